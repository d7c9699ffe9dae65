"""How busy the machine is beside a pool, and what the pool's hand-offs should do about it.

A hand-off between processes is cheap when each has a core: a waiter that spins for a few
hundred microseconds sees the other side's answer without a futex sleep, and a worker pinned
to its own core keeps its caches. On a machine that other work keeps busy, both turn against
the pool: a spinning waiter takes the core the worker it waits for needs, and a worker pinned
to a core shared with a busy process gets half that core while the other runs free, so every
synchronous step waits for it (measured here with one busy process: 0.2x ``SyncVectorEnv``
pinned and spinning, 1.1-2x unpinned and sleeping).

:class:`MachineLoad` measures the other work directly: the CPU time the usable cores spent
busy (``/proc/stat``) minus the time the pool itself took (``/proc/<pid>/stat`` of each
worker, and the parent's own time as :class:`ParentTime` splits it: inside the pool's calls,
and between a synchronous step and the next, when the workers are idle). What is left is work
that competes with the workers for the cores: other processes, the parent's other threads (a
learner's), and the trainer's own computing while envs are in flight (a policy's forward
pass while the workers step the other half of a double-buffered batch). :class:`Contention`
turns those samples into a decision with hysteresis: calm (spin, pin) or contended (sleep at
once, let the scheduler place workers).

Part of that other work can be the trainer's own: :class:`ParentTime` splits the parent's
time into the pool's own and the caller's computing while envs are in flight (the policy of
a double-buffered loop), and :class:`CallerShare` turns the latter into the cores to leave to
the parent, so that the workers stop taking turns with it on a core its forward pass needs.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence

__all__ = ["CallerShare", "Contention", "MachineLoad", "ParentTime", "process_cpu_seconds"]

try:
    _TICK = float(os.sysconf("SC_CLK_TCK"))
except (AttributeError, ValueError, OSError):  # not POSIX
    _TICK = 100.0


def _busy_seconds(cores: Sequence[int]) -> float | None:
    """CPU seconds the ``cores`` spent busy since boot (None where ``/proc/stat`` is not)."""
    try:
        with open("/proc/stat", "rb") as f:
            lines = f.read().split(b"\n")
    except OSError:
        return None
    wanted = {b"cpu%d" % core for core in cores}
    ticks = 0
    found = 0
    for line in lines[1:]:
        if not line.startswith(b"cpu"):
            break
        fields = line.split()
        if fields[0] in wanted:
            # user nice system idle iowait irq softirq steal: all but idle and iowait
            # (steal is time the hypervisor gave another guest: this machine was busy)
            values = [int(v) for v in fields[1:9]]
            ticks += sum(values) - values[3] - values[4]
            found += 1
    return ticks / _TICK if found else None


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used; 0.0 if it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return 0.0
    # the command name, in parentheses, may hold spaces: count fields after its end
    fields = data[data.rfind(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


class MachineLoad:
    """Cores' worth of work beside the pool's own that ran on ``cores`` between two samples.

    ``pids()`` names the pool's worker processes; ``own()`` is the parent's CPU seconds of
    the pool's own work so far (:attr:`ParentTime.own`: its spinning, writing actions and
    reading results are the pool's, not work that competes with it). :meth:`sample` returns
    None until two samples exist, or where the counters cannot be read (not Linux).
    """

    def __init__(self, cores: Sequence[int], pids: Callable[[], Iterable[int]],
                 own: Callable[[], float] = lambda: 0.0) -> None:
        self.cores = list(cores)
        self.pids = pids
        self.own = own
        self._last: tuple[float, float, float] | None = None

    def _read(self, now: float) -> tuple[float, float, float] | None:
        busy = _busy_seconds(self.cores)
        if busy is None:
            return None
        ours = self.own() + sum(process_cpu_seconds(pid) for pid in self.pids())
        return now, busy, ours

    def sample(self, now: float) -> float | None:
        reading = self._read(now)
        last, self._last = self._last, reading
        if reading is None or last is None or reading[0] <= last[0]:
            return None
        wall = reading[0] - last[0]
        others = (reading[1] - last[1]) - (reading[2] - last[2])
        return max(0.0, others / wall)


class Contention:
    """Whether the pool's hand-offs run on a contended machine, decided every ``INTERVAL``
    seconds from :class:`MachineLoad`: contended once other work takes ``BUSY`` cores' worth,
    calm again once it takes under ``QUIET`` (two samples in a row, so a short burst of
    other work does not flip it back and forth).

    A pool with more workers than usable cores is judged the same way: its own workers take
    turns on the cores, and while the machine is otherwise calm a spinning waiter hands its
    core straight to the next of them (64 trivial envs, 8 workers on 2 cores: 422k env-steps/s
    spinning, 185k sleeping at once).
    """

    INTERVAL = 0.25
    BUSY = 0.5
    QUIET = 0.25

    def __init__(self, load: MachineLoad | None) -> None:
        self.load = load
        self.contended = False
        #: the latest sample: cores' worth of other work (None before the second sample)
        self.others: float | None = None
        self._next = 0.0
        self._quiet_samples = 0

    def check(self, now: float) -> bool:
        """Sample if ``INTERVAL`` has passed; True when :attr:`contended` changed."""
        if now < self._next or self.load is None:
            return False
        self._next = now + self.INTERVAL
        others = self.load.sample(now)
        self.others = others
        if others is None:
            return False
        return self.update(others)

    def update(self, others: float) -> bool:
        """Take one sample of other work (cores' worth); True when :attr:`contended` changed."""
        if not self.contended:
            if others >= self.BUSY:
                self.contended = True
                self._quiet_samples = 0
                return True
            return False
        self._quiet_samples = self._quiet_samples + 1 if others < self.QUIET else 0
        if self._quiet_samples >= 2:
            self.contended = False
            return True
        return False


class ParentTime:
    """The parent thread's CPU time, split into the pool's own and the caller's computing
    while envs are in flight.

    The pool calls :meth:`enter` when one of its calls begins and :meth:`leave` when it
    returns, saying whether envs are still in flight. Time inside the calls (waiting,
    writing actions, reading results, stepping ``parent_group``'s envs) is the pool's own,
    and so is time outside them with nothing in flight (between two synchronous steps the
    workers are idle, so the trainer's computing there takes no core from them). Time
    outside the calls with envs in flight (a double-buffered policy's forward pass, or the
    caller's work between ``step_async`` and ``step_wait``) is the caller's: it competes
    with the workers for the cores.

    Only the calling thread is timed (``time.thread_time``): the parent's other threads (a
    learner's, a policy's BLAS pool) are other work to :class:`MachineLoad`, and a policy
    computing on several threads is seen by its share on the calling one. Entering twice
    (a call inside a call) or leaving twice counts once.

    The clock is read at every leave and at an enter that ends the caller's computing, and
    when :attr:`own` is read: the pool's own time is the rest of the thread's. A
    synchronous step reads it three times (``thread_time`` is a system call, about 1 µs
    here). A call from another thread than the last one's reads it on entering: the last
    thread's time counts up to its last read (its last leave), the new thread's from
    there on; the time between the two, on two clocks that cannot be compared, counts for
    nobody.
    """

    def __init__(self, clock: Callable[[], float] = time.thread_time,
                 thread: Callable[[], int] = threading.get_ident) -> None:
        self.clock = clock
        self.thread = thread
        self.caller = 0.0
        self._inside = False
        self._in_flight = False  # since the last leave (outside a call: the caller's time)
        self._own_before = 0.0  # own seconds on the threads before this one
        now = clock()
        self._origin = now  # this thread's clock when the accounting moved to it
        self._caller_here = 0.0  # the caller's seconds on this thread
        self._last = now  # this thread's clock at the last read
        self._last_leave = now  # the last leave, on this thread's clock
        self._thread = thread()

    def _read(self) -> tuple[float, bool]:
        """(now on this thread's clock, whether the accounting just moved to this thread).
        Call it before changing the state: on a move, the last thread's own time ends at its
        last read, or at its last leave if the caller was computing since."""
        now, thread = self.clock(), self.thread()
        # a thread id is reused once its thread has ended, with a clock that starts again
        # near 0: a clock that went back is another thread too
        if thread != self._thread or now < self._last:
            caller_computing = self._in_flight and not self._inside
            end = self._last_leave if caller_computing else self._last
            self._own_before += end - self._origin - self._caller_here
            self._thread, self._origin, self._caller_here = thread, now, 0.0
            self._last = self._last_leave = now
            return now, True
        self._last = now
        return now, False

    @property
    def own(self) -> float:
        """CPU seconds of the pool's own so far (every second not the caller's). Read from
        another thread than the calling one, it is the own time up to the last clock read
        and moves nothing."""
        if self.thread() == self._thread:
            now, _ = self._read()
        else:
            now = self._last
        if self._in_flight and not self._inside:  # the caller computing since the last leave
            now = self._last_leave
        return self._own_before + now - self._origin - self._caller_here

    def enter(self) -> None:
        if self._inside:
            return
        if self._in_flight:  # the caller's computing ends
            now, moved = self._read()
            if not moved:
                elapsed = now - self._last_leave
                self.caller += elapsed
                self._caller_here += elapsed
        elif self.thread() != self._thread:  # a call on another thread: time it from here
            self._read()
        self._inside = True

    def leave(self, in_flight: bool) -> None:
        if not self._inside:
            return
        self._last_leave, _ = self._read()
        self._inside, self._in_flight = False, in_flight


class CallerShare:
    """How many of the usable cores to leave to the parent, from :class:`ParentTime`.

    Every ``INTERVAL`` seconds the caller's CPU seconds over the wall time since the last
    sample give the cores' worth the parent computed while envs were in flight. A core is
    left to it at once for each whole core's worth, and for a part of one from ``RESERVE``
    (never all: ``limit`` is the usable cores less one); fewer once two samples in a row are
    under the reservation by ``MARGIN`` (one core: under 0.25 cores' worth), so a loop
    that computes about that much does not flip back and forth. The threshold is well below
    a whole core because a parent taking turns with a worker on one core gets only about
    half of it: measured there, a policy that would take a whole core shows 0.49.

    A measurement here (policy workload, 16 envs on 2 workers and 2 cores, the policy
    computing one half's actions while the workers step the other): 1,835 env-steps/s
    with the workers on both cores, taking turns with the policy on one of them; 1,994-2,194
    with both workers on one core, leaving the policy the other (median of 12 rounds).
    """

    INTERVAL = 0.25
    RESERVE = 0.4
    MARGIN = 0.75

    def __init__(self, parent: ParentTime | None, limit: int) -> None:
        self.parent = parent
        self.limit = max(0, limit)
        self.reserved = 0
        #: the latest sample: cores' worth of the parent's computing (None before the second)
        self.share: float | None = None
        self._next = 0.0
        self._last: tuple[float, float] | None = None
        self._low_samples = 0

    def check(self, now: float) -> bool:
        """Sample if ``INTERVAL`` has passed; True when :attr:`reserved` changed."""
        if now < self._next or self.parent is None:
            return False
        self._next = now + self.INTERVAL
        reading = (now, self.parent.caller)
        last, self._last = self._last, reading
        if last is None or now <= last[0]:
            return False
        self.share = share = (reading[1] - last[1]) / (now - last[0])
        return self.update(share)

    def update(self, share: float) -> bool:
        """Take one sample (cores' worth); True when :attr:`reserved` changed."""
        # whole cores' worth, plus one for a part from RESERVE (a rounding error does not
        # move a sample of exactly RESERVE below it)
        target = min(self.limit, max(0, math.floor(share - self.RESERVE + 1e-9) + 1))
        if target > self.reserved:
            self.reserved, self._low_samples = target, 0
            return True
        if share < self.reserved - self.MARGIN:
            self._low_samples += 1
            if self._low_samples >= 2:
                self.reserved, self._low_samples = target, 0
                return True
        else:
            self._low_samples = 0
        return False
