"""fastvec as a Tianshou vector env: :class:`TianshouVectorEnv`.

Tianshou's collectors drive a :class:`tianshou.env.BaseVectorEnv`: ``len(envs)``,
``reset(env_id=None, **kwargs)`` and ``step(action, id=None)`` over any subset of the envs,
results as stacked arrays with one info dict per env (``info["env_id"]`` after a step), and,
for :class:`tianshou.data.AsyncCollector`, ``wait_num``/``timeout``: a step returns as soon as
``wait_num`` of the envs in flight have finished. Tianshou resets finished envs itself
(``reset(env_id=...)``), so the fastvec env under this adapter runs with autoreset ``Disabled``.

A synchronous step of every env is fastvec's ``step``; a subset, and every asynchronous step,
goes through fastvec's partial batches (``send``/``recv``, and ``async_reset(env_ids=...)`` to
reset finished envs while others are in flight).

Semantics follow Tianshou 2.0's ``SubprocVectorEnv``, which this replaces:

- ``reset(env_id, seed=s)`` gives every env of ``env_id`` the same seed ``s`` (Tianshou passes
  its reset keywords to each env) and seeds their action spaces with it;
- ``action_space`` / ``observation_space`` are lists with one space per env, kept in the
  parent (so ``seed`` and ``Collector(random=True)`` sample reproducibly from them);
- ``get_env_attr``/``set_env_attr`` read and write through the envs' wrappers
  (``get_wrapper_attr``/``set_wrapper_attr``); a method read by ``get_env_attr`` is called
  with no arguments, as fastvec's and Gymnasium's ``get_attr`` do;
- an asynchronous step returns every env found finished, at least ``wait_num`` (or, once
  ``timeout`` seconds have passed, at least one).
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from gymnasium import Env, Space
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import iterate

from fastvec.vector_env import AsyncVectorEnv

try:
    from tianshou.env import BaseVectorEnv
except ImportError as exc:  # pragma: no cover - exercised only without Tianshou
    raise ImportError(
        "fastvec.integrations.tianshou needs Tianshou: pip install 'fastvec[tianshou]'"
    ) from exc

__all__ = ["TianshouVectorEnv"]

# one env's step result: observation, reward, terminated, truncated, info
_Result = tuple[Any, float, bool, bool, dict[str, Any]]


class TianshouVectorEnv(BaseVectorEnv):
    """A fastvec :class:`~fastvec.AsyncVectorEnv` behind Tianshou's ``BaseVectorEnv`` API.

    Parameters
    ----------
    env_fns
        Functions that create the envs (then the fastvec env is made here, with autoreset
        ``Disabled``, ``batch_size=1`` and ``fastvec_kwargs``), or a fastvec
        ``AsyncVectorEnv`` made with ``autoreset_mode=AutoresetMode.DISABLED`` and nothing in
        flight (it is closed with this one).
    wait_num
        Asynchronous stepping (Tianshou's ``AsyncCollector``): a step returns once this many
        of the envs in flight have finished. ``None``: synchronous, unless ``timeout``.
    timeout
        Asynchronous stepping: a step returns the envs finished within ``timeout`` seconds
        (at least one).
    **fastvec_kwargs
        Passed to :class:`fastvec.AsyncVectorEnv` (``num_workers``, ``context``,
        ``copy``, ...) when ``env_fns`` are functions.
    """

    def __init__(self, env_fns: Sequence[Callable[[], Env[Any, Any]]] | AsyncVectorEnv,
                 wait_num: int | None = None, timeout: float | None = None,
                 **fastvec_kwargs: Any) -> None:
        # BaseVectorEnv.__init__ builds one Tianshou worker per env: not called
        if isinstance(env_fns, AsyncVectorEnv):
            if fastvec_kwargs:
                raise TypeError("fastvec options go to the fastvec env you pass, not here: "
                                f"got {sorted(fastvec_kwargs)}")
            venv = env_fns
            if venv.autoreset_mode is not AutoresetMode.DISABLED:
                raise ValueError(
                    "Tianshou resets finished envs itself: make the fastvec env with "
                    "autoreset_mode=AutoresetMode.DISABLED (it has "
                    f"{venv.autoreset_mode.value!r})")
        else:
            for name in ("autoreset_mode",):
                if name in fastvec_kwargs:
                    raise TypeError(f"{name} is set by TianshouVectorEnv (Disabled)")
            fastvec_kwargs.setdefault("batch_size", 1)
            venv = AsyncVectorEnv(env_fns, autoreset_mode=AutoresetMode.DISABLED,
                                  **fastvec_kwargs)
        self._venv = venv
        self.env_num = n = venv.num_envs
        self.wait_num = wait_num or n
        if not 1 <= self.wait_num <= n:
            venv.close()
            raise ValueError(f"wait_num should be in [1, {n}], but got {wait_num}")
        self.timeout = timeout
        if timeout is not None and timeout <= 0:
            venv.close()
            raise ValueError(f"timeout is {timeout}, it should be positive if provided!")
        self.is_async = self.wait_num != n or timeout is not None
        # Tianshou's names: envs sent and not yet returned by a step (AsyncCollector reads
        # waiting_id), and those that may be sent
        self.waiting_id: list[int] = []
        self.ready_id: list[int] = list(range(n))
        self.is_closed = False
        # envs whose step results came from fastvec and have not been returned yet
        self._finished: dict[int, _Result] = {}
        # envs reset with async_reset whose results have not come yet, and those that have
        self._resetting: set[int] = set()
        self._reset_results: dict[int, tuple[Any, dict[str, Any]]] = {}
        # one space per env, kept here: seeded by seed() and reset(seed=...)
        try:
            self._spaces: dict[str, list[Space[Any]]] = {
                key: list(venv.get_attr(key)) for key in ("action_space", "observation_space")}
        except BaseException:
            venv.close()
            raise

    @property
    def fastvec_env(self) -> AsyncVectorEnv:
        """The fastvec env this adapter drives."""
        return self._venv

    # -- attributes ------------------------------------------------------------------------
    def get_env_attr(self, key: str, id: int | Sequence[int] | np.ndarray | None = None
                     ) -> list[Any]:
        """Attribute ``key`` of the envs ``id`` (default: every env), in that order."""
        self._assert_is_not_closed()
        ids = self._ids(id)
        if self.is_async:
            self._assert_id(ids)
        if key in self._spaces:
            return [self._spaces[key][j] for j in ids]
        self._drain()
        return list(self._venv.get_attr(key, env_ids=ids))

    def set_env_attr(self, key: str, value: Any,
                     id: int | Sequence[int] | np.ndarray | None = None) -> None:
        """Set attribute ``key`` to ``value`` on the envs ``id`` (default: every env)."""
        self._assert_is_not_closed()
        ids = self._ids(id)
        if self.is_async:
            self._assert_id(ids)
        self._drain()
        self._venv.set_attr(key, [value] * len(ids), env_ids=list(ids))

    # -- reset -----------------------------------------------------------------------------
    def reset(self, env_id: int | Sequence[int] | np.ndarray | None = None,
              **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
        """Reset the envs ``env_id`` (default: every env) with ``kwargs`` (``seed``,
        ``options``) each; returns their stacked observations and an array of info dicts."""
        self._assert_is_not_closed()
        ids = self._ids(env_id)
        if self.is_async:
            self._assert_id(ids)
        seed = kwargs.pop("seed", None)
        options = kwargs.pop("options", None)
        if kwargs:
            raise TypeError(f"fastvec envs reset with `seed` and `options` only, got "
                            f"{sorted(kwargs)}")
        if seed is not None:
            for j in ids:
                self._spaces["action_space"][j].seed(seed)
        seeds = [seed] * self.env_num
        if list(ids) == list(range(self.env_num)) and not self.waiting_id:
            obs, infos = self._venv.reset(seed=seeds, options=options)
            return _stack_batch(self._venv.observation_space, obs, self.env_num), _objects(
                _unbatch_infos(infos, self.env_num))
        self._venv.async_reset(seed=seeds, options=options, env_ids=ids)
        self._resetting.update(ids)
        while self._resetting:
            self._receive(None)
        results = [self._reset_results.pop(j) for j in ids]
        return _stack([r[0] for r in results]), _objects([r[1] for r in results])

    # -- step ------------------------------------------------------------------------------
    def step(self, action: Any, id: int | Sequence[int] | np.ndarray | None = None
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Step the envs ``id`` (default: every env) with one action each.

        Synchronously, the results are those envs', in the order of ``id``. Asynchronously
        (``wait_num``/``timeout``) the actions are sent and the envs found finished are
        returned (``info["env_id"]`` says which); ``action=None`` only waits for envs sent
        before.
        """
        self._assert_is_not_closed()
        ids = self._ids(id)
        if not self.is_async:
            if action is None:
                raise ValueError("action must be not-None for non-async")
            actions = _as_actions(action, len(ids))
            if list(ids) == list(range(self.env_num)):
                return self._step_all(actions)
            self._venv.send(actions, ids)
            self.waiting_id = list(ids)
            while len(self._finished) < len(ids):
                self._receive(None)
            self.waiting_id = []
            return _results([self._finished.pop(j) for j in ids], list(ids))
        if action is not None:
            self._assert_id(ids)
            self._venv.send(_as_actions(action, len(ids)), ids)
            self.waiting_id.extend(ids)
            sent = set(ids)
            self.ready_id = [j for j in self.ready_id if j not in sent]
        if not self.waiting_id:
            raise RuntimeError("no env is stepping: step(None) waits for envs sent before")
        self._gather(min(self.wait_num, len(self.waiting_id)))
        done = list(self._finished)
        results = [self._finished.pop(j) for j in done]
        finished = set(done)
        self.waiting_id = [j for j in self.waiting_id if j not in finished]
        self.ready_id.extend(done)
        return _results(results, done)

    def _step_all(self, actions: Any
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        # step_async/step_wait: Gymnasium's synchronous step, whatever the batch_size
        self._venv.step_async(actions)
        obs, rewards, terminations, truncations, infos = self._venv.step_wait()
        per_env = _unbatch_infos(infos, self.env_num)
        for j, info in enumerate(per_env):
            info["env_id"] = j
        return (_stack_batch(self._venv.observation_space, obs, self.env_num), rewards,
                terminations, truncations, _objects(per_env))

    def _gather(self, want: int) -> None:
        """Receive until ``want`` envs in flight have finished (once ``timeout`` has
        passed: at least one), then take the others already finished, without waiting."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while len(self._finished) < want:
            if deadline is None or not self._finished:
                self._receive(None)
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._receive(remaining):
                break
        while len(self._finished) < len(self.waiting_id) and self._receive(0.0):
            pass

    def _receive(self, timeout: float | None) -> bool:
        """One fastvec ``recv``: file its rows as step or reset results. False if nothing
        finished within ``timeout``."""
        try:
            obs, rewards, terminations, truncations, infos = self._venv.recv(timeout)
        except multiprocessing.TimeoutError:
            return False
        ids = infos.pop("env_id").tolist()
        rows = _rows(self._venv.observation_space, obs)
        per_env = _unbatch_infos(infos, len(ids))
        for k, j in enumerate(ids):
            if j in self._resetting:
                self._resetting.discard(j)
                self._reset_results[j] = (rows[k], per_env[k])
            else:
                self._finished[j] = (rows[k], float(rewards[k]), bool(terminations[k]),
                                     bool(truncations[k]), per_env[k])
        return True

    def _drain(self) -> None:
        """Wait for every env in flight (their results are kept for the next step): the
        fastvec env takes no synchronous call while envs are in flight."""
        while len(self._finished) < len(self.waiting_id):
            self._receive(None)

    # -- seed, render, close ---------------------------------------------------------------
    def seed(self, seed: int | Sequence[int] | None = None) -> list[list[int] | None]:
        """Seed every env's action space and reset every env with its seed (``None``, an
        int ``s`` for ``s, s + 1, ...``, or one per env), as Tianshou's workers do."""
        self._assert_is_not_closed()
        if self.waiting_id:
            raise RuntimeError(
                f"Environments {self.waiting_id} are still stepping, cannot seed them now.")
        if seed is None:
            seeds: list[int | None] = [None] * self.env_num
        elif isinstance(seed, (int, np.integer)):
            seeds = [int(seed) + i for i in range(self.env_num)]
        else:
            seeds = [None if s is None else int(s) for s in seed]
        for space, s in zip(self._spaces["action_space"], seeds, strict=True):
            space.seed(s)
        self._venv.reset(seed=seeds)
        return [[s] if s is not None else None for s in seeds]

    def render(self, **kwargs: Any) -> list[Any]:
        """Every env's ``render(**kwargs)``."""
        self._assert_is_not_closed()
        if self.is_async and self.waiting_id:
            raise RuntimeError(
                f"Environments {self.waiting_id} are still stepping, cannot render them now.")
        return list(self._venv.call("render", **kwargs))

    def close(self) -> None:
        """Close the envs and the fastvec env (envs in flight are waited for first)."""
        self._assert_is_not_closed()
        try:
            if self.waiting_id:
                self._drain()
        finally:
            self._venv.close()
            self.is_closed = True

    # -- ids -------------------------------------------------------------------------------
    def _ids(self, id: int | Sequence[int] | np.ndarray | None) -> list[int]:
        if id is None:
            return list(range(self.env_num))
        if np.isscalar(id):
            return [int(id)]  # type: ignore[arg-type]
        return [int(j) for j in id]  # type: ignore[union-attr]

    def _assert_id(self, ids: list[int] | np.ndarray) -> None:
        # Tianshou's checks, with its words and type
        waiting, ready = set(self.waiting_id), set(self.ready_id)
        for i in ids:
            if i in waiting:
                raise AssertionError(f"Cannot interact with environment {i} which is "
                                     "stepping now.")
            if i not in ready:
                raise AssertionError(f"Can only interact with ready environments "
                                     f"{self.ready_id}.")

    def _assert_is_not_closed(self) -> None:
        if self.is_closed:
            raise AssertionError(
                f"Methods of {type(self).__name__} cannot be called after close.")


def _as_actions(action: Any, count: int) -> Any:
    """The action batch as numpy (a torch tensor too), of ``count`` actions."""
    if not isinstance(action, (np.ndarray, dict, tuple)):
        action = np.asarray(action)
    if isinstance(action, np.ndarray) and len(action) != count:
        raise ValueError(f"expected {count} actions (one per env id), got {len(action)}")
    return action


def _rows(space: Space[Any], batch: Any) -> list[Any]:
    """Each env's observation out of a batch (numpy rows for a Box)."""
    if isinstance(batch, np.ndarray):
        return list(batch)
    return list(iterate(space, batch))


def _stack(items: list[Any]) -> np.ndarray:
    """Observations stacked as Tianshou stacks them (an object array when shapes differ)."""
    try:
        return np.stack(items)
    except ValueError:
        return np.array(items, dtype=object)


def _stack_batch(space: Space[Any], batch: Any, n: int) -> np.ndarray:
    if isinstance(batch, np.ndarray):
        return batch
    return _stack(_rows(space, batch)[:n])


def _objects(items: list[Any]) -> np.ndarray:
    """A 1-d object array of ``items`` (one info dict per env)."""
    out = np.empty(len(items), dtype=object)
    for k, item in enumerate(items):
        out[k] = item
    return out


def _results(results: list[_Result], ids: list[int]
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    for (*_, info), j in zip(results, ids, strict=True):
        info["env_id"] = j
    obs, rewards, terminations, truncations, infos = zip(*results, strict=True)
    return (_stack(list(obs)), np.array(rewards, dtype=np.float64),
            np.array(terminations, dtype=np.bool_), np.array(truncations, dtype=np.bool_),
            _objects(list(infos)))


def _unbatch_infos(infos: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """Gymnasium-batched infos (values with ``_key`` masks) as one dict per env."""
    out: list[dict[str, Any]] = [{} for _ in range(n)]
    for key, value in infos.items():
        if key.startswith("_") and key[1:] in infos:
            continue
        mask = infos.get(f"_{key}")
        per_env = _unbatch_infos(value, n) if isinstance(value, dict) else value
        for k in range(n):
            if mask is None or mask[k]:
                out[k][key] = per_env[k]
    return out
