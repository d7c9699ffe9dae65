"""Partial batches: the face's record of the envs in flight, over the pool's partial entries.

:class:`PartialBatches` belongs to one :class:`fastvec.AsyncVectorEnv` (which alone calls
it) and keeps, per env, where it is: *in flight* (sent, its done mark not seen yet),
*awaiting its reply* (done, with an info, error or pipe observation still in the pipe),
*ready* (everything in, in the FIFO of finished envs :meth:`recv` returns from; an env whose
SAME_STEP episode end is in its rows, ``_finals.py``, is also *final*) or idle (returned to
the caller). Envs of a worker that was replaced are *restarted*: reported
truncated with info ``worker_restarted``, at once if they were outstanding, else on their
next send.
"""

from __future__ import annotations

import multiprocessing
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from gymnasium import Space, spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space, concatenate, create_empty_array, iterate

from fastvec import _arguments as A
from fastvec import _messages as M
from fastvec import _segment as S
from fastvec._remote_errors import EnvError, raise_logged
from fastvec._waiting import WAIT_SLICE
from fastvec.errors import invalid_actions

if TYPE_CHECKING:
    from fastvec._pool import WorkerPool
    from fastvec.layout import Layout

__all__ = ["PartialBatches"]

# While a done env's reply is still in its pipe, the pipes are polled at least this often
# (the worker also wakes the parent before and after sending a partial entry's reply).
REPLY_POLL = 0.001


class _Rows:
    """Gymnasium's info batching over the rows of one partial batch (not all the envs)."""

    _add_info = VectorEnv._add_info

    def __init__(self, num_rows: int) -> None:
        self.num_envs = num_rows


class PartialBatches:
    """The envs sent with ``send``/``async_reset`` and not yet returned by ``recv``."""

    def __init__(self, pool: WorkerPool, single_observation_space: Space[Any],
                 single_action_space: Space[Any], autoreset_mode: AutoresetMode,
                 restart: bool) -> None:
        self.pool = pool
        self.num_envs = n = pool.plan.num_envs
        self.single_observation_space = single_observation_space
        self.single_action_space = single_action_space
        self.same_step = autoreset_mode is AutoresetMode.SAME_STEP
        self.restart = restart
        # the envs in flight, oldest send first: envs found done in one scan come back in
        # this order (a worker steps its queue in order, so it is theirs)
        self.in_flight: dict[int, None] = {}
        self.awaiting: set[int] = set()
        self.ready: deque[int] = deque()
        self.infos: dict[int, dict[str, Any]] = {}
        self.errors: dict[int, EnvError] = {}
        self.finals: set[int] = set()
        self.pipe_obs: list[Any] = [None] * n
        # outstanding envs of a replaced worker, and idle ones (reported on their next send)
        self.restarted: dict[int, dict[str, Any]] = {}
        self.stale: dict[int, tuple[dict[str, Any], Any]] = {}
        self.slot = 0  # the observation slot every outstanding env writes
        self.last_ids: list[int] | None = None  # the envs of the last recv
        self._action_spaces: dict[int, Space[Any]] = {}  # batched action spaces by size
        # outstanding envs sent by async_reset: a restart reports them reset, not truncated
        self.resetting: set[int] = set()

    # -- state -----------------------------------------------------------------------------
    @property
    def outstanding(self) -> int:
        """Envs sent and not yet returned by :meth:`recv` (nor failed)."""
        return len(self.in_flight) + len(self.awaiting) + len(self.ready)

    def busy(self, env_ids: Sequence[int]) -> list[int]:
        """Those of ``env_ids`` that are outstanding."""
        ready = set(self.ready) | self.awaiting
        return [i for i in env_ids if i in self.in_flight or i in ready]

    def env_ids(self, env_ids: Any) -> list[int]:
        """``env_ids`` checked (ints in range, no repeats); None: the envs of the last recv,
        or every env if there was none."""
        return A.send_env_ids(env_ids, self.num_envs, self.last_ids)

    # -- send ------------------------------------------------------------------------------
    def call_begins(self) -> None:
        """A ``send`` or ``async_reset`` begins: the caller's computing stops here (its checks
        and writing the actions are the pool's own time; :meth:`send` ends the call)."""
        self.pool.parent_time.enter()

    def call_failed(self) -> None:
        """A ``send`` or ``async_reset`` raised: the call ends here, with whatever was in
        flight before it still in flight."""
        self.pool.parent_time.leave(bool(self.in_flight or self.awaiting))

    def split_actions(self, actions: Any, ids: list[int]) -> list[Any]:
        """One action per env of ``ids``, split by Gymnasium's ``iterate``."""
        space = self._action_spaces.get(len(ids))
        if space is None:  # batch_space deep-copies the space (and its rng): once per size
            space = self._action_spaces[len(ids)] = batch_space(self.single_action_space,
                                                                len(ids))
        try:
            per_env = list(iterate(space, actions))
        except Exception as exc:
            raise invalid_actions(f"actions: {exc}", type(exc)) from exc
        if len(per_env) != len(ids):
            raise invalid_actions(
                f"actions: expected one action for each of the {len(ids)} envs of `env_ids`, "
                f"got {len(per_env)}", ValueError)
        return per_env

    def send(self, command: M.Command, ids: list[int], slot: int,
             request: Callable[[list[int]], M.Request] | None, reset: bool = False) -> None:
        """Submit ``ids`` (checked, idle) into observation ``slot`` (kept while any env is
        outstanding); ``request(group)``: the request record of one worker's envs, for a
        command that needs one. Stale envs of a replaced worker are not stepped: they are
        ready at once, reported restarted (a reset resets them)."""
        if not self.outstanding:
            self.slot = slot
        if reset:
            for i in ids:
                self.stale.pop(i, None)
            self.resetting.update(ids)
        else:
            self.resetting.difference_update(ids)
        stale = [i for i in ids if i in self.stale]
        for i in stale:
            info, obs = self.stale.pop(i)
            self.restarted[i] = info
            self._put_observation(i, obs)
            self.ready.append(i)
        stepped = [i for i in ids if i not in stale] if stale else ids
        by_worker = self.pool.split(stepped)
        requests = (None if request is None
                    else {w: request(group) for w, group in by_worker.items()})
        self.pool.submit(command, by_worker, requests, self.slot)
        self.in_flight.update(dict.fromkeys(stepped))

    def _put_observation(self, i: int, obs: Any) -> None:
        layout = self._layout()
        if layout is None:
            self.pipe_obs[i] = obs
        else:
            layout.write_row(obs, i)

    def _layout(self) -> Layout | None:
        slots = self.pool.plan.observation_slots
        return slots[self.slot] if slots else None

    # -- recv ------------------------------------------------------------------------------
    def recv(self, batch_size: int, timeout: float | None) -> tuple[Any, ...]:
        """The first ``batch_size`` envs to finish (fewer if fewer are outstanding)."""
        self.pool.parent_time.enter()
        try:
            return self._recv(batch_size, timeout)
        finally:  # with envs still in flight, the caller computes while they step
            self.pool.parent_time.leave(bool(self.in_flight or self.awaiting))

    def _recv(self, batch_size: int, timeout: float | None) -> tuple[Any, ...]:
        want = min(batch_size, self.outstanding)
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        next_check = start + WAIT_SLICE
        while True:
            self.pool.serve_local()  # the parent's group, if it has one, before any wait
            completed = self.pool.completed
            self._collect()
            if len(self.ready) >= want:
                break
            now = time.monotonic()
            if now >= next_check:
                self._check_workers()
                next_check = time.monotonic() + WAIT_SLICE
                continue
            wait = next_check - now
            if deadline is not None:
                if deadline <= now:
                    raise multiprocessing.TimeoutError(
                        f"The call to `recv` has timed out after {timeout} second(s); "
                        f"{want - len(self.ready)} of its {want} envs are still in flight."
                    )
                wait = min(wait, deadline - now)
            if self.awaiting:
                wait = min(wait, REPLY_POLL)
            # each env still needed completes at least once more (an env awaiting its reply
            # counts again when the reply is sent)
            self.pool.sleep(completed, wait, want - len(self.ready))
        ids = [self.ready.popleft() for _ in range(want)]
        self.last_ids = ids
        return self._batch(ids)

    def drain(self, timeout: float | None) -> None:
        """Wait until no env is in flight or awaiting its reply, then forget every
        outstanding env (``close``); raises ``multiprocessing.TimeoutError`` past
        ``timeout``."""
        self.pool.parent_time.enter()  # the pool's own time to the end (close follows)
        deadline = None if timeout is None else time.monotonic() + timeout
        next_check = time.monotonic() + WAIT_SLICE
        while self.in_flight or self.awaiting:
            self.pool.serve_local()
            completed = self.pool.completed
            self._collect(raise_errors=False)
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise multiprocessing.TimeoutError("envs still in flight at close")
            if now >= next_check:
                self.pool.check_partial(False)
                next_check = now + WAIT_SLICE
            self.pool.sleep(completed, REPLY_POLL if self.awaiting else WAIT_SLICE / 5)
        self.forget()

    def forget(self) -> None:
        self.in_flight.clear()
        self.awaiting.clear()
        self.ready.clear()
        self.infos.clear()
        self.errors.clear()
        self.finals.clear()
        self.restarted.clear()
        self.resetting.clear()

    def _collect(self, raise_errors: bool = True) -> None:
        """Move the envs whose done marks are set (and replies in) to the ready FIFO; raise
        the errors of the failed ones (the others stay ready)."""
        if self.in_flight:
            for i, has_reply in self.pool.finished(list(self.in_flight)):
                del self.in_flight[i]
                if has_reply == S.REPLY_PIPE:
                    self.awaiting.add(i)
                else:
                    if has_reply == S.REPLY_FINAL:
                        self.finals.add(i)
                    self.ready.append(i)
        if self.awaiting:
            workers = {self.pool.worker_of(i) for i in self.awaiting}
            for reply in self.pool.replies(sorted(workers), self.restart):
                self._absorb(reply)
            self._check_lost()
        failed = [i for i in self.ready if i in self.errors]
        if failed and raise_errors:
            self.ready = deque(i for i in self.ready if i not in self.errors)
            errors = [self.errors.pop(i) for i in failed]
            for i in failed:
                self.infos.pop(i, None)
            try:
                raise_logged(errors)
            except Exception as exc:
                if hasattr(exc, "add_note"):  # Python 3.11+
                    exc.add_note(f"raised by env {errors[-1].env} in a partial batch; it is "
                                 "no longer in flight (the other finished envs stay for the "
                                 "next `recv`)")
                raise

    def _absorb(self, reply: M.Reply) -> None:
        envs: set[int] = set()
        for i, info in reply.infos:
            self.infos[i] = M.as_dict(info)
            envs.add(i)
        for error in reply.errors:
            self.errors[error.env] = error
            envs.add(error.env)
        for i, obs in reply.observations:
            self.pipe_obs[i] = obs
            envs.add(i)
        for i in sorted(envs):
            if i in self.awaiting:
                self.awaiting.discard(i)
                self.ready.append(i)
            elif i in self.in_flight:
                # a later entry's reply, read with the one awaited: its envs were marked done
                # before it was sent, so they are finished (their marks are not scanned again)
                del self.in_flight[i]
                self.ready.append(i)

    def _check_workers(self) -> None:
        lost = self.pool.check_partial(self.restart)
        if lost:
            self._restarted(lost)

    def _check_lost(self) -> None:
        """A worker found dead while its replies were read (``restart_workers``)."""
        if self.pool.lost:
            self._check_workers()

    def _restarted(self, lost: list[int]) -> None:
        """Workers ``lost`` were replaced: their outstanding envs are ready, restarted; their
        idle envs will be on their next send."""
        replies = dict(self.pool.replaced)
        self.pool.replaced = []
        layout = self._layout()
        for w in lost:
            reply = replies.get(w, M.Reply())
            reset_infos = dict(reply.infos)
            for error in reply.errors:
                self.errors[error.env] = error
            pipe_obs = dict(reply.observations)
            outstanding = set(self.ready)
            for i in self.pool.groups[w]:
                # the fresh reset's info where a reset's info is returned: SAME_STEP's step,
                # or the reset this env was sent for
                kept = self.same_step or i in self.resetting
                info = {**(reset_infos.get(i, {}) if kept else {}), "worker_restarted": True}
                self.infos.pop(i, None)
                self.finals.discard(i)
                if i in pipe_obs:
                    self.pipe_obs[i] = pipe_obs[i]
                if i in self.in_flight or i in self.awaiting or i in outstanding:
                    self.in_flight.pop(i, None)
                    self.awaiting.discard(i)
                    self.restarted[i] = info
                    if i not in outstanding:
                        self.ready.append(i)
                else:
                    obs = (self.pipe_obs[i] if layout is None
                           else layout.read_row(i, copy=True))
                    self.stale[i] = (info, obs)

    # -- the batch -------------------------------------------------------------------------
    def _batch(self, ids: list[int]) -> tuple[Any, ...]:
        index = np.array(ids, dtype=np.int64)  # one conversion for every fancy index
        all_rewards, all_terminations, all_truncations = self.pool.results
        rewards, terminations = all_rewards[index], all_terminations[index]
        truncations = all_truncations[index]
        infos: dict[str, Any] = {}
        info_rows = self.pool.info_rows if self.pool.info_rows.learned else None
        if not (self.infos or self.restarted or self.resetting or self.finals):
            # no env of the batch has an info (nor can have one), or all are in their rows
            # with one schema: the batch at once
            batched = infos if info_rows is None else info_rows.read_batch(ids)
            if batched is not None:
                batched["env_id"] = index
                return (self._observations(ids, index), rewards, terminations, truncations,
                        batched)
        rows = _Rows(len(ids))
        for k, i in enumerate(ids):
            info = self.infos.pop(i, None)
            if i in self.finals:  # its episode end, in its rows
                self.finals.discard(i)
                info = self.pool.final_rows.info(i)
            elif info is None and info_rows is not None:  # a few scalars, in the env's row
                info = info_rows.read(i)
            restarted = self.restarted.pop(i, None)
            if restarted is not None:  # a reset it was sent for is not cut short
                rewards[k], terminations[k] = 0.0, False
                truncations[k] = i not in self.resetting
                info = restarted
            self.resetting.discard(i)
            if info:
                infos = rows._add_info(infos, info, k)  # type: ignore[misc]
        infos["env_id"] = index
        return self._observations(ids, index), rewards, terminations, truncations, infos

    def _observations(self, ids: list[int], index: np.ndarray) -> Any:
        layout = self._layout()
        space = self.single_observation_space
        if layout is None:
            out: Any = create_empty_array(space, n=len(ids), fn=np.zeros)
            return concatenate(space, [self.pipe_obs[i] for i in ids], out)
        return take_rows(space, layout.read_batch(copy=False), ids, index)


def take_rows(space: Space[Any], batch: Any, ids: list[int], index: np.ndarray) -> Any:
    """Copies of rows ``ids`` (``index``: the same, as an array) of a batch read from the
    segment, shaped as the batch is: arrays fancy-indexed per leaf, Dict and Tuple by part,
    any other space's tuple of rows by row."""
    if isinstance(batch, np.ndarray):
        return batch[index]
    if isinstance(space, spaces.Dict):
        return {key: take_rows(space[key], batch[key], ids, index) for key in space}
    if isinstance(space, spaces.Tuple):
        return tuple(take_rows(part, batch[n], ids, index) for n, part in enumerate(space))
    return tuple(batch[i] for i in ids)
