"""``fastvec.autotune``: which ``AsyncVectorEnv`` settings step the user's envs fastest here.

The search is small and bounded: every setting (``num_workers`` x ``batch_size`` x
``pin_workers``) gets one vector env, built once; then rounds of short trials go round-robin
over the settings (A, B, C, A, B, C, ...) so that they share the machine's noise, and each
setting reports the median env-steps/s of its rounds. Building the envs counts against the
budget, and no round starts that would end past it. While the trials run,
:class:`fastvec._load.MachineLoad` measures the work of other processes, since results on a
busy machine differ from a calm one's. What it found, and the table it prints, is
:class:`fastvec._autotune_result.AutotuneResult`.

The timed loops and the progress bar are the bench's (:mod:`fastvec.bench`), imported only
when a search runs: ``import fastvec`` does not import the bench.
"""

from __future__ import annotations

import contextlib
import math
import operator
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from gymnasium import Env
from gymnasium.vector.utils import batch_space

from fastvec._autotune_result import AutotuneResult, AutotuneRow, Setting, rate_label
from fastvec._load import MachineLoad
from fastvec._processes import affinity, default_num_workers, usable_cores
from fastvec.errors import AutotuneError, OversubscribedWarning
from fastvec.vector_env import AsyncVectorEnv

if TYPE_CHECKING:
    from fastvec.bench.runner import Progress

__all__ = ["AutotuneResult", "AutotuneRow", "Setting", "autotune"]

#: Share of the budget left after building the envs that the trials plan to use; the rest
#: absorbs a trial's last step running past its deadline, and closing the envs.
PLANNED_SHARE = 0.9
#: No trial is planned shorter than this (seconds, warm-up included).
MIN_TRIAL_SECONDS = 0.05
#: Untimed stepping at the start of each trial, as a share of its timed seconds: the workers
#: of the other settings stepped in between, so caches and spin budgets start cold.
WARMUP_SHARE = 0.2
#: What the search chooses; ``env_kwargs`` may not set these.
TUNED = ("num_workers", "batch_size", "pin_workers", "parent_group")


# -- candidates ------------------------------------------------------------------------------

def default_worker_counts(num_envs: int, cores: int) -> list[int]:
    """1, 2, 4, ... below ``cores``, and ``cores`` itself, none above ``num_envs``."""
    counts = {cores}
    power = 1
    while power < cores:
        counts.add(power)
        power *= 2
    return sorted({min(n, num_envs) for n in counts})


def settings(num_envs: int, cores: int, num_workers: Iterable[int] | None,
             batch_sizes: Iterable[int] | None, pin: Iterable[bool | None],
             partial: bool, parent_group: Iterable[bool] = (False,)) -> list[Setting]:
    """Every combination to try, checked; automatic pinning timed only where it can pin.

    ``num_workers`` counts groups of envs: with ``parent_group=True`` one of them is the
    parent's, so the setting has one worker process fewer. ``pin_workers=None`` pins only
    with one group per usable core; with any other count it is ``pin_workers=False``, so
    that pair is timed once (as ``None``, the default).
    """
    workers = (default_worker_counts(num_envs, cores) if num_workers is None
               else list(num_workers))
    for n in workers:
        if (_integer(n) or 0) < 1:
            raise ValueError(f"autotune: num_workers candidates must be integers >= 1, got {n!r}")
    workers = sorted({min(operator.index(n), num_envs) for n in workers})
    if batch_sizes is None:
        sizes = [num_envs] + ([num_envs // 2] if partial and num_envs >= 2 else [])
    else:
        sizes = list(dict.fromkeys(batch_sizes))
        for b in sizes:
            if not 1 <= (_integer(b) or 0) <= num_envs:
                raise ValueError(f"autotune: batch_sizes must be integers in [1, num_envs="
                                 f"{num_envs}], got {b!r}")
        sizes = list(dict.fromkeys(operator.index(b) for b in sizes))
        if not partial and any(b < num_envs for b in sizes):
            raise ValueError(
                "autotune: batch_size < num_envs needs a trainer that uses send/recv; pass "
                "partial=True to time it (a trainer that calls step() cannot use it)")
    pins = list(dict.fromkeys(pin))
    for p in pins:
        if p is not None and not isinstance(p, bool):
            raise ValueError(f"autotune: pin candidates must be None, True or False, got {p!r}")
    parents = list(dict.fromkeys(parent_group))
    for g in parents:
        if not isinstance(g, bool):
            raise ValueError(f"autotune: parent_group candidates must be True or False, got "
                             f"{g!r}")
    if not workers or not sizes or not pins or not parents:
        raise ValueError("autotune: every list of candidates needs at least one value")
    out = []
    for n in workers:
        for g in parents:
            for b in sizes:
                for p in pins:
                    if p is False and None in pins and n != cores:
                        continue  # the same as pin_workers=None here
                    out.append(Setting(n - g, b, p, g))
    return out


def _integer(value: Any) -> int | None:
    """``value`` as an int if it is an integer (numpy's too), not a bool; else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def plan_trials(remaining: float, count: int, rounds: int) -> tuple[int, float]:
    """(rounds, seconds per trial, warm-up included) for ``count`` settings that fit
    ``remaining`` seconds.

    At least one round always runs, of trials no shorter than :data:`MIN_TRIAL_SECONDS`.
    """
    usable = max(0.0, remaining) * PLANNED_SHARE
    fit = int(usable // (count * MIN_TRIAL_SECONDS))
    rounds = max(1, min(rounds, fit))
    return rounds, max(MIN_TRIAL_SECONDS, usable / (rounds * count))


# -- the search ------------------------------------------------------------------------------

def autotune(
    env_fns: Sequence[Callable[[], Env[Any, Any]]],
    *,
    budget: float = 30.0,
    num_workers: Iterable[int] | None = None,
    batch_sizes: Iterable[int] | None = None,
    pin: Iterable[bool | None] = (None, False),
    partial: bool = False,
    parent_group: Iterable[bool] = (False, True),
    rounds: int = 5,
    env_kwargs: Mapping[str, Any] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    progress: bool = True,
    report: bool = True,
    file: TextIO | None = None,
) -> AutotuneResult:
    """Time ``AsyncVectorEnv(env_fns, ...)`` at several settings on this machine.

    Parameters
    ----------
    env_fns
        The envs to tune for, as given to :class:`fastvec.AsyncVectorEnv`.
    budget
        Seconds the whole search may take, building the vector envs included. No round of
        trials starts that would end past it (at least one round always runs).
    num_workers
        Worker counts to try. Default: 1, 2, 4, ... below the usable cores, and the usable
        cores, none above ``len(env_fns)``. More than the usable cores is timed with its
        :class:`~fastvec.errors.OversubscribedWarning` silenced, and marked in the table.
        With ``parent_group=True`` a count is of groups, the parent's included (so ``2`` is
        one worker process and the parent's group).
    batch_sizes
        ``batch_size`` values to try. Default: ``num_envs``, plus ``num_envs // 2`` with
        ``partial=True``. A ``batch_size < num_envs`` is timed as a send/recv loop (each
        batch's actions go back the moment it arrives): its env-steps/s is what a trainer
        written for :meth:`~fastvec.AsyncVectorEnv.send` / :meth:`~fastvec.AsyncVectorEnv.recv`
        gets, which a trainer calling ``step()`` cannot use.
    pin
        ``pin_workers`` values to try (``None``: automatic).
    parent_group
        ``parent_group`` values to try. ``True`` makes the calling process step one group
        itself, which gives up a worker's isolation for those envs (see
        :class:`~fastvec.AsyncVectorEnv`): pass ``(False,)`` if your envs need it.
    partial
        The trainer can use partial batches (send/recv); needed for any batch size below
        ``num_envs``.
    rounds
        Rounds of trials to plan; fewer run when the budget is short.
    env_kwargs
        Other keyword arguments for every :class:`~fastvec.AsyncVectorEnv` (``copy``,
        ``context``, ``autoreset_mode`` ...), not the three tuned ones.
    clock
        The clock the budget and the trials are timed with (a fake one in tests).
    progress
        Draw a progress bar on ``file`` (default ``sys.stderr``).
    report
        Print the table on ``file`` when done (it is also ``str(result)``).

    Returns
    -------
    AutotuneResult
        The table (``str(result)``) and ``result.best``: keyword arguments for
        ``AsyncVectorEnv(env_fns, **result.best)``.

    Raises
    ------
    AutotuneError
        An env raised while a vector env was built or timed (the env's exception is the
        ``__cause__``). Every vector env autotune built is closed first, also on Ctrl-C.
    """
    env_fns = list(env_fns)
    if not env_fns:
        raise ValueError("autotune: `env_fns` must hold at least one environment function")
    if (isinstance(budget, bool) or not isinstance(budget, (int, float))
            or not (budget > 0 and math.isfinite(budget))):
        raise ValueError(f"autotune: `budget` must be a positive number of seconds, got "
                         f"{budget!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"autotune: `rounds` must be an integer >= 1, got {rounds!r}")
    extra = dict(env_kwargs or {})
    clash = sorted(set(extra) & set(TUNED))
    if clash:
        raise ValueError(f"autotune: `env_kwargs` may not set {', '.join(clash)}: autotune "
                         "chooses it")
    num_envs, cores = len(env_fns), usable_cores()
    rows = [AutotuneRow(s, oversubscribed=s.num_workers > cores)
            for s in settings(num_envs, cores, num_workers, batch_sizes, pin, partial,
                              parent_group)]

    from fastvec.bench.runner import Progress

    bar = Progress(len(rows) * (1 + rounds), budget / (len(rows) * (1 + rounds)), progress,
                   file=file, clock=clock)
    start = clock()
    try:
        with contextlib.ExitStack() as stack:
            built = _build(env_fns, rows, extra, stack, bar, clock)
            setup = clock() - start
            planned, trial = plan_trials(budget - setup, len(rows), rounds)
            seconds = trial / (1 + WARMUP_SHARE)
            bar.total = len(rows) * (1 + planned)
            ran = _rounds(built, rows, planned, seconds, trial - seconds, budget, start,
                          bar, clock)
            bar.show("autotune: closing")
    finally:
        bar.close()
    result = AutotuneResult(rows, num_envs, cores, float(budget), ran, planned, seconds,
                            trial - seconds, setup, clock() - start,
                            Setting(default_num_workers(num_envs), num_envs, None))
    if report:
        out = sys.stderr if file is None else file
        out.write(result.format() + "\n")
        out.flush()
    return result


def _build(env_fns: list[Callable[[], Env[Any, Any]]], rows: list[AutotuneRow],
           extra: dict[str, Any], stack: contextlib.ExitStack, bar: Progress,
           clock: Callable[[], float]) -> list[AsyncVectorEnv]:
    """One vector env per row, each closed by ``stack``; reset where trials call step()."""
    built = []
    for row in rows:
        bar.show(f"autotune: starting {row.setting}")
        began = clock()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OversubscribedWarning)
                envs = AsyncVectorEnv(env_fns, **extra, **row.setting.kwargs())
            stack.callback(_close, envs)
            if row.setting.batch_size == envs.num_envs:
                envs.reset(seed=0)
        except Exception as exc:
            raise AutotuneError(f"autotune: building AsyncVectorEnv({row.setting}) failed: "
                                f"{type(exc).__name__}: {exc}") from exc
        row.setup_seconds = clock() - began
        built.append(envs)
        bar.step(f"autotune: started {row.setting}")
    return built


def _rounds(built: list[AsyncVectorEnv], rows: list[AutotuneRow], planned: int,
            seconds: float, warmup: float, budget: float, start: float, bar: Progress,
            clock: Callable[[], float]) -> int:
    """Runs up to ``planned`` rounds, one trial per row each; returns how many ran."""
    from fastvec.bench.policy import partial_loop
    from fastvec.bench.runner import ACTION_BATCHES, time_vector_env

    first = built[0]
    space = batch_space(first.single_action_space, first.num_envs)
    space.seed(0)
    actions = [space.sample() for _ in range(ACTION_BATCHES)]
    # the calling thread runs the trial loops: its CPU time is autotune's, not other work
    load = MachineLoad(sorted(affinity()), lambda: _worker_pids(built), time.thread_time)
    last_round = 0.0
    for r in range(planned):
        began = clock()
        if r and began - start + last_round > budget:
            return r
        for row, envs in zip(rows, built, strict=True):
            bar.show(f"autotune: round {r + 1}/{planned} {row.setting} ...")
            load.sample(time.monotonic())
            try:
                if row.setting.batch_size < envs.num_envs:
                    steps, elapsed = partial_loop(envs, actions, seconds, warmup, clock)
                else:
                    steps, elapsed = time_vector_env(envs, actions, seconds, warmup, clock)
            except Exception as exc:
                raise AutotuneError(
                    f"autotune: timing AsyncVectorEnv({row.setting}) failed in round "
                    f"{r + 1}: {type(exc).__name__}: {exc}") from exc
            row.others.append(load.sample(time.monotonic()))
            row.rates.append(steps / elapsed if elapsed > 0 else 0.0)
            bar.step(f"autotune: round {r + 1}/{planned} {row.setting}: "
                     f"{rate_label(row.rates[-1])} env-steps/s")
        last_round = clock() - began
    return planned


def _close(envs: AsyncVectorEnv) -> None:
    """Close ``envs``; after an error or Ctrl-C its partial batches may still be in flight,
    and dropping their results is what autotune wants, not worth a warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*have not been received")
        envs.close()


def _worker_pids(built: list[AsyncVectorEnv]) -> list[int]:
    """Every worker of every setting: their work is autotune's own, not other work."""
    return [pid for envs in built for pid in envs._pool._worker_pids()]
