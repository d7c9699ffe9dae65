"""SAME_STEP's episode ends through the segment (``fastvec._finals``).

An episode's final observation goes into the env's final row and its final info into its
info row, and the parent rebuilds ``{"final_info", "final_obs"}``, when that gives exactly
what the pipe would have carried; else it all goes by pipe. Differential tests against
Gymnasium's ``SyncVectorEnv`` (leaf by leaf, dtype by dtype) cover both ways (empty and
scalar final infos, a reset info, an observation of another dtype, infos switching between
row and pipe), worker counts, ``copy``, the parent's group, start methods and partial
batches, each checking which way the episode ends went; and a replaced worker leaves no
episode end marked behind.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from gymnasium.vector import AutoresetMode, SyncVectorEnv
from gymnasium.vector.utils import batch_space

import envs as test_envs
import fastvec
from fastvec import _segment as S
from test_partial import check_same, reference, run_partial
from test_vector_env import assert_same, assert_same_step
from test_worker_death import kill

SAME = AutoresetMode.SAME_STEP
N = 5
STEPS = 40

# (what the env's infos hold, whether its resets have an info, the dtype of its
# observations, whether its episode ends can go through the segment)
KINDS = {
    "empty": ({"infos": "none"}, True),
    "scalars": ({"infos": "scalars"}, True),
    "mixed": ({"infos": "mixed"}, True),
    "reset-info": ({"infos": "none", "reset_info": True}, False),
    "other-dtype": ({"infos": "none", "obs_dtype": np.float64}, False),
}


def count_rebuilt(envs: fastvec.AsyncVectorEnv) -> list[int]:
    """A counter of the episode ends the parent rebuilds from the segment (one list item)."""
    final_rows = envs._pool.final_rows
    counter = [0]
    rebuild = final_rows.info

    def counting(env: int) -> dict[str, Any]:
        counter[0] += 1
        return rebuild(env)

    final_rows.info = counting  # type: ignore[method-assign]
    return counter


def lockstep(fns: list, steps: int = STEPS, **options: Any) -> tuple[int, int]:
    """``fns`` through SyncVectorEnv and fastvec (SAME_STEP) with the same actions, compared
    step by step: (episode ends, of which rebuilt from the segment)."""
    reference_envs = SyncVectorEnv(fns, autoreset_mode=SAME)
    try:
        with fastvec.AsyncVectorEnv(fns, autoreset_mode=SAME, **options) as subject:
            rebuilt = count_rebuilt(subject)
            actions = batch_space(reference_envs.single_action_space, len(fns))
            actions.seed(3)
            assert_same(reference_envs.reset(seed=7), subject.reset(seed=7), "reset")
            ends = 0
            kept = []  # every step's infos: an episode end's must not change afterwards
            for t in range(steps):
                action = actions.sample()
                expected = reference_envs.step(action)
                actual = subject.step(action)
                assert_same_step(expected, actual, f"step {t}")
                kept.append((expected[4], actual[4]))
                ends += int((expected[2] | expected[3]).sum())
            for t, (expected_infos, actual_infos) in enumerate(kept):
                assert_same(expected_infos, actual_infos, f"step {t}'s infos, kept")
            return ends, rebuilt[0]
    finally:
        reference_envs.close()


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("num_workers", [1, 2, N])
def test_episode_ends_match_sync_vector_env(kind, num_workers):
    options, through_segment = KINDS[kind]
    ends, rebuilt = lockstep(test_envs.episode_end_fns(N, **options), num_workers=num_workers,
                             context="fork")
    assert ends > N
    if kind == "mixed":  # an array in the final info: that end went by pipe
        assert 0 < rebuilt < ends
    elif through_segment:
        assert rebuilt == ends
    else:
        assert rebuilt == 0


@pytest.mark.parametrize("copy", [True, False])
@pytest.mark.parametrize("num_workers", [0, 1])
def test_episode_ends_in_the_parents_group(num_workers, copy):
    ends, rebuilt = lockstep(test_envs.episode_end_fns(N, infos="scalars"),
                             num_workers=num_workers, parent_group=True, copy=copy,
                             context="fork")
    assert rebuilt == ends > N


@pytest.mark.parametrize("context", ["forkserver", "spawn"])
def test_episode_ends_under_other_start_methods(context):
    ends, rebuilt = lockstep(test_envs.episode_end_fns(4, infos="mixed"), steps=20,
                             num_workers=2, context=context)
    assert 0 < rebuilt < ends


def test_without_shared_memory_episode_ends_go_by_pipe():
    fns = test_envs.episode_end_fns(3)
    with fastvec.AsyncVectorEnv(fns, autoreset_mode=SAME, shared_memory=False,
                                context="fork") as envs:
        assert envs._pool.plan.final_observations is None
    ends, rebuilt = lockstep(fns, shared_memory=False, num_workers=2, context="fork")
    assert ends > 0 and rebuilt == 0


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.DISABLED])
def test_other_modes_have_no_final_rows(mode):
    with fastvec.AsyncVectorEnv(test_envs.episode_end_fns(2), autoreset_mode=mode,
                                context="fork") as envs:
        assert envs._pool.plan.final_observations is None


@pytest.mark.parametrize("parent_group", [False, True])
@pytest.mark.parametrize("kind", ["empty", "mixed", "reset-info"])
def test_episode_ends_in_partial_batches(kind, parent_group):
    options, through_segment = KINDS[kind]
    fns = test_envs.episode_end_fns(6, jitter=0.002, **options)
    with fastvec.AsyncVectorEnv(fns, autoreset_mode=SAME, batch_size=3, num_workers=2,
                                parent_group=parent_group, context="fork") as envs:
        rebuilt = count_rebuilt(envs)
        got = run_partial(envs, seed=5, steps=12)
        assert envs._partial.finals == set()
    check_same(got, reference(fns, SAME, seed=5, steps=12))
    assert (rebuilt[0] > 0) == through_segment


def test_a_replaced_worker_leaves_no_episode_end_marked():
    # a worker that dies after marking an env's episode end (in a synchronous step) leaves
    # that mark: simulated by setting it, then killing the worker
    fns = test_envs.episode_end_fns(4)
    with fastvec.AsyncVectorEnv(fns, autoreset_mode=SAME, num_workers=2,
                                restart_workers=True, context="fork") as envs:
        rebuilt = count_rebuilt(envs)
        envs.reset(seed=0)
        envs._pool.doorbells.store(envs._pool.plan.mark(0) + S.HAS_REPLY, S.REPLY_FINAL)
        kill(envs._pool.resources.processes[0].pid)
        actions = np.zeros(4, dtype=np.int64)
        with pytest.warns(UserWarning, match="restarted it"):
            _, _, _, truncations, infos = envs.step(actions)
        assert truncations[:2].all() and infos["worker_restarted"][:2].all()
        assert envs._pool.doorbells.load(envs._pool.plan.mark(0) + S.HAS_REPLY) == 0
        ends = 0
        for _ in range(8):  # episode ends of the other envs of that worker's group
            _, _, terminations, truncations, infos = envs.step(actions)
            done = terminations | truncations
            ends += int(done.sum())
            if "final_obs" in infos:
                assert (infos["_final_obs"] == done).all()
            else:
                assert not done.any()
        assert rebuilt[0] == ends > 0
