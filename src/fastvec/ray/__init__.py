"""fastvec.ray: fastvec past one machine, one pool per Ray node, behind the same API.

>>> import ray
>>> from fastvec.ray import RayVectorEnv
>>> ray.init()                                   # or ray.init(address="auto") on a cluster
>>> envs = RayVectorEnv([lambda: gym.make("CartPole-v1")] * 64, num_nodes=2,
...                     cpus_per_actor=8)

Needs Ray core (``pip install 'fastvec[ray]'``); ``ray.init`` is the caller's.
"""

from __future__ import annotations

try:
    import ray as _ray  # noqa: F401  (the absolute import: this package does not shadow it)
except ImportError as exc:  # pragma: no cover - exercised only without ray
    raise ImportError(
        "fastvec.ray needs Ray: pip install 'fastvec[ray]' (Ray core)") from exc

from fastvec.ray.errors import ActorDiedError
from fastvec.ray.vector_env import RayVectorEnv

__all__ = ["ActorDiedError", "RayVectorEnv"]
