"""The worker pool: processes, command delivery, waiting, deaths, restarts and teardown.

:class:`WorkerPool` starts one worker process per group of envs over one segment (with
:class:`~fastvec._launch.Launcher`; with ``parent_group`` the last group is the parent's own,
:mod:`fastvec._local`, served in-process while the pool would wait), rings their doorbells
with a command (and a request record through each pipe when the command needs one), waits
for all of them in slices that notice a dead worker and the caller's timeout, replaces dead
workers when asked to (its base class :class:`~fastvec._deaths.WorkerDeaths`), and frees
every process, process group and the segment exactly once, also when the vector env is never
closed. It raises
:class:`~fastvec.errors.WorkerDiedError` and knows nothing of Gymnasium's call states.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Iterable, Sequence
from multiprocessing import connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from multiprocessing.reduction import ForkingPickler
from multiprocessing.synchronize import Semaphore
from typing import Any

import numpy as np
from gymnasium import Env
from gymnasium.vector import AutoresetMode

from fastvec import _memory
from fastvec import _messages as M
from fastvec import _segment as S
from fastvec._deaths import RESTARTABLE, WorkerDeaths
from fastvec._finals import FinalRows
from fastvec._info_rows import InfoRows
from fastvec._launch import Launcher
from fastvec._local import LocalGroup, LocalPipe
from fastvec._machine import MachineWatch
from fastvec._processes import (
    Resources,
    affinity,
    default_num_workers,
    finalize,
    split_groups,
    usable_cores,
)
from fastvec._remote_errors import raise_logged
from fastvec._sync import Doorbells
from fastvec._waiting import WAIT_SLICE
from fastvec.layout import Segment

# the process helpers are re-exported: the face and the argument checks take them from here
__all__ = ["WorkerPool", "default_num_workers", "finalize", "split_groups", "usable_cores"]


class WorkerPool(WorkerDeaths):
    """The worker processes of one vector env and the segment they share.

    Parameters
    ----------
    env_fns
        One env function per env (the pool sends each worker its group's).
    plan
        The segment's plan: one group (worker line) per worker process, plus the parent's
        with ``parent_group``.
    scratch_bytes
        The segment's last bytes that are allocated only when first needed (copy=True's
        scratch slot).
    context, daemon, autoreset_mode, max_concurrency, pin_workers, restart_workers,
    start_timeout, parent_group
        As given to :class:`fastvec.AsyncVectorEnv`. With ``parent_group`` the last group
        is the parent's (:mod:`fastvec._local`): served in-process whenever the pool would
        wait, never launched, never dead.
    """

    def __init__(self, env_fns: Sequence[Callable[[], Env[Any, Any]]], plan: S.SegmentPlan,
                 scratch_bytes: int, *, context: str | None, daemon: bool,
                 autoreset_mode: AutoresetMode, max_concurrency: int | None,
                 pin_workers: bool | None, restart_workers: bool,
                 start_timeout: float | None, parent_group: bool = False) -> None:
        self.env_fns = env_fns
        self.plan = plan
        # the plan's groups: one per worker process, then the parent's own (parent_group)
        self.num_workers = plan.num_workers
        self.groups = split_groups(plan.num_envs, plan.num_workers)
        self.remote = self.num_workers - (1 if parent_group else 0)
        self.daemon = daemon
        self.autoreset_mode = autoreset_mode
        self.pin_workers = pin_workers
        self.restart_workers = restart_workers
        self.start_timeout = start_timeout
        super().__init__()  # no worker found dead, none replaced
        self._ctx: BaseContext = multiprocessing.get_context(context)
        self._semaphore: Semaphore | None = (
            self._ctx.BoundedSemaphore(max_concurrency) if max_concurrency is not None
            else None)
        self.resources = res = Resources()
        res.plan = plan
        res.shm = _memory.create(plan.nbytes, lazy_tail=scratch_bytes)
        buffer = res.shm.buf
        assert buffer is not None
        plan.write_header(buffer)
        res.doorbells = self.doorbells = Doorbells(buffer)
        res.segment = Segment(buffer)
        plan.bind(res.segment, buffer)
        res.results = plan.result_arrays(buffer)
        res.info_rows = self.info_rows = InfoRows(buffer, plan.info_rows, 0, plan.num_envs)
        # SAME_STEP's episode ends in the segment, and those of the last synchronous step
        self.final_rows = FinalRows(plan.final_observations, self.info_rows)
        self.finals: list[int] = []
        self._pending = plan.parent_line + S.PENDING
        self._completed = plan.parent_line + S.COMPLETED
        cores = sorted(affinity())
        # its load, the caller's share, the workers' cores and spinning (fastvec._machine)
        self.machine = MachineWatch(cores, self.num_workers, pin_workers, self._worker_pids,
                                    self.doorbells, plan.parent_line)
        self.parent_time = self.machine.parent_time  # enter and leave mark the pool's calls
        self._bell = plan.parent_line + S.BELL
        self._broadcast = self.remote > max(1, len(cores))
        self.doorbells.store(plan.parent_line + S.BROADCAST, 1 if self._broadcast else 0)
        # each worker's last published entry (only the parent writes CMD_SEQ), its doorbell,
        # its queue
        self._seq = [0] * self.num_workers
        self._doorbell = [plan.worker_line(w) + S.CMD_SEQ for w in range(self.num_workers)]
        self._sleeping = [plan.worker_line(w) + S.SLEEPING for w in range(self.num_workers)]
        self._queues = [plan.queue(w) for w in range(self.num_workers)]
        self._mask = plan.queue_capacity - 1
        # partial entries: each env's expected done count, each worker's id-ring cursor
        self._sent = [0] * plan.num_envs
        self._id_cursor = [0] * self.num_workers
        # per env its done mark and has-reply words; per worker its ring of env ids
        self._done_words = [plan.mark(i) + S.DONE for i in range(plan.num_envs)]
        self._reply_words = [plan.mark(i) + S.HAS_REPLY for i in range(plan.num_envs)]
        self._rings = [plan.env_id(w, 0) for w in range(self.num_workers)]
        self._worker_of = [w for w, group in enumerate(self.groups) for _ in group]
        self._launcher = Launcher(env_fns, self.groups, plan, res, self.doorbells, self._ctx,
                                  daemon, autoreset_mode, self._semaphore, start_timeout)
        self.local: LocalGroup | None = None
        if parent_group:
            self.local = res.local = LocalGroup(
                self.remote, self.groups[-1].start, plan, buffer, autoreset_mode,
                self._semaphore)

    @property
    def results(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rewards, terminations and truncations: views into the segment (read them before
        the next command)."""
        results = self.resources.results
        assert results is not None, "the segment was released"
        return results

    @property
    def start_method(self) -> str:
        return str(self._ctx.get_start_method())

    # -- start -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start every worker and wait until each built its envs.

        An env function that raises is logged and raised the Gymnasium way; a worker that
        makes no progress for ``start_timeout`` raises :class:`WorkerStartTimeoutError`. On
        any error every worker has been ended and the segment freed.
        """
        res = self.resources
        try:
            for w in range(self.remote):
                process, parent_pipe = self._launch(w)
                res.pipes.append(parent_pipe)
                res.processes.append(process)  # only started processes can be joined
            # the parent builds its own group while the workers build theirs
            local_error = self.local.build(self.env_fns[self.groups[-1].start:]) \
                if self.local is not None else None
            started = self._await_start(range(self.remote))
            errors = [first.error for first, *_ in started.values()
                      if isinstance(first, M.InitError)]
            if local_error is not None:
                errors.append(local_error.error)
            if errors:
                raise_logged(errors)
        except BaseException:
            res.terminate_workers()
            res.shutdown()
            raise

    def _launch(self, w: int, initial_reset: tuple[bool, bool] | None = None
                ) -> tuple[BaseProcess, connection.Connection]:
        """Start the process of worker ``w`` on its cores (see
        :class:`fastvec._placement.Placement`)."""
        return self._launcher.launch(w, self.machine.placement.cores_of(w), initial_reset)

    def _await_start(self, workers: Sequence[int],
                     replies: bool = False) -> dict[int, list[Any]]:
        return self._launcher.await_start(workers, self.recv, replies)

    # -- the machine (fastvec._machine) ------------------------------------------------------
    def _worker_pids(self) -> list[int]:
        return [p.pid for p in self.resources.processes if p.pid is not None]

    def _process_pids(self) -> list[int | None]:
        return [p.pid for p in self.resources.processes]

    # -- commands --------------------------------------------------------------------------
    def ring(self, command: M.Command, requests: Sequence[M.Request] | None = None,
             slot: int = 0) -> None:
        """Send ``command`` to every worker (with one request each), writing ``slot``."""
        # pickled before any doorbell rings: a request that cannot be pickled raises here,
        # with no worker left waiting for it
        payloads = None
        if requests is not None:
            cache: dict[int, Any] = {}  # call sends one request object to every worker
            payloads = [cache.get(id(r)) or cache.setdefault(id(r), ForkingPickler.dumps(r))
                        for r in requests]
        self.parent_time.enter()  # after anything that can raise: nothing can, from here
        self.machine.adapt(self._process_pids)
        doorbells, seqs, queues, mask = self.doorbells, self._seq, self._queues, self._mask
        self._lost = set()
        doorbells.store(self._pending, self.num_workers)
        for w in range(self.num_workers):
            seqs[w] = seq = (seqs[w] + 1) & 0xFFFFFFFF
            entry = queues[w] + S.ENTRY * (seq & mask)
            doorbells.store(entry + S.E_COMMAND, command)
            doorbells.store(entry + S.E_SLOT, slot)
        self._wake([w for w in range(self.num_workers) if self._publish(w, seqs[w])])
        if payloads is not None:
            self._send_payloads(dict(enumerate(payloads)))
        self.parent_time.leave(True)  # until the wait: the caller computes while they step

    def _publish(self, w: int, seq: int) -> bool:
        """Ring worker ``w``'s doorbell with its last entry ``seq``; True if it has to be
        woken: it sleeps on the doorbell (or is about to; see ``S.SLEEPING``). A worker still
        spinning sees the doorbell change by itself, and the parent's own group is served,
        not woken. With more workers than cores they all sleep on the shared bell."""
        if self._broadcast or w == self.remote:
            self.doorbells.store(self._doorbell[w], seq)
            return False
        return self.doorbells.store_then_load(self._doorbell[w], seq, self._sleeping[w]) != 0

    def _wake(self, asleep: Iterable[int]) -> None:
        """Wake the workers ``asleep`` on their rung doorbells, or with more workers than
        cores every worker at once on the shared bell."""
        doorbells = self.doorbells
        if self._broadcast:
            doorbells.add(self._bell, 1)
            doorbells.wake(self._bell)
            return
        for w in asleep:
            doorbells.wake(self._doorbell[w], 1)

    def _send_payloads(self, payloads: dict[int, Any]) -> None:
        """Send each worker its request, after its doorbell: the worker is reading then, so
        a message larger than the pipe's buffer cannot block us."""
        for w, payload in payloads.items():
            try:
                self._pipe(w).send_bytes(payload)
            except OSError:  # EPIPE: the worker is gone; the wait reports it
                self._mark_lost(w)

    def wait(self, timeout: float | None, name: str) -> list[M.Reply | None]:
        """Wait until every worker finished the command; return each worker's reply.

        A dead worker raises :class:`WorkerDiedError` within a wait slice. With
        ``restart_workers`` (and a command a replacement can absorb), the wait goes on until
        the other workers are done, then the dead ones are replaced (see ``_replace_lost``).
        On ``multiprocessing.TimeoutError`` the command stays pending: wait again.
        """
        self.parent_time.enter()
        try:
            replies = self._wait(timeout, name)
        except BaseException as exc:
            # a timeout leaves the command pending; anything else ends it
            self.parent_time.leave(isinstance(exc, multiprocessing.TimeoutError))
            raise
        self.parent_time.leave(False)
        return replies

    def _wait(self, timeout: float | None, name: str) -> list[M.Reply | None]:
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        if self.serve_local() and deadline is not None and time.monotonic() > deadline:
            # the parent's own group took longer than the timeout: the call stays pending
            # (its results are kept; the next wait returns them), as if a worker had
            raise multiprocessing.TimeoutError(
                f"The call to `{name}_wait` has timed out after {timeout} second(s).")
        doorbells = self.doorbells
        pending = self._pending
        restart = self.restart_workers and not self.closing and name in RESTARTABLE
        lost = self._lost
        if lost and not restart:
            self._worker_died(min(lost))
        spin_until = start + self.machine.spin_budget()
        # workers are checked every slice, also when other workers' progress woke us
        next_check = start + WAIT_SLICE
        while True:
            value = doorbells.load(pending)
            if value == 0 or (lost and self._survivors_done()):
                break
            now = time.monotonic()
            if now >= next_check:
                self._check_workers(restart)
                next_check = now + WAIT_SLICE
            wait = next_check - now
            if lost:  # nobody will wake us: poll the survivors' done marks
                wait = min(wait, WAIT_SLICE / 10)
            if deadline is not None:
                remaining = deadline - now
                if remaining <= 0:
                    raise multiprocessing.TimeoutError(
                        f"The call to `{name}_wait` has timed out after {timeout} second(s)."
                    )
                wait = min(wait, remaining)
            doorbells.wait_while_equal(pending, value, wait, max(0.0, spin_until - now), True)
        if not lost:
            self.machine.spin.record(time.monotonic() - start)
        replies: list[M.Reply | None] = [None] * self.num_workers
        self.finals = []
        self._restarting = restart
        try:
            for w in range(self.num_workers):
                flag = self.plan.worker_line(w) + S.INFO_PENDING
                if w in lost:
                    continue
                left = doorbells.load(flag)
                if left & S.REPLY_FINAL:
                    self.finals.extend(self._take_finals(w))
                if left & S.REPLY_PIPE:
                    replies[w] = self.recv(w)
                if left:
                    doorbells.store(flag, 0)  # read: waiting again must not read it twice
        finally:
            self._restarting = False
        if lost:
            self._replace_lost(name)
        return replies

    def _take_finals(self, w: int) -> list[int]:
        """The envs of worker ``w`` whose episode end the last synchronous step left in their
        rows (their HAS_REPLY marks, which this clears)."""
        load, store, reply = self.doorbells.load, self.doorbells.store, self._reply_words
        finals = [i for i in self.groups[w] if load(reply[i]) == S.REPLY_FINAL]
        for i in finals:
            store(reply[i], 0)
        return finals

    # -- partial entries -------------------------------------------------------------------
    def worker_of(self, env: int) -> int:
        """The worker whose group holds ``env``."""
        return self._worker_of[env]

    def split(self, env_ids: Sequence[int]) -> dict[int, list[int]]:
        """``env_ids`` by worker, each worker's in the given order."""
        by_worker: dict[int, list[int]] = {}
        worker_of = self._worker_of
        for i in env_ids:
            by_worker.setdefault(worker_of[i], []).append(i)
        return by_worker

    def submit(self, command: M.Command, by_worker: dict[int, list[int]],
               requests: dict[int, M.Request] | None = None, slot: int = 0) -> None:
        """Queue one partial entry per worker for its envs in ``by_worker`` (and send its
        request); each env is then marked done on its own (see :meth:`finished`)."""
        payloads = ({w: ForkingPickler.dumps(r) for w, r in requests.items()}
                    if requests is not None else None)
        self.parent_time.enter()
        self.machine.adapt(self._process_pids)
        store, mask, sent = self.doorbells.store, self._mask, self._sent
        for w, ids in by_worker.items():
            first, ring = self._id_cursor[w], self._rings[w]
            for k, i in enumerate(ids):
                store(ring + 4 * ((first + k) & mask), i)
                sent[i] = (sent[i] + 1) & 0xFFFFFFFF
            self._id_cursor[w] = (first + len(ids)) & 0xFFFFFFFF
            self._seq[w] = seq = (self._seq[w] + 1) & 0xFFFFFFFF
            entry = self._queues[w] + S.ENTRY * (seq & mask)
            store(entry + S.E_COMMAND, command | S.PARTIAL)
            store(entry + S.E_SLOT, slot)
            store(entry + S.E_FIRST, first)
            store(entry + S.E_COUNT, len(ids))
        self._wake([w for w in by_worker if self._publish(w, self._seq[w])])
        if payloads is not None:
            self._send_payloads(payloads)
        self.parent_time.leave(True)  # until the next call: envs are in flight

    def finished(self, env_ids: Sequence[int]) -> list[tuple[int, int]]:
        """Those of ``env_ids`` (submitted, not yet seen done) whose results are in the
        segment, with what comes besides (their HAS_REPLY mark: 0, S.REPLY_PIPE, a reply
        of theirs is coming through the pipe, or S.REPLY_FINAL, their episode end is in
        their rows)."""
        load, sent = self.doorbells.load, self._sent
        done, reply = self._done_words, self._reply_words
        return [(i, load(reply[i])) for i in env_ids if load(done[i]) == sent[i]]

    @property
    def completed(self) -> int:
        """The partial entries' completed-env counter (to wait on with :meth:`sleep`)."""
        return self.doorbells.load(self._completed)

    def sleep(self, completed: int, timeout: float, need: int = 1) -> None:
        """Sleep until an env completes after the count ``completed`` was read (or
        ``timeout`` seconds); no worker wakes us before ``need`` more completions (a spin
        may see the first)."""
        doorbells, waiting = self.doorbells, self.plan.parent_line + S.WAITING
        doorbells.store(self.plan.parent_line + S.TARGET,
                        (completed + max(1, need)) & 0xFFFFFFFF)
        doorbells.store(waiting, 1)
        try:
            start = time.monotonic()
            doorbells.wait_while_equal(self._completed, completed, timeout,
                                       self.machine.spin_budget(), True)
            self.machine.spin.record(time.monotonic() - start)
        finally:
            doorbells.store(waiting, 0)

    def replies(self, workers: Iterable[int], restart: bool) -> list[M.Reply]:
        """Every reply waiting in the pipes of ``workers``. A worker found dead raises
        :class:`WorkerDiedError`, or with ``restart`` is left for :meth:`check_partial`."""
        replies = []
        self._restarting = restart and not self.closing
        try:
            for w in workers:
                pipe = self._pipe(w)
                while w not in self._lost and pipe.poll(0):
                    reply = self.recv(w)
                    if reply is not None:
                        replies.append(reply)
        finally:
            self._restarting = False
        return replies

    def wait_starting(self, name: str, phase: str) -> list[M.Reply | None]:
        """:meth:`wait` for a command that is part of the start (the space check), bounded by
        ``start_timeout``: a worker that has not answered by then raises
        :class:`WorkerStartTimeoutError` saying it was ``phase``."""
        try:
            return self.wait(self.start_timeout, name)
        except multiprocessing.TimeoutError:
            doorbells, line = self.doorbells, self.plan.worker_line
            # the first worker still busy (any, should the last have finished since)
            busy = [w for w in range(self.num_workers)
                    if doorbells.load(line(w) + S.DONE_SEQ) != doorbells.load(line(w) + S.CMD_SEQ)]
            w = min(busy, default=0)
            raise self._launcher.timeout_error(w, phase) from None

    def _pipe(self, w: int) -> connection.Connection | LocalPipe:
        """The parent's end of group ``w``'s pipe."""
        if w == self.remote:
            assert self.local is not None
            return self.local.pipe
        return self.resources.pipes[w]

    def serve_local(self) -> bool:
        """Step the parent's group through every entry queued for it (the parent would
        otherwise wait); return whether there was any. It runs inside the pool's calls, so
        its CPU time is the pool's own (see :class:`fastvec._load.ParentTime`)."""
        local = self.local
        if local is None:
            return False
        return local.serve(self._seq[self.remote])

    def allocate_scratch(self) -> None:
        """Allocate the scratch slot's pages before a command first writes it (once)."""
        assert self.resources.shm is not None
        self.resources.shm.allocate_tail()

    # -- teardown --------------------------------------------------------------------------
    def shutdown(self, terminate: bool) -> None:
        """End the workers (at once with ``terminate``) and free the segment."""
        if terminate:
            self.resources.terminate_workers()
        self.resources.shutdown()
