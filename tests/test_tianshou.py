"""fastvec under Tianshou 2.0: ``fastvec.integrations.tianshou.TianshouVectorEnv`` against
Tianshou's own ``DummyVectorEnv`` on the same seeded envs, through Tianshou's ``Collector``
and ``AsyncCollector`` (transition by transition, env by env), and the rest of the
``BaseVectorEnv`` API."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tianshou", reason="Tianshou is not installed: pip install '.[tianshou]'")

from gymnasium.vector import AutoresetMode
from tianshou.algorithm.algorithm_base import Policy
from tianshou.data import AsyncCollector, Batch, Collector, VectorReplayBuffer
from tianshou.env import BaseVectorEnv, DummyVectorEnv

import fastvec
from fastvec.integrations.tianshou import TianshouVectorEnv
from trainer_envs import random_time_fns

NUM_ENVS = 8
STEPS = 2_000
SEED = 100


class SignPolicy(Policy):
    """A tiny deterministic policy: push towards the side the first coordinate is on.

    It returns a ``policy`` entry and a hidden state: Tianshou 2.0.1's AsyncCollector raises
    on an empty policy entry (``IndexError``) and on a ``None`` state (``TypeError``), with
    its own SubprocVectorEnv too; so it cannot run ``random=True`` either.
    """

    def forward(self, batch: Any, state: Any = None, **kwargs: Any) -> Any:
        obs = np.asarray(batch.obs)
        return Batch(act=(obs[:, 0] > 0).astype(np.int64), state=np.zeros((len(obs), 1)),
                     policy=Batch(x0=obs[:, 0].copy()))


def make_policy(venv: Any) -> SignPolicy:
    return SignPolicy(action_space=venv.action_space[0])


def per_env(collector: Any) -> list[dict[str, Any]]:
    """Each env's transitions, in its order, out of the collector's VectorReplayBuffer."""
    out = []
    for buf in collector.buffer.buffers:
        batch = buf[np.arange(len(buf))]
        info = batch.info
        out.append({
            "obs": batch.obs, "act": batch.act, "rew": batch.rew,
            "terminated": batch.terminated, "truncated": batch.truncated,
            "obs_next": batch.obs_next,
            "env_id": np.asarray(info.env_id),
            "t": np.asarray(info.get("t", np.zeros(len(buf)))),
        })
    return out


def collect(venv: Any, *, asynchronous: bool, random: bool, n_step: int) -> list[dict]:
    venv.seed(SEED)
    buffer = VectorReplayBuffer(NUM_ENVS * 4_000, NUM_ENVS)
    kind = AsyncCollector if asynchronous else Collector
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "async setting may collect extra..."
        collector = kind(make_policy(venv), venv, buffer)
    stats = collector.collect(n_step=n_step, random=random, reset_before_collect=True)
    assert stats.n_collected_steps >= n_step
    assert stats.n_collected_episodes > 0
    return per_env(collector)


def reference(n_step: int, random: bool) -> list[dict]:
    venv = DummyVectorEnv(random_time_fns(NUM_ENVS, jitter=0.0))
    try:
        return collect(venv, asynchronous=False, random=random, n_step=n_step)
    finally:
        venv.close()


def check_prefix(got: list[dict], expected: list[dict], *, exact: bool) -> None:
    for i, (mine, theirs) in enumerate(zip(got, expected, strict=True)):
        n = len(mine["rew"])
        assert n > 0, f"env {i} collected nothing"
        if exact:
            assert n == len(theirs["rew"]), f"env {i}: {n} != {len(theirs['rew'])}"
        assert len(theirs["rew"]) >= n, f"env {i}: the reference is too short"
        for key, value in mine.items():
            np.testing.assert_array_equal(value, theirs[key][:n], err_msg=f"env {i}, {key}")
        assert (mine["env_id"] == i).all()


@pytest.mark.parametrize("random", [False, True], ids=["policy", "random"])
def test_collector_matches_dummy_vector_env(random):
    expected = reference(STEPS, random)
    venv = TianshouVectorEnv(random_time_fns(NUM_ENVS, jitter=0.001), num_workers=2)
    try:
        assert isinstance(venv, BaseVectorEnv) and len(venv) == NUM_ENVS
        assert not venv.is_async
        got = collect(venv, asynchronous=False, random=random, n_step=STEPS)
    finally:
        venv.close()
    check_prefix(got, expected, exact=True)


@pytest.mark.parametrize(("wait_num", "timeout"), [(3, None), (None, 0.001), (2, 0.002)])
def test_async_collector_matches_dummy_vector_env_env_by_env(wait_num, timeout):
    random = False  # see SignPolicy
    venv = TianshouVectorEnv(random_time_fns(NUM_ENVS, jitter=0.004), wait_num=wait_num,
                             timeout=timeout, num_workers=2)
    sizes: list[int] = []
    original_step = venv.step

    def step(action: Any, id: Any = None) -> Any:
        result = original_step(action, id)
        sizes.append(len(result[1]))
        return result

    venv.step = step  # type: ignore[method-assign]
    try:
        assert venv.is_async
        got = collect(venv, asynchronous=True, random=random, n_step=STEPS)
    finally:
        venv.close()
    # partial batches were really exercised: most steps returned some of the envs only
    assert np.mean(np.array(sizes) < NUM_ENVS) > 0.5, sizes[:20]
    longest = max(len(g["rew"]) for g in got)
    expected = reference(NUM_ENVS * (longest + 1), random)
    check_prefix(got, expected, exact=False)


def test_reset_and_step_subsets_match_dummy_vector_env():
    ours = TianshouVectorEnv(random_time_fns(4, jitter=0.0), num_workers=2)
    theirs = DummyVectorEnv(random_time_fns(4, jitter=0.0))
    try:
        for venv in (ours, theirs):
            venv.seed(3)
        results = []
        for venv in (ours, theirs):
            obs, infos = venv.reset()
            out: list[Any] = [obs, [dict(i) for i in infos]]
            obs, infos = venv.reset(env_id=[2, 0], seed=9)
            out += [obs, [dict(i) for i in infos]]
            for ids in ([3, 1], [0, 1, 2, 3], 2, np.array([1, 3])):
                count = 1 if np.isscalar(ids) else len(ids)
                step = venv.step(np.ones(count, np.int64), ids)
                out += [*step[:4], [dict(i) for i in step[4]]]
            obs, infos = venv.reset(1)
            out += [obs, [dict(i) for i in infos]]
            results.append(out)
        for k, (a, b) in enumerate(zip(*results, strict=True)):
            if isinstance(a, np.ndarray):
                assert a.dtype == b.dtype and a.shape == b.shape, k
                np.testing.assert_array_equal(a, b, err_msg=str(k))
            else:
                assert a == b, k
        assert ours.get_env_attr("index") == [0, 1, 2, 3]
        assert ours.get_env_attr("index", [3, 1]) == [3, 1]
        ours.set_env_attr("jitter", 0.5, [1])
        assert ours.get_env_attr("jitter") == [0.0, 0.5, 0.0, 0.0]
        ours.set_env_attr("jitter", 0.0)
        assert ours.get_env_attr("jitter") == [0.0] * 4
        # a new attribute set on some envs reaches only those (the others never had it)
        ours.set_env_attr("only_on_two", 7, [2])
        assert ours.get_env_attr("only_on_two", [2]) == [7]
        with pytest.warns(UserWarning), \
                pytest.raises(AttributeError):
            ours.get_env_attr("only_on_two", [0])
        assert ours.action_space == theirs.action_space
        assert ours.observation_space == theirs.observation_space
        assert ours.metadata == theirs.metadata
        frames = ours.render()
        assert len(frames) == 4 and frames[0].shape == (2, 2, 3)
    finally:
        ours.close()
        theirs.close()
    with pytest.raises(AssertionError, match="after close"):
        ours.reset()


def test_async_state_is_tianshous():
    venv = TianshouVectorEnv(random_time_fns(4, jitter=0.05), wait_num=1, num_workers=2)
    try:
        venv.reset()
        obs, _rew, _term, _trunc, infos = venv.step(np.zeros(4, np.int64))
        returned = [info["env_id"] for info in infos]
        assert 1 <= len(returned) < 4 and obs.shape == (len(returned), 4)
        assert sorted(venv.ready_id) == sorted(returned)
        assert sorted(venv.waiting_id + venv.ready_id) == [0, 1, 2, 3]
        busy = venv.waiting_id[0]
        with pytest.raises(AssertionError, match="stepping now"):
            venv.step(np.zeros(1, np.int64), [busy])
        with pytest.raises(AssertionError, match="stepping now"):
            venv.reset(busy)
        with pytest.raises(RuntimeError, match="still stepping"):
            venv.render()
        # a finished env is reset while the others are still in flight
        obs, infos = venv.reset(returned[0])
        assert obs.shape == (1, 4) and "horizon" in infos[0]
        # attributes of ready envs: the others are waited for, their results kept
        assert venv.get_env_attr("index", returned[0]) == [returned[0]]
        seen = set(returned)
        while venv.waiting_id:
            _, _, _, _, infos = venv.step(None)
            seen.update(info["env_id"] for info in infos)
        assert seen == {0, 1, 2, 3}
        with pytest.raises(RuntimeError, match="no env is stepping"):
            venv.step(None)
    finally:
        venv.close()


def test_wraps_a_fastvec_env_in_disabled_mode():
    envs = fastvec.AsyncVectorEnv(random_time_fns(3, jitter=0.0), num_workers=1,
                                  autoreset_mode=AutoresetMode.DISABLED, batch_size=2)
    venv = TianshouVectorEnv(envs, wait_num=2)
    assert venv.fastvec_env is envs
    obs, _ = venv.reset()
    assert obs.shape == (3, 4)
    _, rew, _, _, _infos = venv.step(np.zeros(3, np.int64))
    assert len(rew) >= 2
    venv.close()
    assert envs.closed
    with fastvec.AsyncVectorEnv(random_time_fns(2, jitter=0.0), num_workers=1) as next_step:
        with pytest.raises(ValueError, match="DISABLED"):
            TianshouVectorEnv(next_step)
    with pytest.raises(ValueError, match="wait_num should be in"):
        TianshouVectorEnv(random_time_fns(2, jitter=0.0), wait_num=3, num_workers=1)
