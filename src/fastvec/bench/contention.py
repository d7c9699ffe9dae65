"""``--contention N``: busy-looping processes that share the machine with the benchmark.

A trainer's machine is rarely quiet; these processes stand in for its other work, so the
table shows how each vectoriser copes when it does not have the cores to itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import TracebackType

__all__ = ["BUSY_MARKER", "BusyProcesses"]

#: In every busy process's command line, so it can be told from other processes.
BUSY_MARKER = "fastvec-bench busy loop"

# Run as `python -I -S -c`, with the parent's pid as argv[1]. Linux's parent-death signal
# kills the loop if the benchmark dies without cleaning up (SIGKILL, a crash); the pid check
# covers a parent that died before prctl took effect.
_BUSY_LOOP = f"""\
# {BUSY_MARKER}
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(0)
try:
    while True:
        pass
except KeyboardInterrupt:
    pass
"""


class BusyProcesses:
    """Context manager: ``count`` processes spinning ``while True: pass`` while it is open.

    Pure Python, one core's worth each, unpinned (the scheduler places them; they inherit
    this process's affinity). They are killed and reaped when the block is left in any way
    (normally, by an exception, by Ctrl-C), and die with this process if it is killed.
    """

    def __init__(self, count: int) -> None:
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        self.count = count
        self.processes: list[subprocess.Popen[bytes]] = []
        #: How many were still running when they were stopped (set by :meth:`stop`).
        self.ran: int | None = None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def start(self) -> None:
        try:
            for _ in range(self.count):
                self.processes.append(subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", _BUSY_LOOP, str(os.getpid())],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Kills every busy process and waits for it; safe to call more than once."""
        running = [p for p in self.processes if p.poll() is None]
        if self.ran is None:
            self.ran = len(running)
        for p in running:
            p.kill()
        for p in self.processes:
            # SIGKILL cannot be caught; the wait only reaps, so it returns at once
            p.wait()

    def __enter__(self) -> BusyProcesses:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
