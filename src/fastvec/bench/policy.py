"""The ``policy`` workload: the parent computes every batch's actions with a numpy MLP.

The loop is the one a trainer runs, ``obs = reset(); repeat: obs = step(policy(obs))``, with
the policy sized so that one batch's forward pass costs what one core needs to step that
batch's envs. On ``C`` usable cores no vectoriser can then do better than
``(policy + env) / C`` seconds per batch: that is the *bound* the table compares against.

A *loop mode* is how the loop overlaps the policy with the envs; :data:`LOOP_MODES` maps a
name to its timed loop, so another mode is one function more.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import gymnasium as gym
import numpy as np

__all__ = [
    "LOOP_MODES",
    "MLPPolicy",
    "PartialBatchVectorEnv",
    "PolicySetup",
    "blas_threads",
    "calibrate_policy",
    "double_buffered_loop",
    "env_step_seconds",
    "partial_batches_available",
    "partial_loop",
    "single_blas_thread",
    "sync_loop",
]

#: Width of the MLP's hidden layers; its depth is what calibration picks.
POLICY_HIDDEN = 256
#: Calibration aims the policy's cost at the env's within this fraction.
POLICY_TOLERANCE = 0.10


class MLPPolicy:
    """``obs -> tanh(obs W_in) -> depth x tanh(h W) -> argmax(h W_out)``, float32, greedy.

    The hidden layers share one weight matrix: the cost grows with ``depth`` in fine steps
    while the weights stay in cache, so the forward pass measures arithmetic, not memory.
    """

    def __init__(self, obs_dim: int, num_actions: int, depth: int,
                 hidden: int = POLICY_HIDDEN, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)

        def weights(rows: int, columns: int) -> np.ndarray:
            # scaled so that tanh stays out of saturation however deep the stack
            return (rng.standard_normal((rows, columns)) / math.sqrt(rows)).astype(np.float32)

        self.depth = depth
        self.hidden = hidden
        self.w_in = weights(obs_dim, hidden)
        self.w_hidden = weights(hidden, hidden)
        self.w_out = weights(hidden, num_actions)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        h = np.tanh(np.asarray(obs, np.float32).reshape(len(obs), -1) @ self.w_in)
        for _ in range(self.depth):
            h = np.tanh(h @ self.w_hidden)
        actions: np.ndarray = np.argmax(h @ self.w_out, axis=1)
        return actions

    def describe(self) -> str:
        obs_dim, num_actions = self.w_in.shape[0], self.w_out.shape[1]
        return (f"MLP {obs_dim}->{self.hidden}->({self.hidden}->{self.hidden})x{self.depth}"
                f"->{num_actions} float32")


# -- one BLAS thread -------------------------------------------------------------------------

def _openblas_functions() -> tuple[Any, Any, str] | None:
    """(get, set, name) of the num-threads functions of the OpenBLAS numpy loaded, or None.

    numpy's wheels ship OpenBLAS as ``libscipy_openblas64_``, whose symbols carry a prefix
    and a suffix; a system OpenBLAS has the plain names. Found in /proc/self/maps (Linux).
    """
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            paths = dict.fromkeys(line.split()[-1] for line in f
                                  if "openblas" in line.rsplit("/", 1)[-1].lower())
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("openblas", "scipy_openblas"):
            for suffix in ("", "64_"):
                getter = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                setter = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if getter is not None and setter is not None:
                    getter.restype = ctypes.c_int
                    setter.argtypes = [ctypes.c_int]
                    return getter, setter, f"{prefix}_set_num_threads{suffix}"
    return None


def blas_threads() -> int | None:
    """How many threads the OpenBLAS numpy loaded may use now, or None when not OpenBLAS."""
    functions = _openblas_functions()
    return None if functions is None else int(functions[0]())


@contextlib.contextmanager
def single_blas_thread() -> Iterator[str]:
    """Limits numpy's BLAS in this process to one thread while the block runs; yields how.

    Environment variables such as ``OPENBLAS_NUM_THREADS`` are read when numpy loads, which
    has happened long before the benchmark runs, so the limit is set in the library itself:
    with threadpoolctl when it is installed (any BLAS it knows), else by calling OpenBLAS's
    own ``set_num_threads`` through ctypes. The previous setting is restored afterwards.
    """
    try:
        # an optional package, imported by name: it ships no type information
        threadpoolctl = importlib.import_module("threadpoolctl")
    except ImportError:
        pass
    else:
        with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
            yield "threadpoolctl.threadpool_limits(1, 'blas')"
        return
    functions = _openblas_functions()
    if functions is None:
        yield "not limited (no threadpoolctl, and numpy's BLAS is not OpenBLAS)"
        return
    getter, setter, name = functions
    before = int(getter())
    setter(1)
    try:
        yield f"OpenBLAS {name}(1) via ctypes"
    finally:
        setter(before)


# -- calibration -----------------------------------------------------------------------------

def env_step_seconds(env_fn: Callable[[], gym.Env], steps: int = 40, trials: int = 7) -> float:
    """Seconds one step of ``env_fn``'s env costs in this process (median over trials)."""
    env = env_fn()
    try:
        env.action_space.seed(0)
        actions = [env.action_space.sample() for _ in range(steps)]
        env.reset(seed=0)
        per_step = []
        for _ in range(trials + 1):  # the first trial warms up
            start = time.perf_counter()
            for action in actions:
                _, _, terminated, truncated, _ = env.step(action)
                if terminated or truncated:
                    env.reset()
            per_step.append((time.perf_counter() - start) / steps)
        return statistics.median(per_step[1:])
    finally:
        env.close()


def _policy_cost(policy: MLPPolicy, obs: np.ndarray, trials: int = 9) -> tuple[float, float]:
    """(median seconds per forward pass, process CPU time over wall time) of ``policy``."""
    policy(obs)  # warm up
    times = []
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(trials):
        start = time.perf_counter()
        policy(obs)
        times.append(time.perf_counter() - start)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return statistics.median(times), cpu / wall if wall > 0 else 1.0


def _depth_for(target: float, base: float, per_layer: float) -> int:
    """Hidden layers so that ``base + depth * per_layer`` is closest to ``target``."""
    if per_layer <= 0:
        return 0
    return max(0, round((target - base) / per_layer))


@dataclass
class PolicySetup:
    """The calibrated policy of one (env, num_envs) case and what it was matched against."""

    policy: MLPPolicy
    num_envs: int
    env_step_seconds: float  # one env step, in the parent, on one core
    policy_seconds: float  # one forward pass over a batch of num_envs rows
    cpu_per_wall: float  # the parent's CPU time over wall time during the forward passes
    blas: str  # how BLAS was held to one thread
    #: one forward pass over num_envs // 2 rows (a double-buffered loop's batch); None: not
    #: measured
    half_policy_seconds: float | None = None

    @property
    def env_batch_seconds(self) -> float:
        """What one core needs to step the whole batch."""
        return self.num_envs * self.env_step_seconds

    def bound(self, cores: int) -> float:
        """The env-steps/s no vectoriser can beat on ``cores`` cores with this policy."""
        return self.num_envs * cores / (self.policy_seconds + self.env_batch_seconds)

    def double_buffered_bound(self, cores: int) -> float | None:
        """The bound of a double-buffered loop: it runs the policy twice per ``num_envs``
        env steps, on half the rows each time, and a forward pass over half the rows costs
        more than half of one over all of them (BLAS's per-call work), so this is lower
        than :meth:`bound`.

        The policy is one thread: the loop needs at least ``2 * half_policy_seconds`` of
        wall time per ``num_envs`` env steps however many cores the envs get, so when that
        exceeds the whole work spread over the cores, it is the bound."""
        if self.half_policy_seconds is None:
            return None
        policy = 2 * self.half_policy_seconds
        return self.num_envs / max(policy, (policy + self.env_batch_seconds) / cores)

    def to_json(self) -> dict[str, Any]:
        return {"policy": self.policy.describe(), "depth": self.policy.depth,
                "half_policy_seconds": self.half_policy_seconds,
                "num_envs": self.num_envs, "env_step_seconds": self.env_step_seconds,
                "env_batch_seconds": self.env_batch_seconds,
                "policy_seconds": self.policy_seconds, "cpu_per_wall": self.cpu_per_wall,
                "blas": self.blas}


def calibrate_policy(env_fn: Callable[[], gym.Env], num_envs: int, blas: str,
                     seed: int = 0) -> PolicySetup:
    """Picks the MLP depth whose forward pass over ``num_envs`` rows costs one core's batch.

    Call it inside :func:`single_blas_thread` (``blas`` says how that limited BLAS). Measures
    one env step in-process, then the policy at two depths, solves for the depth, and
    corrects once if the chosen depth misses by more than :data:`POLICY_TOLERANCE`.
    """
    probe_env = env_fn()
    obs_space, action_space = probe_env.observation_space, probe_env.action_space
    probe_env.close()
    if not isinstance(action_space, gym.spaces.Discrete):
        raise TypeError(f"the policy workload needs Discrete actions, got {action_space}")
    obs_dim = int(np.prod(obs_space.shape or (1,)))
    num_actions = int(action_space.n)
    target = num_envs * env_step_seconds(env_fn)
    obs = np.random.default_rng(seed).standard_normal((num_envs, obs_dim)).astype(np.float32)

    def build(depth: int) -> MLPPolicy:
        return MLPPolicy(obs_dim, num_actions, depth, seed=seed)

    probe_depth = 8
    base, _ = _policy_cost(build(0), obs)
    deep, _ = _policy_cost(build(probe_depth), obs)
    per_layer = (deep - base) / probe_depth
    policy = build(_depth_for(target, base, per_layer))
    seconds, cpu_per_wall = _policy_cost(policy, obs)
    if abs(seconds / target - 1) > POLICY_TOLERANCE / 2 and policy.depth > 0:
        # the probe's per-layer cost was off (cache, noise): rescale from the real depth
        per_layer = (seconds - base) / policy.depth
        policy = build(_depth_for(target, base, per_layer))
        seconds, cpu_per_wall = _policy_cost(policy, obs)
    half = _policy_cost(policy, obs[:num_envs // 2])[0] if num_envs >= 2 else None
    return PolicySetup(policy, num_envs, target / num_envs, seconds, cpu_per_wall, blas, half)


# -- loop modes ------------------------------------------------------------------------------

class PartialBatchVectorEnv(Protocol):
    """fastvec's partial-batch API (``batch_size < num_envs``): what a double buffer needs."""

    num_envs: int

    def async_reset(self, seed: int | None = None) -> None: ...

    def send(self, actions: Any, env_ids: np.ndarray) -> None: ...

    def recv(self) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]: ...


Policy = Callable[[Any], Any]
LoopMode = Callable[[Any, Policy, float, float], tuple[int, float]]


def _timed(tick: Callable[[], int], seconds: float, warmup: float,
           clock: Callable[[], float] = time.perf_counter) -> tuple[int, float]:
    """Calls ``tick`` (which returns env-steps done) for ``warmup`` then ``seconds`` of
    ``clock``."""
    deadline = clock() + warmup
    while clock() < deadline:
        tick()
    steps = 0
    start = clock()
    deadline = start + seconds
    while True:
        steps += tick()
        now = clock()
        if now >= deadline:
            return steps, now - start


def sync_loop(envs: gym.vector.VectorEnv, policy: Policy, seconds: float,
              warmup: float) -> tuple[int, float]:
    """``obs = reset(); repeat: obs = step(policy(obs))``: policy and envs take turns."""
    obs, _ = envs.reset(seed=0)

    def tick() -> int:
        nonlocal obs
        obs = envs.step(policy(obs))[0]
        return envs.num_envs

    return _timed(tick, seconds, warmup)


def double_buffered_loop(envs: PartialBatchVectorEnv, policy: Policy, seconds: float,
                         warmup: float) -> tuple[int, float]:
    """The policy computes one half's actions while the workers step the other half.

    ``envs`` has ``batch_size = num_envs // 2``: ``recv`` returns the first half to finish
    (their ids in ``infos["env_id"]``), ``send`` hands their actions back. When timing ends
    one half is still in flight; it is received, so the envs are left with none pending.
    """
    envs.async_reset()
    obs, _, _, _, infos = envs.recv()
    env_ids = infos["env_id"]

    def tick() -> int:
        nonlocal obs, env_ids
        envs.send(policy(obs), env_ids)
        obs, _, _, _, infos = envs.recv()
        env_ids = infos["env_id"]
        return len(env_ids)

    result = _timed(tick, seconds, warmup)
    envs.recv()
    return result


def partial_loop(envs: PartialBatchVectorEnv, actions: Sequence[Any], seconds: float,
                 warmup: float,
                 clock: Callable[[], float] = time.perf_counter) -> tuple[int, float]:
    """Partial batches with pre-sampled actions and no policy: each batch's actions go back
    the moment it comes, so no env waits for the slowest of the whole batch.

    ``actions`` are whole batches (a power-of-two count of them); each send takes the first
    rows. As in :func:`double_buffered_loop` the envs still in flight are received at the
    end (with any ``batch_size``, not only ``num_envs // 2``).
    """
    envs.async_reset(seed=0)
    env_ids = envs.recv()[4]["env_id"]
    outstanding = envs.num_envs - len(env_ids)
    mask = len(actions) - 1
    sent = 0

    def tick() -> int:
        nonlocal env_ids, sent, outstanding
        envs.send(actions[sent & mask][:len(env_ids)], env_ids)
        sent += 1
        outstanding += len(env_ids)
        env_ids = envs.recv()[4]["env_id"]
        outstanding -= len(env_ids)
        return len(env_ids)

    result = _timed(tick, seconds, warmup, clock)
    while outstanding > 0:
        outstanding -= len(envs.recv()[4]["env_id"])
    return result


#: Loop modes by name: (vector env, policy, seconds, warmup) -> (env-steps, elapsed seconds).
LOOP_MODES: dict[str, LoopMode] = {
    "sync": sync_loop,
    "double-buffered": double_buffered_loop,
}


def partial_batches_available() -> bool:
    """Whether this fastvec has the partial-batch API (``recv``) the double buffer needs."""
    import fastvec

    return hasattr(fastvec.AsyncVectorEnv, "recv")
