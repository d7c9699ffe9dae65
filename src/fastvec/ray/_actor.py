"""The node actor: one local :class:`fastvec.AsyncVectorEnv` inside one Ray actor process.

:class:`NodePool` is a plain class; :mod:`fastvec.ray._placement` wraps it with
``ray.remote`` (with the CPUs, restarts and placement it asks for). It runs its envs in the
autoreset mode the user asked for, so the parent only concatenates what the nodes return.
Every method answers with numpy arrays and plain containers, which Ray moves through its
object store (read zero-copy by a parent on the same node); nothing is pickled per env.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from gymnasium import Env, Space
from gymnasium.vector import AutoresetMode

from fastvec.ray._batches import StepResult, join, take
from fastvec.ray._infos import merge_infos, take_infos
from fastvec.vector_env import AsyncVectorEnv

__all__ = ["NodePool", "StepResult"]


class NodePool:
    """A fastvec pool on one Ray node, over the envs ``first .. first + len(env_fns) - 1``.

    Parameters
    ----------
    env_fns
        The node's env functions, in global env order.
    first
        The global id of the node's first env (only reported back, for error messages).
    options
        Keyword arguments of its :class:`fastvec.AsyncVectorEnv` (``autoreset_mode``,
        ``num_workers``, ``restart_workers``, ...). ``copy=False`` always: Ray copies each
        result into its object store before the next method runs.
    """

    def __init__(self, env_fns: Sequence[Callable[[], Env[Any, Any]]], first: int,
                 options: dict[str, Any]) -> None:
        self.first = first
        self.envs = AsyncVectorEnv(list(env_fns), copy=False, **options)
        # envs whose next step is an autoreset step (NEXT_STEP mode, after a restart)
        self.autoreset = np.zeros(self.envs.num_envs, dtype=np.bool_)

    def describe(self) -> dict[str, Any]:
        """Where the pool runs and what it steps (asked once after each start)."""
        import ray

        context = ray.get_runtime_context()
        shm = self.envs._pool.resources.shm
        return {
            "pid": os.getpid(),
            "node_id": context.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "segment": None if shm is None else shm.name,
            "num_workers": self.envs.num_workers,
            "worker_pids": [p.pid for p in self.envs._pool.resources.processes],
        }

    def spaces(self) -> tuple[Any, ...]:
        """``(metadata, render_mode, single_action_space, single_observation_space)``."""
        envs = self.envs
        return (envs.metadata, envs.render_mode, envs.single_action_space,
                envs.single_observation_space)

    def reset(self, seeds: list[int | None], options: dict[str, Any] | None) -> tuple[Any, ...]:
        """``(observations, infos)`` of the node's reset."""
        mask = None if options is None else options.get("reset_mask")
        self.autoreset[True if mask is None else mask] = False
        return self.envs.reset(seed=seeds, options=options)

    def recover(self) -> tuple[Any, dict[str, Any]]:
        """Reset every env (seed None) after Ray restarted this actor; in NEXT_STEP mode
        their next step is then an autoreset step, as after any truncation."""
        envs = self.envs
        obs, infos = envs.reset(seed=[None] * envs.num_envs)
        if envs.autoreset_mode is AutoresetMode.NEXT_STEP:
            self.autoreset[:] = True
        return obs, infos

    def step(self, actions: Any) -> StepResult:
        """One step of every env of the node."""
        if self.autoreset.any():
            return self.step_some(actions, list(range(self.envs.num_envs)), ordered=True)
        return self.envs.step(actions)

    def step_some(self, actions: Any, env_ids: list[int], ordered: bool = False
                  ) -> StepResult:
        """One step of the node's envs ``env_ids`` (local ids). Rows come in the order they
        finished, named by ``infos["env_id"]`` (local ids); ``ordered``: in the order of
        ``env_ids``, with no ``env_id``."""
        envs = self.envs
        space = envs.single_observation_space
        resets = [k for k, i in enumerate(env_ids) if self.autoreset[i]]
        if not resets:
            envs.send(actions, env_ids)
            result = envs.recv()
            return _ordered(space, result, env_ids) if ordered else result
        # the autoreset step of envs restarted in NEXT_STEP mode: their reset, reward 0
        reset_ids = [env_ids[k] for k in resets]
        mask = np.zeros(envs.num_envs, dtype=np.bool_)
        mask[reset_ids] = True
        obs, reset_infos = envs.reset(options={"reset_mask": mask})
        self.autoreset[reset_ids] = False
        parts = [(take(space, obs, reset_ids), np.zeros(len(reset_ids)),
                  np.zeros(len(reset_ids), np.bool_), np.zeros(len(reset_ids), np.bool_),
                  take_infos(reset_infos, reset_ids, envs.num_envs),
                  reset_ids)]
        stepped = [k for k in range(len(env_ids)) if k not in set(resets)]
        if stepped:
            envs.send(take(envs.single_action_space, actions, stepped),
                      [env_ids[k] for k in stepped])
            *rest, infos = envs.recv()
            ids = [int(i) for i in infos.pop("env_id")]
            parts.append((*rest, infos, ids))
        result = _concat(space, parts)
        return _ordered(space, result, env_ids) if ordered else result

    def call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        return self.envs.call(name, *args, **kwargs)

    def set_attr(self, name: str, values: list[Any]) -> None:
        self.envs.set_attr(name, values)

    def close(self, timeout: float | None, terminate: bool) -> None:
        """Close the envs, end the workers and free the segment (the actor stays)."""
        self.envs.close(timeout=timeout, terminate=terminate)



def _concat(space: Space[Any], parts: list[tuple[Any, ...]]) -> StepResult:
    """Several ``(obs, rewards, terminations, truncations, infos, local ids)`` parts as one
    result over their rows, in that order, with ``infos["env_id"]``."""
    num_rows = sum(len(p[5]) for p in parts)
    infos: dict[str, Any] = {}
    offset = 0
    for part in parts:
        infos = merge_infos(infos, part[4], offset, len(part[5]), num_rows)
        offset += len(part[5])
    infos["env_id"] = np.array([i for p in parts for i in p[5]], dtype=np.int64)
    return (join(space, [p[0] for p in parts]),
            *(np.concatenate([p[r] for p in parts]) for r in (1, 2, 3)), infos)


def _ordered(space: Space[Any], result: StepResult, env_ids: list[int]) -> StepResult:
    """``result`` (rows named by ``infos["env_id"]``) in the order of ``env_ids``, without
    ``env_id``."""
    obs, rewards, terminations, truncations, infos = result
    order = [int(i) for i in infos.pop("env_id")]
    if order == env_ids:
        return obs, rewards, terminations, truncations, infos
    position = {i: k for k, i in enumerate(order)}
    rows = [position[i] for i in env_ids]
    return (take(space, obs, rows), rewards[rows], terminations[rows], truncations[rows],
            take_infos(infos, rows, len(order)))
