"""The worker process around the loop: it leads a process group of its own, ends with its
parent, pins itself, attaches the segment, builds its group's envs (:func:`build_envs`, which
the parent's own group uses too) and then runs :meth:`fastvec.worker.Worker.run`.

:func:`worker_main` is the process's target (picklable for spawn and forkserver).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Semaphore
from typing import Any

from gymnasium import Env
from gymnasium.vector import AutoresetMode

from fastvec import _memory
from fastvec import _messages as M
from fastvec import _segment as S
from fastvec._remote_errors import EnvError, capture
from fastvec._sync import kill_group_on_parent_death, unlink_on_parent_death
from fastvec.worker import Worker

__all__ = ["build_envs", "worker_main"]


def _lead_process_group() -> bool:
    """Make this worker the leader of a new process group, which every process its envs start
    joins: the parent (or this worker, when the parent dies) can then end them all at once.
    Ctrl-C from a terminal reaches the foreground group only, so it no longer reaches them."""
    try:
        os.setpgid(0, 0)
    except OSError:  # not allowed (a session leader): its descendants are not tracked
        return False
    # A background group is stopped by the terminal when it writes under `stty tostop` or
    # changes terminal settings (a curses renderer): ignored, these go through instead, for
    # the processes the envs start too (an ignored signal stays ignored across exec).
    for stop in (signal.SIGTTOU, signal.SIGTTIN):
        signal.signal(stop, signal.SIG_IGN)
    return True


def _set_parent_death_signal() -> None:
    """Ask Linux to kill this worker's group when its parent process dies (a no-op elsewhere).

    Linux signals when the parent *thread* that forked us ends; the C handler then checks
    that the process itself is gone, so this is safe for envs made on any thread.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        # a real-time signal: no library an env loads claims it, and its default action
        # (should an env replace the handler) still ends the worker
        kill_group_on_parent_death(signal.SIGRTMIN + 3)
    except OSError:  # the ppid check in the wait loop still covers this
        pass


def _parent_alive(start_ppid: int, parent_pid: int) -> bool:
    """Whether the vector env's process lives (``start_ppid``: our parent when we started)."""
    if os.getppid() != start_ppid:  # reparented: our parent (or the server) died
        return False
    if start_ppid == parent_pid:
        return True
    try:  # forkserver: the vector env's process is not our parent
        os.kill(parent_pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


# how long a worker whose pipe closed waits to see whether its parent died (seconds)
PARENT_GONE_WAIT = 1.0


def _parent_gone_within(limit: float, start_ppid: int, parent_pid: int) -> bool:
    """Whether the vector env's process is seen gone within ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while _parent_alive(start_ppid, parent_pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def _segment_file(handle: _memory.Handle) -> str | None:
    """The file that names the segment (None for a memfd, which has no name to leave)."""
    if handle.kind == _memory.SHM:
        return _memory.SHM_DIR + handle.path if sys.platform.startswith("linux") else None
    if handle.kind == _memory.FILE:
        return handle.path
    return None


def _end_group(segment_file: str | None = None) -> None:
    """SIGKILL this worker's process group: the worker and every process its envs started;
    first unlink ``segment_file``, the segment of the parent that died."""
    if segment_file is not None:
        with contextlib.suppress(OSError):  # another worker was first
            os.unlink(segment_file)
    os.killpg(0, signal.SIGKILL)


def worker_main(index: int, start: int, env_fns: list[Callable[[], Env[Any, Any]]],
                pipe: Connection, parent_pipe: Connection | None, plan: S.SegmentPlan,
                segment_handle: _memory.Handle, autoreset_mode: AutoresetMode,
                semaphore: Semaphore | None, parent_pid: int,
                cores: frozenset[int] | None = None, *,
                initial_reset: tuple[bool, bool] | None = None) -> None:
    """Entry point of a worker process (picklable for spawn and forkserver).

    The worker leads a process group of its own, so every process its envs start can be
    ended with it: by the parent at close and after the worker's death, and by the worker
    (the kernel's parent-death signal on Linux, else the wait loop's parent check) when the
    parent dies. While it starts, it writes what it is doing into its control line
    (``STATUS``: building or resetting env ``STATUS_ENV``), which the parent reads when
    the start takes too long.

    ``initial_reset``: this worker replaces one that died; ``(publish, autoreset)`` says
    whether to reset the new envs before serving (seed ``None``), write their observations
    into the current slot and send the reset's reply after ``ready``, and whether their next
    step is an autoreset.
    """
    # Ctrl-C is the parent's to handle, also when a SIGINT reaches us or our own group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    own_group = _lead_process_group()
    start_ppid = os.getppid()
    # a parent that dies (killed, say) cannot unlink its segment: the worker does
    segment_file = _segment_file(segment_handle)
    if segment_file is not None and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            unlink_on_parent_death(segment_file)
    _set_parent_death_signal()
    if not _parent_alive(start_ppid, parent_pid):  # it died before the signal was set
        if own_group:
            _end_group(segment_file)
        return
    if cores is not None:
        try:
            os.sched_setaffinity(0, cores)
        except (AttributeError, OSError):  # not Linux, or a core went away: run unpinned
            pass
    if parent_pipe is not None:
        parent_pipe.close()
    shm: _memory.SharedSegment | None = None
    worker: Worker | None = None
    try:
        try:
            shm = _memory.attach(segment_handle)
            assert shm.buf is not None
            worker = Worker(index, start, pipe, plan, shm.buf, autoreset_mode, semaphore)
        except Exception as exc:  # a segment that is not our parent's, say: tell the parent
            pipe.send(M.InitError(EnvError(start, capture(exc))))
            return
        seq = build_envs(worker, env_fns, initial_reset)
        if seq is not None and not worker.run(
                seq, lambda: _parent_alive(start_ppid, parent_pid)) and own_group:
            _end_group(segment_file)  # the parent died: as its death signal does
    except (EOFError, BrokenPipeError):
        # The parent closed its end: it is closing us (and then ends our group itself), or
        # it died. A dead parent's pipes close before the kernel reparents us and sends the
        # death signal, so a worker that left at once took its envs' processes' only way
        # out with it: wait for the parent to be seen gone, briefly.
        if own_group and _parent_gone_within(PARENT_GONE_WAIT, start_ppid, parent_pid):
            _end_group(segment_file)
    except KeyboardInterrupt:
        pass
    finally:
        if worker is not None:
            if worker.envs:
                worker.close_envs()
            worker.detach()
        if shm is not None:
            shm.close()
        pipe.close()


def build_envs(worker: Worker, env_fns: list[Callable[[], Env[Any, Any]]],
                initial_reset: tuple[bool, bool] | None) -> int | None:
    """Build the group's envs (and reset them, for a replacement), then say ``ready``.

    Returns the command sequence seen before ``ready``, or None if an env function raised
    (the parent has been told).
    """
    start = worker.start
    for j, fn in enumerate(env_fns):
        worker.phase(S.STATUS_BUILDING, start + j)
        try:
            worker.add_env(fn())
        except Exception as exc:
            worker.pipe.send(M.InitError(EnvError(start + j, capture(exc))))
            return None
    reply = None
    if initial_reset is not None:
        publish, autoreset = initial_reset
        worker.phase(S.STATUS_RESETTING, start)
        # the slot of the latest command: the one whose results the reset stands in for
        seq = worker.doorbells.load(worker.line + S.CMD_SEQ)
        worker.slot = worker.doorbells.load(worker.plan.entry(worker.index, seq) + S.E_SLOT)
        reply = worker.reset_group([None] * len(worker.envs), None, None, publish)
        worker.autoreset = [autoreset] * len(worker.envs)
    # read before announcing readiness: the parent may ring as soon as it hears us
    seq = worker.doorbells.load(worker.line + S.CMD_SEQ)
    worker.phase(S.STATUS_READY)
    worker.pipe.send(M.Ready())
    if reply is not None:
        worker.pipe.send_bytes(worker.pickle_reply(reply))
    return seq
