"""The worker: runs one contiguous group of sub-environments over an already-bound plan.

It waits on its doorbell in the segment and serves, in order, every entry the parent put in
its command queue since (see :mod:`fastvec._segment`). A step command reads each env's
action from its row of the segment, steps the env (autoreset handled here) and writes
observation, reward and flags back into the env's rows; a partial entry marks each env done
as soon as it is. Anything that is not fixed-size (a non-empty info, an
error, observations when ``shared_memory=False``, every other command's result) goes through
the worker's pipe as one :class:`~fastvec._messages.Reply`, and only then.

:class:`Worker` only needs a buffer laid out by its :class:`~fastvec._segment.SegmentPlan`
and a pipe, so a test can drive it in-process; :func:`fastvec._worker_main.worker_main` is
the process around it: signals, process group, pinning, attaching the segment, building the
envs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from multiprocessing.synchronize import Semaphore
from typing import Any, Protocol

from gymnasium import Env
from gymnasium.spaces.utils import is_space_dtype_shape_equiv
from gymnasium.vector import AutoresetMode

from fastvec import _messages as M
from fastvec import _segment as S
from fastvec._finals import FinalRows
from fastvec._info_rows import InfoRows
from fastvec._remote_errors import NOT_RETURNED, EnvError, NotADictError, capture, env_error
from fastvec._sync import Doorbells
from fastvec._waiting import PARENT_SPIN_LIMIT, WAIT_SLICE, WORKER_SPIN_LIMIT, SpinBudget
from fastvec.layout import Layout, Segment

__all__ = ["Channel", "Worker"]

_FORBIDDEN_CALLS = ("reset", "step", "close", "_setattr", "_check_spaces")


class Channel(Protocol):
    """What a worker needs of its pipe: a ``multiprocessing`` connection in a worker
    process, :class:`fastvec._local.LocalPipe` in the parent's own group."""

    def send_bytes(self, data: bytes) -> None: ...

    def send(self, obj: Any) -> None: ...

    def recv(self) -> Any: ...

    def close(self) -> None: ...


class Worker:
    """Serves the commands of one group of envs, ``start .. start + len(envs) - 1``.

    Parameters
    ----------
    index
        The worker's index (its control line).
    start
        The batch index of the group's first env.
    pipe
        The worker's end of its pipe to the parent.
    plan
        The segment's plan; :meth:`Worker` binds it over ``buffer``.
    buffer
        The segment (or, in a test, any writable buffer the plan's header was written to).
    autoreset_mode, semaphore
        As given to the vector env (``semaphore``: its max_concurrency permits, or None).
    """

    def __init__(self, index: int, start: int, pipe: Channel, plan: S.SegmentPlan,
                 buffer: memoryview, autoreset_mode: AutoresetMode,
                 semaphore: Semaphore | None = None) -> None:
        self.index = index
        self.start = start
        self.pipe = pipe
        self.plan = plan
        self.autoreset_mode = autoreset_mode
        self.semaphore = semaphore
        self.spin = SpinBudget(WORKER_SPIN_LIMIT)
        self.line = plan.worker_line(index)
        self.queue = plan.queue(index)
        self.queue_mask = plan.queue_capacity - 1
        self.ring = plan.env_id(index, 0)  # the ring of env ids (word k at ring + 4 * k)
        self.marks = plan.mark(0)  # env i's completion marks at marks + MARK * i
        self.pending = plan.parent_line + S.PENDING
        self.completed = plan.parent_line + S.COMPLETED
        self.waiting = plan.parent_line + S.WAITING
        self.target = plan.parent_line + S.TARGET
        # the entry being served: its observation slot and, for a partial entry, its env ids
        self.slot = 0
        self.ids: list[int] | None = None
        plan.check_header(buffer)  # before any use: only our parent's segment will do
        self.doorbells = Doorbells(buffer)
        self.segment = Segment(buffer)
        plan.bind(self.segment, buffer)
        self.rewards, self.terminations, self.truncations = plan.result_arrays(buffer)
        # the group's info rows (sized to the last env: the group's size is not known yet)
        self.rows = InfoRows(buffer, plan.info_rows, start, plan.num_envs - start)
        # SAME_STEP's episode ends (see _finals.py); whether the current synchronous entry
        # set an env's HAS_REPLY mark to REPLY_FINAL
        self.finals = FinalRows(plan.final_observations, self.rows)
        self.final_marked = False
        self.envs: list[Env[Any, Any]] = []
        self.autoreset: list[bool] = []
        self.last_obs: list[Any] = []

    # -- lifetime ------------------------------------------------------------------------
    def add_env(self, env: Env[Any, Any]) -> None:
        self.envs.append(env)
        self.autoreset.append(False)
        self.last_obs.append(None)

    def detach(self) -> None:
        """Drop every view into the buffer (the caller then unmaps it)."""
        self.plan.unbind()
        self.rows.release()
        del self.rewards, self.terminations, self.truncations
        self.segment.release()
        self.doorbells.release()

    def close_envs(self) -> list[EnvError]:
        errors = []
        for j, env in enumerate(self.envs):
            try:
                env.close()
            except Exception as exc:
                errors.append(EnvError(self.start + j, capture(exc)))
        self.envs = []
        return errors

    def phase(self, status: int, env: int = 0) -> None:
        """Tell the parent what this worker is doing while it starts (read on a timeout)."""
        self.doorbells.store(self.line + S.STATUS_ENV, env)
        self.doorbells.store(self.line + S.STATUS, status)

    # -- the loop ------------------------------------------------------------------------
    def run(self, seq: int, parent_alive: Callable[[], bool]) -> bool:
        """Serve commands until ``close`` (True) or the parent's death (False).

        ``seq`` is the last command sequence seen; ``parent_alive`` is checked whenever a
        wait slice passes without a command. Every entry published since ``seq`` is served,
        in order.
        """
        doorbells = self.doorbells
        seq_offset = self.line + S.CMD_SEQ
        sleeping = self.line + S.SLEEPING
        spin_word = self.plan.parent_line + S.SPIN
        bell = self.plan.parent_line + S.BELL
        broadcast = doorbells.load(self.plan.parent_line + S.BROADCAST) != 0
        if broadcast:  # more workers than cores: a long spin takes another worker's core
            self.spin = SpinBudget(PARENT_SPIN_LIMIT)
        while True:
            idle_since = time.monotonic()
            spin_until = idle_since + (self.spin.budget() if doorbells.load(spin_word) else 0.0)
            while True:
                spin = max(0.0, spin_until - time.monotonic())
                if not broadcast:
                    # spin first (a wait that ends when the spin does), then say so and sleep:
                    # the parent wakes only a worker whose SLEEPING flag it sees
                    if spin > 0.0 and doorbells.wait_while_equal(seq_offset, seq, spin, spin,
                                                                 True):
                        break
                    doorbells.add(sleeping, 1)  # an add: see S.SLEEPING
                    try:
                        if doorbells.wait_while_equal(seq_offset, seq, WAIT_SLICE * 10, 0.0):
                            break
                    finally:
                        doorbells.store(sleeping, 0)
                else:
                    rung = doorbells.load(bell)  # before our queue: a later ring changes it
                    if doorbells.load(seq_offset) != seq:
                        break
                    if doorbells.wait_while_equal(bell, rung, WAIT_SLICE * 10, spin, True):
                        continue  # rung: for us, or for another worker
                if not parent_alive():
                    return False
            self.spin.record(time.monotonic() - idle_since)
            published = doorbells.load(seq_offset)
            while seq != published:
                seq = (seq + 1) & 0xFFFFFFFF
                if self.serve(seq):
                    return True

    def serve(self, seq: int) -> bool:
        """Carry out queue entry ``seq``; True if it was ``close``."""
        doorbells = self.doorbells
        entry = self.queue + S.ENTRY * (seq & self.queue_mask)
        command = doorbells.load(entry + S.E_COMMAND)
        self.slot = doorbells.load(entry + S.E_SLOT)
        partial = command & S.PARTIAL != 0
        ids: list[int] | None = None
        if partial:
            first, ring, mask = doorbells.load(entry + S.E_FIRST), self.ring, self.queue_mask
            ids = [doorbells.load(ring + 4 * ((first + k) & mask))
                   for k in range(doorbells.load(entry + S.E_COUNT))]
        self.ids = ids
        request: M.Request | None = None
        if command & ~S.PARTIAL == M.Command.STEP:
            reply = self.step_group()
        else:
            request = self.pipe.recv()
            reply = self.handle(request)
        if partial:
            doorbells.store(self.line + S.DONE_SEQ, seq)
        else:
            doorbells.store(self.line + S.INFO_PENDING,
                            (S.REPLY_PIPE if reply else 0)
                            | (S.REPLY_FINAL if self.final_marked else 0))
            if doorbells.add(self.pending, -1) == 0:
                doorbells.wake(self.pending)
            doorbells.store(self.line + S.DONE_SEQ, seq)
        if reply and not partial:  # a partial entry's envs sent theirs as each finished
            # sent after the counter so a large reply can never deadlock the parent's wait
            self.pipe.send_bytes(self.pickle_reply(reply))
        return isinstance(request, M.Close)

    def pickle_reply(self, reply: M.Reply) -> bytes:
        """``reply`` pickled for the parent; the infos it carries teach this side their
        envs' schemas, as they will teach the parent's when it unpickles them."""
        return M.picklable_reply(reply, self.start, self.rows.learn)

    def signal(self) -> None:
        """Count one more completion and wake the parent if it sleeps on the count and the
        count reached the one it waits for."""
        self.doorbells.count_and_wake(self.completed, self.waiting, self.target)

    def mark_done(self, env: int, has_reply: int) -> None:
        """Env ``env``'s results are in the segment (a partial entry): mark it (``has_reply``:
        0, S.REPLY_PIPE or S.REPLY_FINAL), count it and wake the parent if it sleeps on the
        count."""
        doorbells, mark = self.doorbells, self.marks + S.MARK * env
        doorbells.store(mark + S.HAS_REPLY, has_reply)
        doorbells.add(mark + S.DONE, 1)
        self.signal()

    def finish_env(self, env: int, reply: M.Reply | None, final: bool = False) -> None:
        """A partial entry's env ``env`` is done: mark it, and send its reply (its info, its
        error or its observation by pipe), if it has one, now rather than with the rest of
        the entry, so that the parent can return it at once (``final``: its episode end is
        in its rows instead)."""
        if not _entries(reply):
            self.mark_done(env, S.REPLY_FINAL if final else 0)
            return
        data = self.pickle_reply(reply)  # type: ignore[arg-type]
        # marked before it is sent, so that a reply larger than the pipe's buffer cannot
        # block this worker while the parent waits for the mark; counted again once sent,
        # which wakes a parent that saw the mark before the bytes arrived
        self.mark_done(env, S.REPLY_PIPE)
        self.pipe.send_bytes(data)
        self.signal()

    # -- commands ------------------------------------------------------------------------
    def observation_slot(self) -> Layout | None:
        """The observation slot the current command writes (None: observations go by pipe)."""
        slots = self.plan.observation_slots
        return slots[self.slot] if slots else None

    def env_indices(self) -> list[int] | range:
        """The batch indices of the current entry's envs (the whole group unless partial)."""
        if self.ids is not None:
            return self.ids
        return range(self.start, self.start + len(self.envs))

    def step_group(self, pickled_actions: list[Any] | None = None) -> M.Reply | None:
        """Step the current entry's envs (the whole group unless partial); ``pickled_actions``:
        their actions, in that order, when the action space has no layout (else each env's
        is read from its row). A partial entry marks each env done as soon as it is."""
        # the per-step hot path: locals hoisted, rows read and written by the layouts'
        # bound kernels (a layout's converting write only for a value they refuse)
        read_action = self.plan.actions.row_reader() if self.plan.actions is not None else None
        pickled: Any = pickled_actions if pickled_actions is not None else []
        observations = self.observation_slot()
        write_obs = observations.row_writer() if observations is not None else None
        rewards, terminations, truncations = self.rewards, self.terminations, self.truncations
        semaphore = self.semaphore
        doorbells, permit = self.doorbells, self.line + S.PERMIT
        next_step = self.autoreset_mode is AutoresetMode.NEXT_STEP
        same_step = self.autoreset_mode is AutoresetMode.SAME_STEP
        autoreset = self.autoreset
        last_obs = self.last_obs
        rows = self.rows
        finals = self.finals if same_step and self.finals.enabled else None
        self.final_marked = False
        start, ids = self.start, self.ids
        partial = ids is not None
        order: Any = enumerate(self.envs)  # (group index, env)
        if ids is not None:
            order = [(i - start, self.envs[i - start]) for i in ids]
            if pickled_actions is not None:  # in entry order: index them by group index
                pickled = dict(zip([i - start for i in ids], pickled_actions, strict=True))
        reply: M.Reply | None = None
        for j, env in order:
            i = start + j
            # what the env returned once it has (errors after that are in storing it)
            result = NOT_RETURNED
            final = False  # the episode's end is in the env's rows (finals)
            try:
                if semaphore is not None:
                    semaphore.acquire()
                    doorbells.store(permit, 1)
                try:
                    if next_step and autoreset[j]:
                        obs, info = env.reset()
                        reward, terminated, truncated = 0.0, False, False
                    else:
                        result = env.step(pickled[j] if read_action is None
                                          else read_action(i))
                        obs, reward, terminated, truncated, info = result
                        if same_step and (terminated or truncated):
                            final_obs, final_info = obs, info
                            result = NOT_RETURNED
                            obs, reset_info = env.reset()
                            if finals is not None and finals.put(i, final_obs, final_info,
                                                                 reset_info):
                                final, info = True, {}
                            else:
                                info = {"final_info": final_info, "final_obs": final_obs,
                                        **reset_info}
                finally:
                    if semaphore is not None:
                        doorbells.store(permit, 0)
                        semaphore.release()
                if next_step:
                    autoreset[j] = bool(terminated or truncated)
                # kept for a masked reset, which rewrites the envs it skips into its slot
                last_obs[j] = obs
                if write_obs is not None:
                    if not write_obs(obs, i):
                        observations.write_row(obs, i)  # type: ignore[union-attr]
                elif reply is None:
                    reply = M.Reply(observations=[(i, obs)])
                else:
                    reply.observations.append((i, obs))
                rewards[i] = reward
                terminations[i] = terminated
                truncations[i] = truncated
                if type(info) is not dict and not isinstance(info, Mapping):
                    raise NotADictError(info)
            except Exception as exc:
                if rows.learned:
                    rows.clear(i)
                if reply is None:
                    reply = M.Reply()
                reply.errors.append(env_error(exc, i, result))
            else:
                if final:
                    if not partial:  # the parent reads the group's marks (see _finals.py)
                        doorbells.store(self.marks + S.MARK * i + S.HAS_REPLY, S.REPLY_FINAL)
                        self.final_marked = True
                elif info:
                    # a few scalars whose schema the parent knows go into the env's row
                    if not rows.learned or not rows.write(i, info):
                        if reply is None:
                            reply = M.Reply()
                        reply.infos.append((i, info))
                elif rows.learned:
                    rows.clear(i)
            if partial:
                self.finish_env(i, reply, final)
                reply = None
        return reply

    def reset_group(self, seeds: list[int | None], options: dict[str, Any] | None,
                    mask: list[bool] | None, publish: bool = True) -> M.Reply | None:
        """Reset the current entry's envs (those in ``mask``; one seed each, in entry order);
        ``publish=False`` keeps the observations here. A partial entry writes each env's
        reward 0 and flags False and finishes it as soon as it is (then nothing is left to
        return)."""
        reply = M.Reply()
        observations = self.observation_slot() if publish else None
        partial = self.ids is not None
        for k, i in enumerate(self.env_indices()):
            j = i - self.start
            env = self.envs[j]
            # which env a start-up reset was on, should it hang there (see worker_main)
            self.doorbells.store(self.line + S.STATUS_ENV, i)
            self.rows.clear(i)  # a reset's info goes by pipe
            if mask is not None and not mask[k]:
                # an env left alone keeps its observation, whichever slot this reset writes
                if observations is None:
                    reply.observations.append((i, self.last_obs[j]))
                elif self.last_obs[j] is not None:
                    observations.write_row(self.last_obs[j], i)
                continue
            result = NOT_RETURNED
            try:
                if self.semaphore is not None:
                    self.semaphore.acquire()
                    self.doorbells.store(self.line + S.PERMIT, 1)
                try:
                    result = env.reset(seed=seeds[k], options=options)
                    obs, info = result
                finally:
                    if self.semaphore is not None:
                        self.doorbells.store(self.line + S.PERMIT, 0)
                        self.semaphore.release()
                self.autoreset[j] = False
                self.last_obs[j] = obs
                if observations is not None:
                    observations.write_row(obs, i)
                elif publish:
                    reply.observations.append((i, obs))
                if type(info) is not dict and not isinstance(info, Mapping):
                    raise NotADictError(info)
                if info:
                    reply.infos.append((i, info))
            except Exception as exc:
                reply.errors.append(env_error(exc, i, result, step=False))
            if partial:
                self.rewards[i] = 0.0
                self.terminations[i] = self.truncations[i] = False
                self.finish_env(i, reply)
                reply = M.Reply()
        return None if partial else reply

    def per_env(self, fn: Callable[[int, Env[Any, Any]], Any],
                env_ids: list[int] | None = None) -> M.Reply:
        """``fn(k, env)`` for every env of the group, or for the ``k``-th env of ``env_ids``
        (batch indices): one result each (None if it raised)."""
        reply = M.Reply(results=[])
        order = (enumerate(self.envs) if env_ids is None
                 else [(i - self.start, self.envs[i - self.start]) for i in env_ids])
        for k, (j, env) in enumerate(order):
            try:
                reply.results.append(fn(k, env))  # type: ignore[union-attr]
            except Exception as exc:
                reply.results.append(None)  # type: ignore[union-attr]
                reply.errors.append(EnvError(self.start + j, capture(exc)))
        return reply

    def handle(self, request: M.Request) -> M.Reply | None:
        """Carry out a request that came through the pipe."""
        if isinstance(request, M.Step):
            return self.step_group(request.actions)
        if isinstance(request, M.Reset):
            return self.reset_group(request.seeds, request.options, request.mask)
        if isinstance(request, M.Call):
            return self.per_env(lambda k, env: _call(env, request), request.env_ids)
        if isinstance(request, M.SetAttr):
            return self.per_env(
                lambda k, env: env.set_wrapper_attr(request.name, request.values[k]),
                request.env_ids)
        if isinstance(request, M.CheckSpaces):
            return self.per_env(lambda j, env: _check_spaces(env, request))
        if isinstance(request, M.Close):
            return M.Reply(results=[None] * len(self.envs), errors=self.close_envs())
        raise RuntimeError(f"Received unknown request {request!r}.")


def _entries(reply: M.Reply | None) -> int:
    """How many infos, errors and observations ``reply`` holds."""
    if reply is None:
        return 0
    return len(reply.infos) + len(reply.errors) + len(reply.observations)


def _call(env: Env[Any, Any], request: M.Call) -> Any:
    if callable(request.name):
        return request.name(env, *request.args, **request.kwargs)
    if request.name in _FORBIDDEN_CALLS:
        raise ValueError(
            f"Trying to call function `{request.name}` with `call`, use `{request.name}` "
            "directly instead."
        )
    attr = env.get_wrapper_attr(request.name)
    return attr(*request.args, **request.kwargs) if callable(attr) else attr


def _check_spaces(env: Env[Any, Any], request: M.CheckSpaces) -> tuple[bool, bool]:
    if request.observation_mode == "same":
        same_obs = request.observation_space == env.observation_space
    else:
        same_obs = is_space_dtype_shape_equiv(request.observation_space, env.observation_space)
    return (same_obs, request.action_space == env.action_space)
