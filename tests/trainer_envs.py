"""Envs for the trainer-integration tests (Tianshou, TorchRL, RLlib) and the start-method
tests: Box observations, as every trainer takes them, and steps that take a random time, so
that partial batches and asynchronous collectors really see envs finish out of order."""

from __future__ import annotations

import functools
import multiprocessing
import time
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces


class RandomTimeEnv(gym.Env):
    """A seeded random walk whose ``step`` sleeps 0..``jitter`` seconds, drawn from an rng
    seeded by ``index`` alone: the results depend only on the reset seeds and the actions,
    not on the sleeps.

    Observation: Box(4,) float32; action: Discrete(2). An episode ends when the first
    coordinate leaves [-2, 2] (terminated) or after a horizon of 8..40 steps drawn at reset
    (truncated). Infos: the step count every fourth step, the horizon at reset.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}

    def __init__(self, index: int = 0, jitter: float = 0.002,
                 render_mode: str | None = None) -> None:
        self.index = index
        self.jitter = jitter
        self.render_mode = render_mode
        self.observation_space = spaces.Box(-10.0, 10.0, (4,), np.float32)
        self.action_space = spaces.Discrete(2)
        self.sleeps = np.random.default_rng(7000 + index)
        self.state = np.zeros(4, np.float32)
        self.t = 0
        self.horizon = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.state = self.np_random.uniform(-1, 1, 4).astype(np.float32)
        self.t = 0
        self.horizon = int(self.np_random.integers(8, 41))
        return self.state.copy(), {"horizon": self.horizon}

    def step(self, action):
        if self.jitter:
            time.sleep(float(self.sleeps.uniform(0, self.jitter)))
        self.t += 1
        push = (float(action) - 0.5) * 0.2
        noise = self.np_random.normal(0.0, 0.3, 4)
        self.state = np.clip(self.state + push + noise, -10, 10).astype(np.float32)
        terminated = bool(abs(self.state[0]) > 2.0)
        truncated = not terminated and self.t >= self.horizon
        info = {"t": self.t} if self.t % 4 == 0 else {}
        return self.state.copy(), float(self.state.sum()), terminated, truncated, info

    def render(self):
        return np.full((2, 2, 3), self.t % 256, np.uint8)


def random_time_fns(n: int, **kwargs: Any) -> list:
    return [functools.partial(RandomTimeEnv, index=i, **kwargs) for i in range(n)]


# set by a test's parent process after importing this module: a forked worker sees it, a
# spawned or forkserver one (which imports this module afresh) does not
PARENT_MARK: str | None = None


class StartMethodProbeEnv(RandomTimeEnv):
    """A :class:`RandomTimeEnv` that records how its process was started: the start method
    its process knows (``multiprocessing.get_start_method``) and whether it inherited the
    parent's memory (``PARENT_MARK``)."""

    def __init__(self, index: int = 0, jitter: float = 0.0) -> None:
        super().__init__(index, jitter)
        self.started = (multiprocessing.get_start_method(allow_none=True), PARENT_MARK)
