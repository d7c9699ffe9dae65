"""fastvec.AsyncVectorEnv: Gymnasium's AsyncVectorEnv over one shared-memory segment."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import time
import weakref
from collections.abc import Callable, Sequence
from copy import deepcopy
from enum import Enum
from multiprocessing import connection
from multiprocessing.reduction import ForkingPickler
from typing import Any

import gymnasium
import numpy as np
from gymnasium import Env, Space, logger
from gymnasium.error import (
    AlreadyPendingCallError,
    ClosedEnvironmentError,
    CustomSpaceError,
    NoAsyncCallError,
)
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import (
    CloudpickleWrapper,
    batch_differing_spaces,
    batch_space,
    clear_mpi_env_vars,
    concatenate,
    create_empty_array,
    iterate,
)

from fastvec import _memory
from fastvec import _protocol as P
from fastvec._kernels import Segment
from fastvec._sync import Doorbells
from fastvec.errors import (
    RemoteTraceback,
    WorkerDiedError,
    WorkerStartTimeoutError,
    invalid_actions,
)
from fastvec.worker import worker_main

__all__ = ["AsyncVectorEnv", "AsyncState"]


# Observation slots handed out with copy=True before falling back to copying (plus one scratch).
RECYCLED_SLOTS = 2

# Seconds a worker may spend on one step of its start (see ``start_timeout``): simulators and
# first-run asset downloads can legitimately take minutes per env.
DEFAULT_START_TIMEOUT = 600.0

# Commands during which restart_workers=True replaces a dead worker (construction and close
# do not: there a death raises WorkerDiedError, or is ignored by close).
_RESTARTABLE = frozenset({"step", "reset", "call", "set_attr"})


class AsyncState(Enum):
    """What the vector env is waiting for."""

    DEFAULT = "default"
    WAITING_RESET = "reset"
    WAITING_STEP = "step"
    WAITING_CALL = "call"


def _affinity() -> set[int]:
    try:
        return os.sched_getaffinity(0)
    except AttributeError:  # not Linux: no pinning
        return set()


def usable_cores() -> int:
    """Cores this process may run on (``os.sched_getaffinity`` where it exists)."""
    return len(_affinity()) or os.cpu_count() or 1


def default_num_workers(num_envs: int) -> int:
    """The usable cores, never more than ``num_envs``."""
    return max(1, min(usable_cores(), num_envs))


def split_groups(num_envs: int, num_workers: int) -> list[range]:
    """Contiguous, near-equal groups of env indices, one per worker."""
    base, extra = divmod(num_envs, num_workers)
    groups, start = [], 0
    for w in range(num_workers):
        stop = start + base + (1 if w < extra else 0)
        groups.append(range(start, stop))
        start = stop
    return groups


def _kill_group(pid: int | None) -> None:
    """SIGKILL what is left of worker ``pid``'s process group: the processes its envs started.

    The group's id is the worker's pid, which cannot be reused while the group has members.
    """
    if pid is None:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # nothing left (or not ours to end)
        pass


class _Resources:
    """Everything that must be released exactly once, even if the env is never closed.

    Held apart from the env so that a ``weakref.finalize`` can clean up without keeping the
    env alive.
    """

    def __init__(self) -> None:
        self.shm: _memory.SharedSegment | None = None
        self.doorbells: Doorbells | None = None
        self.segment: Segment | None = None
        self.plan: P.SegmentPlan | None = None
        self.results: tuple | None = None
        self.processes: list = []
        self.pipes: list = []

    def terminate_workers(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.terminate()

    def shutdown(self, join_timeout: float = 2.0) -> None:
        for pipe in self.pipes:
            try:
                pipe.close()
            except OSError:
                pass
        self.pipes = []
        deadline = time.monotonic() + join_timeout
        # wait for the exits without reaping: an unreaped worker's pid (its group's id)
        # cannot be reused, so the group kill reaches only what its envs left behind
        sentinels = {process.sentinel for process in self.processes}
        while sentinels and time.monotonic() < deadline:
            sentinels -= set(connection.wait(list(sentinels),
                                             max(0.0, deadline - time.monotonic())))
        for process in self.processes:
            _kill_group(process.pid)  # a worker still running goes with it
        for process in self.processes:
            process.join(1.0)
            if process.is_alive():
                process.kill()
                process.join(1.0)
        for process in self.processes:
            try:
                process.close()
            except ValueError:
                pass
        self.processes = []
        self.release_segment()

    def release_segment(self) -> None:
        if self.plan is not None:
            self.plan.unbind()
        self.results = None
        if self.segment is not None:
            self.segment.release()
            self.segment = None
        if self.doorbells is not None:
            self.doorbells.release()
            self.doorbells = None
        shm, self.shm = self.shm, None
        if shm is not None:
            shm.close()  # copy=False views the caller still holds keep their mapping
            shm.unlink()


class AsyncVectorEnv(VectorEnv):
    """Steps sub-environments in worker processes, moving every per-step byte through shared memory.

    A drop-in for :class:`gymnasium.vector.AsyncVectorEnv`: the same constructor, methods,
    errors and semantics. Sub-environments are split into contiguous groups, one group per
    worker process; actions, observations, rewards and flags travel through one shared-memory
    segment (in ``/dev/shm``, or a memfd when it does not fit there; see ``fastvec._memory``)
    and workers are woken through futex doorbells, so a step pickles nothing unless an env
    returns a non-empty info or raises.

    Parameters
    ----------
    env_fns
        Functions that create the sub-environments.
    shared_memory
        Observations travel through the segment (``True``) or pickled through pipes
        (``False``: the path for Graph, Sequence and unregistered custom spaces).
    copy
        ``True``: ``reset`` and ``step`` return observations that never change afterwards.
        ``False``: they return views into the segment that the next ``step`` or ``reset``
        overwrites (copy what you keep)::

            obs, *_ = envs.step(actions)       # obs is a view
            buffer[t] = obs                    # copy it into your rollout storage
    context
        ``multiprocessing`` start method: ``"fork"``, ``"forkserver"``, ``"spawn"`` or ``None``.
    daemon
        Start the workers as daemon processes.
    worker
        Gymnasium's custom per-env worker function. Not supported: fastvec's workers step a
        group of envs through the segment, so Gymnasium's pipe protocol has no place to run;
        passing one raises ``ValueError``.
    observation_mode
        ``"same"``, ``"different"`` or a ``(batched, single)`` tuple of spaces, as in Gymnasium.
    autoreset_mode
        :class:`gymnasium.vector.AutoresetMode` (or its value).
    max_concurrency
        At most this many sub-environments run ``reset``/``step`` at once.
    num_workers
        Worker processes. Default: the usable cores, never more than the number of envs.
    pin_workers
        Pin worker ``i`` to the ``i``-th usable core (Linux). Default (``None``): pin when
        there is exactly one worker per usable core, where it keeps the scheduler from
        queueing two workers on one core while another core spins. Processes and threads
        that an environment starts inherit the pin; pass ``False`` for such environments.
    restart_workers
        Replace a worker process that dies (a crash inside a C extension, the OOM killer, a
        ``SIGKILL``) instead of breaking the vector env. The new worker builds fresh envs for
        the dead worker's group from ``env_fns`` and resets them with seed ``None``; a
        ``gymnasium.logger`` warning names the worker, how it died and the new pid.

        - During ``step``: the step returns normally. The group's envs come back with
          ``truncated=True``, ``terminated=False``, reward ``0``, the fresh reset's
          observation and ``infos["worker_restarted"]`` (masked by
          ``infos["_worker_restarted"]``). Their last observation is lost, so there is no
          ``final_obs`` for them in ``SameStep`` mode; in ``NextStep`` mode their next step
          is an autoreset step, as after any truncation.
        - During ``reset``, ``call``, ``get_attr`` or ``set_attr``: the lost results cannot
          be made up, so the call raises :class:`~fastvec.errors.WorkerDiedError` with
          ``restarted=True`` once the new worker is up. The vector env stays usable: repeat
          the call (and ``reset`` before stepping if you need the new envs' observations).
        - During construction and ``close`` nothing is restarted.
        - If the new worker cannot start (an env function raises, or it dies too), the
          vector env breaks as it does without this option.

        Default ``False``: a dead worker makes the waiting call, or the next one, raise
        :class:`~fastvec.errors.WorkerDiedError` (naming the worker, its envs, its pid and
        exit code or signal) within a second; the vector env is broken and ``close()`` frees
        every process and the segment.
    start_timeout
        Seconds a worker may spend on one step of its start: starting up and attaching the
        segment, building one env, resetting one env (a replacement), answering the space
        check. Past it the constructor raises
        :class:`~fastvec.errors.WorkerStartTimeoutError` naming the worker, its envs and
        what it was doing, after ending every worker and freeing the segment; a replacement
        that slow breaks the vector env (:class:`~fastvec.errors.WorkerDiedError`). Default
        600 s; ``None`` waits forever.

    Notes
    -----
    Every worker leads a process group of its own, which the processes its envs start (a
    simulator, say) join: ``close()``, the garbage-collection or exit-time close, a
    worker's death and the death of the process that made the vector env all SIGKILL that
    group, so nothing an env started outlives its worker. A process that leaves the group
    (``setsid``, a daemon) is not followed. Ctrl-C in a terminal reaches the parent only.

    If the process that made the vector env dies, its workers and their groups are killed
    at once on Linux (the kernel's parent-death signal, whichever thread made the env, also
    while the workers are still starting), else within half a second once they serve; and
    multiprocessing's resource tracker unlinks the segment (a memfd goes
    with its last process). A vector env that is never
    closed is closed when it is garbage-collected or at interpreter exit, silently.
    """

    def __init__(
        self,
        env_fns: Sequence[Callable[[], Env]],
        shared_memory: bool = True,
        copy: bool = True,
        context: str | None = None,
        daemon: bool = True,
        worker: Callable[..., None] | None = None,
        observation_mode: str | tuple[Space, Space] = "same",
        autoreset_mode: str | AutoresetMode = AutoresetMode.NEXT_STEP,
        max_concurrency: int | None = None,
        *,
        num_workers: int | None = None,
        pin_workers: bool | None = None,
        restart_workers: bool = False,
        start_timeout: float | None = DEFAULT_START_TIMEOUT,
    ) -> None:
        self._state = AsyncState.DEFAULT
        self._broken: WorkerDiedError | None = None
        self.restart_workers = bool(restart_workers)
        self._closing = False
        self._restarting = False
        # workers found dead during the current command, before it is resolved
        self._lost: set[int] = set()
        # replacements started during the current step: (worker, their reset reply)
        self._replaced: list[tuple[int, Any]] = []
        self._resources = _Resources()
        self.closed = False
        self.env_fns = env_fns
        self.shared_memory = shared_memory
        self.copy = copy
        self.context = context
        self.daemon = daemon
        self.worker = worker
        self.observation_mode = observation_mode
        self.autoreset_mode = (autoreset_mode if isinstance(autoreset_mode, AutoresetMode)
                               else AutoresetMode(autoreset_mode))
        if max_concurrency is not None:
            if not isinstance(max_concurrency, (int, np.integer)):
                raise ValueError(
                    f"`max_concurrency` must be an integer or None, got {type(max_concurrency)}."
                )
            if max_concurrency < 1:
                raise ValueError(
                    f"`max_concurrency` must be a positive or None, got {max_concurrency}."
                )
        self.max_concurrency = max_concurrency
        if start_timeout is not None and not (
                isinstance(start_timeout, (int, float, np.integer, np.floating))
                and start_timeout > 0):
            raise ValueError(
                f"`start_timeout` must be a positive number of seconds or None, got "
                f"{start_timeout!r}."
            )
        self.start_timeout = None if start_timeout is None else float(start_timeout)
        if worker is not None:
            raise ValueError(
                "fastvec.AsyncVectorEnv does not run a custom `worker`: its workers step "
                "groups of sub-environments through shared memory, which Gymnasium's per-env "
                "pipe worker protocol cannot drive. Use gymnasium.vector.AsyncVectorEnv for a "
                "custom worker."
            )
        self.num_envs = len(env_fns)
        if self.num_envs < 1:
            raise ValueError("`env_fns` must hold at least one environment function.")
        if num_workers is None:
            num_workers = default_num_workers(self.num_envs)
        if not isinstance(num_workers, (int, np.integer)) or not 1 <= num_workers <= self.num_envs:
            raise ValueError(
                f"`num_workers` must be an integer in [1, num_envs={self.num_envs}], "
                f"got {num_workers!r}."
            )
        self.num_workers = int(num_workers)
        self.pin_workers = (self.num_workers == usable_cores() if pin_workers is None
                            else bool(pin_workers))
        self._spin = P.SpinBudget()

        dummy_env = env_fns[0]()
        try:
            self.metadata = dict(dummy_env.metadata)
            self.metadata["autoreset_mode"] = self.autoreset_mode
            self.render_mode = dummy_env.render_mode
            self.single_action_space = dummy_env.action_space
            self.action_space = batch_space(self.single_action_space, self.num_envs)
            if isinstance(observation_mode, tuple) and len(observation_mode) == 2:
                if not all(isinstance(s, Space) for s in observation_mode):
                    raise TypeError(
                        "Expected both elements of observation_mode to be Spaces, got "
                        f"{type(observation_mode[0])} and {type(observation_mode[1])}"
                    )
                self.observation_space, self.single_observation_space = observation_mode
            elif observation_mode == "same":
                self.single_observation_space = dummy_env.observation_space
                self.observation_space = batch_space(self.single_observation_space,
                                                     self.num_envs)
            elif observation_mode == "different":
                env_spaces = [fn().observation_space for fn in env_fns]
                self.single_observation_space = env_spaces[0]
                self.observation_space = batch_differing_spaces(env_spaces)
            else:
                raise ValueError(
                    "Invalid `observation_mode`, expected: 'same' or 'different' or tuple of "
                    f"single and batch observation space, actual got {observation_mode}"
                )
        finally:
            dummy_env.close()
            del dummy_env

        try:
            plan = P.SegmentPlan(
                self.num_envs, self.num_workers, self.single_action_space,
                self.single_observation_space if shared_memory else None,
                check_obs_range=observation_mode == "same",
                observation_slots=RECYCLED_SLOTS + 1 if copy else 1,
            )
        except CustomSpaceError as exc:
            raise ValueError(
                "Using `AsyncVector(..., shared_memory=True)` caused an error, you can disable "
                "this feature with `shared_memory=False` however this is slower."
            ) from exc
        self._plan = plan
        # the observation slot the last reset/step wrote, and whether it must be copied out
        self._slot = 0
        self._copy_out = not copy
        self._groups = split_groups(self.num_envs, self.num_workers)
        if shared_memory:
            self.observations = None
            self._pipe_obs = None
        else:
            self.observations = create_empty_array(self.single_observation_space,
                                                   n=self.num_envs, fn=np.zeros)
            self._pipe_obs = [None] * self.num_envs

        self._start(plan)
        weakref.finalize(self, _finalize, self._resources)
        try:
            self._check_spaces()
        except BaseException:
            # the caller never gets the env: free the workers and the segment now
            self.close(terminate=True)
            raise

    # -- construction ----------------------------------------------------------------------
    def _start(self, plan: P.SegmentPlan) -> None:
        res = self._resources
        ctx = multiprocessing.get_context(self.context)
        res.plan = plan
        slots = plan.observation_slots
        # copy=True's scratch slot ends the segment: allocated only when a step first needs it
        scratch = plan.nbytes - slots[RECYCLED_SLOTS].offset if len(slots) > 1 else 0
        res.shm = _memory.create(plan.nbytes, lazy_tail=scratch)
        buffer = res.shm.buf
        assert buffer is not None
        plan.write_header(buffer)
        res.doorbells = Doorbells(buffer)
        res.segment = Segment(buffer)
        plan.bind(res.segment, buffer)
        res.results = plan.result_arrays(buffer)
        self._doorbells = res.doorbells
        self._pending = plan.parent_line + P.PENDING
        self._ctx = ctx
        self._semaphore = (ctx.BoundedSemaphore(self.max_concurrency)
                           if self.max_concurrency is not None else None)
        self._cores = sorted(_affinity())
        try:
            for w in range(self.num_workers):
                process, parent_pipe = self._launch(w)
                res.pipes.append(parent_pipe)
                res.processes.append(process)  # only started processes can be joined
            started = self._await_start(range(self.num_workers))
            errors = [data for (kind, data), *_ in started.values() if kind == "init_error"]
            if errors:
                try:
                    self._raise_errors(errors)
                except _UNREGISTERED as exc:
                    if ctx.get_start_method() != "fork":
                        _add_note(exc, _UNREGISTERED_HINT)
                    raise
        except BaseException:
            res.terminate_workers()
            res.shutdown()
            self.closed = True
            raise

    def _launch(self, w: int, initial_reset: tuple[bool, bool] | None = None) -> tuple:
        """Start the process of worker ``w``; return it and the parent's end of its pipe."""
        group = self._groups[w]
        shm = self._resources.shm
        assert shm is not None
        cores = self._cores
        core = cores[w % len(cores)] if self.pin_workers and cores else None
        # a replacement starts from scratch, whatever its predecessor reported
        self._doorbells.store(self._plan.worker_line(w) + P.STATUS, P.STATUS_STARTING)
        with clear_mpi_env_vars():
            parent_pipe, child_pipe = self._ctx.Pipe()
            env_fns = [CloudpickleWrapper(self.env_fns[i]) for i in group]
            process = self._ctx.Process(
                target=worker_main,
                name=f"Worker<{type(self).__name__}>-{w}",
                args=(w, group.start, env_fns, child_pipe, parent_pipe, self._plan,
                      shm.handle, self.autoreset_mode, self.shared_memory,
                      self._semaphore, os.getpid(), core),
                kwargs={"initial_reset": initial_reset},
                daemon=self.daemon,
            )
            try:
                process.start()
            except BaseException:
                parent_pipe.close()
                raise
            finally:
                child_pipe.close()
        return process, parent_pipe

    # -- properties ------------------------------------------------------------------------
    @property
    def np_random_seed(self) -> tuple[int, ...]:
        """The ``np_random_seed`` of every sub-environment."""
        return self.get_attr("np_random_seed")

    @property
    def np_random(self) -> tuple[np.random.Generator, ...]:
        """The ``np_random`` generator of every sub-environment."""
        return self.get_attr("np_random")

    # -- the doorbell protocol -------------------------------------------------------------
    def _choose_slot(self) -> int:
        """Pick the observation slot the next reset/step writes.

        With ``copy=True`` the arrays of a slot are handed to the caller as they are, so a slot
        is written again only once nothing refers to it; if the caller holds every recycled
        slot, the step goes to the scratch slot and is copied out.
        """
        slots = self._plan.observation_slots
        if len(slots) <= 1:
            return 0
        for slot in range(RECYCLED_SLOTS):
            if not slots[slot].in_use():
                self._copy_out = False
                return slot
        assert self._resources.shm is not None
        self._resources.shm.allocate_tail()  # the scratch slot's pages, once
        self._copy_out = True
        return RECYCLED_SLOTS

    def _ring(self, command: int, messages: list | None = None, slot: int = 0) -> None:
        # pickled before any doorbell rings: a message that cannot be pickled raises here,
        # with no worker left waiting for it
        payloads = None
        if messages is not None:
            cache: dict[int, Any] = {}  # call sends one message object to every worker
            payloads = [cache.get(id(m)) or cache.setdefault(id(m), ForkingPickler.dumps(m))
                        for m in messages]
        doorbells = self._doorbells
        self._lost = set()
        doorbells.store(self._pending, self.num_workers)
        for w in range(self.num_workers):
            line = self._plan.worker_line(w)
            doorbells.store(line + P.SLOT, slot)
            doorbells.store(line + P.CMD, command)
            doorbells.store(line + P.CMD_SEQ, (doorbells.load(line + P.CMD_SEQ) + 1) & 0xFFFFFFFF)
            doorbells.wake(line + P.CMD_SEQ, 1)
            if payloads is not None:
                # after the doorbell: the worker is reading, so a message larger than the
                # pipe's buffer cannot block us
                try:
                    self._resources.pipes[w].send_bytes(payloads[w])
                except OSError:  # EPIPE: the worker is gone; the wait reports it
                    self._mark_lost(w)

    def _wait_pending(self, timeout: float | None, name: str) -> list:
        """Wait until every worker finished the command; return each worker's pipe reply.

        A dead worker raises :class:`WorkerDiedError` within a wait slice. With
        ``restart_workers`` (and a command a replacement can absorb), the wait goes on until
        the other workers are done, then the dead ones are replaced; see ``_replace_lost``.
        """
        doorbells = self._doorbells
        pending = self._pending
        restart = self.restart_workers and not self._closing and name in _RESTARTABLE
        lost = self._lost
        if lost and not restart:
            self._worker_died(min(lost))
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        spin_until = start + self._spin.budget()
        # workers are checked every slice, also when other workers' progress woke us
        next_check = start + P.WAIT_SLICE
        while True:
            value = doorbells.load(pending)
            if value == 0 or (lost and self._survivors_done()):
                break
            now = time.monotonic()
            if now >= next_check:
                self._check_workers(restart)
                next_check = now + P.WAIT_SLICE
            wait = next_check - now
            if lost:  # nobody will wake us: poll the survivors' done marks
                wait = min(wait, P.WAIT_SLICE / 10)
            if deadline is not None:
                remaining = deadline - now
                if remaining <= 0:
                    raise multiprocessing.TimeoutError(
                        f"The call to `{name}_wait` has timed out after {timeout} second(s)."
                    )
                wait = min(wait, remaining)
            doorbells.wait_while_equal(pending, value, wait, max(0.0, spin_until - now), True)
        if not lost:
            self._spin.record(time.monotonic() - start)
        replies = [None] * self.num_workers
        self._restarting = restart
        try:
            for w in range(self.num_workers):
                flag = self._plan.worker_line(w) + P.INFO_PENDING
                if w not in lost and doorbells.load(flag):
                    replies[w] = self._recv(w)
                    doorbells.store(flag, 0)  # read: waiting again must not read it twice
        finally:
            self._restarting = False
        if lost:
            self._replace_lost(name)
        return replies

    def _survivors_done(self) -> bool:
        doorbells, line = self._doorbells, self._plan.worker_line
        return all(doorbells.load(line(w) + P.DONE_SEQ) == doorbells.load(line(w) + P.CMD_SEQ)
                   for w in range(self.num_workers) if w not in self._lost)

    def _recv(self, w: int) -> Any:
        """The next message from worker ``w``. If it died first, raise WorkerDiedError, or,
        while ``_wait_pending`` collects replies it may restart, mark it lost and return
        ``None``."""
        pipe = self._resources.pipes[w]
        process = self._resources.processes[w]
        while True:
            ready = connection.wait([pipe, process.sentinel], P.WAIT_SLICE * 4)
            if pipe in ready:
                try:
                    return pipe.recv()
                except (EOFError, OSError):
                    pass
                break
            if process.sentinel in ready:
                if pipe.poll(0):
                    continue
                break
        if not self._restarting:
            self._worker_died(w)
        self._mark_lost(w)
        return None

    def _await_start(self, workers: Sequence[int],
                     replies: bool = False) -> dict[int, list[Any]]:
        """Wait until each of ``workers`` sent ``ready`` (then, with ``replies``, the reply of
        its initial reset) or ``init_error``; return each one's messages.

        A worker whose phase (``_phase``) stays the same for ``start_timeout`` seconds raises
        :class:`WorkerStartTimeoutError`; one that dies raises :class:`WorkerDiedError`.
        """
        res = self._resources
        wanted = 2 if replies else 1
        messages: dict[int, list[Any]] = {w: [] for w in workers}
        now = time.monotonic()
        progress = {w: (self._phase_words(w), now) for w in workers}
        waiting = set(workers)
        while waiting:
            handles = {}
            for w in waiting:
                handles[res.pipes[w]] = handles[res.processes[w].sentinel] = w
            for handle in connection.wait(list(handles), P.WAIT_SLICE * 4):
                w = handles[handle]
                if w not in waiting:
                    continue
                messages[w].append(self._recv(w))  # a message or a death: no waiting here
                if messages[w][0][0] == "init_error" or len(messages[w]) == wanted:
                    waiting.discard(w)
                progress[w] = (self._phase_words(w), time.monotonic())
            now = time.monotonic()
            for w in sorted(waiting):
                words, since = progress[w]
                if self._phase_words(w) != words:
                    progress[w] = (self._phase_words(w), now)
                elif self.start_timeout is not None and now - since > self.start_timeout:
                    raise self._start_timeout(w, self._phase(w))
        return messages

    def _phase_words(self, w: int) -> tuple[int, int]:
        line = self._plan.worker_line(w)
        return (self._doorbells.load(line + P.STATUS), self._doorbells.load(line + P.STATUS_ENV))

    def _phase(self, w: int) -> str:
        """What worker ``w`` reports doing while it starts."""
        status, env = self._phase_words(w)
        if status == P.STATUS_BUILDING:
            return f"building env {env} (its env function had not returned)"
        if status == P.STATUS_RESETTING:
            return f"resetting env {env}"
        if status == P.STATUS_READY:
            return "sending its ready message"
        return "starting up (its process had not attached the segment yet)"

    def _start_timeout(self, w: int, phase: str) -> WorkerStartTimeoutError:
        what = self._describe(w)
        group = self._groups[w]
        return WorkerStartTimeoutError(
            f"{what} made no progress for {self.start_timeout:g} s while {phase}. Building "
            "or resetting an env may legitimately take longer (a simulator): pass a larger "
            "`start_timeout=` (seconds, or None to wait forever) to AsyncVectorEnv.",
            worker=w, env_indices=tuple(group), pid=self._resources.processes[w].pid,
            phase=phase)

    def _describe(self, w: int) -> str:
        """``fastvec worker <w> (pid <pid>, envs <a>..<b>)``."""
        group = self._groups[w]
        envs = (f"env {group.start}" if len(group) == 1
                else f"envs {group.start}..{group.stop - 1}")
        return f"fastvec worker {w} (pid {self._resources.processes[w].pid}, {envs})"

    def _check_workers(self, restart: bool = False) -> None:
        for w, process in enumerate(self._resources.processes):
            if w not in self._lost and process.exitcode is not None:
                if not restart:
                    self._worker_died(w)
                self._mark_lost(w)

    def _mark_lost(self, w: int) -> None:
        self._lost.add(w)
        # at once: a survivor may be waiting for the permit before it can finish
        self._release_permit(w)

    def _death(self, w: int) -> tuple[str, WorkerDiedError]:
        """Reap worker ``w``, end what its envs started and describe its end:
        ``(description, error)``; the error says the vector env cannot continue."""
        process = self._resources.processes[w]
        process.join(0.5)  # it closed its pipe or sentinel: it is exiting, if not reaped yet
        code = process.exitcode
        if code is not None:
            _kill_group(process.pid)
        group = self._groups[w]
        if code is None:
            how = "closed its pipe"
        elif code < 0:
            try:
                how = f"was killed by signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        what = f"{self._describe(w)} {how}"
        error = WorkerDiedError(
            f"{what}. The vector env cannot continue; close it and make a new one.",
            worker=w, env_indices=tuple(group), pid=process.pid, exitcode=code,
        )
        return what, error

    def _worker_died(self, w: int) -> None:
        error = self._death(w)[1]
        self._broken = error
        self._state = AsyncState.DEFAULT
        self._lost = set()
        raise error

    def _replace_lost(self, name: str) -> None:
        """Start a new worker for every lost one (``restart_workers=True``).

        The new worker builds fresh envs from ``env_fns`` and resets them (seed ``None``)
        before it serves. During a step it writes their observations into the step's slot
        and the step reports them truncated (``step_wait`` reads ``self._replaced``); any
        other command cannot make up the lost results, so it raises
        :class:`WorkerDiedError` with ``restarted=True`` once the replacements are up.
        """
        res = self._resources
        lost, self._lost = sorted(self._lost), set()
        in_step = name == "step"
        deaths = {w: self._death(w) for w in lost}
        autoreset = in_step and self.autoreset_mode is AutoresetMode.NEXT_STEP
        for w in lost:
            self._release_permit(w)
            res.pipes[w].close()
            old = res.processes[w]
            if old.exitcode is None:  # closed its pipe yet still running: make sure
                old.kill()
                old.join(1.0)
                _kill_group(old.pid)
            try:
                res.processes[w], res.pipes[w] = self._launch(
                    w, initial_reset=(in_step, autoreset))
            except Exception as exc:  # cannot fork, say; shutdown joins the old one
                what, died = deaths[w]
                self._broken = WorkerDiedError(
                    f"{what} during `{name}`, and its replacement could not be started: {exc}",
                    worker=w, env_indices=died.env_indices, pid=died.pid,
                    exitcode=died.exitcode)
                self._state = AsyncState.DEFAULT
                raise self._broken from exc
            old.close()
        self._replaced = []
        restarted = []
        try:  # a replacement that dies breaks the vector env
            started = self._await_start(lost, replies=True)
        except WorkerStartTimeoutError as exc:
            what, died = deaths[exc.worker]
            self._broken = WorkerDiedError(
                f"{what} during `{name}`, and its replacement (pid {exc.pid}) made no progress "
                f"for {self.start_timeout:g} s while {exc.phase}; pass a larger "
                "`start_timeout=` if that is expected. The vector env cannot continue; close "
                "it and make a new one.",
                worker=exc.worker, env_indices=died.env_indices, pid=died.pid,
                exitcode=died.exitcode)
            self._state = AsyncState.DEFAULT
            raise self._broken from None
        for w in lost:
            what, died = deaths[w]
            (kind, data), *reply = started[w]
            if kind == "init_error":
                index, payload = data
                cause = _rebuild_exception(*payload)
                error = WorkerDiedError(
                    f"{what} during `{name}`, and its replacement could not be started: env "
                    f"{index} raised {type(cause).__name__}: {cause}. The vector env cannot "
                    "continue; close it and make a new one.",
                    worker=w, env_indices=died.env_indices, pid=died.pid,
                    exitcode=died.exitcode)
                self._broken = error
                self._state = AsyncState.DEFAULT
                raise error from cause
            self._replaced.append((w, reply[0]))
            pid = res.processes[w].pid
            if in_step:
                logger.warn(f"{what} during `step`; restarted it as pid {pid}. Its envs are "
                            "fresh (reset with seed None): this step reports them truncated, "
                            "with info `worker_restarted`.")
            else:
                restarted.append(WorkerDiedError(
                    f"{what} during `{name}`; restarted it as pid {pid} with fresh envs (reset "
                    f"with seed None). The `{name}` results are lost: call it again (after a "
                    "`reset`, if you need the new envs' observations).",
                    worker=w, env_indices=died.env_indices, pid=died.pid,
                    exitcode=died.exitcode, restarted=True))
        if not in_step:
            self._replaced = []
            self._state = AsyncState.DEFAULT
            raise restarted[0]

    def _release_permit(self, w: int) -> None:
        """Give back the max_concurrency permit a dead worker held."""
        line = self._plan.worker_line(w)
        if self._semaphore is not None and self._doorbells.load(line + P.PERMIT):
            try:
                self._semaphore.release()
            except ValueError:  # it had not taken it after all
                pass
        self._doorbells.store(line + P.PERMIT, 0)

    def _raise_errors(self, errors: list) -> None:
        """Log every sub-env error the Gymnasium way and raise the last one."""
        if not errors:
            return
        self._state = AsyncState.DEFAULT
        exception = None
        for index, payload in errors:
            blob, type_blob, type_name, message, trace = payload
            logger.error(f"Received the following error from Worker-{index}")
            logger.error("%s", trace)  # a trace may hold "%": never format it
            exception = _rebuild_exception(blob, type_blob, type_name, message, trace)
        logger.error("Raising the last exception back to the main process.")
        raise exception

    def _assert_not_pending(self, method: str, end: str = ".") -> None:
        """Gymnasium's ``AlreadyPendingCallError`` if a call is pending (its wording, too)."""
        if self._state != AsyncState.DEFAULT:
            raise AlreadyPendingCallError(
                f"Calling `{method}` while waiting for a pending call to "
                f"`{self._state.value}` to complete{end}",
                str(self._state.value),
            )

    def _assert_pending(self, state: AsyncState, method: str, start: str) -> None:
        """Gymnasium's ``NoAsyncCallError`` unless ``state`` is the pending call."""
        if self._state != state:
            raise NoAsyncCallError(
                f"Calling `{method}` without any prior call to `{start}`.", state.value
            )

    def _assert_is_running(self) -> None:
        if self.closed:
            raise ClosedEnvironmentError(
                f"Trying to operate on `{type(self).__name__}`, after a call to `close()`."
            )
        if self._broken is not None:
            raise self._broken

    # -- reset -----------------------------------------------------------------------------
    def reset(self, *, seed: int | list[int | None] | None = None,
              options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        """Reset every sub-environment (or those in ``options["reset_mask"]``)."""
        self.reset_async(seed=seed, options=options)
        return self.reset_wait()

    def reset_async(self, seed: int | list[int | None] | None = None,
                    options: dict[str, Any] | None = None) -> None:
        """Send the reset to the workers; :meth:`reset_wait` collects it."""
        self._assert_is_running()
        if seed is None:
            seed = [None] * self.num_envs
        elif isinstance(seed, int):
            seed = [seed + i for i in range(self.num_envs)]
        if len(seed) != self.num_envs:
            raise ValueError(
                f"If seeds are passed as a list the length must match num_envs={self.num_envs}"
                f" but got length={len(seed)}."
            )
        self._assert_not_pending("reset_async", end="")
        mask = None
        if options is not None and "reset_mask" in options:
            options = dict(options)
            mask = options.pop("reset_mask")
            if not isinstance(mask, np.ndarray):
                raise TypeError(
                    f"`options['reset_mask']` must be a numpy array, got {type(mask)}"
                )
            if mask.shape != (self.num_envs,):
                raise ValueError(
                    f"`options['reset_mask']` must have shape `({self.num_envs},)`, "
                    f"got {mask.shape}"
                )
            if mask.dtype != np.bool_:
                raise TypeError(
                    f"`options['reset_mask']` must have `dtype=np.bool_`, got {mask.dtype}"
                )
            if not np.any(mask):
                raise ValueError(
                    "`options['reset_mask']` must contain a boolean array with at least one "
                    f"True value, got reset_mask={mask}"
                )
        messages = [
            ("reset", (list(seed[g.start:g.stop]), options,
                       None if mask is None else [bool(m) for m in mask[g.start:g.stop]]))
            for g in self._groups
        ]
        self._slot = self._choose_slot()
        self._ring(P.CMD_PIPE, messages, self._slot)
        self._state = AsyncState.WAITING_RESET

    def reset_wait(self, timeout: float | None = None) -> tuple[Any, dict[str, Any]]:
        """Wait for the reset sent by :meth:`reset_async` and return ``(observations, infos)``."""
        self._assert_is_running()
        self._assert_pending(AsyncState.WAITING_RESET, "reset_wait", "reset_async")
        replies = self._wait_pending(timeout, "reset")
        self._state = AsyncState.DEFAULT
        infos, errors = self._merge_replies(replies)
        self._raise_errors(errors)
        return self._observations(), infos

    # -- step ------------------------------------------------------------------------------
    def step(self, actions: Any) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict]:
        """Step every sub-environment with its action from the batch ``actions``."""
        self.step_async(actions)
        return self.step_wait()

    def step_async(self, actions: Any) -> None:
        """Write the action batch into the segment and wake the workers.

        A batch that does not fit the action space raises ``ValueError`` here, before any
        worker sees it; the env stays usable.
        """
        self._assert_is_running()
        self._assert_not_pending("step_async")
        layout = self._plan.actions
        if layout is None:  # no layout for the action space: pickled, as in Gymnasium
            per_env = self._iterate_actions(actions)
            messages = [("step", per_env[g.start:g.stop]) for g in self._groups]
            self._slot = self._choose_slot()
            self._ring(P.CMD_PIPE, messages, self._slot)
        else:
            try:
                layout.write_batch(actions)
            except ValueError as exc:
                raise invalid_actions(str(exc), _gymnasium_refusal(
                    self.action_space, actions, self.num_envs)) from None
            self._slot = self._choose_slot()
            self._ring(P.CMD_STEP, slot=self._slot)
        self._state = AsyncState.WAITING_STEP

    def _iterate_actions(self, actions: Any) -> list[Any]:
        """One action per env, split by Gymnasium's ``iterate`` (and raising its errors)."""
        per_env = list(iterate(self.action_space, actions))
        if len(per_env) != self.num_envs:
            raise invalid_actions(
                f"actions: expected one action for each of the {self.num_envs} envs, got "
                f"{len(per_env)}", None)
        return per_env

    def step_wait(self, timeout: float | None = None
                  ) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict]:
        """Wait for the step sent by :meth:`step_async` and return its batched results.

        On ``multiprocessing.TimeoutError`` the step stays pending: call ``step_wait`` again
        to complete it. With ``restart_workers=True``, replacing a worker that died during
        the step may take longer than ``timeout``: each step of the replacement's start is
        bounded by ``start_timeout`` instead.
        """
        self._assert_is_running()
        self._assert_pending(AsyncState.WAITING_STEP, "step_wait", "step_async")
        replies = self._wait_pending(timeout, "step")
        self._state = AsyncState.DEFAULT
        infos, errors = self._merge_replies(replies)
        replaced, self._replaced = self._replaced, []
        if replaced:
            infos = self._report_replaced(replaced, infos, errors)
        self._raise_errors(errors)
        rewards, terminations, truncations = self._resources.results
        return (self._observations(), rewards.copy(), terminations.copy(),
                truncations.copy(), infos)

    def _merge_replies(self, replies: list) -> tuple[dict[str, Any], list]:
        """Batch the infos of a reset or step's replies (in env order), collect their errors
        and keep the observations that came by pipe."""
        infos: dict[str, Any] = {}
        errors: list = []
        for reply in replies:
            if reply is None:  # nothing to report: the common step
                continue
            r_infos, r_errors, r_obs = reply
            if r_infos:
                for i, info in r_infos:
                    infos = self._add_info(infos, info, i)
            if r_errors:
                errors.extend(r_errors)
            if r_obs:
                self._store_pipe_obs(r_obs)
        return infos, errors

    def _report_replaced(self, replaced: list, infos: dict, errors: list) -> dict:
        """The envs of workers replaced during this step: truncated, reward 0, observation
        from their fresh reset, info ``worker_restarted`` (plus, in SAME_STEP mode, the reset's
        info, as for any reset there)."""
        results = self._resources.results
        assert results is not None
        rewards, terminations, truncations = results
        same_step = self.autoreset_mode is AutoresetMode.SAME_STEP
        for w, (r_infos, r_errors, r_obs) in replaced:
            group = self._groups[w]
            rewards[group.start:group.stop] = 0.0
            terminations[group.start:group.stop] = False
            truncations[group.start:group.stop] = True
            reset_infos = dict(r_infos) if same_step else {}
            for i in group:
                infos = self._add_info(infos, {**reset_infos.get(i, {}), "worker_restarted": True},
                                       i)
            errors.extend(r_errors)
            self._store_pipe_obs(r_obs)
        return infos

    def _store_pipe_obs(self, pipe_obs: list | None) -> None:
        if pipe_obs:
            for i, obs in pipe_obs:
                self._pipe_obs[i] = obs

    def _observations(self) -> Any:
        slots = self._plan.observation_slots
        if slots:
            return slots[self._slot].read_batch(copy=self._copy_out and self.copy)
        if any(obs is None for obs in self._pipe_obs):
            return deepcopy(self.observations) if self.copy else self.observations
        self.observations = concatenate(self.single_observation_space, self._pipe_obs,
                                        self.observations)
        return deepcopy(self.observations) if self.copy else self.observations

    # -- call, get_attr, set_attr, render --------------------------------------------------
    def call(self, name: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        """Call ``name`` (a method, or read an attribute) on every sub-environment."""
        self.call_async(name, *args, **kwargs)
        return self.call_wait()

    def render(self) -> tuple[Any, ...] | None:
        """The rendered frame of every sub-environment."""
        return self.call("render")

    def call_async(self, name: str, *args: Any, **kwargs: Any) -> None:
        """Send ``call(name, *args, **kwargs)`` to every sub-environment."""
        self._assert_is_running()
        self._assert_not_pending("call_async")
        self._ring(P.CMD_PIPE, [("call", (name, args, kwargs))] * self.num_workers)
        self._state = AsyncState.WAITING_CALL

    def call_wait(self, timeout: float | None = None) -> tuple[Any, ...]:
        """Wait for the call sent by :meth:`call_async`; one result per sub-environment."""
        self._assert_is_running()
        self._assert_pending(AsyncState.WAITING_CALL, "call_wait", "call_async")
        replies = self._wait_pending(timeout, "call")
        self._state = AsyncState.DEFAULT
        return self._gather_results(replies)

    def _gather_results(self, replies: list) -> tuple[Any, ...]:
        results: list = []
        errors: list = []
        for r_results, r_errors in replies:
            results.extend(r_results)
            errors.extend(r_errors)
        self._raise_errors(errors)
        return tuple(results)

    def get_attr(self, name: str) -> tuple[Any, ...]:
        """The attribute ``name`` of every sub-environment."""
        return self.call(name)

    def set_attr(self, name: str, values: list[Any] | tuple[Any, ...] | object) -> None:
        """Set ``name`` on every sub-environment (one value each, or one for all)."""
        self._assert_is_running()
        if not isinstance(values, (list, tuple)):
            values = [values for _ in range(self.num_envs)]
        if len(values) != self.num_envs:
            raise ValueError(
                "Values must be a list or tuple with length equal to the number of "
                f"environments. Got `{len(values)}` values for {self.num_envs} environments."
            )
        self._assert_not_pending("set_attr")
        self._ring(P.CMD_PIPE, [("setattr", (name, list(values[g.start:g.stop])))
                                for g in self._groups])
        self._gather_results(self._wait_pending(None, "set_attr"))

    def _check_spaces(self) -> None:
        self._assert_is_running()
        message = ("check_spaces", (self.observation_mode, self.single_observation_space,
                                    self.single_action_space))
        self._ring(P.CMD_PIPE, [message] * self.num_workers)
        try:
            replies = self._wait_pending(self.start_timeout, "check_spaces")
        except multiprocessing.TimeoutError:
            doorbells, line = self._doorbells, self._plan.worker_line
            w = min(w for w in range(self.num_workers)
                    if doorbells.load(line(w) + P.DONE_SEQ) != doorbells.load(line(w) + P.CMD_SEQ))
            raise self._start_timeout(
                w, "answering the space check (reading its envs' spaces)") from None
        results = self._gather_results(replies)
        same_observation_spaces, same_action_spaces = zip(*results)
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

    # -- close -----------------------------------------------------------------------------
    def close_extras(self, timeout: float | None = None, terminate: bool = False) -> None:
        """Close the sub-environments, end the workers and free the segment.

        Parameters
        ----------
        timeout
            Seconds to wait for a pending call and for the sub-environments to close; past it
            the workers are terminated.
        terminate
            End the workers at once without closing the sub-environments.
        """
        res = self._resources
        self._closing = True  # a worker that dies now is not replaced
        timeout = 0 if terminate else timeout
        healthy = self._broken is None and res.shm is not None
        try:
            if healthy and self._state != AsyncState.DEFAULT:
                logger.warn(
                    f"Calling `close` while waiting for a pending call to "
                    f"`{self._state.value}` to complete."
                )
                getattr(self, f"{self._state.value}_wait")(timeout)
        except multiprocessing.TimeoutError:
            terminate = True
        except Exception:
            # the pending call's own error was already logged; closing goes on
            healthy = self._broken is None
        if healthy and not terminate:
            try:
                self._ring(P.CMD_PIPE, [("close", None)] * self.num_workers)
                self._gather_results(self._wait_pending(timeout, "close"))
            except multiprocessing.TimeoutError:
                terminate = True
            except WorkerDiedError:
                pass
        if terminate or not healthy:
            res.terminate_workers()
        self._state = AsyncState.DEFAULT
        res.shutdown()

    def __enter__(self) -> AsyncVectorEnv:
        """Support the with-statement: the env is closed when the block ends."""
        return self

    def __exit__(self, *args: Any) -> bool:
        self.close()
        return False

    def __del__(self) -> None:
        if not getattr(self, "closed", True) and hasattr(self, "_state"):
            self.close(terminate=True)


# An env registered only in the parent is unknown to spawn and forkserver workers.
_UNREGISTERED = (gymnasium.error.NameNotFound, gymnasium.error.NamespaceNotFound,
                 gymnasium.error.VersionNotFound)
_UNREGISTERED_HINT = (
    "spawn and forkserver workers re-import modules but never see a `gymnasium.register()` "
    "made only in the parent: use `fastvec.make_vec(id, ...)` (it sends the EnvSpec), "
    "register the env in a module that the env function imports, or use context='fork'."
)


def _add_note(exc: BaseException, note: str) -> None:
    if hasattr(exc, "add_note"):  # Python 3.11+
        exc.add_note(note)
    else:
        exc.args = (f"{exc.args[0] if exc.args else ''}\n{note}", *exc.args[1:])


def _gymnasium_refusal(action_space: Space[Any], actions: Any, num_envs: int
                       ) -> type[BaseException] | None:
    """The type of error Gymnasium's AsyncVectorEnv raises for this action batch, if any.

    Only on the error path: it splits the batch with Gymnasium's ``iterate`` as its
    ``step_async`` does, then counts the actions as its ``zip(..., strict=True)`` does.
    """
    try:
        count = sum(1 for _ in iterate(action_space, actions))
    except Exception as exc:
        return type(exc)
    return None if count == num_envs else ValueError


def _finalize(resources: _Resources) -> None:
    resources.terminate_workers()
    resources.shutdown()


def _rebuild_exception(blob: bytes | None, type_blob: bytes | None, type_name: str,
                       message: str, trace: str) -> BaseException:
    exception: BaseException | None = None
    if blob is not None:
        try:
            exception = pickle.loads(blob)
        except Exception:
            exception = None
    if exception is None and type_blob is not None:
        try:
            exception = pickle.loads(type_blob)(message)
        except Exception:
            exception = None
    if exception is None:
        exception = RuntimeError(f"{type_name}: {message}")
    exception.__cause__ = RemoteTraceback(trace)
    return exception
