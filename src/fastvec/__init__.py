"""fastvec: a shared-memory, Cython-accelerated drop-in for gymnasium.vector.AsyncVectorEnv.

>>> from fastvec import AsyncVectorEnv   # was: from gymnasium.vector import AsyncVectorEnv
"""

from fastvec import errors
from fastvec._autotune import AutotuneResult, autotune
from fastvec._version import __version__
from fastvec.layout import register_layout
from fastvec.registration import make_vec
from fastvec.vector_env import AsyncVectorEnv

__all__ = ["AsyncVectorEnv", "AutotuneResult", "__version__", "autotune", "errors", "make_vec",
           "register_layout"]
