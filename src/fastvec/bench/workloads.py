"""Benchmark workloads: the environments ``python -m fastvec.bench`` steps.

The env classes live in this importable module (not in ``__main__``) so that workers started
with ``spawn`` or ``forkserver`` can unpickle them. Every env factory is a
``functools.partial`` over a module-level callable, so it pickles by reference.
"""

from __future__ import annotations

import functools
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.envs.classic_control.cartpole import CartPoleEnv

__all__ = [
    "ATARI_ENV_ID",
    "DEFAULT_WORKLOADS",
    "WORKLOADS",
    "CartPoleComputeEnv",
    "ComputeEnv",
    "DictEnv",
    "ImageEnv",
    "JitterEnv",
    "Workload",
    "WorkloadUnavailable",
    "atari_missing",
    "calibrate_compute",
    "calibrate_round_seconds",
    "jitter_rounds",
    "make_atari_env",
]

#: Episodes of the no-work and compute envs are truncated after this many steps, so the
#: benchmark also exercises autoreset now and then.
EPISODE_STEPS = 1000


class _FixedObsEnv(gym.Env):
    """Does no work: every step returns the same preallocated observation object."""

    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012 (Gymnasium's own type)

    def __init__(self) -> None:
        self.action_space = spaces.Discrete(4)
        self._obs = self._make_obs()
        self._t = 0

    def _make_obs(self) -> Any:
        raise NotImplementedError

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        super().reset(seed=seed)
        self._t = 0
        return self._obs, {}

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        self._t += 1
        return self._obs, 0.0, False, self._t >= EPISODE_STEPS, {}


class ImageEnv(_FixedObsEnv):
    """Atari-shaped frames: ``Box(0, 255, (84, 84, 4), uint8)``, ``Discrete(4)`` actions."""

    def __init__(self) -> None:
        self.observation_space = spaces.Box(0, 255, (84, 84, 4), np.uint8)
        super().__init__()

    def _make_obs(self) -> np.ndarray:
        return np.arange(84 * 84 * 4, dtype=np.uint8).reshape(84, 84, 4)


class DictEnv(_FixedObsEnv):
    """A nested observation: ``Dict(image uint8 (64,64,3), vector float32 (32,),
    id Discrete(5))``."""

    def __init__(self) -> None:
        self.observation_space = spaces.Dict({
            "image": spaces.Box(0, 255, (64, 64, 3), np.uint8),
            "vector": spaces.Box(-1.0, 1.0, (32,), np.float32),
            "id": spaces.Discrete(5),
        })
        super().__init__()

    def _make_obs(self) -> dict[str, Any]:
        return {
            "image": np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3),
            "vector": np.linspace(-1.0, 1.0, 32, dtype=np.float32),
            "id": np.int64(2),
        }


# -- compute ---------------------------------------------------------------------------------

#: Target cost of one ComputeEnv step, in seconds.
COMPUTE_STEP_SECONDS = 300e-6
_SIZE = 64


def _compute_matrix() -> np.ndarray:
    return np.random.default_rng(0).uniform(-2.0, 2.0, (_SIZE, _SIZE))


def _work(state: np.ndarray, scratch: np.ndarray, matrix: np.ndarray, iters: int) -> None:
    """``iters`` rounds of ``state = 0.5 * state + sin(matrix * state)`` over 64x64 float64.

    Element-wise ufuncs on purpose: they run on the calling thread only, whereas a 64x64
    BLAS matmul may wake OpenBLAS helper threads, which would compete with the workers for
    the cores and blur the comparison. The recurrence stays bounded (|state| <= 2) and is
    deterministic.
    """
    for _ in range(iters):
        np.multiply(matrix, state, out=scratch)
        np.sin(scratch, out=scratch)
        np.multiply(state, 0.5, out=state)
        np.add(state, scratch, out=state)


@functools.cache
def calibrate_round_seconds() -> float:
    """Seconds one round of :func:`_work` takes on this machine now.

    Measured once per process (the median of several short trials, so the work matches
    what this machine delivers now, neighbours included) and cached.
    """
    state = np.full((_SIZE, _SIZE), 0.1)
    scratch = np.empty_like(state)
    matrix = _compute_matrix()
    probe = 50
    _work(state, scratch, matrix, probe)  # warm up
    trials = []
    for _ in range(9):
        start = time.perf_counter()
        _work(state, scratch, matrix, probe)
        trials.append(time.perf_counter() - start)
    return float(statistics.median(trials)) / probe


def calibrate_compute(target: float = COMPUTE_STEP_SECONDS) -> int:
    """Rounds of work per step so that one ComputeEnv step costs about ``target`` seconds.

    The benchmark calibrates in the parent and passes the result to every env, so all
    processes do exactly the same work.
    """
    return max(1, round(target / calibrate_round_seconds()))


class ComputeEnv(gym.Env):
    """About 300 µs of deterministic numpy work per step; ``Box(8,)`` float32 observations."""

    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012 (Gymnasium's own type)

    def __init__(self, iters: int | None = None) -> None:
        self.iters = calibrate_compute() if iters is None else int(iters)
        self.observation_space = spaces.Box(-np.inf, np.inf, (8,), np.float32)
        self.action_space = spaces.Discrete(4)
        self._matrix = _compute_matrix()
        self._state = np.empty((_SIZE, _SIZE))
        self._scratch = np.empty_like(self._state)
        self._obs = np.empty(8, np.float32)
        self._t = 0

    def __setstate__(self, state: dict[str, Any]) -> None:
        # An env built in one process and unpickled in another (Tianshou's Ray workers) may
        # arrive with read-only arrays (Ray's zero-copy numpy): it owns writable copies.
        self.__dict__.update(state)
        for name in ("_state", "_scratch", "_obs"):
            setattr(self, name, np.array(getattr(self, name)))

    def _observe(self) -> np.ndarray:
        np.copyto(self._obs, self._state.reshape(-1)[:8], casting="same_kind")
        return self._obs

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self._state.fill(0.1)
        self._t = 0
        return self._observe(), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        self._state[0, 0] += 1e-3 * int(action)
        _work(self._state, self._scratch, self._matrix, self.iters)
        self._t += 1
        reward = float(self._state[0, 1])
        return self._observe(), reward, False, self._t >= EPISODE_STEPS, {}


# -- jitter ----------------------------------------------------------------------------------

#: The range, in seconds, of one JitterEnv step's work; each step draws uniformly from it.
JITTER_STEP_SECONDS = (100e-6, 500e-6)


def jitter_rounds() -> tuple[float, float]:
    """(fewest, most) rounds of work per JitterEnv step, calibrated like ``compute``.

    Fractional: one round is ~40 µs on a typical core, too coarse a unit for 100 µs.
    """
    low, high = JITTER_STEP_SECONDS
    per_round = calibrate_round_seconds()
    return low / per_round, high / per_round


class JitterEnv(ComputeEnv):
    """ComputeEnv whose work varies per step: ~100-500 µs, uniform, from the env's own rng.

    The draw comes from ``self.np_random``, so ``reset(seed=...)`` makes the sequence of step
    costs reproducible; a synchronous step waits for its slowest env, which is what this
    workload exposes. ``rounds`` is the last step's draw.
    """

    def __init__(self, low_rounds: float | None = None,
                 high_rounds: float | None = None) -> None:
        low, high = jitter_rounds()
        self.rounds_range = (low if low_rounds is None else float(low_rounds),
                             high if high_rounds is None else float(high_rounds))
        super().__init__(iters=0)
        self.rounds = 0.0

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        self.rounds = float(self.np_random.uniform(*self.rounds_range))
        self.iters = int(self.rounds)
        # the fraction of a round, as one round over that fraction of the rows
        rows = round((self.rounds - self.iters) * _SIZE)
        if rows:
            _work(self._state[:rows], self._scratch[:rows], self._matrix[:rows], 1)
        return super().step(action)


# -- policy ----------------------------------------------------------------------------------

class CartPoleComputeEnv(CartPoleEnv):
    """CartPole's dynamics plus ~300 µs of numpy work per step (as ``compute``).

    Episodes end when the pole falls, so a policy's actions matter and autoreset is exercised.
    """

    def __init__(self, iters: int | None = None) -> None:
        super().__init__()
        self.iters = calibrate_compute() if iters is None else int(iters)
        self._matrix = _compute_matrix()
        self._state = np.full((_SIZE, _SIZE), 0.1)
        self._scratch = np.empty_like(self._state)

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        _work(self._state, self._scratch, self._matrix, self.iters)
        step = super().step  # gymnasium's CartPoleEnv.step is not annotated
        obs, reward, terminated, truncated, info = step(action)  # type: ignore[no-untyped-call]
        return obs, float(reward), bool(terminated), bool(truncated), info


# -- atari -----------------------------------------------------------------------------------

ATARI_ENV_ID = "ALE/Pong-v5"


class WorkloadUnavailable(RuntimeError):
    """A workload whose optional dependencies are not installed; the message says which."""


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    if module in sys.modules:  # None there means "blocked", as importing it would raise
        return sys.modules[module] is not None
    return importlib.util.find_spec(module) is not None


def atari_missing() -> str | None:
    """Why the atari workload cannot run here (a sentence), or ``None`` when it can."""
    # AtariPreprocessing resizes frames with OpenCV, so both packages are needed.
    missing = [package for module, package in (("ale_py", "ale-py"), ("cv2", "opencv-python"))
               if not _installed(module)]
    if not missing:
        return None
    return (f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed "
            "(pip install 'fastvec[atari]')")


def make_atari_env() -> gym.Env:
    """Pong the way Atari agents see it: ``(4, 84, 84)`` uint8 stacks of grey frames.

    ``ALE/Pong-v5`` with ``frameskip=1`` so that ``AtariPreprocessing`` does the frame
    skipping (4 emulator frames per step, max-pooled), grey-scales and resizes to 84x84;
    ``FrameStackObservation`` stacks the last 4 of those.
    """
    import ale_py
    import cv2
    from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation

    # The emulator prints a banner on stderr per instance, which would tear the progress bar.
    ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)
    # One thread per env process: with dozens of processes (gym-async), OpenCV's own pool
    # would only add threads competing for the same cores.
    cv2.setNumThreads(1)
    gym.register_envs(ale_py)
    env = gym.make(ATARI_ENV_ID, frameskip=1)
    return FrameStackObservation(AtariPreprocessing(env), stack_size=4)


def _atari_factory() -> Callable[[], gym.Env]:
    reason = atari_missing()
    if reason is not None:
        raise WorkloadUnavailable(reason)
    return make_atari_env


# -- registry --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
    name: str
    default_num_envs: int
    description: str
    #: Builds a picklable zero-argument env factory (called once, in the parent).
    factory: Callable[[], Callable[[], gym.Env]]
    #: Also measure free-running processes with no IPC (the "ceiling").
    ceiling: bool = False
    #: Why the workload cannot run on this machine (missing packages), or None.
    unavailable: Callable[[], str | None] = lambda: None
    #: The parent computes every batch's actions with a calibrated MLP (fastvec.bench.policy)
    #: instead of cycling through pre-sampled actions.
    policy: bool = False


def _compute_factory() -> Callable[[], gym.Env]:
    return functools.partial(ComputeEnv, iters=calibrate_compute())


def _jitter_factory() -> Callable[[], gym.Env]:
    low, high = jitter_rounds()
    return functools.partial(JitterEnv, low_rounds=low, high_rounds=high)


def _policy_factory() -> Callable[[], gym.Env]:
    return functools.partial(CartPoleComputeEnv, iters=calibrate_compute())


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("image", 32, "no-work env, fixed uint8 (84,84,4) frame, Discrete(4)",
                 lambda: ImageEnv),
        Workload("cartpole", 32, 'gymnasium.make("CartPole-v1")',
                 lambda: functools.partial(gym.make, "CartPole-v1")),
        Workload("dict", 32, "no-work env, Dict{image (64,64,3) uint8, vector (32,) f32, id}",
                 lambda: DictEnv),
        Workload("compute", 8, "~300 us of numpy work per step, Box(8,) float32",
                 _compute_factory, ceiling=True),
        Workload("jitter", 8, "~100-500 us of numpy work per step, uniform per step from the "
                 "env's seeded rng, Box(8,) float32", _jitter_factory, ceiling=True),
        Workload("policy", 16, "the parent picks actions with a numpy MLP as costly as one "
                 "core stepping the batch; CartPole + ~300 us numpy work per step",
                 _policy_factory, policy=True),
        Workload("atari", 8, f"{ATARI_ENV_ID} + AtariPreprocessing + FrameStackObservation(4): "
                 "(4,84,84) uint8, Discrete(6); needs fastvec[atari]",
                 _atari_factory, ceiling=True, unavailable=atari_missing),
    )
}

#: What a bare ``python -m fastvec.bench`` runs; jitter and policy only on request, as each
#: would add about half a minute to the default run.
DEFAULT_WORKLOADS: tuple[str, ...] = ("image", "cartpole", "dict", "compute", "atari")
