"""How a worker pool follows the machine it runs on.

:class:`MachineWatch` holds the pool's readings of the machine and what it does about them:
- the parent's time, split into the pool's own and the caller's (:class:`ParentTime`);
- whether other work keeps the cores busy (:class:`Contention`), which decides if anybody
  spins;
- how many cores the caller's computing needs (:class:`CallerShare`);
- the cores each worker runs on (:class:`fastvec._placement.Placement`);
- how long the parent spins before it sleeps (:class:`fastvec._waiting.SpinBudget`).

The pool calls :meth:`MachineWatch.adapt` at each command and asks it for a waiter's spin.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from fastvec import _segment as S
from fastvec._load import CallerShare, Contention, MachineLoad, ParentTime
from fastvec._placement import Placement
from fastvec._sync import Doorbells
from fastvec._waiting import SpinBudget

__all__ = ["MachineWatch"]


class MachineWatch:
    """The readings and decisions of one pool of ``num_workers`` workers on ``cores``.

    ``worker_pids()`` names the running workers (their CPU time is the pool's own). The
    workers read whether to spin from the word ``S.SPIN`` of the segment's parent line
    (at ``parent_line``), which :meth:`adapt` keeps up to date.
    """

    def __init__(self, cores: Sequence[int], num_workers: int, pin_workers: bool | None,
                 worker_pids: Callable[[], Iterable[int]], doorbells: Doorbells,
                 parent_line: int) -> None:
        self.cores = sorted(cores)
        # pin_workers=None: pinned while the machine is calm, if there is a core per worker,
        # and kept off the cores the parent's own computing needs (see fastvec._placement)
        self.placement = Placement(self.cores, num_workers, pin_workers)
        # the parent's time: the pool's own, and the caller's computing while envs are in
        # flight (see ParentTime; enter and leave mark the pool's calls)
        self.parent_time = ParentTime()
        self.contention = Contention(
            MachineLoad(self.cores, worker_pids, lambda: self.parent_time.own)
            if self.cores else None)
        # sampled only where the placement follows it
        self.caller_share = CallerShare(
            self.parent_time if self.placement.automatic else None, len(self.cores) - 1)
        self.spin = SpinBudget()
        self._doorbells = doorbells
        self._spin_word = parent_line + S.SPIN
        doorbells.store(self._spin_word, 0 if self.contention.contended else 1)

    def adapt(self, pids: Callable[[], Sequence[int | None]]) -> None:
        """Sample the machine's load and the parent's own computing now and then; on a
        change of mind, tell the workers whether to spin and, with automatic placement,
        move them (``pids()[w]``: worker ``w``'s process, None if it has none) to their
        cores."""
        now = time.monotonic()
        contention_changed = self.contention.check(now)
        share_changed = self.caller_share.check(now)
        if not (contention_changed or share_changed):
            return
        contended = self.contention.contended
        if contention_changed:
            self._doorbells.store(self._spin_word, 0 if contended else 1)
        placement = self.placement
        placement.contended, placement.reserved = contended, self.caller_share.reserved
        if placement.automatic:
            placement.apply(pids())

    def spin_budget(self) -> float:
        """How long the parent may spin before it sleeps (never on a contended machine)."""
        return 0.0 if self.contention.contended else self.spin.budget()
