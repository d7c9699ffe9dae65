"""Atari Pong through fastvec, the way agents see it, into a preallocated rollout buffer.

Needs the atari extra (ale-py and OpenCV)::

    pip install 'fastvec[atari]'
    python examples/atari_pong.py --num-envs 8 --rollout-steps 128 --rollouts 4

Each sub-environment is ``ALE/Pong-v5`` with ``frameskip=1`` wrapped in Gymnasium's
``AtariPreprocessing`` (4 frames per step, max-pooled, grey 84x84) and
``FrameStackObservation(stack_size=4)``: observations are ``(4, 84, 84)`` uint8 stacks.

``copy=False`` makes ``step`` return a *view* of fastvec's shared-memory segment instead of
a fresh array: the batch of frames is not copied once more on its way to you. The view is
overwritten by the next ``step``, so copy it where you keep it — here straight into the
rollout buffer, which is the one copy a trainer needs anyway. The policy is a placeholder
(uniformly random actions); put yours where ``choose_actions`` is.
"""

from __future__ import annotations

import argparse
import functools
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation

import fastvec

ENV_ID = "ALE/Pong-v5"


def make_envs(num_envs: int, **vector_kwargs) -> fastvec.AsyncVectorEnv:
    """``num_envs`` preprocessed Pong envs in fastvec, with observations as segment views."""
    import ale_py

    gym.register_envs(ale_py)  # makes the "ALE/..." ids known to gymnasium
    return fastvec.make_vec(
        ENV_ID, num_envs,
        vector_kwargs={"copy": False, **vector_kwargs},
        wrappers=[AtariPreprocessing, functools.partial(FrameStackObservation, stack_size=4)],
        frameskip=1,  # AtariPreprocessing skips frames itself
    )


@dataclass
class Rollout:
    """What a PPO/A2C update reads: ``T + 1`` observations (the last to bootstrap from)."""

    obs: np.ndarray  # (T + 1, num_envs, 4, 84, 84) uint8
    actions: np.ndarray  # (T, num_envs)
    rewards: np.ndarray  # (T, num_envs) float32
    dones: np.ndarray  # (T, num_envs) bool: the episode ended at this step


def allocate(envs: gym.vector.VectorEnv, steps: int) -> Rollout:
    n = envs.num_envs
    return Rollout(
        obs=np.zeros((steps + 1, n, *envs.single_observation_space.shape),
                     dtype=envs.single_observation_space.dtype),
        actions=np.zeros((steps, n), dtype=np.int64),
        rewards=np.zeros((steps, n), dtype=np.float32),
        dones=np.zeros((steps, n), dtype=bool),
    )


def choose_actions(obs: np.ndarray, rng: np.random.Generator, num_actions: int) -> np.ndarray:
    """Placeholder policy: uniformly random. ``obs`` is the batch stored in the buffer."""
    return rng.integers(num_actions, size=len(obs))


def collect(envs: gym.vector.VectorEnv, rollout: Rollout, first_obs: np.ndarray,
            rng: np.random.Generator) -> np.ndarray:
    """Fill ``rollout`` starting from ``first_obs``; return the observation to continue from."""
    steps = len(rollout.actions)
    num_actions = int(envs.single_action_space.n)
    rollout.obs[0] = first_obs  # the one copy out of the segment
    for t in range(steps):
        actions = choose_actions(rollout.obs[t], rng, num_actions)
        obs, rewards, terminated, truncated, _ = envs.step(actions)
        rollout.obs[t + 1] = obs  # copy the view before the next step overwrites it
        rollout.actions[t] = actions
        rollout.rewards[t] = rewards
        rollout.dones[t] = terminated | truncated
    return rollout.obs[steps]


def main(num_envs: int = 8, rollout_steps: int = 128, rollouts: int = 4, seed: int = 0,
         verbose: bool = False) -> Rollout:
    """Collect ``rollouts`` rollouts of ``rollout_steps`` steps; return the last one."""
    rng = np.random.default_rng(seed)
    envs = make_envs(num_envs)
    try:
        rollout = allocate(envs, rollout_steps)
        obs, _ = envs.reset(seed=seed)
        started = time.perf_counter()
        for i in range(rollouts):
            obs = collect(envs, rollout, obs, rng)
            if verbose:
                elapsed = time.perf_counter() - started
                rate = (i + 1) * rollout_steps * num_envs / elapsed
                print(f"rollout {i + 1}/{rollouts}: {rate:,.0f} env-steps/s; "
                      f"points won {int((rollout.rewards > 0).sum())}, "
                      f"lost {int((rollout.rewards < 0).sum())}")
    finally:
        envs.close()
    return rollout


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-envs", type=int, default=8, help="Pong envs (default: 8)")
    parser.add_argument("--rollout-steps", type=int, default=128,
                        help="steps per env per rollout (default: 128)")
    parser.add_argument("--rollouts", type=int, default=4, help="rollouts (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    args = parser.parse_args()
    last = main(args.num_envs, args.rollout_steps, args.rollouts, args.seed, verbose=True)
    print(f"rollout buffer: obs {last.obs.shape} {last.obs.dtype}, "
          f"{last.obs.nbytes / 2**20:.1f} MiB")
