"""The ``--ray`` rows of ``python -m fastvec.bench``: fastvec.ray and Tianshou's
``RayVectorEnv`` on a local multi-node Ray cluster started for the run.

:class:`LocalCluster` starts ``nodes`` Ray nodes on this machine (``ray.cluster_utils``),
splitting its usable cores between them, and connects to it; :func:`make_ray_backend` builds
a row's vector env over it: ``fastvec-ray`` is :class:`fastvec.ray.RayVectorEnv` with one
actor per node, ``tianshou-ray`` is Tianshou's ``RayVectorEnv`` (one Ray actor and one remote
call per env per step) behind the few ``VectorEnv`` names the timed loop uses.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

__all__ = [
    "FASTVEC_RAY",
    "RAY_BACKENDS",
    "TIANSHOU_MAX_ENVS",
    "TIANSHOU_RAY",
    "LocalCluster",
    "TianshouRayVectorEnv",
    "make_ray_backend",
    "ray_missing",
    "tianshou_missing",
]

FASTVEC_RAY = "fastvec-ray"
TIANSHOU_RAY = "tianshou-ray"
RAY_BACKENDS = (FASTVEC_RAY, TIANSHOU_RAY)
#: Tianshou's row runs up to this many envs (one actor process, importing torch, per env).
TIANSHOU_MAX_ENVS = 32


def ray_missing() -> str | None:
    """Why the ``--ray`` rows cannot run here, or None."""
    if importlib.util.find_spec("ray") is None:
        return "needs Ray: pip install 'fastvec[ray]'"
    return None


def tianshou_missing() -> str | None:
    """Why the ``tianshou-ray`` row cannot run here, or None."""
    if importlib.util.find_spec("tianshou") is None:
        return ("needs Tianshou: pip install torch==2.13.0 (a CPU build) then "
                "pip install tianshou==2.0.1")
    return None


class LocalCluster:
    """``nodes`` Ray nodes on this machine with ``cpus`` CPUs each, connected to for the
    ``with`` block (and shut down after it)."""

    def __init__(self, nodes: int, cpus: int) -> None:
        self.nodes, self.cpus = nodes, cpus
        self.cluster: Any = None

    def __enter__(self) -> LocalCluster:
        import ray
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, connect=False, head_node_args={
            "num_cpus": self.cpus, "include_dashboard": False})
        self.cluster = cluster
        try:
            for _ in range(self.nodes - 1):
                cluster.add_node(num_cpus=self.cpus)
            ray.init(address=cluster.address, log_to_driver=False)
            cluster.wait_for_nodes()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        import ray

        ray.shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()
            self.cluster = None


class TianshouRayVectorEnv:
    """Tianshou's ``RayVectorEnv`` behind ``reset(seed=)``, ``step(actions)``, ``close()``,
    ``num_envs`` and the spaces; done envs are reset as Tianshou's collector resets them
    (``reset(env_id=...)``: one more remote call per done env)."""

    def __init__(self, env_fns: list[Callable[[], gym.Env]]) -> None:
        # imported by name: Tianshou is optional, and mypy need not know it
        tianshou_env: Any = importlib.import_module("tianshou.env")
        self.envs = tianshou_env.RayVectorEnv(env_fns)
        self.num_envs = len(env_fns)
        probe = env_fns[0]()
        self.single_action_space = probe.action_space
        self.single_observation_space = probe.observation_space
        probe.close()

    def reset(self, *, seed: int | None = None) -> tuple[Any, Any]:
        if seed is not None:  # env i gets seed + i, as in the other rows
            self.envs.seed([seed + i for i in range(self.num_envs)])
        obs, infos = self.envs.reset()
        return obs, infos

    def step(self, actions: Any) -> tuple[Any, ...]:
        obs, rewards, terminations, truncations, infos = self.envs.step(actions)
        done = np.flatnonzero(np.logical_or(terminations, truncations))
        if done.size:
            fresh, _ = self.envs.reset(env_id=done)
            obs[done] = fresh
        return obs, rewards, terminations, truncations, infos

    @property
    def processes(self) -> int:
        return self.num_envs

    def close(self) -> None:
        import ray

        self.envs.close()
        # Tianshou's close leaves its actors alive (each an idle Ray worker taking a few % of
        # a core) until their handles are collected: end them now, before the next case
        for worker in self.envs.workers:
            ray.kill(worker.env, no_restart=True)


def make_ray_backend(backend: str, env_fns: list[Callable[[], gym.Env]],
                     nodes: int, cpus: int) -> Any:
    """The vector env of a ``--ray`` row over the connected cluster."""
    if backend == FASTVEC_RAY:
        from fastvec.ray import RayVectorEnv

        return RayVectorEnv(env_fns, num_nodes=nodes, cpus_per_actor=cpus)
    if backend == TIANSHOU_RAY:
        return TianshouRayVectorEnv(env_fns)
    raise ValueError(f"unknown backend {backend!r}")


def cpus_per_node(nodes: int) -> int:
    """The usable cores split between ``nodes`` nodes (at least one each)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // nodes)
