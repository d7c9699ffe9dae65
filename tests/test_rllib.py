"""The README's RLlib recipe: an env creator that returns a fastvec env when RLlib asks for a
vector env (``gym_env_vectorize_mode="vector_entry_point"`` puts ``num_envs`` in its config),
against RLlib's own ``"sync"`` vectorisation of the same envs: the same episodes from an
EnvRunner with the same seed.

ray[rllib] 2.60.0 pins gymnasium 1.2.2, so it does not install beside the gymnasium 1.4 the
rest of the suite runs with; the test runs where it is installed and skips elsewhere. It runs
in a fresh interpreter (RLlib registers a gymnasium env per runner and warns on the second)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest


def _rllib_missing() -> str | None:
    """Why RLlib cannot be imported here (None if it can). Ray core ships ``ray.rllib`` without
    its dependencies (dm-tree and more, from ``ray[rllib]``): only an import tells."""
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.rllib") is None:
        return "RLlib is not installed"
    done = subprocess.run([sys.executable, "-c", "import ray.rllib.algorithms.ppo"],
                          capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return f"RLlib does not import ({lines[-1] if lines else done.returncode})"
    return None


_MISSING = _rllib_missing()
if _MISSING is not None:
    pytest.skip(f"{_MISSING}: pip install torch==2.13.0 'ray[rllib]==2.60.0' (it needs "
                "gymnasium 1.2.2)", allow_module_level=True)

SCRIPT = r"""
import json
import gymnasium as gym
import fastvec
from ray.rllib.algorithms.ppo import PPOConfig
from ray.rllib.env.single_agent_env_runner import SingleAgentEnvRunner


def make_env():
    return gym.make("CartPole-v1")


def env_creator(config):
    if "num_envs" in config:  # RLlib wants the whole vector env
        return fastvec.AsyncVectorEnv([make_env] * config["num_envs"], num_workers=2)
    return make_env()


if __name__ == "__main__":
    report = {}
    for mode in ("sync", "vector_entry_point"):
        config = (PPOConfig().environment(env_creator)
                  .env_runners(num_env_runners=0, num_envs_per_env_runner=4,
                               gym_env_vectorize_mode=mode)
                  .debugging(seed=0))
        runner = SingleAgentEnvRunner(config=config)
        episodes = runner.sample(num_timesteps=400, explore=False)
        report[mode] = {
            "env": type(runner.env.unwrapped).__module__,
            "episodes": [[e.get_observations().tolist(), list(map(float, e.get_rewards()))]
                         for e in episodes],
        }
        runner.stop()
    print(json.dumps(report))
"""


def test_vector_entry_point_creator_gives_rllibs_own_episodes(tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=110, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["vector_entry_point"]["env"] == "fastvec.vector_env"
    assert report["sync"]["env"].startswith("gymnasium.vector")
    ours, theirs = report["vector_entry_point"]["episodes"], report["sync"]["episodes"]
    assert sum(len(rewards) for _, rewards in ours) >= 400
    assert ours == theirs
