"""Double buffering: the policy computes one half's actions while the workers step the other.

``batch_size = num_envs // 2`` splits the envs into two halves that take turns: ``recv`` returns
the first half to finish (``infos["env_id"]`` says which envs), and while the policy works on
them the other half is being stepped. The loop below is a trainer's collection loop with a
numpy policy whose cost is close to stepping half the envs; it runs the same loop with the
ordinary synchronous ``step`` for comparison and prints both rates.

    python examples/double_buffering.py
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np

import fastvec


@dataclass
class Collected:
    """What a collection loop gathered: per-env transitions and the rate it ran at."""

    env_steps: int = 0
    seconds: float = 0.0
    # per env, its (observation, action, reward) transitions in the order they happened
    transitions: dict[int, list[tuple[np.ndarray, int, float]]] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.env_steps / self.seconds if self.seconds else 0.0


class Policy:
    """A small numpy MLP: pushes the cart towards where the pole leans, plus noise."""

    def __init__(self, seed: int = 0, width: int = 256, depth: int = 8) -> None:
        rng = np.random.default_rng(seed)
        self.w_in = rng.normal(0, 0.5, (4, width)).astype(np.float32)
        self.hidden = rng.normal(0, 1 / np.sqrt(width), (width, width)).astype(np.float32)
        self.depth = depth
        self.rng = rng

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        h = np.tanh(obs.astype(np.float32) @ self.w_in)
        for _ in range(self.depth):  # the cost of a real network's forward pass
            h = np.tanh(h @ self.hidden)
        lean = obs[:, 2] + 0.5 * obs[:, 3] + 0.01 * float(h.mean())
        noise = self.rng.random(len(obs)) < 0.1
        return np.where(noise, self.rng.integers(0, 2, len(obs)), lean > 0).astype(np.int64)


def collect_double_buffered(envs: fastvec.AsyncVectorEnv, policy: Policy,
                            env_steps: int) -> Collected:
    """``recv`` one half, compute its actions, ``send`` them back: the other half steps
    meanwhile."""
    out = Collected()
    start = time.perf_counter()
    envs.async_reset(seed=0)
    while out.env_steps < env_steps:
        obs, rewards, _, _, infos = envs.recv()
        env_ids = infos["env_id"]
        actions = policy(obs)
        envs.send(actions, env_ids)
        for row, env in enumerate(env_ids):
            out.transitions.setdefault(int(env), []).append(
                (obs[row].copy(), int(actions[row]), float(rewards[row])))
        out.env_steps += len(env_ids)
    for _ in range(envs.num_envs // envs.batch_size):  # what is still in flight
        envs.recv()
    out.seconds = time.perf_counter() - start
    return out


def collect_synchronous(envs: gym.vector.VectorEnv, policy: Policy, env_steps: int) -> Collected:
    """The usual loop: the envs wait while the policy computes, and the policy while they step."""
    out = Collected()
    start = time.perf_counter()
    obs, _ = envs.reset(seed=0)
    rewards = np.zeros(envs.num_envs)
    while out.env_steps < env_steps:
        actions = policy(obs)
        for env in range(envs.num_envs):
            out.transitions.setdefault(env, []).append(
                (obs[env].copy(), int(actions[env]), float(rewards[env])))
        obs, rewards, _, _, _ = envs.step(actions)
        out.env_steps += envs.num_envs
    out.seconds = time.perf_counter() - start
    return out


def main(num_envs: int = 16, env_steps: int = 20_000, seed: int = 0) -> tuple[Collected, Collected]:
    env_fns = [functools.partial(gym.make, "CartPole-v1") for _ in range(num_envs)]
    with fastvec.AsyncVectorEnv(env_fns, batch_size=num_envs // 2) as envs:
        double = collect_double_buffered(envs, Policy(seed), env_steps)
    with fastvec.AsyncVectorEnv(env_fns) as envs:
        synchronous = collect_synchronous(envs, Policy(seed), env_steps)
    return double, synchronous


if __name__ == "__main__":
    double, synchronous = main()
    print(f"double-buffered: {double.rate:,.0f} env-steps/s")
    print(f"synchronous:     {synchronous.rate:,.0f} env-steps/s "
          f"({double.rate / synchronous.rate:.2f}x for double buffering)")
