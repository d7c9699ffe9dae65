"""Dead workers: finding them, saying how they ended and replacing them.

:class:`WorkerDeaths` is the base class of :class:`fastvec._pool.WorkerPool` that keeps what a
death changes: the workers found dead during the current command (lost), the error that broke
the pool (``broken``) and the replacements started during a step (``replaced``). A worker is
found dead by its sentinel or its closed pipe while the pool waits for it, reads its reply or
sends it a request. Unless ``restart_workers`` and the command (:data:`RESTARTABLE`) let a
replacement make up for it, the death breaks the pool with
:class:`~fastvec.errors.WorkerDiedError`. The pool's attributes and methods used here are
declared below; its waits and command delivery call into this class.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from multiprocessing import connection
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Semaphore
from typing import TYPE_CHECKING, Any

from gymnasium import logger
from gymnasium.vector import AutoresetMode

from fastvec import _messages as M
from fastvec import _segment as S
from fastvec._info_rows import InfoRows
from fastvec._launch import Launcher, envs_label
from fastvec._local import LocalPipe
from fastvec._processes import Resources, has_exited
from fastvec._remote_errors import rebuild
from fastvec._sync import Doorbells
from fastvec._waiting import WAIT_SLICE
from fastvec.errors import WorkerDiedError, WorkerStartTimeoutError

__all__ = ["RESTARTABLE", "WorkerDeaths"]

# Commands during which restart_workers=True replaces a dead worker (construction and close
# do not: there a death raises WorkerDiedError, or is ignored by close).
RESTARTABLE = frozenset({"step", "reset", "call", "set_attr"})

class WorkerDeaths:
    """Finds dead workers, describes their end and replaces them (``restart_workers``)."""

    # the pool's, read here
    plan: S.SegmentPlan
    resources: Resources
    doorbells: Doorbells
    groups: list[range]
    num_workers: int
    remote: int
    autoreset_mode: AutoresetMode
    start_timeout: float | None
    _semaphore: Semaphore | None
    _sent: list[int]
    _launcher: Launcher
    info_rows: InfoRows

    if TYPE_CHECKING:  # the pool's: (re)starting a worker and its pipe
        def _launch(self, w: int, initial_reset: tuple[bool, bool] | None = None
                    ) -> tuple[BaseProcess, connection.Connection]: ...

        def _await_start(self, workers: Sequence[int],
                         replies: bool = False) -> dict[int, list[Any]]: ...

        def _pipe(self, w: int) -> connection.Connection | LocalPipe: ...

    def __init__(self) -> None:
        # set once a worker died and the pool cannot continue: every later call raises it
        self.broken: WorkerDiedError | None = None
        # set by the vector env's close: a worker that dies now is not replaced
        self.closing = False
        # workers found dead during the current command, before it is resolved
        self._lost: set[int] = set()
        # while collecting replies a restart may absorb: a dead worker is lost, not fatal
        self._restarting = False
        # replacements started during the current step: (worker, their reset reply)
        self.replaced: list[tuple[int, M.Reply]] = []

    # -- finding dead workers --------------------------------------------------------------
    @property
    def lost(self) -> bool:
        """Whether a worker was found dead and not yet replaced (``restart_workers``)."""
        return bool(self._lost)

    def _survivors_done(self) -> bool:
        doorbells, line = self.doorbells, self.plan.worker_line
        return all(doorbells.load(line(w) + S.DONE_SEQ) == doorbells.load(line(w) + S.CMD_SEQ)
                   for w in range(self.num_workers) if w not in self._lost)

    def recv(self, w: int) -> Any:
        """The next message from worker ``w``. If it died first, raise WorkerDiedError, or,
        while ``wait`` collects replies it may restart, mark it lost and return ``None``."""
        if w == self.remote:  # the parent's group: its reply is already there
            return self._learn(self._pipe(w).recv())
        pipe = self.resources.pipes[w]
        process = self.resources.processes[w]
        while True:
            # a reply is usually there already (its worker marked it sent): poll is one
            # system call, connection.wait builds a selector
            ready = ([pipe] if pipe.poll(0)
                     else connection.wait([pipe, process.sentinel], WAIT_SLICE * 4))
            if pipe in ready:
                try:
                    message = pipe.recv()
                except (EOFError, OSError):
                    pass
                else:
                    return self._learn(message)
                break
            if process.sentinel in ready:
                if pipe.poll(0):
                    continue
                break
        if not self._restarting:
            self._worker_died(w)
        self._mark_lost(w)
        return None

    def _learn(self, message: Any) -> Any:
        """``message``, once the infos of a reply taught the parent their envs' schemas
        (whether or not the caller uses them: the worker learned them when it sent them)."""
        if type(message) is M.Reply and message.infos:
            self.info_rows.learn(message.infos)
        return message

    def check_partial(self, restart: bool) -> list[int]:
        """Look for dead workers while partial entries are in flight: raise
        :class:`WorkerDiedError`, or with ``restart`` replace them (their envs fresh, reset
        into the line's slot; :attr:`replaced` holds the resets' replies) and return them."""
        restart = restart and not self.closing
        self._check_workers(restart)
        if not self._lost:
            return []
        lost = sorted(self._lost)
        if not restart:
            self._worker_died(lost[0])
        self._replace_lost("step")
        doorbells, mark = self.doorbells, self.plan.mark
        for w in lost:  # what was queued for the dead worker is gone: count from here
            for i in self.groups[w]:
                self._sent[i] = doorbells.load(mark(i) + S.DONE)
        return lost

    def _check_workers(self, restart: bool = False) -> None:
        for w, process in enumerate(self.resources.processes):
            if w not in self._lost and has_exited(process):
                if not restart:
                    self._worker_died(w)
                self._mark_lost(w)

    def _mark_lost(self, w: int) -> None:
        self._lost.add(w)
        # at once: a survivor may be waiting for the permit before it can finish
        self._release_permit(w)

    # -- describing a death ----------------------------------------------------------------
    def describe(self, w: int) -> str:
        """``fastvec worker <w> (pid <pid>, envs <a>..<b>)``, or the parent's group."""
        if w == self.remote:
            group = self.groups[w]
            return f"the parent's group ({envs_label(group)})"
        return self._launcher.describe(w)

    def _death(self, w: int) -> tuple[str, WorkerDiedError]:
        """Reap worker ``w``, end what its envs started and describe its end:
        ``(description, error)``; the error says the vector env cannot continue."""
        process = self.resources.processes[w]
        # it closed its pipe or sentinel: it is exiting; its group goes before it is reaped
        if has_exited(process, 0.5):
            self.resources.kill_group(process)
        process.join(0.5)  # blocks until the exit that closed the sentinel is complete
        code = process.exitcode
        if code is None:
            how = "closed its pipe"
        elif code < 0:
            try:
                how = f"was killed by signal {signal.Signals(-code).name}"
            except ValueError:
                how = f"was killed by signal {-code}"
        else:
            how = f"exited with code {code}"
        what = f"{self.describe(w)} {how}"
        error = WorkerDiedError(
            f"{what}. The vector env cannot continue; close it and make a new one.",
            worker=w, env_indices=tuple(self.groups[w]), pid=process.pid, exitcode=code,
        )
        return what, error

    def _worker_died(self, w: int) -> None:
        self.broken = error = self._death(w)[1]
        self._lost = set()
        raise error

    def _break(self, error: WorkerDiedError) -> WorkerDiedError:
        self.broken = error
        return error

    # -- replacing the dead ----------------------------------------------------------------
    def _replace_lost(self, name: str) -> None:
        """Start a new worker for every lost one (``restart_workers=True``).

        The new worker builds fresh envs from ``env_fns`` and resets them (seed ``None``)
        before it serves. During a step it writes their observations into the step's slot
        and the step reports them truncated (the caller reads :attr:`replaced`); any other
        command cannot make up the lost results, so it raises :class:`WorkerDiedError` with
        ``restarted=True`` once the replacements are up.
        """
        res = self.resources
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
                has_exited(old, 1.0)
                res.kill_group(old)
                old.join(1.0)
            self.info_rows.forget(self.groups[w])  # the replacement knows no schema yet
            for i in self.groups[w]:  # nor any episode end the old worker marked
                self.doorbells.store(self.plan.mark(i) + S.HAS_REPLY, 0)
            try:
                res.processes[w], res.pipes[w] = self._launch(
                    w, initial_reset=(in_step, autoreset))
            except Exception as exc:  # cannot fork, say; shutdown joins the old one
                what, died = deaths[w]
                raise self._break(WorkerDiedError(
                    f"{what} during `{name}`, and its replacement could not be started: {exc}",
                    worker=w, env_indices=died.env_indices, pid=died.pid,
                    exitcode=died.exitcode)) from exc
            old.close()
        self.replaced = []
        try:  # a replacement that dies breaks the vector env
            started = self._await_start(lost, replies=True)
        except WorkerStartTimeoutError as exc:
            what, died = deaths[exc.worker]
            raise self._break(WorkerDiedError(
                f"{what} during `{name}`, and its replacement (pid {exc.pid}) made no progress "
                f"for {self.start_timeout:g} s while {exc.phase}; pass a larger "
                "`start_timeout=` if that is expected. The vector env cannot continue; close "
                "it and make a new one.",
                worker=exc.worker, env_indices=died.env_indices, pid=died.pid,
                exitcode=died.exitcode)) from None
        restarted = []
        for w in lost:
            what, died = deaths[w]
            first, *reply = started[w]
            if isinstance(first, M.InitError):
                cause = rebuild(first.error.payload)
                raise self._break(WorkerDiedError(
                    f"{what} during `{name}`, and its replacement could not be started: env "
                    f"{first.error.env} raised {type(cause).__name__}: {cause}. The vector "
                    "env cannot continue; close it and make a new one.",
                    worker=w, env_indices=died.env_indices, pid=died.pid,
                    exitcode=died.exitcode)) from cause
            self.replaced.append((w, reply[0]))
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
            self.replaced = []
            raise restarted[0]

    def _release_permit(self, w: int) -> None:
        """Give back the max_concurrency permit a dead worker held."""
        line = self.plan.worker_line(w)
        if self._semaphore is not None and self.doorbells.load(line + S.PERMIT):
            try:
                self._semaphore.release()
            except ValueError:  # it had not taken it after all
                pass
        self.doorbells.store(line + S.PERMIT, 0)
