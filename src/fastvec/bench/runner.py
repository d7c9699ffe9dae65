"""Timing machinery for ``python -m fastvec.bench``: backends, the timed loop, the ceiling."""

from __future__ import annotations

import contextlib
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
from typing import Any, TextIO, cast

import gymnasium as gym
import numpy as np
from gymnasium.vector.utils import batch_space

import fastvec
from fastvec.bench.contention import BusyProcesses
from fastvec.bench.policy import (
    LOOP_MODES,
    PartialBatchVectorEnv,
    PolicySetup,
    calibrate_policy,
    partial_batches_available,
    partial_loop,
    single_blas_thread,
)
from fastvec.bench.ray_backends import (
    RAY_BACKENDS,
    TIANSHOU_MAX_ENVS,
    TIANSHOU_RAY,
    LocalCluster,
    cpus_per_node,
    make_ray_backend,
    tianshou_missing,
)
from fastvec.bench.workloads import (
    COMPUTE_STEP_SECONDS,
    JITTER_STEP_SECONDS,
    WORKLOADS,
    Workload,
    calibrate_compute,
    jitter_rounds,
)

__all__ = [
    "BACKENDS",
    "BOUND",
    "CEILING",
    "DOUBLE_BUFFERED",
    "PARENT",
    "PARTIAL",
    "BenchConfig",
    "Contender",
    "Prepared",
    "Progress",
    "Result",
    "contenders",
    "machine_info",
    "prepare",
    "run",
    "skipped_workloads",
    "usable_cores",
]

BACKENDS = ("fastvec", "gym-async", "gym-sync")
CEILING = "ceiling"
#: The policy workload's computed row: (policy + env) / cores per batch, no vectoriser faster.
BOUND = "bound"
#: fastvec in the double-buffered loop (partial batches of num_envs // 2).
DOUBLE_BUFFERED = "fastvec-db"
#: fastvec stepping partial batches of num_envs // 2 with pre-sampled actions: no env waits
#: for the slowest of the whole batch (the workloads with a ceiling).
PARTIAL = "fastvec-partial"
#: fastvec with parent_group=True, on request (--backends): the parent steps one group
#: itself while it waits.
PARENT = "fastvec-parent"
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
    contention: int = 0  # busy-looping processes running beside the timed runs
    ray_nodes: int = 0  # --ray: local Ray nodes for the fastvec-ray/tianshou-ray rows
    # per-workload numbers of envs when num_envs is None (else each workload's default)
    num_envs_of: dict[str, Sequence[int]] = field(default_factory=dict)


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
                 num_workers: int | None,
                 batch_size: int | None = None, ray_nodes: int = 0) -> gym.vector.VectorEnv:
    """A vector env of ``backend``; ``batch_size`` (fastvec only) asks for partial batches;
    the ``--ray`` backends run over ``ray_nodes`` nodes of the connected cluster."""
    fns = [env_fn] * num_envs
    if backend in RAY_BACKENDS:
        return cast(gym.vector.VectorEnv, make_ray_backend(
            backend, fns, ray_nodes, cpus_per_node(ray_nodes)))
    if backend == PARENT:
        if num_workers is not None:
            num_workers = min(num_workers, num_envs - 1)
        return fastvec.AsyncVectorEnv(fns, num_workers=num_workers, parent_group=True)
    if backend == "fastvec":
        if num_workers is not None:
            num_workers = min(num_workers, num_envs)
        if batch_size is not None:
            # the partial-batch API is newer than this fastvec's type information
            partial: dict[str, Any] = {"batch_size": batch_size}
            return fastvec.AsyncVectorEnv(fns, num_workers=num_workers, **partial)
        return fastvec.AsyncVectorEnv(fns, num_workers=num_workers)
    if backend == "gym-async":
        return gym.vector.AsyncVectorEnv(fns)
    if backend == "gym-sync":
        return gym.vector.SyncVectorEnv(fns)
    raise ValueError(f"unknown backend {backend!r}")


def _processes(envs: gym.vector.VectorEnv) -> int:
    if isinstance(envs, fastvec.AsyncVectorEnv):
        return int(envs.num_workers)
    if isinstance(envs, gym.vector.AsyncVectorEnv):
        return len(envs.processes)
    nodes = getattr(envs, "nodes", None)
    if nodes is not None:  # fastvec.ray: the actors and their workers
        return sum(1 + len(node.worker_pids) for node in nodes)
    return int(getattr(envs, "processes", 0))


def _timed_loop(step: Callable[[Any], Any], actions: Sequence[Any], seconds: float,
                warmup: float, after_warmup: Callable[[], None] | None = None,
                on_done: Callable[[Any], None] | None = None,
                clock: Callable[[], float] = time.perf_counter) -> tuple[int, float]:
    """Calls ``step`` for ``warmup`` then ``seconds`` of ``clock``; returns (calls, elapsed)
    timed."""
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
                    warmup: float,
                    clock: Callable[[], float] = time.perf_counter) -> tuple[int, float]:
    """(env-steps, elapsed seconds) of repeated ``envs.step`` after a warm-up."""
    calls, elapsed = _timed_loop(envs.step, actions, seconds, warmup, clock=clock)
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

        def on_done(result: tuple[Any, ...]) -> None:
            if result[2] or result[3]:
                env.reset()

        calls, elapsed = _timed_loop(env.step, actions, seconds, warmup,
                                     after_warmup=lambda: barrier.wait(60.0),
                                     on_done=on_done)
        env.close()
        conn.send((calls, elapsed, None))
    except BaseException as exc:
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
    """A progress bar on stderr (or ``file``): where the run is, elapsed time and the estimated
    total.

    ``[#######.............]  14/39  0:33 / ~1:31  cartpole x32 rep 2/3 gym-async ...``

    A *unit* is one timed run (one backend, one repeat). On a terminal the line is redrawn in
    place; elsewhere (a CI log, a pipe) each event is a line of its own. It is drawn only
    between timed runs, never during one, so it costs the measurement nothing.
    """

    BAR_WIDTH = 20

    def __init__(self, total: int, unit_seconds: float, enabled: bool,
                 file: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self.unit_seconds = unit_seconds
        self.file = sys.stderr if file is None else file
        self.clock = clock
        self.tty = enabled and self.file.isatty()
        self.start = clock()
        self._width = 0

    def estimate(self) -> float:
        """Estimated total seconds of the run: the pace so far, applied to what is left."""
        elapsed = self.clock() - self.start
        # Before any unit is done only the timed seconds are known; setup and teardown show
        # up in the observed pace, which also never drops below the timed seconds.
        pace = self.unit_seconds if self.done == 0 else max(self.unit_seconds,
                                                            elapsed / self.done)
        return elapsed + pace * (self.total - self.done)

    def line(self, text: str) -> str:
        filled = self.BAR_WIDTH * self.done // max(1, self.total)
        bar = "#" * filled + "." * (self.BAR_WIDTH - filled)
        width = len(str(self.total))
        elapsed = self.clock() - self.start
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
            self.file.write("\r" + line + " " * pad)
            self._width = len(line)
        else:
            self.file.write(line + "\n")
        self.file.flush()

    def step(self, text: str) -> None:
        self.done += 1
        self.show(text)

    def note(self, text: str) -> None:
        """A line of its own that stays above the bar."""
        if not self.enabled:
            return
        if self.tty:
            self.file.write("\r" + " " * self._width + "\r")
            self._width = 0
        self.file.write(text + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.file.write("\r" + " " * self._width + "\r")
            self.file.flush()


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
        default = config.num_envs_of.get(name, [workload.default_num_envs])
        for n in (config.num_envs or default):
            cases.append((workload, int(n)))
    return cases


@dataclass(frozen=True)
class Contender:
    """One timed row of a case: a backend, stepped with pre-sampled actions or in a loop mode."""

    label: str  # the row's name in the table
    backend: str  # one of BACKENDS
    mode: str | None = None  # a LOOP_MODES name (policy workloads); None: pre-sampled actions
    batch_size: int | None = None  # fastvec's partial batches; None: whole batches


def contenders(workload: Workload, num_envs: int, backends: Sequence[str]) -> list[Contender]:
    """The rows a case times: each backend, plus fastvec double-buffered where it can be."""
    if not workload.policy:
        rows = [Contender(b, b) for b in backends]
        if (workload.ceiling and "fastvec" in backends and num_envs >= 2
                and not any(b in RAY_BACKENDS for b in backends)
                and partial_batches_available()):
            rows.insert(1, Contender(PARTIAL, "fastvec", "partial", num_envs // 2))
        return rows
    rows = [Contender(b, b, "sync") for b in backends]
    if "fastvec" in backends and num_envs >= 2 and partial_batches_available():
        rows.append(Contender(DOUBLE_BUFFERED, "fastvec", "double-buffered", num_envs // 2))
    return rows


@dataclass
class Prepared:
    """What a case needs before any backend starts, measured on a machine still quiet."""

    env_fn: Callable[[], gym.Env]
    policy: PolicySetup | None = None


def prepare(workload: Workload, num_envs: int, extra: dict[str, Any]) -> Prepared:
    """Calibrates a case (its env's work, its policy) and records the numbers in ``extra``."""
    env_fn = workload.factory()
    if workload.name == "compute":
        extra["compute_rounds_per_step"] = calibrate_compute()
        extra["compute_target_step_us"] = COMPUTE_STEP_SECONDS * 1e6
    if workload.name == "jitter":
        extra["jitter_rounds_per_step"] = list(jitter_rounds())
        extra["jitter_step_us"] = [s * 1e6 for s in JITTER_STEP_SECONDS]
    if not workload.policy:
        return Prepared(env_fn)
    with single_blas_thread() as blas:
        setup = calibrate_policy(env_fn, num_envs, blas)
    extra.setdefault("policy", {})[str(num_envs)] = {
        **setup.to_json(), "cores": usable_cores(), "bound": setup.bound(usable_cores()),
        "double_buffered_bound": setup.double_buffered_bound(usable_cores())}
    return Prepared(env_fn, setup)


def run(config: BenchConfig, progress: bool = True) -> tuple[list[Result], dict[str, Any]]:
    """Runs every (workload, num_envs) case; returns the results and extra facts for the JSON.

    A workload whose optional packages are missing is not run: ``extra["skipped"]`` maps its
    name to the reason. Every case is calibrated first; then ``config.contention`` busy
    processes start and run beside every timed run until the last case is done.
    """
    skipped = skipped_workloads(config.workloads)
    if TIANSHOU_RAY in config.backends and tianshou_missing():
        skipped[TIANSHOU_RAY] = str(tianshou_missing())
    backends = [b for b in (BACKENDS[0], PARENT, *BACKENDS[1:], *RAY_BACKENDS)
                if b in config.backends
                and b not in skipped]
    want_ceiling = CEILING in config.backends
    cases = _cases(config, skip=tuple(skipped))
    ray_rows = config.ray_nodes and any(b in RAY_BACKENDS for b in backends)
    rows_of = {}
    for w, n in cases:
        rows = contenders(w, n, backends)
        if n > TIANSHOU_MAX_ENVS and any(r.backend == TIANSHOU_RAY for r in rows):
            rows = [r for r in rows if r.backend != TIANSHOU_RAY]
            skipped[f"{TIANSHOU_RAY} {w.name} x{n}"] = (
                f"one Ray actor per env, each a process that imports torch: more than "
                f"{TIANSHOU_MAX_ENVS} do not fit a small machine")
        rows_of[w.name, n] = rows
    total = sum(config.repeats * (len(rows_of[w.name, n]) + (want_ceiling and w.ceiling))
                for w, n in cases)
    bar = Progress(total, config.seconds + config.warmup, progress)
    results: list[Result] = []
    extra: dict[str, Any] = {"skipped": skipped}
    for name, reason in skipped.items():
        bar.note(f"{name}: skipped, {reason}")
    try:
        prepared = []
        for workload, num_envs in cases:
            bar.show(f"{workload.name} x{num_envs}: calibrating")
            prepared.append(prepare(workload, num_envs, extra))
        if ray_rows:
            bar.show(f"starting a local Ray cluster of {config.ray_nodes} nodes")
            extra["ray"] = {"nodes": config.ray_nodes,
                            "cpus_per_node": cpus_per_node(config.ray_nodes)}
        with (LocalCluster(config.ray_nodes, cpus_per_node(config.ray_nodes)) if ray_rows
              else contextlib.nullcontext()), BusyProcesses(config.contention) as busy:
            extra["contention"] = {"processes": config.contention, "pids": busy.pids}
            for (workload, num_envs), prep in zip(cases, prepared, strict=True):
                results.extend(_run_case(workload, num_envs, prep,
                                         rows_of[workload.name, num_envs],
                                         want_ceiling and workload.ceiling, config, bar))
        extra["contention"]["ran"] = busy.ran
    finally:
        bar.close()
    return results, extra


def _start(rows: Sequence[Contender], env_fn: Callable[[], gym.Env], num_envs: int,
           config: BenchConfig, bar: Progress, label: str,
           results: dict[str, Result]) -> dict[str, gym.vector.VectorEnv]:
    """Starts (and, unless its loop resets itself, resets) every row's vector env."""
    envs: dict[str, gym.vector.VectorEnv] = {}
    for row in rows:
        bar.show(f"{label}: starting {row.label}")
        start = time.perf_counter()
        try:
            ray: dict[str, Any] = ({"ray_nodes": config.ray_nodes}
                                   if row.backend in RAY_BACKENDS else {})
            env = make_backend(row.backend, env_fn, num_envs,
                               config.num_workers if row.backend in ("fastvec", PARENT)
                               else None, batch_size=row.batch_size, **ray)
        except Exception as exc:
            results[row.label].error = f"{type(exc).__name__}: {exc}"
            continue
        envs[row.label] = env
        if row.mode is None:
            try:
                env.reset(seed=0)
            except Exception as exc:
                results[row.label].error = f"{type(exc).__name__}: {exc}"
                envs.pop(row.label).close()
                continue
        results[row.label].setup_seconds = time.perf_counter() - start
        results[row.label].processes = _processes(env)
    return envs


def _time_row(row: Contender, env: gym.vector.VectorEnv, actions: Sequence[Any],
              prepared: Prepared, config: BenchConfig) -> tuple[int, float]:
    """(env-steps, elapsed seconds) of one timed run of ``row``."""
    if row.mode is None:
        return time_vector_env(env, actions, config.seconds, config.warmup)
    if row.mode == "partial":
        return partial_loop(cast(PartialBatchVectorEnv, env), actions, config.seconds,
                            config.warmup)
    if prepared.policy is None:
        raise ValueError(f"{row.label}: loop mode {row.mode!r} without a calibrated policy")
    with single_blas_thread():
        return LOOP_MODES[row.mode](env, prepared.policy.policy, config.seconds,
                                    config.warmup)


def _run_case(workload: Workload, num_envs: int, prepared: Prepared, rows: list[Contender],
              ceiling: bool, config: BenchConfig, bar: Progress) -> list[Result]:
    label = f"{workload.name} x{num_envs}"
    results = {row.label: Result(workload.name, num_envs, row.label) for row in rows}
    envs: dict[str, gym.vector.VectorEnv] = {}
    try:
        envs = _start(rows, prepared.env_fn, num_envs, config, bar, label, results)
        actions: list[Any] = []
        if envs:
            first = next(iter(envs.values()))
            action_space = batch_space(first.single_action_space, num_envs)
            action_space.seed(0)
            actions = [action_space.sample() for _ in range(ACTION_BATCHES)]
        ceiling_result = Result(workload.name, num_envs, CEILING, processes=usable_cores())
        for rep in range(config.repeats):
            where = f"{label} rep {rep + 1}/{config.repeats}"
            for row in rows:
                running = envs.get(row.label)
                if running is None:
                    bar.step(f"{where} {row.label}: skipped")
                    continue
                bar.show(f"{where} {row.label} ...")
                try:
                    steps, elapsed = _time_row(row, running, actions, prepared, config)
                except Exception as exc:
                    results[row.label].error = f"{type(exc).__name__}: {exc}"
                    envs.pop(row.label).close()
                    bar.step(f"{where} {row.label}: failed")
                    continue
                r = results[row.label]
                r.steps.append(steps)
                r.seconds.append(elapsed)
                r.rates.append(steps / elapsed)
                bar.step(f"{where} {row.label}: {_fmt_rate(r.rates[-1])} steps/s")
            if ceiling:
                _ceiling_repeat(ceiling_result, prepared.env_fn, config, bar, where)
    finally:
        for name in list(envs):
            bar.show(f"{label}: closing {name}")
            envs.pop(name).close()
    out = [results[row.label] for row in rows]
    if ceiling:
        out.append(ceiling_result)
    if prepared.policy is not None:
        # computed, not timed: the work bound of the calibration's numbers on these cores
        out.append(Result(workload.name, num_envs, BOUND, processes=usable_cores(),
                          rates=[prepared.policy.bound(usable_cores())]))
    return out


def _ceiling_repeat(result: Result, env_fn: Callable[[], gym.Env], config: BenchConfig,
                    bar: Progress, where: str) -> None:
    """One repeat of the free-running ceiling, added to ``result`` (skipped once it failed)."""
    if result.error is not None:
        bar.step(f"{where} ceiling: skipped")
        return
    bar.show(f"{where} ceiling ...")
    try:
        steps, elapsed, rate = measure_ceiling(env_fn, config.seconds, config.warmup,
                                               usable_cores())
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        bar.step(f"{where} ceiling: failed")
    else:
        result.steps.append(steps)
        result.seconds.append(elapsed)
        result.rates.append(rate)
        bar.step(f"{where} ceiling: {_fmt_rate(rate)} steps/s")


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
