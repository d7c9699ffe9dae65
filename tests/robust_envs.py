"""Environments for the robustness tests (tests/test_robustness.py).

Importable by spawn and forkserver workers (``pythonpath = ["tests"]``); build env functions
with :func:`functools.partial`.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces


class SlowEnv(gym.Env):
    """A deterministic env whose ``reset`` and ``step`` sleep; ``slow(s)`` sleeps ``s`` seconds.

    The observation is ``[index, t]`` and the reward ``index + 10 * action + t``, so the
    result of a completed call can be checked exactly.
    """

    metadata = {"render_modes": []}

    def __init__(self, index: int = 0, step_delay: float = 0.0,
                 reset_delay: float = 0.0) -> None:
        self.observation_space = spaces.Box(-1e6, 1e6, (2,), np.float64)
        self.action_space = spaces.Discrete(4)
        self.index = index
        self.step_delay = step_delay
        self.reset_delay = reset_delay
        self.t = 0

    def _obs(self) -> np.ndarray:
        return np.array([self.index, self.t], dtype=np.float64)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if self.reset_delay:
            time.sleep(self.reset_delay)
        self.t = 0
        return self._obs(), {"seed": seed}

    def step(self, action):
        if self.step_delay:
            time.sleep(self.step_delay)
        self.t += 1
        reward = float(self.index + 10 * int(action) + self.t)
        return self._obs(), reward, False, False, {}

    def slow(self, seconds: float) -> int:
        time.sleep(seconds)
        return self.index * 100 + self.t


class RecordingEnv(gym.Env):
    """Records every action it is given (``last_action``, ``steps``); never checks it.

    Gymnasium's vector envs deliver whatever the action batch iterates into, so this env lets
    a test see exactly what reached a sub-environment.
    """

    metadata = {"render_modes": []}

    def __init__(self, action_space: spaces.Space, index: int = 0) -> None:
        self.observation_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.action_space = action_space
        self.index = index
        self.steps = 0
        self.last_action: Any = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.steps += 1
        self.last_action = action
        return np.full(2, 0.5, np.float32), 1.0, False, False, {}


class Unpicklable:
    """Stands for an object that cannot be pickled: :class:`BadOutputEnv` returns a lock in
    its place (the marker itself must pickle, to reach the env through ``set_attr``)."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Unpicklable)

    __hash__ = None  # as __eq__ alone leaves it: unhashable

    def __repr__(self) -> str:
        return "Unpicklable()"


def _materialize(value: Any) -> Any:
    if isinstance(value, Unpicklable):
        return threading.Lock()
    if isinstance(value, dict):
        return {k: _materialize(v) for k, v in value.items()}
    return value


class BadOutputEnv(gym.Env):
    """Returns what ``bad`` says instead of a valid part of its step result.

    ``bad`` is ``None`` (a valid step) or a pair ``(field, value)`` with ``field`` one of
    ``"obs"``, ``"reward"``, ``"terminated"``, ``"truncated"``, ``"info"``, ``"reset_obs"``
    (the observation returned by ``reset``) or ``"result"`` (the whole step return value).
    Set it with ``set_attr("bad", ...)``; an :class:`Unpicklable` in ``value`` (or in a dict
    value) becomes a lock.
    """

    metadata = {"render_modes": []}
    observation_space = spaces.Box(-2.0, 2.0, (2,), np.float32)
    action_space = spaces.Discrete(2)

    def __init__(self, index: int = 0) -> None:
        self.index = index
        self.t = 0
        self.bad: tuple[str, Any] | None = None

    def _value(self, field: str, good: Any) -> Any:
        if self.bad is not None and self.bad[0] == field:
            return _materialize(self.bad[1])
        return good

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.t = 0
        obs = np.array([self.index, 0], dtype=np.float32)
        return self._value("reset_obs", obs), {}

    def step(self, action):
        self.t += 1
        good = (np.array([self.index, self.t % 2], dtype=np.float32),
                float(self.index + self.t), False, False, {})
        if self.bad is not None and self.bad[0] == "result":
            return _materialize(self.bad[1])
        obs, reward, terminated, truncated, info = good
        return (self._value("obs", obs), self._value("reward", reward),
                self._value("terminated", terminated), self._value("truncated", truncated),
                self._value("info", info))
