"""The warnings a vector env gives at construction when it and the caller's own threads would
want more cores than the machine lets this process use.

Two causes, each with its own warning class (both are
:class:`~fastvec.errors.OversubscribedWarning`, so one filter silences both):

- more worker processes than usable cores (``num_workers``);
- PyTorch's intra-op threads in the process that builds the vector env: with the workers they
  are more than the usable cores, so PyTorch's threads and the workers take turns on them.
  The cure is one line the user writes (``torch.set_num_threads``), which a library should not
  write for them: it changes the whole process.

PyTorch is only looked at when the caller has imported it; this module never imports it.
"""

from __future__ import annotations

import sys
import warnings

from fastvec.errors import OversubscribedWarning, TrainerThreadsWarning

__all__ = ["torch_threads", "warn_if_oversubscribed"]


def torch_threads() -> int:
    """PyTorch's intra-op threads in this process, or 0 if PyTorch is not imported."""
    torch = sys.modules.get("torch")
    get_num_threads = getattr(torch, "get_num_threads", None)
    if get_num_threads is None:  # not imported, or only partly (an import that failed)
        return 0
    return int(get_num_threads())


def warn_if_oversubscribed(num_workers: int, num_envs: int, cores: int, *,
                           stacklevel: int) -> None:
    """Warn about too many workers and about PyTorch's threads beside them, as the
    constructor of a vector env with ``num_workers`` worker processes on ``cores`` usable
    cores; ``stacklevel`` counts from the caller of this function."""
    if num_workers > cores:
        warnings.warn(
            f"AsyncVectorEnv(num_workers={num_workers}) on {cores} usable core(s): "
            "workers beyond one per core only wait for each other to be scheduled; the "
            f"default (num_workers=None, {min(cores, num_envs)} here) is faster.",
            OversubscribedWarning, stacklevel=stacklevel + 1)
    threads = torch_threads()
    if threads > 1 and num_workers + threads > cores:
        advised = max(1, cores - num_workers)
        warnings.warn(
            f"PyTorch runs {threads} intra-op threads in this process beside {num_workers} "
            f"fastvec worker(s) on {cores} usable core(s): PyTorch's threads and the "
            "workers take turns on the cores, which slows both the envs and the policy. Call "
            f"torch.set_num_threads({advised}) before training (see the README's "
            "\"Trainers\"); silence this with "
            "warnings.filterwarnings('ignore', category=fastvec.errors.TrainerThreadsWarning).",
            TrainerThreadsWarning, stacklevel=stacklevel + 1)
