"""Command line for ``python -m fastvec.bench``."""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym

from fastvec.bench.contention import BusyProcesses
from fastvec.bench.plot import MISSING_MATPLOTLIB, matplotlib_missing, plot_results
from fastvec.bench.ray_backends import FASTVEC_RAY, RAY_BACKENDS, TIANSHOU_RAY, ray_missing
from fastvec.bench.runner import (
    ACTION_BATCHES,
    BACKENDS,
    BOUND,
    CEILING,
    DOUBLE_BUFFERED,
    PARENT,
    PARTIAL,
    BenchConfig,
    Result,
    machine_info,
    run,
    usable_cores,
)
from fastvec.bench.workloads import DEFAULT_WORKLOADS, WORKLOADS
from fastvec.errors import AutotuneError

__all__ = ["autotune_main", "build_parser", "format_header", "format_notes", "format_table",
           "main", "ratios"]

_DESCRIPTION = """\
Compare fastvec.AsyncVectorEnv with gymnasium's AsyncVectorEnv and SyncVectorEnv, all at
default settings, in one run on this machine.

For each workload, every backend does reset(seed=0), warms up, then calls step() for
--seconds with actions pre-sampled from the batched action space. Backends take turns
(A, B, C, A, B, C, ...) so they share the machine's noise, and each reports the median
env-steps/s over --repeats. For "compute" and "jitter" the run also measures the ceiling:
one free-running process per usable core stepping its own env with no IPC at all; every
backend's "of ceiling" is its fraction of that.

"policy" times a trainer's loop instead: the parent computes each batch's actions with a
numpy MLP (BLAS held to one thread), calibrated to cost what one core needs to step the
batch. On C usable cores no vectoriser beats (policy + env) / C per batch: the "bound" row,
C times what an overhead-free gym-sync would do in the same loop; "of bound" is each
backend's fraction of it.

--contention N runs N busy-looping processes beside every timed run (calibration runs
before they start), to show how each backend copes on a machine it does not have to itself.

A progress bar on stderr shows the workload, backend and repeat being timed, the time
elapsed and the estimated total. The defaults take about two minutes on 2 cores.
"""

_EPILOG = "workloads:\n" + "\n".join(
    f"  {w.name:<9} {w.description} (default {w.default_num_envs} envs)"
    for w in WORKLOADS.values()
) + """


"atari" needs `pip install 'fastvec[atari]'` (ale-py and OpenCV); without them it is skipped
with a note. --plot needs `pip install 'fastvec[plot]'` (matplotlib).

examples:
  python -m fastvec.bench
  python -m fastvec.bench --num-envs 8,16,32 --plot bench.png
  python -m fastvec.bench --workload cartpole,image --num-envs 8,64 --seconds 1
  python -m fastvec.bench --workload compute --num-workers 2 --json out.json
  python -m fastvec.bench --workload jitter,policy --seconds 1
  python -m fastvec.bench --workload compute --contention 2
  python -m fastvec.bench --ray
  python -m fastvec.bench --ray --workload compute --num-envs 32,128
  python -m fastvec.bench --autotune --autotune-env CartPole-v1 --num-envs 16
  python -m fastvec.bench --autotune --workload compute --autotune-partial --autotune-budget 60

--autotune times fastvec alone at several settings (num_workers, batch_size, pin_workers) for
one env on this machine, within --autotune-budget seconds, prints the table and the best
settings as AsyncVectorEnv keyword arguments (fastvec.autotune from Python).
"""

#: Sub-environments --autotune-env tunes for when --num-envs is not given.
AUTOTUNE_NUM_ENVS = 16

#: --ray's workloads, and their numbers of envs unless --num-envs says otherwise: enough
#: envs per step that a step's work is several times Ray's per-call cost (see README).
RAY_WORKLOADS: dict[str, Sequence[int]] = {"compute": (32, 128), "cartpole": (32,)}


def _csv(choices: Sequence[str] | None = None,
         kind: Callable[[str], Any] = str) -> Callable[[str], list[Any]]:
    """argparse type: a comma-separated list (flags that use it may also be repeated)."""

    def parse(text: str) -> list[Any]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected at least one value")
        out = []
        for item in items:
            if choices is not None and item not in choices:
                raise argparse.ArgumentTypeError(
                    f"invalid choice {item!r} (choose from {', '.join(choices)})")
            try:
                out.append(kind(item))
            except ValueError:
                raise argparse.ArgumentTypeError(f"invalid value {item!r}") from None
        return out

    return parse


def _non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    """argparse type: a number of ``kind`` above zero."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def _sizes(workload: str, sizes: Sequence[int]) -> str:
    return f"{workload} " + ",".join(f"x{n}" for n in sizes)


def _add_number(parser: argparse.ArgumentParser, flag: str, kind: Callable[[str], Any],
                default: float, metavar: str, text: str) -> None:
    """A number option with a default, which its help ``text`` is followed by."""
    parser.add_argument(flag, type=kind, default=default, metavar=metavar,
                        help=f"{text} (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fastvec.bench", description=_DESCRIPTION, epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--workload", action="extend", type=_csv(tuple(WORKLOADS)), metavar="NAME[,NAME...]",
        help=f"workloads to run; repeat the flag or give a comma list "
             f"(choices: {', '.join(WORKLOADS)}; default: {','.join(DEFAULT_WORKLOADS)}, "
             "skipping any whose packages are missing)")
    parser.add_argument(
        "--num-envs", action="extend", type=_csv(kind=_positive(int)), metavar="N[,N...]",
        help="numbers of sub-environments, overriding each workload's default; with several "
             "values (e.g. 8,16,32) every selected workload runs at each of them, which "
             "gives --plot a curve")
    parser.add_argument(
        "--num-workers", type=_positive(int), metavar="N",
        help="worker processes for fastvec only (default: fastvec's own default, the usable "
             f"cores capped at num_envs; {usable_cores()} here); capped at num_envs")
    parser.add_argument(
        "--backends", action="extend", type=_csv((*BACKENDS, PARENT, CEILING, *RAY_BACKENDS)),
        metavar="NAME[,NAME...]",
        help=f"backends to compare (choices: "
             f"{', '.join((*BACKENDS, PARENT, CEILING, *RAY_BACKENDS))}; default: all but "
             f"{PARENT} and the Ray ones; {', '.join(RAY_BACKENDS)} need --ray; {PARENT}: "
             "fastvec with parent_group=True). "
             f"'{CEILING}' applies to the compute and jitter workloads only; with fastvec, "
             f"the policy workload also times '{DOUBLE_BUFFERED}' (fastvec double-buffered) "
             "when this fastvec has the partial-batch API (AsyncVectorEnv.recv)")
    _add_number(parser, "--seconds", _positive(float), 2.0, "S",
                "timed seconds per backend, per workload, per repeat")
    _add_number(parser, "--repeats", _positive(int), 3, "N",
                "timed runs per backend; the table reports their median")
    _add_number(parser, "--warmup", float, 0.3, "S", "untimed stepping before each timed run")
    _add_number(parser, "--contention", _non_negative_int, 0, "N",
                "run N busy-looping processes (pure-Python `while True: pass`, unpinned) "
                "beside every timed run, started after calibration and killed at the end, "
                "also on Ctrl-C or an error")
    parser.add_argument(
        "--ray", action="store_true",
        help=f"compare {FASTVEC_RAY} (fastvec.ray over --ray-nodes local Ray nodes, the "
             f"usable cores split between them), fastvec (local, the same cores) and "
             f"{TIANSHOU_RAY} (Tianshou's RayVectorEnv: one actor and one remote call per env "
             f"per step) on a local Ray cluster started for the run; default workloads "
             f"{', '.join(_sizes(w, n) for w, n in RAY_WORKLOADS.items())} (needs "
             "fastvec[ray]; the tianshou row is skipped with a note without tianshou)")
    _add_number(parser, "--ray-nodes", _positive(int), 2, "N", "local Ray nodes for --ray")
    parser.add_argument(
        "--json", metavar="PATH",
        help="also write every raw number (each repeat's steps, seconds and steps/s), the "
             "ratios, the settings and the machine (CPU model, cores, Python, numpy, "
             "gymnasium and fastvec versions, date) to PATH as JSON")
    parser.add_argument(
        "--plot", metavar="PATH",
        help="also write a PNG to PATH: env-steps/s against the number of envs, one line per "
             "backend, one panel per workload (needs matplotlib: pip install 'fastvec[plot]'; "
             "exits with status 2 before running anything when it is missing)")
    parser.add_argument(
        "--quiet", action="store_true",
        help="no progress bar on stderr; the table is still printed")
    tune = parser.add_argument_group(
        "autotune", "instead of the comparison, find fastvec's fastest settings for one env")
    tune.add_argument(
        "--autotune", action="store_true",
        help="try num_workers, batch_size and pin_workers for one env (--workload NAME or "
             "--autotune-env ID, at one --num-envs) and print the table and the best "
             "AsyncVectorEnv keyword arguments; --contention and --json apply, the other "
             "comparison flags do not")
    tune.add_argument(
        "--autotune-env", metavar="ID",
        help="a gymnasium.make id to tune for (e.g. CartPole-v1), instead of --workload; "
             f"default --num-envs {AUTOTUNE_NUM_ENVS}")
    tune.add_argument(
        "--autotune-budget", type=_positive(float), metavar="S",
        help="seconds the search may take, starting the vector envs included (default: 30)")
    tune.add_argument(
        "--autotune-partial", action="store_true",
        help="the trainer uses partial batches (send/recv): also try batch_size = "
             "num_envs // 2")
    return parser


# -- report ----------------------------------------------------------------------------------

#: The rows whose ratios to the others are reported.
_FASTVEC_ROWS = ("fastvec", PARENT, PARTIAL, DOUBLE_BUFFERED, FASTVEC_RAY)
#: What each row is compared with.
_BASELINES = ("gym-async", "gym-sync", CEILING, BOUND, "fastvec", TIANSHOU_RAY)


def ratios(results: Sequence[Result]) -> list[dict[str, Any]]:
    """fastvec's median over each other backend's median, per (workload, num_envs)."""
    by_case: dict[tuple[str, int], dict[str, Result]] = {}
    for r in results:
        by_case.setdefault((r.workload, r.num_envs), {})[r.backend] = r
    out = []
    for (workload, num_envs), rows in by_case.items():
        for name in _FASTVEC_ROWS:
            fast = rows.get(name)
            if fast is None or fast.median is None:
                continue
            for other in _BASELINES:
                base = rows.get(other)
                if other != name and base is not None and base.median:
                    out.append({"workload": workload, "num_envs": num_envs,
                                "ratio": f"{name}/{other}",
                                "value": fast.median / base.median})
    return out


def _fmt_int(x: float) -> str:
    return f"{x:,.0f}"


def format_table(results: Sequence[Result]) -> str:
    """The results as a text table, one block per (workload, num_envs)."""
    index = {(q["workload"], q["num_envs"], q["ratio"]): q["value"] for q in ratios(results)}
    medians = {(r.workload, r.num_envs, r.backend): r.median for r in results}
    compared = [other for other in ("gym-async", "gym-sync")
                if not any(r.backend in RAY_BACKENDS for r in results)
                or any(r.backend == other for r in results)]
    compared += [other for other in ("fastvec", TIANSHOU_RAY)
                 if any(r.backend == FASTVEC_RAY for r in results)]
    headers = ["workload", "envs", "backend", "procs", "env-steps/s", "spread",
               *(f"vs {other}" for other in compared), "of ceiling", "of bound"]
    right = set(headers) - {"workload", "backend"}
    limits = [limit for limit in (CEILING, BOUND) if any(r.backend == limit for r in results)]
    for limit in {CEILING, BOUND} - set(limits):
        headers.remove(f"of {limit}")
    rows: list[list[str]] = []
    for r in results:
        med = r.median
        if med is None:
            rate, spread = "failed" if r.error else "-", ""
        else:
            rate = _fmt_int(med)
            spread = (f"±{(max(r.rates) - min(r.rates)) / 2 / med:.0%}"
                      if len(r.rates) > 1 else "")
        row = [r.workload, str(r.num_envs), r.backend, str(r.processes or "-"), rate, spread]
        for other in compared:
            value = index.get((r.workload, r.num_envs, f"{r.backend}/{other}"))
            row.append(f"{value:.2f}x" if value else "")
        for limit in limits:
            # every timed row's fraction of the case's ceiling or bound, when it has one
            top = medians.get((r.workload, r.num_envs, limit))
            row.append(f"{med / top:.2f}" if med and top and r.backend not in (CEILING, BOUND)
                       else "")
        rows.append(row)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if h in right else c.ljust(w)
                         for c, w, h in zip(cells, widths, headers, strict=True)).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    previous = None
    for r, row in zip(results, rows, strict=True):
        case = (r.workload, r.num_envs)
        if previous is not None and case != previous:
            out.append("")
        previous = case
        out.append(line(row))
    return "\n".join(out)


def format_header(contention: dict[str, Any]) -> str | None:
    """The line above the table saying what else ran on the machine, or None when nothing."""
    started, ran = contention["processes"], contention["ran"]
    if not started:
        return None
    s = "" if started == 1 else "es"
    # counted when they were stopped: one that exited early did not run throughout
    early = "" if ran == started else f" ({started - ran} of them exited early)"
    return (f"contention: {started} busy-looping process{s} (pure-Python `while True: "
            f"pass`, unpinned) ran beside every timed run{early}; calibration ran before them")


def format_notes(results: Sequence[Result], extra: dict[str, Any]) -> list[str]:
    """The lines under the table that explain how its workloads were sized."""
    notes = []
    if "compute_rounds_per_step" in extra:
        notes.append(f"compute: {extra['compute_rounds_per_step']} rounds of work per step, "
                     f"calibrated to ~{extra['compute_target_step_us']:.0f} us on this machine")
    if "jitter_rounds_per_step" in extra:
        (low, high), (low_us, high_us) = extra["jitter_rounds_per_step"], extra["jitter_step_us"]
        notes.append(f"jitter: {low:.1f}-{high:.1f} rounds of work per step (~{low_us:.0f}-"
                     f"{high_us:.0f} us), uniform per step from each env's seeded rng")
    for num_envs, p in extra.get("policy", {}).items():
        notes.append(
            f"policy x{num_envs}: {p['policy']}, {p['policy_seconds'] * 1e3:.2f} ms per batch "
            f"vs {p['env_batch_seconds'] * 1e3:.2f} ms to step it on one core (ratio "
            f"{p['policy_seconds'] / p['env_batch_seconds']:.2f}); BLAS in the parent: "
            f"{p['blas']}; its CPU/wall {p['cpu_per_wall']:.2f} (above 1: several threads)")
        notes.append(
            f"policy x{num_envs}: bound = {num_envs} envs x {p['cores']} cores / (policy + "
            f"env) = {_fmt_int(p['bound'])} env-steps/s; no vectoriser beats it on "
            f"{p['cores']} cores")
        if p.get("double_buffered_bound") and p.get("half_policy_seconds"):
            notes.append(
                f"policy x{num_envs}: a double-buffered loop runs the policy twice per "
                f"{num_envs} env steps on {int(num_envs) // 2} rows, "
                f"{p['half_policy_seconds'] * 1e3:.2f} ms each "
                f"({p['half_policy_seconds'] / p['policy_seconds']:.2f} of the whole batch's), "
                f"so its own bound is {_fmt_int(p['double_buffered_bound'])} env-steps/s")
    if any(r.backend == PARENT for r in results):
        notes.append(f"{PARENT}: fastvec with parent_group=True, the parent stepping one group "
                     "of envs itself while it waits (procs: the worker processes beside it)")
    if any(r.backend == PARTIAL for r in results):
        notes.append(f"{PARTIAL}: fastvec with batch_size = num_envs // 2, each half's "
                     "actions sent back the moment it comes (send/recv), no policy")
    medians = {(r.workload, r.num_envs, r.backend): r.median for r in results}
    for (workload, num_envs, backend), rate in medians.items():
        local = medians.get((workload, num_envs, "fastvec"))
        if backend == FASTVEC_RAY and rate and local:
            ray = extra.get("ray", {})
            notes.append(
                f"{FASTVEC_RAY} {workload} x{num_envs}: {num_envs / rate * 1e3:.2f} ms per step "
                f"vs {num_envs / local * 1e3:.2f} ms for local fastvec: "
                f"{(num_envs / rate - num_envs / local) * 1e3:+.2f} ms per step over "
                f"{ray.get('nodes', '?')} nodes of {ray.get('cpus_per_node', '?')} CPUs")
    if any(r.backend == DOUBLE_BUFFERED for r in results):
        notes.append(f"{DOUBLE_BUFFERED}: fastvec double-buffered, batch_size = num_envs // 2, "
                     "the policy computing one half while the other steps")
    return notes


def _autotune_target(parser: argparse.ArgumentParser, args: argparse.Namespace
                     ) -> tuple[str, Callable[[], Any], int]:
    """(what is tuned, its env function, num_envs) from the flags, or a usage error."""
    if args.autotune_env and args.workload:
        parser.error("--autotune takes --workload NAME or --autotune-env ID, not both")
    if not args.autotune_env and not args.workload:
        parser.error("--autotune needs the env to tune for: --workload NAME or "
                     "--autotune-env ID (a gymnasium.make id)")
    for flag, value in (("--num-workers", args.num_workers), ("--backends", args.backends),
                        ("--plot", args.plot)):
        if value is not None:
            parser.error(f"{flag} has no effect with --autotune (it times fastvec alone and "
                         "chooses num_workers itself)")
    if args.num_envs and len(set(args.num_envs)) > 1:
        parser.error("--autotune tunes for one --num-envs value")
    if args.autotune_env:
        try:
            gym.spec(args.autotune_env)
        except gym.error.Error as exc:
            parser.error(f"--autotune-env {args.autotune_env}: {exc}")
        num_envs = args.num_envs[0] if args.num_envs else AUTOTUNE_NUM_ENVS
        return args.autotune_env, functools.partial(gym.make, args.autotune_env), num_envs
    names = list(dict.fromkeys(args.workload))
    if len(names) > 1:
        parser.error("--autotune tunes for one --workload")
    workload = WORKLOADS[names[0]]
    reason = workload.unavailable()
    if reason is not None:
        parser.error(f"--workload {workload.name}: {reason}")
    num_envs = args.num_envs[0] if args.num_envs else workload.default_num_envs
    return f"workload {workload.name}", workload.factory(), num_envs


def autotune_main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """``--autotune``: the search, its table on stdout and (with ``--json``) its numbers."""
    from fastvec._autotune import autotune

    target, env_fn, num_envs = _autotune_target(parser, args)
    machine = machine_info()
    try:
        with BusyProcesses(args.contention) as busy:
            result = autotune([env_fn] * num_envs, budget=args.autotune_budget or 30.0,
                              partial=args.autotune_partial, progress=not args.quiet,
                              report=False)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except AutotuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.contention:
        s = "" if args.contention == 1 else "es"
        print(f"contention: {args.contention} busy-looping process{s} ran beside the trials "
              "(their work counts as other work)")
    print(f"{target} x{num_envs}")
    print(result.format())
    print(f"{machine['cpu_model']}, {machine['usable_cores']} usable cores; python "
          f"{machine['python'].split()[-1]}, gymnasium {machine['gymnasium']}, fastvec "
          f"{machine['fastvec']}; {machine['date']}")
    if args.json:
        payload = {"machine": machine, "target": target,
                   "contention": {"processes": args.contention, "ran": busy.ran},
                   **result.to_json()}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.autotune:
        return autotune_main(parser, args)
    for flag in ("autotune_env", "autotune_budget", "autotune_partial"):
        if getattr(args, flag):
            parser.error(f"--{flag.replace('_', '-')} needs --autotune")
    if args.plot and matplotlib_missing():
        # Say so now rather than after minutes of measuring.
        print(f"error: {MISSING_MATPLOTLIB}", file=sys.stderr)
        return 2
    if not args.ray and any(b in RAY_BACKENDS for b in args.backends or ()):
        print(f"error: the {', '.join(RAY_BACKENDS)} backends run with --ray", file=sys.stderr)
        return 2
    if args.ray and ray_missing():
        print(f"error: --ray {ray_missing()}", file=sys.stderr)
        return 2
    workloads = list(dict.fromkeys(args.workload or (
        RAY_WORKLOADS if args.ray else DEFAULT_WORKLOADS)))
    backends = list(dict.fromkeys(args.backends or (
        ("fastvec", *RAY_BACKENDS) if args.ray else (*BACKENDS, CEILING))))
    num_envs = list(dict.fromkeys(args.num_envs)) if args.num_envs else None
    config = BenchConfig(
        workloads=workloads,
        num_envs=num_envs,
        num_workers=args.num_workers,
        backends=backends,
        seconds=args.seconds,
        repeats=args.repeats,
        warmup=max(0.0, args.warmup),
        contention=args.contention,
        ray_nodes=args.ray_nodes if args.ray else 0,
        num_envs_of=RAY_WORKLOADS if args.ray else {},
    )
    machine = machine_info()
    started = time.perf_counter()
    try:
        results, extra = run(config, progress=not args.quiet)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    wall = time.perf_counter() - started

    header = format_header(extra["contention"])
    if header is not None:
        print(header)
        print()
    print(format_table(results))
    print()
    print(f"median of {config.repeats} x {config.seconds:g} s per backend; spread = half the "
          f"min-max range; procs = worker processes ({CEILING}: free-running, no IPC)")
    print(f"{machine['cpu_model']}, {machine['usable_cores']} usable cores; "
          f"python {machine['python'].split()[-1]}, numpy {machine['numpy']}, gymnasium "
          f"{machine['gymnasium']}, fastvec {machine['fastvec']}; wall time {wall:.1f} s")
    for note in format_notes(results, extra):
        print(note)
    for name, reason in extra.get("skipped", {}).items():
        print(f"{name}: skipped, {reason}")
    failed = [r for r in results if r.error]
    for r in failed:
        print(f"error: {r.workload} x{r.num_envs} {r.backend}: {r.error}", file=sys.stderr)

    if args.json:
        payload = {
            "machine": machine,
            "settings": {
                "workloads": workloads,
                "num_envs": config.num_envs,
                "num_workers": config.num_workers,
                "backends": backends,
                "seconds": config.seconds,
                "repeats": config.repeats,
                "warmup": config.warmup,
                "contention": config.contention,
                "ray_nodes": config.ray_nodes,
                "action_batches": ACTION_BATCHES,
            },
            **extra,
            "wall_seconds": wall,
            "results": [r.to_json() for r in results],
            "ratios": ratios(results),
        }
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
    if args.plot:
        if any(r.rates for r in results):
            plot_results(results, args.plot, machine)
            print(f"plot written to {args.plot}")
        else:
            print("no measurements to plot; --plot wrote nothing", file=sys.stderr)
    return 1 if failed else 0
