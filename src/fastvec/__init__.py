"""fastvec: a shared-memory, Cython-accelerated drop-in for gymnasium.vector.AsyncVectorEnv."""

from fastvec._version import __version__
from fastvec.layout import register_layout

__all__ = ["__version__", "register_layout"]
