"""Stable-Baselines3's PPO on fastvec: ``FastVecEnv`` wherever SB3 takes a ``VecEnv``.

Run it::

    python examples/sb3_ppo.py --total-steps 100000
    python examples/sb3_ppo.py --vec-env subproc     # SB3's SubprocVecEnv, for comparison

``make_vec_env(..., vec_env_cls=FastVecEnv)`` is the only change from SB3's own quick start;
``vec_env_kwargs`` passes fastvec's options (here ``num_workers``). ``FastVecEnv`` returns what
SB3's ``DummyVecEnv`` returns (``terminal_observation``, ``TimeLimit.truncated``,
``reset_infos``, seeds), so the training is the same, with the envs stepped in fastvec's
worker processes.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

from fastvec.integrations.sb3 import FastVecEnv

VEC_ENVS: dict[str, Any] = {"fastvec": FastVecEnv, "dummy": DummyVecEnv,
                            "subproc": SubprocVecEnv}


@dataclass
class Trained:
    """A trained model's evaluation and how fast ``learn`` ran."""

    mean_return: float  # over the last 20 training episodes
    eval_return: float  # of the deterministic policy, on fresh episodes
    env_steps: int
    seconds: float

    @property
    def steps_per_second(self) -> float:
        return self.env_steps / self.seconds


def main(total_steps: int = 100_000, n_envs: int = 8, seed: int = 0, vec_env: str = "fastvec",
         vec_env_kwargs: dict[str, Any] | None = None, eval_episodes: int = 5,
         verbose: int = 0) -> Trained:
    torch.set_num_threads(1)  # the envs' workers need the other cores
    venv = make_vec_env("CartPole-v1", n_envs=n_envs, seed=seed, vec_env_cls=VEC_ENVS[vec_env],
                        vec_env_kwargs=vec_env_kwargs)
    try:
        model = PPO("MlpPolicy", venv, n_steps=64, batch_size=128, n_epochs=4,
                    learning_rate=2.5e-3, seed=seed, device="cpu", verbose=verbose)
        started = time.perf_counter()
        model.learn(total_timesteps=total_steps)
        seconds = time.perf_counter() - started
        returns = [info["r"] for info in model.ep_info_buffer]
        evaluation, _ = evaluate_policy(model, venv, n_eval_episodes=eval_episodes)
    finally:
        venv.close()
    return Trained(float(np.mean(returns[-20:])), float(evaluation), model.num_timesteps,
                   seconds)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vec-env", choices=list(VEC_ENVS), default="fastvec")
    parser.add_argument("--total-steps", type=int, default=100_000)
    parser.add_argument("--n-envs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = main(args.total_steps, args.n_envs, args.seed, args.vec_env, verbose=1)
    print(f"{args.vec_env}: {out.steps_per_second:,.0f} env-steps/s in learn(); mean return "
          f"of the last 20 training episodes {out.mean_return:.1f}, evaluation "
          f"{out.eval_return:.1f}")
