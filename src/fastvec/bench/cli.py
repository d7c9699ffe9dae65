"""Command line for ``python -m fastvec.bench``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from fastvec.bench.plot import MISSING_MATPLOTLIB, matplotlib_missing, plot_results
from fastvec.bench.runner import (
    ACTION_BATCHES,
    BACKENDS,
    CEILING,
    BenchConfig,
    Result,
    machine_info,
    run,
    usable_cores,
)
from fastvec.bench.workloads import DEFAULT_WORKLOADS, WORKLOADS

__all__ = ["build_parser", "format_table", "main", "ratios"]

_DESCRIPTION = """\
Compare fastvec.AsyncVectorEnv with gymnasium's AsyncVectorEnv and SyncVectorEnv, all at
default settings, in one run on this machine.

For each workload, every backend does reset(seed=0), warms up, then calls step() for
--seconds with actions pre-sampled from the batched action space. Backends take turns
(A, B, C, A, B, C, ...) so they share the machine's noise, and each reports the median
env-steps/s over --repeats. For "compute" the run also measures the ceiling: one
free-running process per usable core stepping its own env with no IPC at all.

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
"""


def _csv(choices: Sequence[str] | None = None, kind: type = str):
    """argparse type: a comma-separated list (flags that use it may also be repeated)."""

    def parse(text: str) -> list:
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


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


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
        "--backends", action="extend", type=_csv((*BACKENDS, CEILING)),
        metavar="NAME[,NAME...]",
        help=f"backends to compare (choices: {', '.join((*BACKENDS, CEILING))}; default: all). "
             f"'{CEILING}' applies to the compute workload only")
    parser.add_argument(
        "--seconds", type=_positive(float), default=2.0, metavar="S",
        help="timed seconds per backend, per workload, per repeat (default: 2.0)")
    parser.add_argument(
        "--repeats", type=_positive(int), default=3, metavar="N",
        help="timed runs per backend; the table reports their median (default: 3)")
    parser.add_argument(
        "--warmup", type=float, default=0.3, metavar="S",
        help="untimed stepping before each timed run (default: 0.3)")
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
    return parser


# -- report ----------------------------------------------------------------------------------

def ratios(results: Sequence[Result]) -> list[dict[str, Any]]:
    """fastvec's median over each other backend's median, per (workload, num_envs)."""
    by_case: dict[tuple[str, int], dict[str, Result]] = {}
    for r in results:
        by_case.setdefault((r.workload, r.num_envs), {})[r.backend] = r
    out = []
    for (workload, num_envs), rows in by_case.items():
        fast = rows.get("fastvec")
        if fast is None or fast.median is None:
            continue
        for other in ("gym-async", "gym-sync", CEILING):
            base = rows.get(other)
            if base is not None and base.median:
                out.append({"workload": workload, "num_envs": num_envs,
                            "ratio": f"fastvec/{other}", "value": fast.median / base.median})
    return out


def _fmt_int(x: float) -> str:
    return f"{x:,.0f}"


def format_table(results: Sequence[Result]) -> str:
    index = {(q["workload"], q["num_envs"], q["ratio"]): q["value"] for q in ratios(results)}
    headers = ["workload", "envs", "backend", "procs", "env-steps/s", "spread",
               "vs gym-async", "vs gym-sync", "vs ceiling"]
    right = {"envs", "procs", "env-steps/s", "spread", "vs gym-async", "vs gym-sync",
             "vs ceiling"}
    show_ceiling = any(r.backend == CEILING for r in results)
    if not show_ceiling:
        headers.remove("vs ceiling")
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
        cells = []
        for other in ("gym-async", "gym-sync", CEILING):
            if other == CEILING and not show_ceiling:
                continue
            value = index.get((r.workload, r.num_envs, f"fastvec/{other}"))
            cells.append(f"{value:.2f}x" if r.backend == "fastvec" and value else "")
        rows.append(row + cells)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if h in right else c.ljust(w)
                         for c, w, h in zip(cells, widths, headers)).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    previous = None
    for r, row in zip(results, rows):
        case = (r.workload, r.num_envs)
        if previous is not None and case != previous:
            out.append("")
        previous = case
        out.append(line(row))
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.plot and matplotlib_missing():
        # Say so now rather than after minutes of measuring.
        print(f"error: {MISSING_MATPLOTLIB}", file=sys.stderr)
        return 2
    workloads = list(dict.fromkeys(args.workload or DEFAULT_WORKLOADS))
    backends = list(dict.fromkeys(args.backends or (*BACKENDS, CEILING)))
    config = BenchConfig(
        workloads=workloads,
        num_envs=list(dict.fromkeys(args.num_envs)) if args.num_envs else None,
        num_workers=args.num_workers,
        backends=backends,
        seconds=args.seconds,
        repeats=args.repeats,
        warmup=max(0.0, args.warmup),
    )
    machine = machine_info()
    started = time.perf_counter()
    try:
        results, extra = run(config, progress=not args.quiet)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    wall = time.perf_counter() - started

    print(format_table(results))
    print()
    print(f"median of {config.repeats} x {config.seconds:g} s per backend; spread = half the "
          f"min-max range; procs = worker processes ({CEILING}: free-running, no IPC)")
    print(f"{machine['cpu_model']}, {machine['usable_cores']} usable cores; "
          f"python {machine['python'].split()[-1]}, numpy {machine['numpy']}, gymnasium "
          f"{machine['gymnasium']}, fastvec {machine['fastvec']}; wall time {wall:.1f} s")
    if "compute_rounds_per_step" in extra:
        print(f"compute: {extra['compute_rounds_per_step']} rounds of work per step, calibrated "
              f"to ~{extra['compute_target_step_us']:.0f} us on this machine")
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
