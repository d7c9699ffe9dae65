"""What :func:`fastvec.autotune` measured: the settings it tried, each one's trials, and the
table it prints (:class:`AutotuneResult`).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fastvec._load import Contention

__all__ = ["AutotuneResult", "AutotuneRow", "Setting", "rate_label"]


@dataclass(frozen=True)
class Setting:
    """One combination of the options autotune tries."""

    num_workers: int
    batch_size: int
    pin_workers: bool | None
    parent_group: bool = False

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments for :class:`fastvec.AsyncVectorEnv`."""
        return {"num_workers": self.num_workers, "batch_size": self.batch_size,
                "pin_workers": self.pin_workers, "parent_group": self.parent_group}

    @property
    def pin_label(self) -> str:
        return {None: "auto", True: "pinned", False: "unpinned"}[self.pin_workers]

    def __str__(self) -> str:
        return (f"num_workers={self.num_workers}, batch_size={self.batch_size}, "
                f"pin_workers={self.pin_workers}, parent_group={self.parent_group}")


@dataclass
class AutotuneRow:
    """One setting's trials: env-steps/s and other processes' load, one value per round."""

    setting: Setting
    oversubscribed: bool = False  # more workers than usable cores (the warning was silenced)
    setup_seconds: float = 0.0  # building (and, for step() trials, resetting) its vector env
    rates: list[float] = field(default_factory=list)
    #: cores' worth of other processes' work during each trial (None where unreadable)
    others: list[float | None] = field(default_factory=list)

    @property
    def median(self) -> float | None:
        return statistics.median(self.rates) if self.rates else None

    @property
    def spread(self) -> float | None:
        """Half the min-max range of the rates, relative to their median."""
        median = self.median
        if median is None or len(self.rates) < 2 or median <= 0:
            return None
        return (max(self.rates) - min(self.rates)) / 2 / median

    @property
    def other_work(self) -> float | None:
        """Median cores' worth of other work during this setting's trials."""
        known = [x for x in self.others if x is not None]
        return statistics.median(known) if known else None


@dataclass
class AutotuneResult:
    """What :func:`autotune` measured; ``str(result)`` is the table it prints.

    ``AsyncVectorEnv(env_fns, **result.best)`` builds the fastest setting.
    """

    rows: list[AutotuneRow]
    num_envs: int
    cores: int
    budget: float
    rounds: int  # rounds that ran
    planned_rounds: int
    trial_seconds: float  # timed seconds of each trial
    warmup_seconds: float  # untimed stepping before each
    setup_seconds: float  # building every setting's vector env
    elapsed: float  # the whole search, closing included
    default: Setting  # AsyncVectorEnv's defaults for these envs

    @property
    def best_row(self) -> AutotuneRow:
        """The row with the highest median env-steps/s (the first of equals)."""
        return max(self.rows, key=lambda row: row.median or 0.0)

    @property
    def best(self) -> dict[str, Any]:
        """``num_workers``, ``batch_size``, ``pin_workers`` and ``parent_group`` of the
        fastest setting."""
        return self.best_row.setting.kwargs()

    @property
    def other_work(self) -> float | None:
        """Median cores' worth of other processes' work over every trial (None: unknown)."""
        known = [x for row in self.rows for x in row.others if x is not None]
        return statistics.median(known) if known else None

    @property
    def busy(self) -> bool | None:
        """Whether other work kept the machine busy during the trials (None: unknown)."""
        others = self.other_work
        return None if others is None else others >= Contention.BUSY

    def __str__(self) -> str:
        return self.format()

    def format(self) -> str:
        """The table, one row per setting (the best marked ``*``), and what it means."""
        return "\n".join([*_table(self), "", *_notes(self)])

    def to_json(self) -> dict[str, Any]:
        return {
            "num_envs": self.num_envs, "cores": self.cores, "budget": self.budget,
            "rounds": self.rounds, "planned_rounds": self.planned_rounds,
            "trial_seconds": self.trial_seconds, "warmup_seconds": self.warmup_seconds,
            "setup_seconds": self.setup_seconds, "elapsed": self.elapsed,
            "other_work": self.other_work, "busy": self.busy, "best": self.best,
            "rows": [{**row.setting.kwargs(), "median": row.median, "spread": row.spread,
                      "rates": row.rates, "others": row.others,
                      "oversubscribed": row.oversubscribed,
                      "setup_seconds": row.setup_seconds} for row in self.rows],
        }


# -- the table -------------------------------------------------------------------------------

def rate_label(rate: float) -> str:
    """A rate as the progress bar shows it: 12.3k, 1.23M."""
    return f"{rate / 1e6:.2f}M" if rate >= 1e6 else f"{rate / 1e3:.1f}k"


def _table(result: AutotuneResult) -> list[str]:
    default = next((row for row in result.rows if row.setting == result.default), None)
    best = result.best_row
    parents = any(row.setting.parent_group for row in result.rows)
    headers = ["", "num_workers", *(["parent_group"] if parents else []), "batch_size",
               "pin_workers", "env-steps/s", "spread"]
    if default is not None and default.median:
        headers.append("vs default")
    headers.append("other work")
    table = []
    for row in result.rows:
        s, median, spread = row.setting, row.median, row.spread
        cells = ["*" if row is best else "", f"{s.num_workers}" + ("!" if row.oversubscribed
                                                                     else ""),
                 *(["yes" if s.parent_group else "no"] if parents else []),
                 str(s.batch_size), s.pin_label,
                 f"{median:,.0f}" if median is not None else "-",
                 f"±{spread:.0%}" if spread is not None else ""]
        if "vs default" in headers:
            assert default is not None and default.median
            cells.append(f"{median / default.median:.2f}x" if median is not None else "")
        others = row.other_work
        cells.append(f"{others:.2f}" if others is not None else "?")
        table.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in table)) for i, h in enumerate(headers)]
    left = {"", "pin_workers", "parent_group"}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if h in left else c.rjust(w)
                         for c, w, h in zip(cells, widths, headers, strict=True)).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(c) for c in table)]


def _notes(result: AutotuneResult) -> list[str]:
    r = result
    notes = [
        f"autotune: {r.num_envs} envs, {r.cores} usable cores; {r.rounds} round(s) x "
        f"{len(r.rows)} settings, round-robin, {r.trial_seconds:.2f} s timed per trial after "
        f"{r.warmup_seconds:.2f} s warm-up; env-steps/s is the median over rounds, spread "
        "half their min-max range",
    ]
    if r.rounds < r.planned_rounds:
        notes.append(f"stopped after {r.rounds} of {r.planned_rounds} planned rounds: the "
                     "next would have ended past the budget")
    if any(row.setting.batch_size < r.num_envs for row in r.rows):
        notes.append("batch_size < num_envs: a send/recv loop, each batch's actions sent back "
                     "as it arrives (pre-sampled actions, no policy); only a trainer written "
                     "for send/recv can use it, one calling step() needs batch_size = num_envs")
    if any(row.setting.pin_workers is None for row in r.rows):
        once = (", so auto and unpinned are timed once there, as auto"
                if any(row.setting.pin_workers is False for row in r.rows) else "")
        notes.append(f"pin_workers auto: pinned one per core while the machine is calm, and "
                     f"only with num_workers = {r.cores} (the usable cores; {r.cores - 1} "
                     f"with a parent group); with any other count it never pins{once}")
    if any(row.setting.parent_group for row in r.rows):
        notes.append("parent_group yes: the calling process steps one group of envs itself "
                     "while it waits (those envs give up a worker's isolation); num_workers "
                     "counts the worker processes beside it")
    over = sorted({row.setting.num_workers for row in r.rows if row.oversubscribed})
    if over:
        notes.append(f"!: more workers than the {r.cores} usable cores (OversubscribedWarning "
                     "silenced during the trials)")
    others = r.other_work
    if others is None:
        notes.append("machine load: unknown (no /proc/stat here)")
    else:
        state = ("BUSY: other processes took the cores during the trials, so these results "
                 "differ from a calm machine's" if r.busy
                 else "calm: little other work during the trials")
        notes.append(f"other work: cores' worth of other processes' CPU time during each "
                     f"setting's trials (median); over all trials {others:.2f} of "
                     f"{r.cores}, {state}")
    notes.append(f"took {r.elapsed:.1f} s of the {r.budget:g} s budget (building the vector "
                 f"envs: {r.setup_seconds:.1f} s)")
    best = ", ".join(f"{k}={v!r}" for k, v in r.best.items())
    notes.append(f"best: AsyncVectorEnv(env_fns, {best})")
    return notes
