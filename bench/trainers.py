"""PPO training rates with each vectoriser side by side: SB3's PPO (``SubprocVecEnv``,
``DummyVecEnv``, fastvec's ``FastVecEnv`` without and with ``parent_group=True``) and the
CleanRL-style PyTorch PPO of examples/ppo_torch_cartpole.py (Gymnasium's ``SyncVectorEnv``
and ``AsyncVectorEnv``, fastvec synchronous, with ``parent_group=True``, and
double-buffered). CartPole-v1, 8 envs, a fixed number of env steps.

A script, not a test (pytest does not collect it)::

    python bench/trainers.py --steps 16384 --repeats 3

The runs are interleaved (every configuration once, then again...) and each figure is the
median of the repeats, so that a noisy neighbour slows every configuration alike; compare the
ratios. Two rates per run: the whole training (``learn``, or rollouts plus updates) and the
rollout collection alone (acting and stepping, no gradient steps). The PyTorch PPO runs use
PyTorch's own thread count unless ``--torch-threads`` says otherwise (SB3's use one thread);
fastvec's PyTorch PPO rows run again with ``--advised-threads`` (default 1), the count its
``TrainerThreadsWarning`` advises, against the same baseline.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import statistics
import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

from fastvec.integrations.sb3 import FastVecEnv

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
NUM_ENVS = 8
#: PyTorch's own intra-op thread count, read before any run sets one (SB3's runs use 1)
TORCH_DEFAULT_THREADS = torch.get_num_threads()


def _load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


class RolloutTimer(BaseCallback):  # type: ignore[misc]
    """Adds up the time SB3 spends in ``collect_rollouts``."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds = 0.0
        self._started = 0.0

    def _on_rollout_start(self) -> None:
        self._started = time.perf_counter()

    def _on_rollout_end(self) -> None:
        self.seconds += time.perf_counter() - self._started

    def _on_step(self) -> bool:
        return True


def sb3_run(vec_env_cls: type, steps: int, **vec_env_kwargs: Any) -> tuple[float, float]:
    """SB3 PPO ``learn(steps)``: (env steps/s of learn, env steps/s of its rollouts)."""
    torch.set_num_threads(1)
    venv = make_vec_env("CartPole-v1", n_envs=NUM_ENVS, seed=0, vec_env_cls=vec_env_cls,
                        vec_env_kwargs=vec_env_kwargs)
    try:
        model = PPO("MlpPolicy", venv, n_steps=64, batch_size=128, n_epochs=4,
                    learning_rate=2.5e-3, seed=0, device="cpu")
        timer = RolloutTimer()
        started = time.perf_counter()
        model.learn(total_timesteps=steps, callback=timer)
        seconds = time.perf_counter() - started
    finally:
        venv.close()
    return model.num_timesteps / seconds, model.num_timesteps / timer.seconds


def torch_run(example: ModuleType, vector: str, steps: int, threads: int
              ) -> tuple[float, float]:
    """The CleanRL-style PPO with ``threads`` PyTorch threads: (env steps/s of training, env
    steps/s of its rollouts)."""
    result = example.main(total_steps=steps, seed=0, vector=vector,
                          config=example.Config(torch_threads=threads))
    return result.steps_per_second, result.env_steps / result.collect_seconds


def main(steps: int, repeats: int, threads: int, torch_only: bool, advised: int) -> None:
    example = _load_example("ppo_torch_cartpole")
    configs: dict[str, tuple[str, Callable[[], tuple[float, float]]]] = {
        "SubprocVecEnv": ("SB3 PPO", lambda: sb3_run(SubprocVecEnv, steps)),
        "DummyVecEnv": ("SB3 PPO", lambda: sb3_run(DummyVecEnv, steps)),
        "fastvec FastVecEnv": ("SB3 PPO", lambda: sb3_run(FastVecEnv, steps)),
        "fastvec FastVecEnv, parent group": (
            "SB3 PPO", lambda: sb3_run(FastVecEnv, steps, parent_group=True)),
        "gymnasium SyncVectorEnv": ("torch PPO",
                                    lambda: torch_run(example, "gym-sync", steps, threads)),
        "gymnasium AsyncVectorEnv": ("torch PPO",
                                     lambda: torch_run(example, "gym-async", steps, threads)),
        "fastvec synchronous": ("torch PPO",
                                lambda: torch_run(example, "fastvec", steps, threads)),
        "fastvec parent group": ("torch PPO",
                                 lambda: torch_run(example, "fastvec-parent", steps, threads)),
        "fastvec double-buffered": ("torch PPO",
                                    lambda: torch_run(example, "fastvec-double", steps, threads)),
    }
    if advised != threads:  # fastvec as its TrainerThreadsWarning tells the user to run it
        configs[f"fastvec synchronous, {advised} thread(s)"] = (
            "torch PPO", lambda: torch_run(example, "fastvec", steps, advised))
        configs[f"fastvec parent group, {advised} thread(s)"] = (
            "torch PPO", lambda: torch_run(example, "fastvec-parent", steps, advised))
    if torch_only:
        configs = {name: config for name, config in configs.items()
                   if config[0] == "torch PPO"}
    rates: dict[str, list[tuple[float, float]]] = {name: [] for name in configs}
    for r in range(repeats):
        for name, (_, run) in configs.items():
            rates[name].append(run())
            print(f"repeat {r + 1}/{repeats} {name}: {rates[name][-1][0]:,.0f} steps/s",
                  file=sys.stderr)
    baselines = {"SB3 PPO": "DummyVecEnv", "torch PPO": "gymnasium SyncVectorEnv"}
    medians = {name: (statistics.median(t for t, _ in runs),
                      statistics.median(c for _, c in runs)) for name, runs in rates.items()}
    sb3 = "" if torch_only else ", SB3 with 1"
    print(f"CartPole-v1, {NUM_ENVS} envs, {steps} env steps per run, median of {repeats} "
          f"interleaved runs; PyTorch PPO with {threads} PyTorch thread(s){sb3}")
    print("| trainer | vectoriser | training steps/s | vs baseline | rollout steps/s "
          "| vs baseline |")
    print("|---|---|---:|---:|---:|---:|")
    for name, (trainer, _) in configs.items():
        base: Any = medians[baselines[trainer]]
        train, collect = medians[name]
        print(f"| {trainer} | {name} | {train:,.0f} | {train / base[0]:.2f}x "
              f"| {collect:,.0f} | {collect / base[1]:.2f}x |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=16_384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=TORCH_DEFAULT_THREADS,
                        help="PyTorch threads for the PyTorch PPO runs (default: PyTorch's "
                        f"own, {TORCH_DEFAULT_THREADS} here)")
    parser.add_argument("--torch-only", action="store_true",
                        help="only the PyTorch PPO rows")
    parser.add_argument("--advised-threads", type=int, default=1,
                        help="also run fastvec's PyTorch PPO rows with this many PyTorch "
                        "threads, if it differs from --torch-threads (default 1: what "
                        "fastvec's TrainerThreadsWarning advises with one worker per core)")
    args = parser.parse_args()
    main(args.steps, args.repeats, args.torch_threads, args.torch_only, args.advised_threads)
