"""Partial batches, the face's side: ``send``, ``async_reset`` and ``recv``.

:class:`PartialBatchCalls` is a base class of :class:`fastvec.AsyncVectorEnv`: it checks a
call's arguments the Gymnasium way, writes the actions of a ``send`` into their envs' rows
and hands the envs to :class:`fastvec._partial.PartialBatches`, which keeps where each env is
and builds the batches ``recv`` returns. Everything else it reads is the face's
(:mod:`fastvec.vector_env`, declared below), which keeps the call state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from gymnasium.error import AlreadyPendingCallError, NoAsyncCallError

from fastvec import _arguments as A
from fastvec import _messages as M
from fastvec._partial import PartialBatches
from fastvec._segment import SegmentPlan
from fastvec.errors import invalid_actions

__all__ = ["PartialBatchCalls"]


class PartialBatchCalls:
    """EnvPool's ``send``/``recv`` (and ``async_reset``) behind Gymnasium's API; the face's
    attributes and methods it uses are declared here and set by
    :class:`fastvec.AsyncVectorEnv`."""

    num_envs: int
    batch_size: int
    _partial: PartialBatches
    _plan: SegmentPlan

    if TYPE_CHECKING:  # the face's: its checks and its choice of observation slot
        def _assert_is_running(self) -> None: ...

        def _assert_not_pending(self, method: str, end: str = ".") -> None: ...

        def _assert_no_call(self, method: str) -> None: ...

        def _choose_slot(self) -> int: ...

    def send(self, actions: Any, env_ids: Any = None) -> None:
        """Send one action to each env of ``env_ids`` and return at once (:meth:`recv`
        collects the results).

        Parameters
        ----------
        actions
            A batch of ``len(env_ids)`` actions, in the order of ``env_ids``.
        env_ids
            The envs to step (ints). Default: the envs of the last :meth:`recv` (every env
            if there was none since the last ``reset``/``step``), which makes
            ``envs.send(policy(obs), info["env_id"])`` and ``envs.send(policy(obs))`` the same.

        An env that was sent and not yet received (in flight), an unknown or repeated env id
        and an action batch of the wrong size raise here, before any worker sees the batch.
        """
        self._assert_is_running()
        self._assert_no_call("send")
        self._partial.call_begins()
        try:
            self._send(actions, env_ids)
        except BaseException:
            self._partial.call_failed()
            raise

    def _send(self, actions: Any, env_ids: Any) -> None:
        partial = self._partial
        ids = partial.env_ids(env_ids)
        busy = partial.busy(ids)
        if busy:
            raise AlreadyPendingCallError(
                f"Calling `send` for envs {busy}, which are still in flight (sent and not yet "
                "returned by `recv`).", "recv")
        layout = self._plan.actions
        request: Callable[[list[int]], M.Request] | None = None
        if layout is None:  # pickled, as in step_async
            action_of = dict(zip(ids, partial.split_actions(actions, ids), strict=True))

            def request(group: list[int]) -> M.Request:
                return M.Step([action_of[i] for i in group])

            command = M.Command.REQUEST
        else:  # the batch straight into its envs' rows, as step_async writes a whole one
            try:
                layout.write_rows(actions, ids)
            except ValueError as exc:
                partial.split_actions(actions, ids)  # Gymnasium's refusal, or a wrong count
                raise invalid_actions(str(exc), ValueError) from None
            command = M.Command.STEP
        slot = partial.slot if partial.outstanding else self._choose_slot()
        partial.send(command, ids, slot, request)

    def async_reset(self, seed: int | list[int | None] | None = None,
                    options: dict[str, Any] | None = None, env_ids: Any = None) -> None:
        """Start a reset of every env (or of ``env_ids``) and return at once; :meth:`recv`
        returns the envs as they finish (reward 0, both flags False, the reset's infos).

        ``seed`` and ``options`` are as for :meth:`reset` (no ``reset_mask``); a list of
        seeds has one per env of the vector env, whichever envs are reset. With ``env_ids``
        (ints, no repeats) only those envs are reset and the others may be in flight: the
        way to reset finished envs in a partial batch in ``Disabled`` autoreset mode. An
        env of ``env_ids`` still in flight raises ``AlreadyPendingCallError``; without
        ``env_ids`` no env may be in flight.
        """
        self._assert_is_running()
        self._partial.call_begins()
        try:
            self._async_reset(seed, options, env_ids)
        except BaseException:
            self._partial.call_failed()
            raise

    def _async_reset(self, seed: int | list[int | None] | None,
                     options: dict[str, Any] | None, env_ids: Any) -> None:
        seeds = A.seeds(seed, self.num_envs)
        if options is not None and "reset_mask" in options:
            raise ValueError("`async_reset` resets every env (or `env_ids`): "
                             "`options['reset_mask']` is for `reset`.")
        if env_ids is None:
            self._assert_not_pending("async_reset")
            ids = list(range(self.num_envs))
        else:
            self._assert_no_call("async_reset")
            ids = self._partial.env_ids(env_ids)
            busy = self._partial.busy(ids)
            if busy:
                raise AlreadyPendingCallError(
                    f"Calling `async_reset` for envs {busy}, which are still in flight (sent "
                    "and not yet returned by `recv`).", "recv")

        def request(group: list[int]) -> M.Request:
            return M.Reset([seeds[i] for i in group], options, None)

        slot = self._partial.slot if self._partial.outstanding else self._choose_slot()
        self._partial.send(M.Command.REQUEST, ids, slot, request, reset=True)

    def recv(self, timeout: float | None = None
             ) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """The results of the first ``batch_size`` envs to finish since they were sent.

        Returns ``(observations, rewards, terminations, truncations, infos)`` over those
        envs' rows, with ``infos["env_id"]`` (an int array) naming the env of each row and
        the infos batched the Gymnasium way over the rows. Fewer rows come back only when
        fewer than ``batch_size`` envs are outstanding. The rows of a partial batch are not
        contiguous in the segment, so the observations are always copies (``copy=False``
        does not make views here).

        A sub-env that raised is logged and raised here (naming its env id); the other
        finished envs stay for the next ``recv``. On ``multiprocessing.TimeoutError`` (after
        ``timeout`` seconds) nothing is taken: the envs stay in flight. With
        ``restart_workers=True`` the envs of a replaced worker come back truncated, reward 0,
        with info ``worker_restarted``.
        """
        self._assert_is_running()
        self._assert_no_call("recv")
        if not self._partial.outstanding:
            raise NoAsyncCallError(
                "Calling `recv` without any env sent by `send` or `async_reset`.", "recv")
        obs, rewards, terminations, truncations, infos = self._partial.recv(
            self.batch_size, timeout)
        return obs, rewards, terminations, truncations, infos
