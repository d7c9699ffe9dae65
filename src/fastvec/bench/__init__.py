"""``python -m fastvec.bench``: fastvec against Gymnasium's vector envs on this machine.

Run ``python -m fastvec.bench --help`` for the options. The same run is available from
Python as :func:`fastvec.bench.main` (argv list) or :func:`fastvec.bench.run`
(a :class:`BenchConfig`).
"""

from fastvec.bench.cli import main
from fastvec.bench.runner import BenchConfig, Result, run

__all__ = ["BenchConfig", "Result", "main", "run"]
