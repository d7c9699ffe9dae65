"""Small deterministic test environments for the vector-env tests.

They live in a module (not in test functions) so that spawn and forkserver workers can import
them: ``pythonpath = ["tests"]`` makes ``import envs`` work in the test process and in every
worker. Build env functions with :func:`functools.partial` (picklable by reference).
"""

from __future__ import annotations

import copy
import threading
import time
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces


def _numbers(value: Any) -> list[float]:
    """Every number in a sample, in order (Graph, Sequence and custom samples included)."""
    if isinstance(value, spaces.GraphInstance):
        parts = [value.nodes, value.edges, value.edge_links]
        return [x for part in parts if part is not None for x in _numbers(part)]
    if isinstance(value, dict):
        return [x for item in value.values() for x in _numbers(item)]
    if isinstance(value, (tuple, list)):
        return [x for item in value for x in _numbers(item)]
    if isinstance(value, str):
        return [float(ord(c)) for c in value]
    return [float(x) for x in np.asarray(value, dtype=np.float64).ravel()]


def _action_code(space: spaces.Space, action: Any) -> float:
    """A number that depends on every part of ``action`` (so a misdelivered action shows)."""
    flat = np.asarray(_numbers(action), dtype=np.float64)
    return float(np.dot(flat, np.arange(1, flat.size + 1)))


class PairSpace(spaces.Space):
    """A custom space fastvec has no layout for: a pair (int in [0, 4), float32 array (2,))."""

    def __init__(self, seed: int | None = None) -> None:
        super().__init__(None, None, seed)

    def sample(self, mask: Any = None, probability: Any = None) -> tuple:
        return (int(self.np_random.integers(4)),
                self.np_random.random(2).astype(np.float32))

    def contains(self, x: Any) -> bool:
        return (isinstance(x, tuple) and len(x) == 2 and 0 <= int(x[0]) < 4
                and np.asarray(x[1]).shape == (2,))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PairSpace)

    __hash__ = spaces.Space.__hash__


class SpaceEnv(gym.Env):
    """Observations sampled from ``obs_space`` with a generator seeded from the env's rng.

    Parameters
    ----------
    obs_space, action_space
        The single spaces (deep-copied: every env owns and seeds its own).
    episode_len
        ``(low, high)``: on each reset the episode length is drawn from this range and
        ``index`` is added, so envs end at different steps. The episode terminates when the
        length is even and truncates when it is odd.
    info_every
        Step infos are returned only on steps divisible by ``info_every + index % 3``; they
        hold scalars, numpy arrays and a nested dict. Reset infos only on some resets.
    index
        The env's index in the batch (changes episode lengths and info steps).
    delay
        Seconds to sleep in every ``step`` (for timeout and concurrency tests).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}

    def __init__(self, obs_space: spaces.Space, action_space: spaces.Space | None = None,
                 episode_len: tuple[int, int] = (3, 9), info_every: int = 3, index: int = 0,
                 delay: float = 0.0, render_mode: str | None = None) -> None:
        self.observation_space = copy.deepcopy(obs_space)
        self.action_space = copy.deepcopy(action_space if action_space is not None
                                          else spaces.Discrete(4))
        self.episode_len = episode_len
        self.info_every = info_every
        self.index = index
        self.delay = delay
        self.render_mode = render_mode
        self.t = 0
        self.length = 0
        self.episodes = 0
        self.custom_attr = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.observation_space.seed(int(self.np_random.integers(2**31)))
        low, high = self.episode_len
        self.length = int(self.np_random.integers(low, high + 1)) + self.index
        self.t = 0
        self.episodes += 1
        info: dict[str, Any] = {}
        if self.episodes % 2 == 0:
            info["episode"] = self.episodes
            info["reset_arr"] = np.full((2,), self.index, dtype=np.int16)
        if options and "tag" in options:
            info["tag"] = options["tag"]
        return self.observation_space.sample(), info

    def step(self, action):
        if self.delay:
            time.sleep(self.delay)
        # a batched Box of shape () iterates into numpy scalars, which Box.contains warns about
        checked = np.asarray(action) if isinstance(self.action_space, spaces.Box) else action
        assert self.action_space.contains(checked), f"bad action {action!r}"
        self.t += 1
        reward = _action_code(self.action_space, action) + 0.25 * self.t
        reward += float(self.np_random.random())
        done = self.t >= self.length
        terminated = done and self.length % 2 == 0
        truncated = done and not terminated
        info: dict[str, Any] = {}
        if self.t % (self.info_every + self.index % 3) == 0:
            info = {
                "t": self.t,
                "value": reward / 2,
                "arr": np.arange(3, dtype=np.float32) * self.t,
                "nested": {"even": self.t % 2 == 0, "deep": {"idx": self.index,
                                                              "vec": np.ones(2) * self.t}},
            }
        return self.observation_space.sample(), reward, terminated, truncated, info

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        return np.full((4, 5, 3), (self.t * 10 + self.index) % 256, dtype=np.uint8)

    def scaled(self, factor: float, offset: float = 0.0) -> float:
        return self.index * factor + offset

    def slow(self, seconds: float) -> int:
        time.sleep(seconds)
        return self.index


class ActionEchoEnv(gym.Env):
    """Reports the type of each action it receives in its info (``action_type``)."""

    def __init__(self, obs_space: spaces.Space, action_space: spaces.Space) -> None:
        self.observation_space = copy.deepcopy(obs_space)
        self.action_space = copy.deepcopy(action_space)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.observation_space.seed(int(self.np_random.integers(2**31)))
        return self.observation_space.sample(), {}

    def step(self, action):
        assert self.action_space.contains(action), f"bad action {action!r}"
        return (self.observation_space.sample(), float(action), False, False,
                {"action_type": type(action).__name__})


class FailError(RuntimeError):
    """A picklable error raised by :class:`FailingEnv`."""


class LockError(Exception):
    """An exception that cannot be pickled (it holds a lock) but whose type can."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def _local_error_type() -> type[Exception]:
    class LocalError(Exception):  # neither it nor its instances pickle
        pass

    return LocalError


class FailingEnv(gym.Env):
    """Fails ``step`` (or ``reset``) at ``fail_at`` steps for the envs in ``failing``.

    ``kind`` picks the raised error: ``"fail"`` (:class:`FailError`), ``"lock"``
    (:class:`LockError`), ``"local"`` (a local class: nothing about it pickles), ``"percent"``
    (a message with ``%`` format characters).
    """

    metadata = {"render_modes": []}

    def __init__(self, index: int = 0, failing: tuple[int, ...] = (), fail_at: int = 2,
                 kind: str = "fail", fail_reset: bool = False) -> None:
        self.observation_space = spaces.Box(-10, 10, (2,), np.float32)
        self.action_space = spaces.Discrete(3)
        self.index = index
        self.failing = failing
        self.fail_at = fail_at
        self.kind = kind
        self.fail_reset = fail_reset
        self.t = 0

    def _maybe_fail(self) -> None:
        if self.index not in self.failing:
            return
        message = f"env {self.index} failed at t={self.t}"
        if self.kind == "fail":
            raise FailError(message)
        if self.kind == "lock":
            raise LockError(message)
        if self.kind == "local":
            raise _local_error_type()(message)
        if self.kind == "percent":
            raise FailError(message + " (100% of %d %s)")
        raise AssertionError(self.kind)

    def _obs(self) -> np.ndarray:
        return np.array([self.index, self.t], dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        if self.fail_reset:
            self._maybe_fail()
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        if self.t == self.fail_at:
            self._maybe_fail()
        return self._obs(), float(action), False, False, {}


def broken_env() -> gym.Env:
    """An env function that fails (in the worker that calls it)."""
    raise FailError("cannot build this env")


class UnpicklableInfoEnv(gym.Env):
    """Returns an info holding a lock (which cannot be pickled) when ``bad``; else a plain one."""

    observation_space = spaces.Box(0.0, 1.0, (2,), np.float32)
    action_space = spaces.Discrete(2)

    def __init__(self, bad: bool = False) -> None:
        self.bad = bad

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        info = {"lock": threading.Lock()} if self.bad else {"ok": 1}
        return np.full(2, 0.5, np.float32), 1.0, False, False, info

    def get_lock(self) -> Any:
        return threading.Lock() if self.bad else "fine"


class BrokenStrError(RuntimeError):
    """An exception whose ``str()`` itself raises."""

    def __str__(self) -> str:
        raise RuntimeError("no text for this error")


class BrokenStrEnv(UnpicklableInfoEnv):
    """Raises :class:`BrokenStrError` from ``step`` when ``bad``."""

    def step(self, action):
        if self.bad:
            raise BrokenStrError()
        return super().step(action)


# The processes SimulatorEnv started, referenced so that none is reported as a ResourceWarning.
_STARTED: list = []


class SimulatorEnv(gym.Env):
    """An env that starts a process, as a simulator does, and never ends it (not even in
    ``close``): what is left of it shows whether fastvec ends what envs start.

    Only inside a worker process (``multiprocessing.parent_process()``) is ``sleep 100``
    started, in ``__init__``; its pid is the attribute ``child_pid``.

    Parameters
    ----------
    index
        The env's index in the batch.
    pid_dir
        If given, ``__init__`` writes ``{"worker": pid, "child": pid}`` as JSON to the file
        ``<pid_dir>/<index>`` once the child runs (for a test that cannot ask the env).
    hang_in
        ``"init"`` or ``"reset"``: that method sleeps for ``hang`` seconds (after the child
        started), when ``index`` is in ``hanging`` and ``arm_file`` (if given) exists when the
        env is built.
    """

    metadata = {"render_modes": []}

    def __init__(self, index: int = 0, pid_dir: str | None = None, hang_in: str | None = None,
                 hanging: tuple[int, ...] = (), hang: float = 60.0,
                 arm_file: str | None = None) -> None:
        import json
        import multiprocessing
        import os
        import subprocess

        self.observation_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.action_space = spaces.Discrete(2)
        self.index = index
        self.child_pid: int | None = None
        in_worker = multiprocessing.parent_process() is not None
        self.hang_in = hang_in if (in_worker and index in hanging and (
            arm_file is None or os.path.exists(arm_file))) else None
        self.hang = hang
        if in_worker:
            child = subprocess.Popen(["sleep", "100"])
            _STARTED.append(child)
            self.child_pid = child.pid
            if pid_dir is not None:
                path = os.path.join(pid_dir, str(index))
                with open(path + ".tmp", "w") as file:
                    json.dump({"worker": os.getpid(), "child": child.pid}, file)
                os.replace(path + ".tmp", path)  # whole or absent for the reader
        if self.hang_in == "init":
            time.sleep(hang)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if self.hang_in == "reset":
            time.sleep(self.hang)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        return np.zeros(2, np.float32), 1.0, False, False, {}


class JitterEnv(gym.Env):
    """A deterministic env whose ``step`` sleeps a random 0..``jitter`` seconds, drawn from an
    rng seeded by ``index`` alone (so envs finish in a shuffled order, yet every env's results
    depend only on its seed and actions): for the partial-batch differential tests.

    Observations are a Dict (a float64 position and a Discrete step count); episodes last
    ``3 + index % 5`` steps and then terminate (even index) or truncate (odd); infos come on
    every third step (a scalar and an array) and from every reset.
    """

    metadata = {"render_modes": []}

    def __init__(self, index: int = 0, jitter: float = 0.003) -> None:
        self.index = index
        self.jitter = jitter
        self.observation_space = spaces.Dict({
            "pos": spaces.Box(-1e9, 1e9, (2,), np.float64),
            "t": spaces.Discrete(1000),
        })
        self.action_space = spaces.Discrete(4)
        self.sleeps = np.random.default_rng(1000 + index)
        self.pos = np.zeros(2)
        self.t = 0

    def _obs(self) -> dict[str, Any]:
        return {"pos": self.pos.copy(), "t": self.t}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.pos = self.np_random.normal(size=2)
        self.t = 0
        return self._obs(), {"start": float(self.pos[0])}

    def step(self, action):
        if self.jitter:
            time.sleep(float(self.sleeps.uniform(0, self.jitter)))
        self.t += 1
        self.pos = self.pos + np.array([int(action) - 1.5, self.np_random.normal()])
        end = self.t >= 3 + self.index % 5
        info = {"steps": self.t, "pos": self.pos.copy()} if self.t % 3 == 0 else {}
        return (self._obs(), float(self.pos[0]), end and self.index % 2 == 0,
                end and self.index % 2 == 1, info)


class ScalarInfoEnv(JitterEnv):
    """A :class:`JitterEnv` whose infos are mostly a few scalars of every type an info row
    holds (see ``fastvec._info_rows``), and sometimes not: empty, a different set of keys, a
    value of another type, an array. Env 3 lists its keys in another order. The info of
    each step is :meth:`info_at` of the env's own step count, which survives resets; step
    number ``fail_at`` raises (after counting) in the envs of ``failing``. A reset with
    ``options={"quiet": True}`` has an empty info."""

    def __init__(self, index: int = 0, jitter: float = 0.0, failing: tuple[int, ...] = (),
                 fail_at: int = 0) -> None:
        super().__init__(index, jitter)
        self.failing = failing
        self.fail_at = fail_at
        self.count = 0

    @staticmethod
    def info_at(index: int, n: int) -> dict[str, Any]:
        if n % 7 == 0:
            return {}
        if n % 11 == 0:
            return {"lives": np.int32(n % 4)}
        info: dict[str, Any] = {
            "lives": np.int32(3 - n % 4), "frame": 4 * n, "score": n / 3 + index,
            "flag": np.bool_(n % 2), "ok": n % 3 == 0, "half": np.float16(n / 8),
            "big": np.uint64(2**63 + n), "small": np.int8(-index), "single": np.float32(n / 7),
        }
        if n % 13 == 0:
            info["frame"] = 4.0 * n  # the same keys, another type
        if n % 17 == 0:
            info["arr"] = np.arange(2) * n
        if index == 3:
            info = dict(reversed(info.items()))
        return info

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, _ = super().reset(seed=seed, options=options)
        if options and options.get("quiet"):
            return obs, {}
        return obs, {"start": float(self.pos[0]), "lives": np.int32(3)}

    def step(self, action):
        obs, reward, terminated, truncated, _ = super().step(action)
        self.count += 1
        if self.count == self.fail_at and self.index in self.failing:
            raise FailError(f"env {self.index} failed at step {self.count}")
        return obs, reward, terminated, truncated, self.info_at(self.index, self.count)


def scalar_info_fns(n: int, **kwargs: Any) -> list:
    import functools

    return [functools.partial(ScalarInfoEnv, index=i, **kwargs) for i in range(n)]


def jitter_fns(n: int, **kwargs: Any) -> list:
    import functools

    return [functools.partial(JitterEnv, index=i, **kwargs) for i in range(n)]


class EpisodeEndEnv(gym.Env):
    """Box observations and short episodes, for SAME_STEP's episode ends in the segment
    (``fastvec._finals``). Episodes last ``2 + index % 4`` steps and terminate (even length)
    or truncate (odd).

    Parameters
    ----------
    infos
        What a step's info holds: ``"none"`` (always empty, as CartPole's), ``"scalars"`` (a
        few scalars, which go by info row) or ``"mixed"`` (the scalars, and an array on
        every fourth step).
    reset_info
        Resets return a non-empty info (then an episode end goes by pipe).
    obs_dtype
        The dtype of the observations returned (another than the space's float32 goes by
        pipe, so that the final observation keeps it).
    jitter
        A step sleeps a random 0..``jitter`` seconds (an rng seeded by ``index``).
    """

    metadata = {"render_modes": []}

    def __init__(self, index: int = 0, infos: str = "none", reset_info: bool = False,
                 obs_dtype: Any = np.float32, jitter: float = 0.0) -> None:
        self.index = index
        self.infos = infos
        self.reset_info = reset_info
        self.obs_dtype = obs_dtype
        self.jitter = jitter
        self.sleeps = np.random.default_rng(2000 + index)
        self.observation_space = spaces.Box(-1e6, 1e6, (3,), np.float32)
        self.action_space = spaces.Discrete(4)
        self.state = np.zeros(3)
        self.t = 0

    def _obs(self) -> np.ndarray:
        return self.state.astype(self.obs_dtype)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.t = 0
        self.state = self.np_random.normal(size=3)
        return self._obs(), ({"start": float(self.state[0])} if self.reset_info else {})

    def step(self, action):
        if self.jitter:
            time.sleep(float(self.sleeps.uniform(0, self.jitter)))
        self.t += 1
        self.state = self.state + (int(action) - 1.5) + 0.1 * self.np_random.normal(size=3)
        length = 2 + self.index % 4
        end = self.t >= length
        info: dict[str, Any] = {}
        if self.infos != "none":
            info = {"t": self.t, "x": float(self.state[0]), "alive": np.bool_(not end)}
        if self.infos == "mixed" and self.t % 4 == 0:
            info["state"] = self.state.copy()
        return (self._obs(), float(self.state[1]), end and length % 2 == 0,
                end and length % 2 == 1, info)


def episode_end_fns(n: int, **kwargs: Any) -> list:
    import functools

    return [functools.partial(EpisodeEndEnv, index=i, **kwargs) for i in range(n)]
