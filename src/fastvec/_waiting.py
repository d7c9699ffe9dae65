"""How waiters wait: spin briefly while hand-offs are quick, then sleep on the futex."""

from __future__ import annotations

# Parent-death and dead-worker checks run between wait slices of this many seconds.
WAIT_SLICE = 0.05


class SpinBudget:
    """How long a waiter yield-spins before it sleeps on the futex, learned from recent waits.

    When the awaited word changes within a few hundred microseconds (a trainer stepping in a
    tight loop, a step that takes that long), spinning with ``sched_yield`` keeps the hand-off
    to a context switch on the same core instead of a futex sleep and wake-up, which costs
    tens of microseconds on a virtual machine. When waits are long, spinning would only burn
    CPU, so the waiter sleeps at once; an idle waiter uses no CPU.
    """

    LIMIT = 500e-6
    FLOOR = 50e-6

    def __init__(self) -> None:
        self.typical = 0.0

    def budget(self) -> float:
        if self.typical >= self.LIMIT:
            return 0.0
        return min(max(2.0 * self.typical, self.FLOOR), self.LIMIT)

    def record(self, waited: float) -> None:
        self.typical += 0.25 * (min(waited, 4 * self.LIMIT) - self.typical)
