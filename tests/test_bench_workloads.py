"""The jitter and policy workloads of ``python -m fastvec.bench``: envs, calibration, loops."""

import sys
import types

import gymnasium as gym
import numpy as np
import pytest

import fastvec
from fastvec.bench import runner
from fastvec.bench.policy import (
    LOOP_MODES,
    MLPPolicy,
    PolicySetup,
    _depth_for,
    blas_threads,
    calibrate_policy,
    double_buffered_loop,
    partial_loop,
    single_blas_thread,
    sync_loop,
)
from fastvec.bench.runner import DOUBLE_BUFFERED, BenchConfig, Contender, contenders, run
from fastvec.bench.workloads import (
    DEFAULT_WORKLOADS,
    JITTER_STEP_SECONDS,
    WORKLOADS,
    CartPoleComputeEnv,
    JitterEnv,
    calibrate_round_seconds,
    jitter_rounds,
)

# -- jitter ----------------------------------------------------------------------------------


def _rollout(env: JitterEnv, seed: int, steps: int) -> tuple[list[float], list[np.ndarray]]:
    env.reset(seed=seed)
    rounds, obs = [], []
    for _ in range(steps):
        obs.append(env.step(0)[0].copy())
        rounds.append(env.rounds)
    return rounds, obs


def test_jitter_steps_are_reproducible_from_the_env_seed():
    a, b = JitterEnv(1.0, 5.0), JitterEnv(1.0, 5.0)
    rounds_a, obs_a = _rollout(a, seed=3, steps=20)
    rounds_b, obs_b = _rollout(b, seed=3, steps=20)
    assert rounds_a == rounds_b
    np.testing.assert_array_equal(np.stack(obs_a), np.stack(obs_b))
    assert _rollout(a, seed=4, steps=20)[0] != rounds_a
    # a second reset with the same seed replays the same costs
    assert _rollout(a, seed=3, steps=20)[0] == rounds_a


def test_jitter_draws_uniformly_over_its_range():
    env = JitterEnv(2.0, 10.0)
    rounds, _ = _rollout(env, seed=0, steps=400)
    assert min(rounds) >= 2.0 and max(rounds) <= 10.0
    assert min(rounds) < 2.5 and max(rounds) > 9.5  # both ends are reached
    assert np.mean(rounds) == pytest.approx(6.0, abs=0.5)
    # not a handful of values: the fraction of a round is drawn too
    assert len({round(r, 2) for r in rounds}) > 300


def test_jitter_range_is_calibrated_like_compute():
    low, high = jitter_rounds()
    per_round = calibrate_round_seconds()
    assert low * per_round == pytest.approx(JITTER_STEP_SECONDS[0])
    assert high * per_round == pytest.approx(JITTER_STEP_SECONDS[1])
    assert JitterEnv().rounds_range == (low, high)
    env_fn = WORKLOADS["jitter"].factory()
    assert env_fn().rounds_range == (low, high)  # what every process is handed


def test_new_workloads_are_registered_but_not_in_the_default_run():
    jitter, policy = WORKLOADS["jitter"], WORKLOADS["policy"]
    assert jitter.ceiling and jitter.default_num_envs == 8 and not jitter.policy
    assert policy.policy and policy.default_num_envs == 16 and not policy.ceiling
    assert "jitter" not in DEFAULT_WORKLOADS and "policy" not in DEFAULT_WORKLOADS
    assert set(DEFAULT_WORKLOADS) == set(WORKLOADS) - {"jitter", "policy"}


# -- policy ----------------------------------------------------------------------------------


def test_mlp_policy_is_deterministic_and_returns_a_batch_of_actions():
    obs = np.random.default_rng(1).standard_normal((6, 4)).astype(np.float32)
    a = MLPPolicy(4, 3, depth=5, hidden=32, seed=7)
    b = MLPPolicy(4, 3, depth=5, hidden=32, seed=7)
    actions = a(obs)
    assert actions.shape == (6,) and actions.dtype.kind == "i"
    assert set(actions.tolist()) <= {0, 1, 2}
    np.testing.assert_array_equal(actions, b(obs))
    assert MLPPolicy(4, 3, depth=0, hidden=32)(obs).shape == (6,)
    assert a.describe() == "MLP 4->32->(32->32)x5->3 float32"


def test_depth_solves_base_plus_layers_for_the_target():
    assert _depth_for(target=10.0, base=1.0, per_layer=0.5) == 18
    assert _depth_for(target=1.0, base=2.0, per_layer=0.5) == 0  # never negative
    assert _depth_for(target=1.0, base=0.0, per_layer=0.0) == 0


def test_bound_is_cores_times_the_overhead_free_one_core_loop():
    setup = PolicySetup(MLPPolicy(4, 2, 0), num_envs=16, env_step_seconds=1e-3,
                        policy_seconds=16e-3, cpu_per_wall=1.0, blas="test")
    assert setup.env_batch_seconds == pytest.approx(16e-3)
    one_core = 16 / (16e-3 + 16e-3)  # the sync loop on one core: policy, then every env
    assert setup.bound(1) == pytest.approx(one_core)
    assert setup.bound(2) == pytest.approx(2 * one_core)


def test_double_buffered_bound_is_held_by_the_single_threaded_policy():
    def setup(half: float | None) -> PolicySetup:
        return PolicySetup(MLPPolicy(4, 2, 0), num_envs=16, env_step_seconds=1e-3,
                           policy_seconds=16e-3, cpu_per_wall=1.0, blas="test",
                           half_policy_seconds=half)

    assert setup(None).double_buffered_bound(2) is None
    # half the rows at half the cost: the cores' share of the work bounds it, as bound()
    assert setup(8e-3).double_buffered_bound(2) == pytest.approx(setup(8e-3).bound(2))
    # at 0.65 of the cost the policy alone takes 20.8 ms per 16 steps, more than the
    # (20.8 + 16) / 2 ms the two cores would need for all the work
    assert setup(10.4e-3).double_buffered_bound(2) == pytest.approx(16 / 20.8e-3)
    assert setup(10.4e-3).double_buffered_bound(4) == pytest.approx(16 / 20.8e-3)
    assert setup(10.4e-3).double_buffered_bound(1) == pytest.approx(16 / 36.8e-3)


@pytest.mark.skipif(blas_threads() is None, reason="numpy's BLAS is not OpenBLAS")
def test_single_blas_thread_without_threadpoolctl_sets_openblas_itself(monkeypatch):
    monkeypatch.setitem(sys.modules, "threadpoolctl", None)  # import threadpoolctl raises
    before = blas_threads()
    with single_blas_thread() as how:
        assert blas_threads() == 1
        assert "OpenBLAS" in how and "ctypes" in how
    assert blas_threads() == before


def test_single_blas_thread_prefers_threadpoolctl(monkeypatch):
    calls = []

    class Limits:
        def __init__(self, **kwargs):
            calls.append(kwargs)

        def __enter__(self):
            calls.append("entered")

        def __exit__(self, *exc):
            calls.append("exited")

    fake = types.ModuleType("threadpoolctl")
    fake.threadpool_limits = Limits
    monkeypatch.setitem(sys.modules, "threadpoolctl", fake)
    with single_blas_thread() as how:
        assert calls == [{"limits": 1, "user_api": "blas"}, "entered"]
    assert calls[-1] == "exited"
    assert how.startswith("threadpoolctl")


def test_calibration_gives_a_costlier_env_a_deeper_policy():
    # 1 vs 40 rounds of work per step: a 10x and more gap in env cost, far above the noise
    cheap = calibrate_policy(lambda: CartPoleComputeEnv(iters=1), 4, blas="test")
    costly = calibrate_policy(lambda: CartPoleComputeEnv(iters=40), 4, blas="test")
    assert costly.env_step_seconds > cheap.env_step_seconds
    assert costly.policy.depth > cheap.policy.depth
    assert costly.blas == "test" and costly.num_envs == 4
    assert costly.policy.w_in.shape[0] == 4 and costly.policy.w_out.shape[1] == 2  # CartPole


class RecordingPolicy:
    """Greedy-free policy that records the observation batches it is handed."""

    def __init__(self, num_actions: int) -> None:
        self.batches: list[np.ndarray] = []
        self.num_actions = num_actions

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        self.batches.append(np.array(obs, copy=True))
        return np.arange(len(obs)) % self.num_actions


def test_sync_loop_feeds_each_steps_observations_to_the_next_policy_call():
    envs = gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1")] * 3)
    policy = RecordingPolicy(2)
    steps, elapsed = sync_loop(envs, policy, seconds=0.05, warmup=0.01)
    envs.close()
    assert elapsed >= 0.05
    assert steps > 0 and steps % 3 == 0
    assert all(b.shape == (3, 4) for b in policy.batches)
    assert len(policy.batches) >= steps // 3  # warm-up calls too
    # the first batch is reset(seed=0)'s observation
    reference = gym.vector.SyncVectorEnv([lambda: gym.make("CartPole-v1")] * 3)
    np.testing.assert_array_equal(policy.batches[0], reference.reset(seed=0)[0])
    reference.close()


class FakePartialVectorEnv(gym.vector.SyncVectorEnv):
    """SyncVectorEnv with fastvec's partial-batch API, strict about how it is used.

    ``recv`` returns the first ``batch_size`` envs to finish (oldest first; within one
    ``send`` the envs finish in a random order) with their ids in ``infos["env_id"]``;
    ``send`` accepts only envs that were received and not sent since. An env that ends its
    episode is reset at once.
    """

    num_workers = 0  # what the runner reports as fastvec's processes

    def __init__(self, env_fns, batch_size: int, seed: int = 0) -> None:
        super().__init__(env_fns)
        self.batch_size = batch_size
        self._rng = np.random.default_rng(seed)
        self.finished: list[tuple[int, np.ndarray, float, bool, bool]] = []
        self.held: set[int] = set()
        self.sent: list[list[int]] = []
        self.env_steps = np.zeros(self.num_envs, int)

    def async_reset(self, seed: int | None = None) -> None:
        if self.finished:
            raise RuntimeError("async_reset with envs still to be received")
        self.held.clear()
        for i in self._rng.permutation(self.num_envs):
            obs, _ = self.envs[i].reset(seed=int(i))
            self.finished.append((int(i), obs, 0.0, False, False))

    def send(self, actions, env_ids) -> None:
        ids = [int(i) for i in env_ids]
        if len(actions) != len(ids):
            raise ValueError(f"{len(actions)} actions for {len(ids)} env ids")
        if len(set(ids)) != len(ids) or not set(ids) <= self.held:
            raise ValueError(f"send to envs {ids} not all received (held: {sorted(self.held)})")
        self.held -= set(ids)
        self.sent.append(ids)
        for k in self._rng.permutation(len(ids)):
            i = ids[k]
            obs, reward, terminated, truncated, _ = self.envs[i].step(actions[k])
            if terminated or truncated:
                obs, _ = self.envs[i].reset()
            self.env_steps[i] += 1
            self.finished.append((i, obs, float(reward), terminated, truncated))

    def recv(self):
        if len(self.finished) < self.batch_size:
            raise RuntimeError("recv would wait forever: fewer than batch_size envs in flight")
        batch, self.finished = self.finished[:self.batch_size], self.finished[self.batch_size:]
        ids = [b[0] for b in batch]
        self.held.update(ids)
        return (np.stack([b[1] for b in batch]), np.array([b[2] for b in batch]),
                np.array([b[3] for b in batch]), np.array([b[4] for b in batch]),
                {"env_id": np.array(ids)})


def _fake(num_envs: int = 6, batch_size: int = 3) -> FakePartialVectorEnv:
    return FakePartialVectorEnv([lambda: gym.make("CartPole-v1")] * num_envs, batch_size)


def test_double_buffered_loop_alternates_halves_and_leaves_nothing_in_flight():
    envs, policy = _fake(6, 3), RecordingPolicy(2)
    steps, elapsed = double_buffered_loop(envs, policy, seconds=0.05, warmup=0.01)
    assert elapsed >= 0.05
    assert steps > 0 and steps % 3 == 0
    assert steps <= envs.env_steps.sum()  # the warm-up's steps are not counted
    assert all(b.shape == (3, 4) for b in policy.batches)
    assert all(len(ids) == 3 for ids in envs.sent)
    # the halves take turns, so every env was stepped as often as the others (within one)
    assert envs.env_steps.max() - envs.env_steps.min() <= 1
    assert envs.finished == []  # the half in flight at the end was received
    assert sorted(envs.held) == list(range(6))
    # and the envs are ready for the next repeat
    steps, _ = double_buffered_loop(envs, policy, seconds=0.02, warmup=0.0)
    assert steps > 0
    envs.close()


def test_partial_loop_sends_presampled_rows_back_and_leaves_nothing_in_flight():
    envs = _fake(6, 3)
    actions = [np.full(6, k % 2, np.int64) for k in range(4)]
    steps, elapsed = partial_loop(envs, actions, seconds=0.05, warmup=0.01)
    assert elapsed >= 0.05 and steps > 0 and steps % 3 == 0
    assert all(len(ids) == 3 for ids in envs.sent)
    assert envs.env_steps.max() - envs.env_steps.min() <= 1
    assert envs.finished == [] and sorted(envs.held) == list(range(6))
    envs.close()


def test_double_buffered_loop_sends_each_policy_output_to_the_envs_it_was_computed_for():
    envs, sent_actions = _fake(4, 2), []

    def policy(obs):
        actions = (obs[:, 2] > 0).astype(np.int64)  # push towards the pole's lean
        sent_actions.append(actions)
        return actions

    double_buffered_loop(envs, policy, seconds=0.02, warmup=0.0)
    assert len(envs.sent) == len(sent_actions)
    assert all(len(ids) == len(a) for ids, a in zip(envs.sent, sent_actions, strict=True))
    envs.close()


def test_the_double_buffered_row_appears_only_when_fastvec_has_recv(monkeypatch):
    policy = WORKLOADS["policy"]
    assert contenders(WORKLOADS["cartpole"], 8, ["fastvec"]) == [Contender("fastvec", "fastvec")]
    # a workload with a ceiling also times fastvec's partial batches
    assert contenders(WORKLOADS["compute"], 8, ["fastvec"]) == [
        Contender("fastvec", "fastvec"), Contender("fastvec-partial", "fastvec", "partial", 4)]
    rows = contenders(policy, 16, ["fastvec", "gym-sync"])
    has_recv = hasattr(fastvec.AsyncVectorEnv, "recv")
    assert (DOUBLE_BUFFERED in [r.label for r in rows]) == has_recv
    monkeypatch.setattr(fastvec.AsyncVectorEnv, "recv", lambda self: None, raising=False)
    rows = contenders(policy, 16, ["fastvec", "gym-sync"])
    assert rows == [Contender("fastvec", "fastvec", "sync"),
                    Contender("gym-sync", "gym-sync", "sync"),
                    Contender(DOUBLE_BUFFERED, "fastvec", "double-buffered", batch_size=8)]
    assert all(r.mode in LOOP_MODES for r in rows)
    assert [r.label for r in contenders(policy, 16, ["gym-sync"])] == ["gym-sync"]


def test_policy_run_times_the_double_buffered_row_through_the_partial_batch_api(monkeypatch):
    monkeypatch.setattr(fastvec.AsyncVectorEnv, "recv", lambda self: None, raising=False)
    made, real = [], runner.make_backend

    def make_backend(backend, env_fn, num_envs, num_workers, batch_size=None):
        env = (FakePartialVectorEnv([env_fn] * num_envs, batch_size) if batch_size
               else real(backend, env_fn, num_envs, num_workers))
        made.append((backend, batch_size, env))
        return env

    monkeypatch.setattr(runner, "make_backend", make_backend)
    config = BenchConfig(workloads=["policy"], num_envs=[4], backends=["fastvec"],
                         seconds=0.05, repeats=2, warmup=0.0)
    results, extra = run(config, progress=False)
    assert [r.backend for r in results] == ["fastvec", DOUBLE_BUFFERED, "bound"]
    assert all(r.error is None for r in results), [r.error for r in results]
    db = results[1]
    assert len(db.rates) == 2 and all(n > 0 and n % 2 == 0 for n in db.steps)
    fake = next(env for backend, batch_size, env in made if batch_size == 2)
    assert fake.sent and all(len(ids) == 2 for ids in fake.sent)
    assert extra["policy"]["4"]["bound"] == results[2].median
