"""The operating system's side of a pool: cores, process groups, and the resources that must
be released exactly once.

:class:`Resources` holds a pool's worker processes, their pipes and the segment, apart from the
pool so that a ``weakref.finalize`` can end them without keeping the vector env alive; its
teardown ends each worker's process group (what its envs started) without ever signalling a
process that merely reuses a pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from multiprocessing import connection
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING

import numpy as np

from fastvec import _memory
from fastvec import _segment as S
from fastvec._info_rows import InfoRows
from fastvec._sync import Doorbells
from fastvec.layout import Segment

if TYPE_CHECKING:
    from fastvec._local import LocalGroup

__all__ = ["Resources", "default_num_workers", "finalize", "split_groups", "usable_cores"]


def affinity() -> set[int]:
    try:
        return os.sched_getaffinity(0)
    except AttributeError:  # not Linux: no pinning
        return set()


def usable_cores() -> int:
    """Cores this process may run on (``os.sched_getaffinity`` where it exists)."""
    return len(affinity()) or os.cpu_count() or 1


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


def process_start_time(pid: int | None) -> str | None:
    """The kernel's start time of process ``pid`` (None where there is no /proc or no such
    process): with the pid, it names one process for good."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return fields[19].decode()  # field 22 of stat(5), counted after the command name


def kill_process_group(pid: int | None, start_time: str | None) -> None:
    """SIGKILL what is left of worker ``pid``'s group: the processes its envs started.

    The group's id is the worker's pid. While a member of that group lives the number cannot
    be reused, but once the worker is reaped and the group is empty another process may take
    it and lead a group of its own: the kill is sent only while the worker is still our
    unreaped child, or the process with its pid is still the worker (its ``start_time``: a
    forkserver's child), or no process has that pid (then only the worker's orphans can).
    """
    if pid is None:
        return
    ours = False
    if hasattr(os, "waitid"):
        try:
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            ours = True
        except ChildProcessError:  # reaped already, or a forkserver's child
            pass
    if not ours:
        now = process_start_time(pid)
        if now is not None and now != start_time:  # the pid is another process's now
            return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # nothing left (or not ours to end)
        pass


def has_exited(process: BaseProcess, timeout: float = 0.0) -> bool:
    """Whether ``process`` ended (waiting up to ``timeout``), without reaping it."""
    return bool(connection.wait([process.sentinel], timeout))


class Resources:
    """Everything that must be released exactly once, even if the env is never closed.

    Held apart from the pool so that a ``weakref.finalize`` can clean up without keeping the
    vector env alive.
    """

    def __init__(self) -> None:
        self.shm: _memory.SharedSegment | None = None
        self.doorbells: Doorbells | None = None
        self.segment: Segment | None = None
        self.plan: S.SegmentPlan | None = None
        self.results: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.info_rows: InfoRows | None = None
        self.processes: list[BaseProcess] = []
        self.pipes: list[connection.Connection] = []
        # each worker's start time, read at launch: with its pid, names it for good
        self.start_times: dict[int, str | None] = {}
        # the parent's own group (parent_group=True): its envs and views into the segment
        self.local: LocalGroup | None = None

    def kill_group(self, process: BaseProcess) -> None:
        """End what is left of ``process``'s group (see :func:`kill_process_group`)."""
        if process.pid is not None:
            kill_process_group(process.pid, self.start_times.get(process.pid))

    def terminate_workers(self) -> None:
        for process in self.processes:
            if not has_exited(process):  # not is_alive(): it would reap, before the group kill
                process.terminate()

    def shutdown(self, join_timeout: float = 2.0) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.close()
        self.pipes = []
        deadline = time.monotonic() + join_timeout
        # wait for the exits without reaping: an unreaped worker's pid (its group's id)
        # cannot be reused, so the group kill reaches only what its envs left behind
        sentinels = {process.sentinel for process in self.processes}
        while sentinels and time.monotonic() < deadline:
            sentinels -= set(connection.wait(list(sentinels),
                                             max(0.0, deadline - time.monotonic())))
        for process in self.processes:
            self.kill_group(process)  # a worker still running goes with it
        for process in self.processes:
            process.join(1.0)
            if process.is_alive():
                process.kill()
                process.join(1.0)
        for process in self.processes:
            with contextlib.suppress(ValueError):  # one that would not end: left to the GC
                process.close()
        self.processes = []
        self.release_segment()

    def release_segment(self) -> None:
        local, self.local = self.local, None
        if local is not None:
            local.release()
        if self.plan is not None:
            self.plan.unbind()
        self.results = None
        if self.info_rows is not None:
            self.info_rows.release()
            self.info_rows = None
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


def finalize(resources: Resources) -> None:
    """End every worker and free the segment (``weakref.finalize`` of the vector env)."""
    resources.terminate_workers()
    resources.shutdown()
