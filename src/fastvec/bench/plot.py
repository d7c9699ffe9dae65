"""``python -m fastvec.bench --plot PATH``: throughput against the number of envs, as a PNG.

Needs matplotlib (``pip install 'fastvec[plot]'``); nothing else in the benchmark does.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from typing import Any

from fastvec.bench.runner import BACKENDS, BOUND, CEILING, DOUBLE_BUFFERED, Result

__all__ = ["MISSING_MATPLOTLIB", "matplotlib_missing", "plot_results"]

MISSING_MATPLOTLIB = ("--plot needs matplotlib, which is not installed: "
                      "pip install 'fastvec[plot]' (or pip install matplotlib)")

# One colour and marker per backend, kept across subplots so the legend holds for all.
_STYLE = {
    "fastvec": {"color": "tab:blue", "marker": "o"},
    "gym-async": {"color": "tab:orange", "marker": "s"},
    "gym-sync": {"color": "tab:green", "marker": "^"},
    DOUBLE_BUFFERED: {"color": "tab:purple", "marker": "D"},
    CEILING: {"color": "tab:gray", "marker": "x", "linestyle": "--"},
    BOUND: {"color": "black", "marker": "+", "linestyle": ":"},
}


def matplotlib_missing() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return True
    return False


def plot_results(results: Sequence[Result], path: str | os.PathLike[str],
                 machine: dict[str, Any] | None = None) -> None:
    """Write a PNG: one panel per workload, env-steps/s against num_envs, a line per backend.

    Points are the median over the repeats; the error bars span the fastest and slowest
    repeat. The x axis is logarithmic (base 2) and marked at the measured numbers of envs.
    """
    # Figure without pyplot: no GUI backend is chosen and no global state is touched.
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    workloads = list(dict.fromkeys(r.workload for r in results))
    if not workloads:
        raise ValueError("no results to plot")
    columns = min(3, len(workloads))
    rows = -(-len(workloads) // columns)
    fig = Figure(figsize=(max(6.4, 4.6 * columns), 3.6 * rows + 0.8), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    order = [*BACKENDS, DOUBLE_BUFFERED, CEILING, BOUND]
    for index, workload in enumerate(workloads):
        ax = axes[index // columns][index % columns]
        mine = [r for r in results if r.workload == workload and r.rates]
        counts = sorted({r.num_envs for r in mine})
        for backend in sorted({r.backend for r in mine}, key=order.index):
            points = sorted((r for r in mine if r.backend == backend), key=lambda r: r.num_envs)
            x = [r.num_envs for r in points]
            y = [statistics.median(r.rates) for r in points]
            low = [m - min(r.rates) for r, m in zip(points, y, strict=True)]
            high = [max(r.rates) - m for r, m in zip(points, y, strict=True)]
            ax.errorbar(x, y, yerr=[low, high], label=backend, capsize=3, linewidth=1.6,
                        markersize=5, **_STYLE.get(backend, {}))
        ax.set_title(workload)
        ax.set_xscale("log", base=2)
        if counts:
            ax.set_xticks(counts)
            ax.set_xlim(counts[0] / 1.4, counts[-1] * 1.4)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_formatter(FuncFormatter(_rate_label))
        ax.set_xlabel("number of envs")
        ax.set_ylabel("env-steps/s")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    for index in range(len(workloads), rows * columns):
        axes[index // columns][index % columns].set_visible(False)
    title = "fastvec vs Gymnasium vector envs\nmedian env-steps/s; bars span the repeats"
    if machine:
        title += (f"\n{machine.get('usable_cores', '?')} usable cores "
                  f"({machine.get('cpu_model', '?')}), fastvec {machine.get('fastvec', '?')}, "
                  f"gymnasium {machine.get('gymnasium', '?')}")
    fig.suptitle(title, fontsize="medium")
    fig.savefig(os.fspath(path), dpi=110, format="png")


def _rate_label(value: float, _position: Any) -> str:
    if value >= 1e6:
        return f"{value / 1e6:g}M"
    if value >= 1e3:
        return f"{value / 1e3:g}k"
    return f"{value:g}"
