"""``parent_group=True``: the calling process steps the last group of envs itself.

Differential against Gymnasium's ``SyncVectorEnv`` (synchronous calls) and against each env
stepped alone (partial batches), across spaces, autoreset modes, ``copy``, start methods and
worker counts from 0 (every env in the parent) up; plus what is particular to the parent's
group: its envs live in this process, its errors are reported as a worker's are, it is
closed with the vector env (also when the vector env is only garbage-collected), and a
worker's restart leaves it alone.
"""

from __future__ import annotations

import functools
import gc
import os
import signal

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.vector import AutoresetMode

import envs as test_envs
import fastvec
from fastvec._processes import usable_cores
from test_partial import STEPS as PARTIAL_STEPS
from test_partial import check_same, reference, run_partial
from test_vector_env import (
    MODES,
    N,
    _raise_from_step,
    child_pids,
    failing_fns,
    run_differential,
    worker_error,
)


# -- differential ----------------------------------------------------------------------------
@pytest.mark.parametrize("num_workers", [0, 1, N - 1])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize(("space_name", "shared_memory", "copy"), [
    ("box_f32", True, True), ("nested", True, False), ("graph", False, True)])
def test_parent_group_matches_sync_vector_env(space_name, shared_memory, copy, mode,
                                              num_workers):
    run_differential(space_name, mode, shared_memory, copy, "fork", num_workers,
                     parent_group=True)


@pytest.mark.parametrize("context", ["forkserver", "spawn"])
def test_parent_group_under_other_start_methods(context):
    run_differential("nested", AutoresetMode.SAME_STEP, True, True, context, 1,
                     steps=60, parent_group=True)


@pytest.mark.parametrize("mode", list(AutoresetMode))
@pytest.mark.parametrize(("num_envs", "batch_size", "num_workers"),
                         [(6, 3, 1), (5, 2, 2), (4, 2, 0)])
def test_parent_group_in_partial_batches_matches_envs_stepped_alone(
        mode, num_envs, batch_size, num_workers):
    fns = test_envs.jitter_fns(num_envs)
    with fastvec.AsyncVectorEnv(fns, autoreset_mode=mode, batch_size=batch_size,
                                num_workers=num_workers, parent_group=True,
                                context="fork") as envs:
        got = run_partial(envs, seed=3, steps=PARTIAL_STEPS)
    check_same(got, reference(fns, mode, seed=3, steps=PARTIAL_STEPS))


# -- where the envs run ------------------------------------------------------------------------
def _pid(env: gym.Env) -> int:
    return os.getpid()


def test_the_last_group_runs_in_the_calling_process():
    with fastvec.AsyncVectorEnv([lambda: gym.make("CartPole-v1")] * 5, num_workers=2,
                                parent_group=True) as envs:
        assert envs.num_workers == 2 and len(child_pids()) >= 2
        pids = envs.call(_pid)
        groups = envs._pool.groups
        assert len(groups) == 3
        parent = [pids[i] for i in groups[-1]]
        assert parent == [os.getpid()] * len(groups[-1])
        assert os.getpid() not in [pids[i] for g in groups[:-1] for i in g]
        # env_ids across the groups, in the order asked
        assert envs.call(_pid, env_ids=[4, 0]) == (pids[4], pids[0])
        envs.set_attr("marker", [10, 20], env_ids=[0, 4])
        assert envs.get_attr("marker", env_ids=[4, 0]) == (20, 10)


def test_num_workers_zero_starts_no_process():
    before = child_pids()
    with fastvec.AsyncVectorEnv([lambda: gym.make("CartPole-v1")] * 3, num_workers=0,
                                parent_group=True) as envs:
        assert child_pids() == before
        envs.reset(seed=0)
        obs, rewards, *_ = envs.step(np.ones(3, np.int64))
        assert obs.shape == (3, 4) and rewards.tolist() == [1.0] * 3


def test_default_num_workers_leaves_a_core_to_the_parent():
    cores = usable_cores()
    with fastvec.AsyncVectorEnv([lambda: gym.make("CartPole-v1")] * 8,
                                parent_group=True) as envs:
        assert envs.num_workers == min(cores, 8) - 1


@pytest.mark.parametrize(("num_workers", "match"), [
    (3, r"\[0, 2\] with parent_group=True"), (-1, r"\[0, 2\]"), (True, r"\[0, 2\]")])
def test_num_workers_is_checked_with_a_parent_group(num_workers, match):
    with pytest.raises(ValueError, match=match):
        fastvec.AsyncVectorEnv([lambda: gym.make("CartPole-v1")] * 3,
                               num_workers=num_workers, parent_group=True)


# -- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fail", "lock", "local"])
def test_an_error_in_the_parents_group_is_reported_as_a_workers(kind):
    """The same exception, message and remote traceback as from a worker; the envs of every
    group go on."""
    fns = failing_fns(4, failing=(3,), fail_at=2, kind=kind)
    errors = []
    for parent_group in (False, True):
        with fastvec.AsyncVectorEnv(fns, num_workers=2 if not parent_group else 1,
                                    parent_group=parent_group) as envs:
            envs.reset(seed=0)
            envs.step(np.zeros(4, np.int64))
            expected = test_envs.LockError if kind == "lock" else Exception
            error, _ = _raise_from_step(envs, np.zeros(4, np.int64), expected, [3])
            errors.append((type(error).__name__, str(error), error.__cause__.text))
            obs, _ = envs.reset(seed=1)
            assert obs[:, 1].tolist() == [0, 0, 0, 0]
            obs, *_ = envs.step(np.ones(4, np.int64))
            assert obs[:, 1].tolist() == [1, 1, 1, 1]
    assert errors[0][:2] == errors[1][:2]
    assert "in step" in errors[1][2] and errors[1][1] in errors[1][2]


def test_an_env_function_that_raises_in_the_parents_group():
    before = child_pids()
    fns = [functools.partial(test_envs.SpaceEnv, spaces.Box(-1, 1, (2,), np.float32))] * 2
    fns.append(test_envs.broken_env)
    with worker_error(test_envs.FailError, [2], match="cannot build this env") as excinfo:
        fastvec.AsyncVectorEnv(fns, num_workers=1, parent_group=True)
    assert child_pids() <= before
    del excinfo


# -- lifetime ----------------------------------------------------------------------------------
class ClosingEnv(test_envs.SpaceEnv):
    """Counts its closes in this process (``closes``)."""

    closes: list[int] = []

    def __init__(self, index: int = 0) -> None:
        super().__init__(spaces.Box(-1, 1, (2,), np.float32), index=index)

    def close(self) -> None:
        ClosingEnv.closes.append(self.index)
        super().close()


def test_close_and_garbage_collection_close_the_parents_envs():
    fns = [functools.partial(ClosingEnv, index=i) for i in range(4)]
    envs = fastvec.AsyncVectorEnv(fns, num_workers=1, parent_group=True)
    ClosingEnv.closes.clear()  # the spaces were read from an env made and closed here
    envs.reset(seed=0)
    envs.close()
    # only the parent's envs close in this process (the worker's close in the worker)
    assert sorted(ClosingEnv.closes) == [2, 3]
    envs = fastvec.AsyncVectorEnv(fns, num_workers=1, parent_group=True)
    ClosingEnv.closes.clear()
    envs.reset(seed=0)
    del envs
    gc.collect()
    assert sorted(ClosingEnv.closes) == [2, 3]


def test_close_with_envs_in_flight_in_the_parents_group():
    fns = test_envs.jitter_fns(4)
    envs = fastvec.AsyncVectorEnv(fns, batch_size=2, num_workers=1, parent_group=True)
    envs.async_reset(seed=0)
    _, _, _, _, infos = envs.recv()
    envs.send(np.zeros(2, np.int64), infos["env_id"])
    with pytest.warns(UserWarning, match="have not been received: their results are dropped"):
        envs.close()
    assert envs.closed


def test_a_restarted_worker_leaves_the_parents_group_alone():
    fns = [functools.partial(test_envs.FailingEnv, index=i) for i in range(4)]
    with fastvec.AsyncVectorEnv(fns, num_workers=1, parent_group=True,
                                restart_workers=True) as envs:
        envs.reset(seed=0)
        envs.step(np.zeros(4, np.int64))
        os.kill(envs._pool.resources.processes[0].pid, signal.SIGKILL)
        with pytest.warns(UserWarning, match="restarted it as pid"):
            obs, _, _, truncations, infos = envs.step(np.ones(4, np.int64))
        # the worker's envs (0, 1) are fresh and truncated; the parent's stepped on
        assert truncations.tolist() == [True, True, False, False]
        assert obs[:, 1].tolist() == [0, 0, 2, 2]
        assert infos["_worker_restarted"].tolist() == [True, True, False, False]
        obs, *_ = envs.step(np.ones(4, np.int64))
        assert obs[:, 1].tolist() == [0, 0, 3, 3]  # NextStep: their autoreset step


def test_step_async_returns_before_the_parents_group_steps():
    """The parent steps its group in step_wait, so work between step_async and step_wait
    overlaps the workers' (and the step is pending until step_wait)."""
    fns = [functools.partial(test_envs.FailingEnv, index=i) for i in range(2)]
    with fastvec.AsyncVectorEnv(fns, num_workers=1, parent_group=True) as envs:
        envs.reset(seed=0)
        envs.step_async(np.zeros(2, np.int64))
        assert envs._pool.local is not None and envs._pool.local.worker is not None
        assert envs._pool.local.worker.envs[0].t == 0  # not stepped yet
        obs, *_ = envs.step_wait()
        assert obs[:, 1].tolist() == [1, 1]



def test_a_timeout_passed_while_the_parent_stepped_its_group_keeps_the_call_pending():
    """The parent's own envs cannot be interrupted, but a step that outlasts the timeout
    still raises TimeoutError and stays pending, its results kept for the next wait."""
    import multiprocessing

    import robust_envs

    fns = [functools.partial(robust_envs.SlowEnv, index=i) for i in range(2)]
    with fastvec.AsyncVectorEnv(fns, num_workers=1, parent_group=True) as envs:
        envs.reset(seed=0)
        envs.set_attr("step_delay", [0.0, 0.3])  # env 1 is the parent's
        envs.step_async(np.array([1, 2]))
        with pytest.raises(multiprocessing.TimeoutError, match="step_wait"):
            envs.step_wait(timeout=0.05)
        obs, rewards, *_ = envs.step_wait(timeout=5)
        assert obs.tolist() == [[0, 1], [1, 1]] and rewards.tolist() == [11.0, 22.0]
