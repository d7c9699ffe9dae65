"""How waiters wait: spin briefly while hand-offs are quick, then sleep on the futex."""

from __future__ import annotations

import math

# Parent-death and dead-worker checks run between wait slices of this many seconds.
WAIT_SLICE = 0.05

#: How long the parent may spin for a step's results: the workers it waits for need the
#: cores, and a longer spin would take a share of one from them.
PARENT_SPIN_LIMIT = 500e-6
#: How long a worker may spin for its next command. While a worker waits, its envs are
#: stepped and the trainer computes the next actions (a policy's forward pass, 0.3-3 ms for
#: a small network on the CPU) on a core of its own. A worker asleep through that costs the
#: next step its futex wake-up, and on a virtual machine the wake-up of an idle core: median
#: 21-28 us for one round trip, 60-100 us added to a step of 8 CartPole envs on 2 workers
#: after a 1-2 ms pause (measured here); a worker spinning costs only the otherwise idle core
#: it spins on. A contended machine turns spinning off (:mod:`fastvec._load`), and a pool with
#: more workers than cores keeps the parent's limit: there a spinning worker does take a core
#: that another worker needs.
WORKER_SPIN_LIMIT = 3e-3


class SpinBudget:
    """How long a waiter yield-spins before it sleeps on the futex, learned from recent waits.

    When the awaited word changes within ``limit`` seconds (a trainer stepping in a tight
    loop, a step that takes that long), spinning with ``sched_yield`` keeps the hand-off to a
    context switch on the same core instead of a futex sleep and wake-up, which costs tens of
    microseconds on a virtual machine. When waits are longer, spinning would only burn CPU,
    so the waiter sleeps at once; an idle waiter uses no CPU.
    """

    FLOOR = 50e-6

    def __init__(self, limit: float = PARENT_SPIN_LIMIT) -> None:
        if not (math.isfinite(limit) and limit >= self.FLOOR):
            raise ValueError(f"a spin limit must be finite and at least {self.FLOOR} s, got "
                             f"{limit!r}")
        self.limit = limit
        self.typical = 0.0

    def budget(self) -> float:
        """Seconds to spin before the next wait sleeps: twice the typical wait (at least
        ``FLOOR``, at most ``limit``), none once the typical wait reaches ``limit``."""
        if self.typical >= self.limit:
            return 0.0
        return min(max(2.0 * self.typical, self.FLOOR), self.limit)

    def record(self, waited: float) -> None:
        """Count one wait of ``waited`` seconds into the typical wait (a moving average in
        which a long wait weighs as at most four times ``limit``)."""
        self.typical += 0.25 * (min(waited, 4 * self.limit) - self.typical)
