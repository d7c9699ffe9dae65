"""``call``/``get_attr``/``set_attr`` addressed to a subset of envs (``env_ids=``) and ``call``
with a function: the parts of the face that fastvec.integrations.sb3 builds its
``env_method(..., indices=...)`` on."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

import fastvec


class CountingEnv(gym.Env):
    """Counts the calls of ``bump`` it received; ``index`` is its place in the batch."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.bumps = 0
        self.observation_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.action_space = spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        return np.zeros(2, np.float32), 0.0, False, False, {}

    def bump(self, by: int = 1) -> tuple[int, int]:
        if self.index == 4 and by < 0:
            raise KeyError(f"env {self.index} refuses {by}")
        self.bumps += by
        return self.index, self.bumps


def _index_times(env: gym.Env, factor: int, *, plus: int = 0) -> int:
    """Run in the worker by ``call``: sees the env itself, not a name."""
    return env.unwrapped.index * factor + plus


def _fns(n: int = 5):
    return [lambda i=i: CountingEnv(i) for i in range(n)]


@pytest.mark.parametrize("num_workers", [1, 2, 5])
def test_call_runs_only_on_the_given_envs(num_workers):
    with fastvec.AsyncVectorEnv(_fns(), num_workers=num_workers) as envs:
        envs.reset(seed=0)
        assert envs.call("bump", env_ids=[1, 3]) == ((1, 1), (3, 1))
        # the other envs were never called: their counters did not move
        assert envs.get_attr("bumps") == (0, 1, 0, 1, 0)
        # results follow the order of env_ids, not the envs' order
        assert envs.call("bump", 2, env_ids=np.array([3, 0])) == ((3, 3), (0, 2))
        assert envs.get_attr("bumps", env_ids=[4, 3, 0]) == (0, 3, 2)
        assert envs.call("bump", env_ids=[]) == ()
        assert envs.get_attr("bumps") == (2, 1, 0, 3, 0)


def test_call_with_a_function_and_subset():
    with fastvec.AsyncVectorEnv(_fns(), num_workers=2) as envs:
        assert envs.call(_index_times, 10, plus=1) == (1, 11, 21, 31, 41)
        assert envs.call(_index_times, 10, env_ids=[4, 2]) == (40, 20)


def test_set_attr_on_the_given_envs():
    with fastvec.AsyncVectorEnv(_fns(), num_workers=2) as envs:
        envs.set_attr("bumps", [7, 9], env_ids=[4, 1])
        assert envs.get_attr("bumps") == (0, 9, 0, 0, 7)
        envs.set_attr("bumps", 5, env_ids=[0, 2])  # one value for all of them
        assert envs.get_attr("bumps") == (5, 9, 5, 0, 7)
        with pytest.raises(ValueError, match="Got `1` values for 2 environments"):
            envs.set_attr("bumps", [1], env_ids=[0, 2])


def test_bad_env_ids_raise_before_any_worker_runs():
    with fastvec.AsyncVectorEnv(_fns(), num_workers=2) as envs:
        for bad, match in (([5], "unknown env ids"), ([-1], "unknown env ids"),
                           ([1, 1], "more than once"), ([[0, 1]], "1-d sequence of ints"),
                           ([0.5], "1-d sequence of ints")):
            with pytest.raises(ValueError, match=match):
                envs.call("bump", env_ids=bad)
            with pytest.raises(ValueError, match=match):
                envs.set_attr("bumps", 1, env_ids=bad)
        assert envs.get_attr("bumps") == (0,) * 5  # still usable, nothing ran


def test_an_error_in_the_subset_names_its_env():
    with fastvec.AsyncVectorEnv(_fns(), num_workers=2) as envs:
        # logged the Gymnasium way (gymnasium.logger.error warns), naming env 4 only
        with pytest.warns(UserWarning) as record:
            with pytest.raises(KeyError, match="env 4 refuses -1"):
                envs.call("bump", -1, env_ids=[2, 4])
        logged = " ".join(str(w.message) for w in record)
        assert "error from Worker-4" in logged and "Worker-2" not in logged
        assert envs.get_attr("bumps") == (0, 0, -1, 0, 0)
        assert envs.call("bump", env_ids=[4]) == ((4, 1),)
