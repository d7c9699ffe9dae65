"""Timing machinery for ``python -m fastvec.bench``: backends, the timed loop, the ceiling."""

from __future__ import annotations

import datetime
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector.utils import batch_space

from fastvec.bench.workloads import (
    COMPUTE_STEP_SECONDS,
    WORKLOADS,
    Workload,
    calibrate_compute,
)

__all__ = [
    "BACKENDS",
    "CEILING",
    "BenchConfig",
    "Result",
    "machine_info",
    "Progress",
    "run",
    "skipped_workloads",
    "usable_cores",
]

BACKENDS = ("fastvec", "gym-async", "gym-sync")
CEILING = "ceiling"
#: Action batches sampled up front and cycled through, so sampling is never timed.
ACTION_BATCHES = 64


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class BenchConfig:
    workloads: Sequence[str] = tuple(WORKLOADS)
    num_envs: Sequence[int] | None = None  # None: each workload's default
    num_workers: int | None = None  # fastvec only; None: fastvec's default
    backends: Sequence[str] = (*BACKENDS, CEILING)
    seconds: float = 2.0
    repeats: int = 3
    warmup: float = 0.3


@dataclass
class Result:
    """All repeats of one backend on one (workload, num_envs)."""

    workload: str
    num_envs: int
    backend: str
    processes: int = 0  # worker processes (0: steps in the calling process)
    rates: list[float] = field(default_factory=list)  # env-steps/s, one per repeat
    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    setup_seconds: float = 0.0
    error: str | None = None

    @property
    def median(self) -> float | None:
        return statistics.median(self.rates) if self.rates else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["median"] = self.median
        return data


# -- backends --------------------------------------------------------------------------------

def make_backend(backend: str, env_fn: Callable[[], gym.Env], num_envs: int,
                 num_workers: int | None) -> gym.vector.VectorEnv:
    fns = [env_fn] * num_envs
    if backend == "fastvec":
        import fastvec

        if num_workers is not None:
            num_workers = min(num_workers, num_envs)
        return fastvec.AsyncVectorEnv(fns, num_workers=num_workers)
    if backend == "gym-async":
        return gym.vector.AsyncVectorEnv(fns)
    if backend == "gym-sync":
        return gym.vector.SyncVectorEnv(fns)
    raise ValueError(f"unknown backend {backend!r}")


def _processes(backend: str, envs: gym.vector.VectorEnv) -> int:
    if backend == "fastvec":
        return int(getattr(envs, "num_workers"))
    if backend == "gym-async":
        return len(getattr(envs, "processes"))
    return 0


def _timed_loop(step: Callable[[Any], Any], actions: Sequence[Any], seconds: float,
                warmup: float, after_warmup: Callable[[], None] | None = None,
                on_done: Callable[[Any], None] | None = None) -> tuple[int, float]:
    """Calls ``step`` for ``warmup`` then ``seconds``; returns (calls, elapsed) of the timed part."""
    clock = time.perf_counter
    mask = len(actions) - 1  # a power of two
    calls = 0
    deadline = clock() + warmup
    while clock() < deadline:
        result = step(actions[calls & mask])
        calls += 1
        if on_done is not None:
            on_done(result)
    if after_warmup is not None:
        after_warmup()
    calls = 0
    start = clock()
    deadline = start + seconds
    while True:
        result = step(actions[calls & mask])
        calls += 1
        if on_done is not None:
            on_done(result)
        now = clock()
        if now >= deadline:
            return calls, now - start


def time_vector_env(envs: gym.vector.VectorEnv, actions: Sequence[Any], seconds: float,
                    warmup: float) -> tuple[int, float]:
    """(env-steps, elapsed seconds) of repeated ``envs.step`` after a warm-up."""
    calls, elapsed = _timed_loop(envs.step, actions, seconds, warmup)
    return calls * envs.num_envs, elapsed


# -- ceiling ---------------------------------------------------------------------------------

def _ceiling_child(index: int, env_fn: Callable[[], gym.Env], seconds: float, warmup: float,
                   barrier: Any, conn: Any) -> None:
    """One free-running process: steps its own env in a loop, no IPC while timed."""
    try:
        env = env_fn()
        env.action_space.seed(index)
        actions = [env.action_space.sample() for _ in range(ACTION_BATCHES)]
        env.reset(seed=index)

        def on_done(result: tuple) -> None:
            if result[2] or result[3]:
                env.reset()

        calls, elapsed = _timed_loop(env.step, actions, seconds, warmup,
                                     after_warmup=lambda: barrier.wait(60.0),
                                     on_done=on_done)
        env.close()
        conn.send((calls, elapsed, None))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        try:
            barrier.abort()
        finally:
            conn.send((0, 0.0, f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def measure_ceiling(env_fn: Callable[[], gym.Env], seconds: float, warmup: float,
                    processes: int) -> tuple[int, float, float]:
    """One free-running process per core; returns (steps, mean elapsed, summed steps/s)."""
    ctx = multiprocessing.get_context()
    barrier = ctx.Barrier(processes)
    children, pipes = [], []
    try:
        for i in range(processes):
            parent_conn, child_conn = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_ceiling_child, name=f"fastvec-bench-ceiling-{i}",
                            args=(i, env_fn, seconds, warmup, barrier, child_conn),
                            daemon=True)
            p.start()
            child_conn.close()
            children.append(p)
            pipes.append(parent_conn)
        steps, rate, elapsed_all, errors = 0, 0.0, [], []
        for conn in pipes:
            if not conn.poll(seconds + warmup + 120.0):
                raise TimeoutError("a ceiling process did not report")
            n, elapsed, error = conn.recv()
            if error:
                errors.append(error)
                continue
            steps += n
            rate += n / elapsed
            elapsed_all.append(elapsed)
        if errors:
            raise RuntimeError("ceiling process failed: " + "; ".join(errors))
        return steps, statistics.fmean(elapsed_all), rate
    finally:
        for conn in pipes:
            conn.close()
        for p in children:
            p.join(5.0)
            if p.is_alive():
                p.kill()
                p.join(1.0)


# -- the run ---------------------------------------------------------------------------------

def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds + 0.5))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """A progress bar on stderr: where the run is, elapsed time and the estimated total.

    ``[#######.............]  14/39  0:33 / ~1:31  cartpole x32 rep 2/3 gym-async ...``

    A *unit* is one timed run (one backend, one repeat). On a terminal the line is redrawn in
    place; elsewhere (a CI log, a pipe) each event is a line of its own. It is drawn only
    between timed runs, never during one, so it costs the measurement nothing.
    """

    BAR_WIDTH = 20

    def __init__(self, total: int, unit_seconds: float, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self.unit_seconds = unit_seconds
        self.tty = enabled and sys.stderr.isatty()
        self.start = time.monotonic()
        self._width = 0

    def estimate(self) -> float:
        """Estimated total seconds of the run: the pace so far, applied to what is left."""
        elapsed = time.monotonic() - self.start
        # Before any unit is done only the timed seconds are known; setup and teardown show
        # up in the observed pace, which also never drops below the timed seconds.
        pace = self.unit_seconds if self.done == 0 else max(self.unit_seconds,
                                                            elapsed / self.done)
        return elapsed + pace * (self.total - self.done)

    def line(self, text: str) -> str:
        filled = self.BAR_WIDTH * self.done // max(1, self.total)
        bar = "#" * filled + "." * (self.BAR_WIDTH - filled)
        width = len(str(self.total))
        elapsed = time.monotonic() - self.start
        return (f"[{bar}] {self.done:>{width}}/{self.total}  {_clock(elapsed)} / "
                f"~{_clock(self.estimate())}  {text}")

    def show(self, text: str) -> None:
        if not self.enabled:
            return
        line = self.line(text)
        if self.tty:
            # a line longer than the terminal wraps, and "\r" then redraws only its tail
            columns = shutil.get_terminal_size((100, 24)).columns
            line = line[:max(20, columns - 1)]
            pad = max(0, self._width - len(line))
            sys.stderr.write("\r" + line + " " * pad)
            self._width = len(line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def step(self, text: str) -> None:
        self.done += 1
        self.show(text)

    def note(self, text: str) -> None:
        """A line of its own that stays above the bar."""
        if not self.enabled:
            return
        if self.tty:
            sys.stderr.write("\r" + " " * self._width + "\r")
            self._width = 0
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\r" + " " * self._width + "\r")
            sys.stderr.flush()


def _fmt_rate(rate: float) -> str:
    return f"{rate / 1e6:.2f}M" if rate >= 1e6 else f"{rate / 1e3:.1f}k"


def skipped_workloads(names: Sequence[str]) -> dict[str, str]:
    """The workloads among ``names`` that cannot run here, with the reason for each."""
    skipped = {}
    for name in names:
        reason = WORKLOADS[name].unavailable()
        if reason is not None:
            skipped[name] = reason
    return skipped


def _cases(config: BenchConfig, skip: Sequence[str] = ()) -> list[tuple[Workload, int]]:
    cases = []
    for name in config.workloads:
        if name in skip:
            continue
        workload = WORKLOADS[name]
        for n in (config.num_envs or [workload.default_num_envs]):
            cases.append((workload, int(n)))
    return cases


def run(config: BenchConfig, progress: bool = True) -> tuple[list[Result], dict[str, Any]]:
    """Runs every (workload, num_envs) case; returns the results and extra facts for the JSON.

    A workload whose optional packages are missing is not run: ``extra["skipped"]`` maps its
    name to the reason.
    """
    backends = [b for b in BACKENDS if b in config.backends]
    want_ceiling = CEILING in config.backends
    skipped = skipped_workloads(config.workloads)
    cases = _cases(config, skip=tuple(skipped))
    total = sum(config.repeats * (len(backends) + (want_ceiling and w.ceiling))
                for w, _ in cases)
    bar = Progress(total, config.seconds + config.warmup, progress)
    results: list[Result] = []
    extra: dict[str, Any] = {"skipped": skipped}
    for name, reason in skipped.items():
        bar.note(f"{name}: skipped, {reason}")
    try:
        for workload, num_envs in cases:
            results.extend(_run_case(workload, num_envs, backends,
                                     want_ceiling and workload.ceiling, config, bar, extra))
    finally:
        bar.close()
    return results, extra


def _run_case(workload: Workload, num_envs: int, backends: list[str], ceiling: bool,
              config: BenchConfig, bar: Progress, extra: dict[str, Any]) -> list[Result]:
    label = f"{workload.name} x{num_envs}"
    if workload.name == "compute":
        bar.show(f"{label}: calibrating")
        iters = calibrate_compute()
        extra["compute_rounds_per_step"] = iters
        extra["compute_target_step_us"] = COMPUTE_STEP_SECONDS * 1e6
    env_fn = workload.factory()
    results = {b: Result(workload.name, num_envs, b) for b in backends}
    envs: dict[str, gym.vector.VectorEnv] = {}
    try:
        action_space = None
        for b in backends:
            bar.show(f"{label}: starting {b}")
            start = time.perf_counter()
            try:
                env = make_backend(b, env_fn, num_envs,
                                   config.num_workers if b == "fastvec" else None)
            except Exception as exc:  # noqa: BLE001 - reported in the table
                results[b].error = f"{type(exc).__name__}: {exc}"
                continue
            envs[b] = env
            try:
                env.reset(seed=0)
            except Exception as exc:  # noqa: BLE001
                results[b].error = f"{type(exc).__name__}: {exc}"
                envs.pop(b).close()
                continue
            results[b].setup_seconds = time.perf_counter() - start
            results[b].processes = _processes(b, env)
            if action_space is None:
                action_space = batch_space(env.single_action_space, num_envs)
        actions: list[Any] = []
        if action_space is not None:
            action_space.seed(0)
            actions = [action_space.sample() for _ in range(ACTION_BATCHES)]
        ceiling_result = Result(workload.name, num_envs, CEILING, processes=usable_cores())
        for rep in range(config.repeats):
            for b in backends:
                running = envs.get(b)
                if running is None:
                    bar.step(f"{label} rep {rep + 1}/{config.repeats} {b}: skipped")
                    continue
                bar.show(f"{label} rep {rep + 1}/{config.repeats} {b} ...")
                try:
                    steps, elapsed = time_vector_env(running, actions, config.seconds,
                                                     config.warmup)
                except Exception as exc:  # noqa: BLE001
                    results[b].error = f"{type(exc).__name__}: {exc}"
                    envs.pop(b).close()
                    bar.step(f"{label} rep {rep + 1}/{config.repeats} {b}: failed")
                    continue
                r = results[b]
                r.steps.append(steps)
                r.seconds.append(elapsed)
                r.rates.append(steps / elapsed)
                bar.step(f"{label} rep {rep + 1}/{config.repeats} {b}: "
                         f"{_fmt_rate(r.rates[-1])} steps/s")
            if ceiling and ceiling_result.error is None:
                bar.show(f"{label} rep {rep + 1}/{config.repeats} ceiling ...")
                try:
                    steps, elapsed, rate = measure_ceiling(env_fn, config.seconds,
                                                           config.warmup, usable_cores())
                except Exception as exc:  # noqa: BLE001
                    ceiling_result.error = f"{type(exc).__name__}: {exc}"
                    bar.step(f"{label} rep {rep + 1}/{config.repeats} ceiling: failed")
                else:
                    ceiling_result.steps.append(steps)
                    ceiling_result.seconds.append(elapsed)
                    ceiling_result.rates.append(rate)
                    bar.step(f"{label} rep {rep + 1}/{config.repeats} ceiling: "
                             f"{_fmt_rate(rate)} steps/s")
            elif ceiling:
                bar.step(f"{label} rep {rep + 1}/{config.repeats} ceiling: skipped")
    finally:
        for b in list(envs):
            bar.show(f"{label}: closing {b}")
            envs.pop(b).close()
    out = [results[b] for b in backends]
    if ceiling:
        out.append(ceiling_result)
    return out


# -- machine ---------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict[str, Any]:
    import fastvec

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores(),
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "numpy": np.__version__,
        "gymnasium": gym.__version__,
        "fastvec": fastvec.__version__,
        "start_method": multiprocessing.get_start_method(allow_none=False),
    }
