"""Calls to the sub-environments' methods and attributes: ``call``, ``get_attr``, ``set_attr``,
``render`` and the space check of the start.

:class:`EnvCalls` is a base class of :class:`fastvec.AsyncVectorEnv`: it sends each worker a
request for its group (or for some of its envs) and gathers one result per env. Everything it
reads is the face's (:mod:`fastvec.vector_env`, declared below), and so is the call state:
the face's ``_call_sent`` and ``_call_replies`` start and end a pending call, so that
:class:`~fastvec.vector_env.AsyncState` changes only there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from gymnasium import Space

from fastvec import _arguments as A
from fastvec import _messages as M
from fastvec._pool import WorkerPool
from fastvec._remote_errors import EnvError

__all__ = ["EnvCalls"]


class EnvCalls:
    """Gymnasium's ``call``, ``call_async``, ``call_wait``, ``get_attr``, ``set_attr`` and
    ``render``, over the face's pool; the face's attributes and methods it uses are declared
    here and set by :class:`fastvec.AsyncVectorEnv`."""

    num_envs: int
    observation_mode: str | tuple[Space[Any], Space[Any]]
    single_observation_space: Space[Any]
    single_action_space: Space[Any]
    _pool: WorkerPool
    _groups: list[range]

    if TYPE_CHECKING:  # the face's: its checks, its waits and the call state
        def _assert_is_running(self) -> None: ...

        def _assert_not_pending(self, method: str, end: str = ".") -> None: ...

        def _wait(self, timeout: float | None, name: str) -> list[M.Reply | None]: ...

        def _raise_errors(self, errors: list[EnvError]) -> None: ...

        def _call_sent(self, ids: list[int] | None) -> None: ...

        def _call_replies(self, timeout: float | None
                          ) -> tuple[list[M.Reply | None], list[int] | None]: ...

    def call(self, name: str | Callable[..., Any], *args: Any,
             env_ids: Sequence[int] | None = None, **kwargs: Any) -> tuple[Any, ...]:
        """Call ``name`` (a method, or read an attribute) on every sub-environment.

        fastvec's additions: ``env_ids`` (a sequence of env indices) runs the call on those
        envs only and returns their results in that order; a callable ``name`` runs
        ``name(env, *args, **kwargs)`` in the worker on each env (it must pickle).
        """
        self.call_async(name, *args, env_ids=env_ids, **kwargs)
        return self.call_wait()

    def render(self) -> tuple[Any, ...] | None:
        """The rendered frame of every sub-environment."""
        return self.call("render")

    def call_async(self, name: str | Callable[..., Any], *args: Any,
                   env_ids: Sequence[int] | None = None, **kwargs: Any) -> None:
        """Send ``call(name, *args, **kwargs)`` to every sub-environment (or to ``env_ids``)."""
        self._assert_is_running()
        ids = A.call_env_ids(env_ids, self.num_envs)
        self._assert_not_pending("call_async")
        if ids is None:
            requests = [M.Call(name, args, kwargs)] * len(self._groups)
        else:
            requests = [M.Call(name, args, kwargs, group)
                        for group in self._by_group(ids)]
        self._pool.ring(M.Command.REQUEST, requests)
        self._call_sent(ids)

    def call_wait(self, timeout: float | None = None) -> tuple[Any, ...]:
        """Wait for the call sent by :meth:`call_async`; one result per sub-environment
        (per env of its ``env_ids``, in their order)."""
        self._assert_is_running()
        replies, ids = self._call_replies(timeout)
        return self._in_order(self._gather_results(replies), ids)

    def _by_group(self, ids: list[int]) -> list[list[int]]:
        """``ids`` split by worker group, ascending in each (empty for a group with none)."""
        chosen = set(ids)
        return [[i for i in group if i in chosen] for group in self._groups]

    @staticmethod
    def _in_order(results: tuple[Any, ...], ids: list[int] | None) -> tuple[Any, ...]:
        """Results gathered in ascending env order, put in the order of ``ids``."""
        if ids is None:
            return results
        by_env = dict(zip(sorted(ids), results, strict=True))
        return tuple(by_env[i] for i in ids)

    def _gather_results(self, replies: Sequence[M.Reply | None]) -> tuple[Any, ...]:
        """One result per env, in env order; the envs' errors are raised."""
        results: list[Any] = []
        errors: list[EnvError] = []
        for reply in replies:
            assert reply is not None and reply.results is not None, "a request always answers"
            results.extend(reply.results)
            errors.extend(reply.errors)
        self._raise_errors(errors)
        return tuple(results)

    def get_attr(self, name: str, *, env_ids: Sequence[int] | None = None) -> tuple[Any, ...]:
        """The attribute ``name`` of every sub-environment (or of those in ``env_ids``, in
        that order)."""
        return self.call(name, env_ids=env_ids)

    def set_attr(self, name: str, values: list[Any] | tuple[Any, ...] | object, *,
                 env_ids: Sequence[int] | None = None) -> None:
        """Set ``name`` on every sub-environment (one value each, or one for all); with
        ``env_ids``, on those envs only (one value each, in their order, or one for all)."""
        self._assert_is_running()
        ids = A.call_env_ids(env_ids, self.num_envs)
        count = self.num_envs if ids is None else len(ids)
        if not isinstance(values, (list, tuple)):
            values = [values for _ in range(count)]
        if len(values) != count:
            raise ValueError(
                "Values must be a list or tuple with length equal to the number of "
                f"environments. Got `{len(values)}` values for {count} environments."
            )
        self._assert_not_pending("set_attr")
        if ids is None:
            requests = [M.SetAttr(name, list(values[g.start:g.stop])) for g in self._groups]
        else:
            value_of = dict(zip(ids, values, strict=True))
            requests = [M.SetAttr(name, [value_of[i] for i in group], group)
                        for group in self._by_group(ids)]
        self._pool.ring(M.Command.REQUEST, requests)
        self._gather_results(self._wait(None, "set_attr"))

    def _check_spaces(self) -> None:
        self._assert_is_running()
        request = M.CheckSpaces(self.observation_mode, self.single_observation_space,
                                self.single_action_space)
        self._pool.ring(M.Command.REQUEST, [request] * len(self._groups))
        replies = self._pool.wait_starting(
            "check_spaces", "answering the space check (reading its envs' spaces)")
        results = self._gather_results(replies)
        same_observation_spaces, same_action_spaces = zip(*results, strict=True)
        if not all(same_observation_spaces):
            if self.observation_mode == "same":
                raise RuntimeError(
                    "AsyncVectorEnv(..., observation_mode='same') however some of the "
                    "sub-environments observation spaces are not equivalent. If this is "
                    "intentional, use `observation_mode='different'` instead."
                )
            raise RuntimeError(
                "AsyncVectorEnv(..., observation_mode='different' or custom space) however the "
                "sub-environment's observation spaces do not share a common shape and dtype."
            )
        if not all(same_action_spaces):
            raise RuntimeError(
                f"Some environments have an action space different from "
                f"`{self.single_action_space}`. In order to batch actions, the action spaces "
                "from all environments must be equal."
            )
