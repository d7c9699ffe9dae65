"""Starting worker processes: one per group of envs, over an already-created segment.

:class:`Launcher` forks (or spawns) the process of one worker with its group's env
functions, and waits until a set of workers have built their envs, reading the phase each
one reports in its control line so that a worker that makes no progress for
``start_timeout`` seconds is named with what it was doing. The pool uses it to start every
worker and to replace dead ones; what happens once they serve is the pool's.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing import connection
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Semaphore
from typing import Any

from gymnasium import Env
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import CloudpickleWrapper, clear_mpi_env_vars

from fastvec import _messages as M
from fastvec import _segment as S
from fastvec._processes import Resources, process_start_time
from fastvec._sync import Doorbells
from fastvec._waiting import WAIT_SLICE
from fastvec._worker_main import worker_main
from fastvec.errors import WorkerStartTimeoutError

__all__ = ["Launcher", "envs_label"]

# Worker processes start one at a time across the process's threads. Forking is quick, so
# threads building vector envs at once lose nothing, and an at-fork hook that cannot bear
# concurrent forks (filelock 3.32's, which Ray and Tianshou import, raises RuntimeError when
# another thread forks while it runs) is never entered twice.
_START_LOCK = threading.Lock()


def envs_label(group: range) -> str:
    """``env 3`` or ``envs 3..5``."""
    return f"env {group.start}" if len(group) == 1 else f"envs {group.start}..{group.stop - 1}"


@dataclass
class Launcher:
    """Starts the worker processes of one pool.

    Parameters
    ----------
    env_fns, groups
        Every env's function, and each worker's group of env indices.
    plan, resources, doorbells
        The pool's segment plan, what it releases (the segment's handle, the processes and
        their start times) and its doorbells over the segment.
    context, daemon, autoreset_mode, semaphore, start_timeout
        As the pool was given them (``semaphore``: the max_concurrency permits, or None).
    """

    env_fns: Sequence[Callable[[], Env[Any, Any]]]
    groups: list[range]
    plan: S.SegmentPlan
    resources: Resources
    doorbells: Doorbells
    context: BaseContext
    daemon: bool
    autoreset_mode: AutoresetMode
    semaphore: Semaphore | None
    start_timeout: float | None

    def launch(self, w: int, cores: frozenset[int] | None,
               initial_reset: tuple[bool, bool] | None = None
               ) -> tuple[BaseProcess, connection.Connection]:
        """Start the process of worker ``w`` (on ``cores``, if not None); return it and the
        parent's end of its pipe. ``initial_reset``: see :func:`worker_main`."""
        group = self.groups[w]
        shm = self.resources.shm
        assert shm is not None
        # a replacement starts from scratch, whatever its predecessor reported
        self.doorbells.store(self.plan.worker_line(w) + S.STATUS, S.STATUS_STARTING)
        with clear_mpi_env_vars():
            parent_pipe, child_pipe = self.context.Pipe()
            env_fns = [CloudpickleWrapper(self.env_fns[i]) for i in group]
            process = self.context.Process(  # type: ignore[attr-defined]
                target=worker_main,
                name=f"Worker<AsyncVectorEnv>-{w}",
                args=(w, group.start, env_fns, child_pipe, parent_pipe, self.plan,
                      shm.handle, self.autoreset_mode, self.semaphore, os.getpid(), cores),
                kwargs={"initial_reset": initial_reset},
                daemon=self.daemon,
            )
            try:
                with _START_LOCK:  # one fork at a time, whatever the threads
                    process.start()
            except BaseException:
                parent_pipe.close()
                raise
            finally:
                child_pipe.close()
        if process.pid is not None:
            self.resources.start_times[process.pid] = process_start_time(process.pid)
        return process, parent_pipe

    def await_start(self, workers: Sequence[int], recv: Callable[[int], Any],
                    replies: bool = False) -> dict[int, list[Any]]:
        """Wait until each of ``workers`` sent :class:`Ready` (then, with ``replies``, the
        reply of its initial reset) or :class:`InitError`; return each one's messages, read
        with ``recv(w)`` (which raises :class:`WorkerDiedError` for a dead worker).

        A worker whose phase (:meth:`phase`) stays the same for ``start_timeout`` seconds
        raises :class:`WorkerStartTimeoutError`.
        """
        res = self.resources
        wanted = 2 if replies else 1
        messages: dict[int, list[Any]] = {w: [] for w in workers}
        now = time.monotonic()
        progress = {w: (self._phase_words(w), now) for w in workers}
        waiting = set(workers)
        while waiting:
            handles: dict[Any, int] = {}
            for w in waiting:
                handles[res.pipes[w]] = handles[res.processes[w].sentinel] = w
            for handle in connection.wait(list(handles), WAIT_SLICE * 4):
                w = handles[handle]
                if w not in waiting:
                    continue
                messages[w].append(recv(w))  # a message or a death: no waiting here
                if isinstance(messages[w][0], M.InitError) or len(messages[w]) == wanted:
                    waiting.discard(w)
                progress[w] = (self._phase_words(w), time.monotonic())
            now = time.monotonic()
            for w in sorted(waiting):
                words, since = progress[w]
                if self._phase_words(w) != words:
                    progress[w] = (self._phase_words(w), now)
                elif self.start_timeout is not None and now - since > self.start_timeout:
                    raise self.timeout_error(w, self.phase(w))
        return messages

    def _phase_words(self, w: int) -> tuple[int, int]:
        line = self.plan.worker_line(w)
        return (self.doorbells.load(line + S.STATUS), self.doorbells.load(line + S.STATUS_ENV))

    def phase(self, w: int) -> str:
        """What worker ``w`` reports doing while it starts."""
        status, env = self._phase_words(w)
        if status == S.STATUS_BUILDING:
            return f"building env {env} (its env function had not returned)"
        if status == S.STATUS_RESETTING:
            return f"resetting env {env}"
        if status == S.STATUS_READY:
            return "sending its ready message"
        return "starting up (its process had not attached the segment yet)"

    def timeout_error(self, w: int, phase: str) -> WorkerStartTimeoutError:
        """Worker ``w`` made no progress for ``start_timeout`` seconds while ``phase``."""
        assert self.start_timeout is not None
        return WorkerStartTimeoutError(
            f"{self.describe(w)} made no progress for {self.start_timeout:g} s while {phase}. "
            "Building or resetting an env may legitimately take longer (a simulator): pass a "
            "larger `start_timeout=` (seconds, or None to wait forever) to AsyncVectorEnv.",
            worker=w, env_indices=tuple(self.groups[w]),
            pid=self.resources.processes[w].pid, phase=phase)

    def describe(self, w: int) -> str:
        """``fastvec worker <w> (pid <pid>, envs <a>..<b>)``."""
        pid = self.resources.processes[w].pid
        return f"fastvec worker {w} (pid {pid}, {envs_label(self.groups[w])})"
