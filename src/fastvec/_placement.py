"""Which cores each worker of a pool runs on.

With ``pin_workers=True`` every worker is pinned to one core (round robin), with ``False``
none is. The default (``None``) follows the machine, as :mod:`fastvec._load` judges it, when
there is one worker per usable core (with any other count it leaves the workers to the
scheduler, as ``False`` does):

- calm, with one worker per usable core: each worker pinned to its own core, which keeps its
  caches and its hand-offs on one core;
- contended (other work takes the cores): every worker free to run on any usable core, so
  the scheduler can move it off a core another process keeps busy;
- the parent computing while envs are in flight (a double-buffered policy): the workers kept
  off the last ``reserved`` cores, which the scheduler then gives the parent, instead of
  the parent's forward pass taking turns with a worker on one core.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

__all__ = ["Placement"]


class Placement:
    """The cores of ``num_workers`` workers over the usable ``cores`` (sorted)."""

    def __init__(self, cores: Sequence[int], num_workers: int,
                 pin_workers: bool | None) -> None:
        self.cores = sorted(cores)
        self.pin_workers = pin_workers
        #: the placement follows the machine (pin_workers=None, one worker per usable core)
        self.automatic = (pin_workers is None and bool(self.cores)
                          and num_workers == len(self.cores))
        #: other work takes the cores (see fastvec._load.Contention)
        self.contended = False
        #: cores left to the parent (see fastvec._load.CallerShare)
        self.reserved = 0

    def cores_of(self, w: int) -> frozenset[int] | None:
        """The cores worker ``w`` runs on; None: any usable core (not pinned)."""
        cores = self.cores
        if not cores or self.pin_workers is False:
            return None
        if self.pin_workers:
            return frozenset({cores[w % len(cores)]})
        if not self.automatic:
            return None
        reserved = min(self.reserved, len(cores) - 1)
        if reserved > 0:
            return frozenset(cores[:len(cores) - reserved])
        return None if self.contended else frozenset({cores[w]})

    def apply(self, pids: Sequence[int | None]) -> None:
        """Move the running workers (``pids[w]``: worker ``w``'s, None if it has none) to
        their cores now. A worker already gone is skipped (the next wait reports it). Only
        a worker's main thread moves: threads its envs started keep the cores they had."""
        if not hasattr(os, "sched_setaffinity"):  # not Linux: nothing is pinned
            return
        for w, pid in enumerate(pids):
            if pid is None:
                continue
            cores = self.cores_of(w)
            try:
                os.sched_setaffinity(pid, self.cores if cores is None else cores)
            except OSError:
                pass
