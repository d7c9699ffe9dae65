"""fastvec.AsyncVectorEnv against Gymnasium: differential runs, the async state machine, and
the places where fastvec must be right where Gymnasium's AsyncVectorEnv is not.

Differential tests drive the same seeded environments through Gymnasium's SyncVectorEnv (or
AsyncVectorEnv) and fastvec with the same seeded random action batches, and compare every
observation leaf, reward, flag and info after every call.

Note: ``gymnasium.logger.error`` reports through ``warnings.warn`` (a ``UserWarning``), which
``filterwarnings = error`` turns into an exception; tests that provoke a sub-environment error
therefore wrap the call in ``pytest.warns(UserWarning)`` and inspect the recorded messages.
"""

from __future__ import annotations

import contextlib
import copy as copy_module
import functools
import multiprocessing
import os
import pickle
import re
import subprocess
import sys
import time
import warnings
from typing import Any

import gymnasium as gym
import numpy as np
import psutil
import pytest
from gymnasium import spaces
from gymnasium.error import AlreadyPendingCallError, ClosedEnvironmentError, NoAsyncCallError
from gymnasium.utils.env_checker import data_equivalence
from gymnasium.vector import AutoresetMode, SyncVectorEnv
from gymnasium.vector.utils import batch_space, iterate

import envs as test_envs
import fastvec
from conftest import _created_here as created_here
from conftest import fastvec_segments
from fastvec._pool import WorkerPool
from fastvec.errors import RemoteTraceback

NEXT, SAME, DISABLED = AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP, AutoresetMode.DISABLED
MODES = [NEXT, SAME, DISABLED]
N = 5
STEPS = 200

# -- spaces --------------------------------------------------------------------------------
NESTED = spaces.Dict({
    "pos": spaces.Tuple((
        spaces.Dict({"x": spaces.Box(-1, 1, (2,), np.float64),
                     "y": spaces.Discrete(4, start=2)}),
        spaces.MultiBinary(3),
    )),
    "name": spaces.Text(6, min_length=0, charset="ab cé日"),
    "level": spaces.Box(0, 10, (), np.int32),
    "choice": spaces.OneOf((spaces.Discrete(3), spaces.Box(-1, 1, (2,), np.float32))),
})
DICT_ACTION = spaces.Dict({"move": spaces.Discrete(3, start=1),
                           "force": spaces.Box(-1, 1, (2,), np.float32)})

# name -> (observation space, action space)
SPACES: dict[str, tuple[spaces.Space, spaces.Space]] = {
    "box_f32": (spaces.Box(-1, 1, (3, 2), np.float32), spaces.Discrete(4)),
    "box_f16_scalar": (spaces.Box(-2, 2, (), np.float16), spaces.Box(-1, 1, (), np.float16)),
    "box_bool": (spaces.Box(0, 1, (4,), np.bool_), spaces.MultiBinary(2)),
    "box_uint8": (spaces.Box(0, 255, (2, 3), np.uint8), spaces.Discrete(4)),
    "discrete_start": (spaces.Discrete(7, start=-3), spaces.MultiDiscrete([3, 2])),
    "multidiscrete": (spaces.MultiDiscrete([[2, 3], [4, 5]], start=[[0, 1], [-1, 2]]),
                      spaces.Discrete(4)),
    "multibinary": (spaces.MultiBinary([2, 3]), spaces.Discrete(4)),
    "text": (spaces.Text(8), spaces.Box(-1, 1, (), np.float16)),
    "oneof": (spaces.OneOf((spaces.Discrete(3), spaces.Box(-1, 1, (2,), np.float32))),
              spaces.Tuple((spaces.Discrete(2), spaces.Box(0, 1, (2,), np.float64)))),
    "nested": (NESTED, DICT_ACTION),
    "graph": (spaces.Graph(spaces.Box(-1, 1, (2,), np.float32), spaces.Discrete(3)),
              spaces.OneOf((spaces.Discrete(3), spaces.Box(-1, 1, (2,), np.float32)))),
    "sequence": (spaces.Sequence(spaces.Box(-1, 1, (2,), np.float32)),
                 spaces.Text(4, min_length=0)),
    # every integer dtype is kept, on every path (see also test_discrete_dtypes_are_kept)
    "discrete_dtypes": (spaces.Dict({"a": spaces.Discrete(5, start=2, dtype=np.int32),
                                     "b": spaces.Discrete(3, dtype=np.uint8)}),
                        spaces.Discrete(4, start=-1, dtype=np.int16)),
    # action spaces with no layout travel pickled, as in Gymnasium
    "graph_action": (spaces.Box(-1, 1, (2,), np.float32),
                     spaces.Graph(spaces.Box(-1, 1, (2,), np.float32), spaces.Discrete(3))),
    "sequence_action": (spaces.Discrete(5), spaces.Sequence(spaces.Discrete(3))),
    "custom_action": (spaces.MultiBinary(3), test_envs.PairSpace()),
}
DYNAMIC = {"graph", "sequence"}


def env_fns(space_name: str, n: int = N, **kwargs: Any) -> list:
    obs_space, action_space = SPACES[space_name]
    return [functools.partial(test_envs.SpaceEnv, obs_space, action_space, index=i, **kwargs)
            for i in range(n)]


def box_fns(n: int = 3, **kwargs: Any) -> list:
    return env_fns("box_f32", n, **kwargs)


def failing_fns(n: int = 4, **kwargs: Any) -> list:
    return [functools.partial(test_envs.FailingEnv, index=i, **kwargs) for i in range(n)]


# -- comparison helpers ----------------------------------------------------------------------
def assert_same(expected: Any, actual: Any, what: str) -> None:
    assert data_equivalence(expected, actual, exact=True), (
        f"{what} differ:\nexpected {expected!r}\nactual   {actual!r}"
    )


RESULT_NAMES = ("observations", "rewards", "terminations", "truncations", "infos")


def assert_same_step(expected: tuple, actual: tuple, where: str) -> None:
    for name, e, a in zip(RESULT_NAMES, expected, actual, strict=True):
        assert_same(e, a, f"{where}: {name}")


def child_pids() -> set[int]:
    """Live child processes, without multiprocessing's resource tracker and forkserver."""
    pids = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                pids.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return pids - _infrastructure()


def drive(reference: gym.vector.VectorEnv, subject: gym.vector.VectorEnv, mode: AutoresetMode,
          steps: int = STEPS, seed: int = 0) -> None:
    """Run both vector envs in lockstep with seeded random actions, comparing everything."""
    n = reference.num_envs
    action_space = batch_space(reference.single_action_space, n)
    action_space.seed(seed)
    assert_same(reference.reset(seed=seed), subject.reset(seed=seed), "reset")
    dones = infos_seen = finals = 0
    for t in range(steps):
        actions = action_space.sample()
        expected = reference.step(actions)
        actual = subject.step(actions)
        assert_same_step(expected, actual, f"step {t}")
        done = expected[2] | expected[3]
        dones += int(done.sum())
        infos_seen += bool(expected[4])
        finals += "final_obs" in expected[4]
        if mode is DISABLED and done.any():
            assert_same(reference.reset(options={"reset_mask": done.copy()}),
                        subject.reset(options={"reset_mask": done.copy()}),
                        f"masked reset after step {t}")
    # the run exercised what it is meant to
    assert dones >= n and infos_seen > 0
    assert (finals > 0) == (mode is SAME)


def run_differential(space_name: str, mode: AutoresetMode, shared_memory: bool, copy: bool,
                     context: str, num_workers: int, n: int = N, steps: int = STEPS,
                     **options: Any) -> None:
    """``options``: more keyword arguments of fastvec's AsyncVectorEnv."""
    fns = env_fns(space_name, n)
    reference = SyncVectorEnv(fns, autoreset_mode=mode)
    try:
        with fastvec.AsyncVectorEnv(fns, shared_memory=shared_memory, copy=copy,
                                    context=context, autoreset_mode=mode,
                                    num_workers=num_workers, **options) as subject:
            assert subject.num_workers == num_workers
            assert subject.single_observation_space == reference.single_observation_space
            assert subject.observation_space == reference.observation_space
            assert subject.action_space == reference.action_space
            drive(reference, subject, mode, steps=steps)
    finally:
        reference.close()


# -- 1. differential tests ----------------------------------------------------------------
MEMORY_COPY = [(True, True), (True, False), (False, True), (False, False)]
FORK_CASES = [
    pytest.param(name, mode, shm, cp, id=f"{name}-{mode.value}-shm{int(shm)}-copy{int(cp)}")
    for name in SPACES
    for mode in MODES
    for shm, cp in MEMORY_COPY
    if not (shm and name in DYNAMIC)
]


@pytest.mark.parametrize(("space_name", "mode", "shared_memory", "copy"), FORK_CASES)
def test_differential_fork(space_name, mode, shared_memory, copy):
    run_differential(space_name, mode, shared_memory, copy, "fork", num_workers=2)


@pytest.mark.parametrize("num_workers", [1, N])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("space_name", ["nested", "graph"])
def test_differential_num_workers(space_name, mode, num_workers):
    run_differential(space_name, mode, space_name not in DYNAMIC, num_workers == 1, "fork",
                     num_workers)


@pytest.mark.parametrize(
    ("context", "space_name", "mode", "shared_memory", "copy", "num_workers"),
    [
        ("spawn", "nested", NEXT, True, True, 2),
        ("spawn", "graph", DISABLED, False, True, 2),
        ("spawn", "text", SAME, True, False, N),
        ("forkserver", "nested", SAME, True, False, 2),
        ("forkserver", "sequence", NEXT, False, False, 1),
        ("forkserver", "oneof", DISABLED, True, True, N),
        ("forkserver", "box_f16_scalar", NEXT, False, True, 2),
        ("spawn", "custom_action", SAME, True, True, 2),
        ("forkserver", "graph_action", NEXT, True, False, 2),
        ("spawn", "discrete_dtypes", DISABLED, False, True, 2),
    ],
)
def test_differential_other_contexts(context, space_name, mode, shared_memory, copy,
                                     num_workers):
    run_differential(space_name, mode, shared_memory, copy, context, num_workers, steps=120)


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("space_name", ["box_f32", "discrete_start", "nested"])
def test_differential_against_gymnasium_async(space_name, mode):
    fns = env_fns(space_name, 4)
    # Gymnasium's shared memory returns stale Text/OneOf observations: compare to its pipes.
    reference = gym.vector.AsyncVectorEnv(fns, shared_memory=False, context="fork",
                                          autoreset_mode=mode)
    try:
        with fastvec.AsyncVectorEnv(fns, context="fork", autoreset_mode=mode,
                                    num_workers=2) as subject:
            drive(reference, subject, mode, steps=100)
    finally:
        reference.close()


def test_reset_options_and_seed_lists_match_reference():
    fns = env_fns("nested", 4)
    reference = SyncVectorEnv(fns)
    try:
        with fastvec.AsyncVectorEnv(fns, num_workers=2) as subject:
            seeds = [11, None, 7, 3]
            expected, actual = reference.reset(seed=seeds), subject.reset(seed=seeds)
            # env 1 was seeded randomly: compare everything else
            assert_same(reference.np_random_seed[::2], subject.np_random_seed[::2], "seeds")
            options = {"tag": "hello"}
            assert_same(reference.reset(seed=5, options=dict(options)),
                        subject.reset(seed=5, options=dict(options)), "reset with options")
            mask = np.array([True, False, False, True])
            assert_same(reference.reset(seed=[1, 2, 3, 4],
                                        options={"reset_mask": mask.copy(), "tag": 1}),
                        subject.reset(seed=[1, 2, 3, 4],
                                      options={"reset_mask": mask.copy(), "tag": 1}),
                        "masked reset with seeds and options")
            assert subject.np_random_seed == (1, 6, 7, 4)
            del expected, actual
    finally:
        reference.close()


# -- 2. the state machine and Gymnasium API parity --------------------------------------------
def test_pending_call_errors():
    with fastvec.AsyncVectorEnv(box_fns(), num_workers=2) as envs:
        envs.reset(seed=0)
        actions = envs.action_space.sample()
        for wait in (envs.step_wait, envs.reset_wait, envs.call_wait):
            name = wait.__name__.removesuffix("_wait")
            with pytest.raises(NoAsyncCallError, match=re.escape(
                    f"Calling `{name}_wait` without any prior call to `{name}_async`.")):
                wait()
        envs.step_async(actions)
        pending = "Calling `{}` while waiting for a pending call to `step` to complete"
        with pytest.raises(AlreadyPendingCallError,
                           match=re.escape(pending.format("step_async") + ".")):
            envs.step_async(actions)
        with pytest.raises(AlreadyPendingCallError, match=re.escape(pending.format("reset_async"))):
            envs.reset_async()
        with pytest.raises(AlreadyPendingCallError,
                           match=re.escape(pending.format("call_async") + ".")):
            envs.call_async("scaled", 1.0)
        with pytest.raises(AlreadyPendingCallError,
                           match=re.escape(pending.format("set_attr") + ".")):
            envs.set_attr("custom_attr", 1)
        with pytest.raises(NoAsyncCallError):
            envs.reset_wait()
        with pytest.raises(NoAsyncCallError):
            envs.call_wait()
        obs, *_ = envs.step_wait()
        assert envs.observation_space.contains(obs)

        envs.reset_async(seed=1)
        with pytest.raises(AlreadyPendingCallError, match=re.escape(
                "Calling `step_async` while waiting for a pending call to `reset` to complete.")):
            envs.step_async(actions)
        envs.reset_wait()
        envs.call_async("scaled", 2.0)
        with pytest.raises(AlreadyPendingCallError, match="pending call to `call`"):
            envs.reset_async()
        assert envs.call_wait() == (0.0, 2.0, 4.0)


def test_closed_environment_error():
    envs = fastvec.AsyncVectorEnv(box_fns(), num_workers=2)
    envs.reset(seed=0)
    envs.close()
    assert envs.closed
    message = re.escape("Trying to operate on `AsyncVectorEnv`, after a call to `close()`.")
    actions = envs.action_space.sample()
    for operation in (lambda: envs.step(actions), lambda: envs.step_async(actions),
                      envs.step_wait, envs.reset, envs.reset_async, envs.reset_wait,
                      lambda: envs.call("scaled", 1.0), lambda: envs.get_attr("index"),
                      lambda: envs.set_attr("custom_attr", 1), envs.render):
        with pytest.raises(ClosedEnvironmentError, match=message):
            operation()
    envs.close()  # a second close is a no-op


def test_step_wait_timeout_keeps_the_step_pending():
    fns = box_fns(4)
    slow_fns = box_fns(4, delay=0.25)
    reference = SyncVectorEnv(fns)
    try:
        with fastvec.AsyncVectorEnv(slow_fns, num_workers=2) as envs:
            assert_same(reference.reset(seed=3), envs.reset(seed=3), "reset")
            action_space = batch_space(reference.single_action_space, 4)
            action_space.seed(3)
            actions = action_space.sample()
            envs.step_async(actions)
            with pytest.raises(multiprocessing.TimeoutError, match=re.escape(
                    "The call to `step_wait` has timed out after 0.05 second(s).")):
                envs.step_wait(timeout=0.05)
            with pytest.raises(AlreadyPendingCallError):
                envs.step_async(actions)
            assert_same_step(reference.step(actions), envs.step_wait(), "completed step")
            envs.set_attr("delay", 0.0)
            for t in range(30):
                actions = action_space.sample()
                assert_same_step(reference.step(actions), envs.step(actions), f"step {t}")

            envs.call_async("slow", 0.4)
            with pytest.raises(multiprocessing.TimeoutError, match=re.escape(
                    "The call to `call_wait` has timed out after 0.01 second(s).")):
                envs.call_wait(timeout=0.01)
            assert envs.call_wait(timeout=5) == (0, 1, 2, 3)
            actions = action_space.sample()
            assert_same_step(reference.step(actions), envs.step(actions), "after call")
    finally:
        reference.close()


def test_close_while_pending_warns():
    envs = fastvec.AsyncVectorEnv(box_fns(), num_workers=2)
    try:
        envs.reset(seed=0)
        envs.step_async(envs.action_space.sample())
    except BaseException:
        envs.close(terminate=True)
        raise
    with pytest.warns(UserWarning, match=re.escape(
            "Calling `close` while waiting for a pending call to `step` to complete.")):
        envs.close()
    assert envs.closed


def test_close_while_pending_times_out_and_terminates():
    envs = fastvec.AsyncVectorEnv(box_fns(2, delay=5.0), num_workers=2)
    pids = child_pids()
    try:
        envs.reset(seed=0)
        envs.step_async(envs.action_space.sample())
    except BaseException:
        envs.close(terminate=True)
        raise
    start = time.monotonic()
    with pytest.warns(UserWarning, match="pending call to `step`"):
        envs.close(timeout=0.1)
    assert time.monotonic() - start < 3.0
    assert envs.closed
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in pids)


def test_close_terminate():
    envs = fastvec.AsyncVectorEnv(box_fns(), num_workers=2)
    try:
        envs.reset(seed=0)
        workers = [psutil.Process(p) for p in child_pids()]
        assert len(workers) >= 2
    finally:
        envs.close(terminate=True)
    assert envs.closed
    _, alive = psutil.wait_procs(workers, timeout=2.0)
    assert not alive


def test_context_manager():
    with fastvec.AsyncVectorEnv(box_fns(), num_workers=2) as envs:
        assert not envs.closed
        envs.reset(seed=0)
    assert envs.closed
    with pytest.raises(KeyError, match="propagates"):
        with fastvec.AsyncVectorEnv(box_fns(), num_workers=2) as envs:
            raise KeyError("propagates")
    assert envs.closed


def test_call_get_attr_set_attr():
    with fastvec.AsyncVectorEnv(box_fns(3), num_workers=2) as envs:
        envs.reset(seed=0)
        assert envs.call("scaled", 2.0, offset=1.0) == (1.0, 3.0, 5.0)
        assert envs.get_attr("index") == (0, 1, 2)
        assert envs.call("index") == (0, 1, 2)  # non-callable attributes are read
        envs.set_attr("custom_attr", [10, "b", None])
        assert envs.get_attr("custom_attr") == (10, "b", None)
        envs.set_attr("custom_attr", (1, 2, 3))
        assert envs.get_attr("custom_attr") == (1, 2, 3)
        envs.set_attr("custom_attr", {"same": "value"})
        assert envs.get_attr("custom_attr") == ({"same": "value"},) * 3
        for bad in ([1, 2], (1, 2, 3, 4)):
            with pytest.raises(ValueError, match=re.escape(
                    "Values must be a list or tuple with length equal to the number of "
                    f"environments. Got `{len(bad)}` values for 3 environments.")):
                envs.set_attr("custom_attr", bad)
        for name in ("reset", "step"):
            with worker_error(ValueError, [0, 1, 2], match=re.escape(
                    f"Trying to call function `{name}` with `call`, use `{name}` "
                    "directly instead.")):
                envs.call(name)
        with worker_error(AttributeError, [0, 1, 2]):
            envs.get_attr("no_such_attribute")
        # still usable
        assert envs.get_attr("index") == (0, 1, 2)
        obs, *_ = envs.step(envs.action_space.sample())
        assert envs.observation_space.contains(obs)


def test_render_rgb_array():
    fns = box_fns(3, render_mode="rgb_array")
    reference = SyncVectorEnv(fns)
    try:
        with fastvec.AsyncVectorEnv(fns, num_workers=2) as envs:
            assert envs.render_mode == "rgb_array"
            assert envs.metadata["render_modes"] == ["rgb_array"]
            reference.reset(seed=0)
            envs.reset(seed=0)
            actions = envs.action_space.sample()
            reference.step(actions)
            envs.step(actions)
            frames = envs.render()
            assert isinstance(frames, tuple) and len(frames) == 3
            assert_same(reference.render(), frames, "frames")
    finally:
        reference.close()
    with fastvec.AsyncVectorEnv(box_fns(2), num_workers=1) as envs:
        assert envs.render_mode is None


@pytest.mark.parametrize("mode", [*MODES, "SameStep"])
def test_metadata_and_spaces(mode):
    fns = env_fns("nested", 3)
    reference = SyncVectorEnv(fns, autoreset_mode=mode)
    try:
        with fastvec.AsyncVectorEnv(fns, autoreset_mode=mode, num_workers=2) as envs:
            assert envs.metadata == reference.metadata
            assert isinstance(envs.metadata["autoreset_mode"], AutoresetMode)
            assert envs.metadata["autoreset_mode"] == AutoresetMode(mode)
            assert envs.autoreset_mode == AutoresetMode(mode)
            assert envs.num_envs == 3
            for name in ("single_observation_space", "observation_space",
                         "single_action_space", "action_space"):
                assert getattr(envs, name) == getattr(reference, name), name
            assert isinstance(envs, gym.vector.VectorEnv)
            assert envs.unwrapped is envs
    finally:
        reference.close()


def test_make_vec_spec():
    with fastvec.make_vec("CartPole-v1", 3, vector_kwargs={"num_workers": 2}) as envs:
        assert isinstance(envs, fastvec.AsyncVectorEnv)
        assert envs.num_envs == 3 and envs.num_workers == 2
        assert envs.spec is not None and envs.spec.id == "CartPole-v1"
        assert envs.spec.kwargs["num_envs"] == 3
        assert envs.spec.kwargs["vectorization_mode"] == "async"
        assert envs.spec.kwargs["vector_kwargs"] == {"num_workers": 2}
        reference = gym.make_vec("CartPole-v1", 3, vectorization_mode="sync")
        try:
            assert reference.spec.id == envs.spec.id
            assert envs.metadata == {**reference.metadata}
            obs_r, _ = reference.reset(seed=4)
            obs_f, _ = envs.reset(seed=4)
            assert_same(obs_r, obs_f, "CartPole reset")
            for t in range(50):
                actions = np.array([t % 2, (t // 2) % 2, 1])
                assert_same_step(reference.step(actions), envs.step(actions), f"step {t}")
        finally:
            reference.close()


def test_np_random_seed():
    fns = box_fns(3)
    reference = SyncVectorEnv(fns)
    try:
        with fastvec.AsyncVectorEnv(fns, num_workers=2) as envs:
            envs.reset(seed=7)
            reference.reset(seed=7)
            assert envs.np_random_seed == (7, 8, 9)
            generators = envs.np_random
            assert all(isinstance(g, np.random.Generator) for g in generators)
            assert [g.bit_generator.state for g in generators] == [
                g.bit_generator.state for g in reference.np_random]
            envs.reset(seed=[3, None, 5])
            seeds = envs.np_random_seed
            assert seeds[0] == 3 and seeds[2] == 5 and isinstance(seeds[1], int)
            with pytest.raises(ValueError, match=re.escape(
                    "If seeds are passed as a list the length must match num_envs=3 but got "
                    "length=2.")):
                envs.reset(seed=[1, 2])
            envs.reset(seed=0)  # still usable
            assert envs.np_random_seed == (0, 1, 2)
    finally:
        reference.close()


@pytest.mark.parametrize("mask", [
    [True, False, True],
    np.array([True, False]),
    np.array([[True, False, True]]),
    np.array([1, 0, 1]),
    np.array([False, False, False]),
], ids=["list", "short", "2d", "int-dtype", "all-false"])
def test_reset_mask_validation(mask):
    fns = box_fns(3)
    reference = SyncVectorEnv(fns)
    try:
        reference.reset(seed=0)
        with pytest.raises((TypeError, ValueError)) as expected:
            reference.reset(options={"reset_mask": mask})
        with fastvec.AsyncVectorEnv(fns, num_workers=2) as envs:
            envs.reset(seed=0)
            with pytest.raises(expected.type, match=re.escape(str(expected.value))):
                envs.reset(options={"reset_mask": mask})
            # nothing reached the workers: the env is usable and untouched
            obs, _ = envs.reset(seed=1)
            assert envs.observation_space.contains(obs)
    finally:
        reference.close()


def test_observation_mode_different():
    boxes = [spaces.Box(-1 - i, 1 + i, (3,), np.float32) for i in range(3)]
    fns = [functools.partial(test_envs.SpaceEnv, box, index=i) for i, box in enumerate(boxes)]
    reference = SyncVectorEnv(fns, observation_mode="different")
    try:
        with fastvec.AsyncVectorEnv(fns, observation_mode="different", num_workers=2) as envs:
            assert envs.observation_space == reference.observation_space
            assert envs.single_observation_space == reference.single_observation_space
            drive(reference, envs, NEXT, steps=60)
        with pytest.raises(RuntimeError, match=re.escape(
                "AsyncVectorEnv(..., observation_mode='same') however some of the "
                "sub-environments observation spaces are not equivalent.")):
            fastvec.AsyncVectorEnv(fns, num_workers=2)
    finally:
        reference.close()


def test_observation_mode_tuple_of_spaces():
    single = spaces.Box(-1, 1, (3, 2), np.float32)
    batched = batch_space(single, 3)
    fns = box_fns(3)
    reference = SyncVectorEnv(fns, observation_mode=(batched, single))
    try:
        with fastvec.AsyncVectorEnv(fns, observation_mode=(batched, single),
                                    num_workers=2) as envs:
            assert envs.observation_space is batched
            assert envs.single_observation_space is single
            drive(reference, envs, NEXT, steps=40)
    finally:
        reference.close()
    with pytest.raises(TypeError, match="Expected both elements of observation_mode to be Spaces"):
        fastvec.AsyncVectorEnv(fns, observation_mode=(batched, "single"))
    with pytest.raises(ValueError, match=re.escape(
            "Invalid `observation_mode`, expected: 'same' or 'different' or tuple of single "
            "and batch observation space, actual got bogus")):
        fastvec.AsyncVectorEnv(fns, observation_mode="bogus")


def test_custom_worker_is_rejected():
    def worker(*args):  # pragma: no cover - never runs
        pass

    with pytest.raises(ValueError, match=r"^fastvec\.AsyncVectorEnv does not run a custom"):
        fastvec.AsyncVectorEnv(box_fns(), worker=worker)


def test_dynamic_space_with_shared_memory_is_rejected():
    # Gymnasium's own sentence, then fastvec's advice
    with pytest.raises(TypeError, match=r"has a dynamic shape so its not possible to make a "
                       r"static shared memory.*shared_memory=False"):
        fastvec.AsyncVectorEnv(env_fns("graph", 2))


@pytest.mark.parametrize("space_name", ["graph_action", "sequence_action", "custom_action"])
@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "pipes"])
def test_actions_without_a_layout_travel_pickled(space_name, shared_memory):
    fns = env_fns(space_name, 4)
    reference = SyncVectorEnv(fns)
    try:
        with fastvec.AsyncVectorEnv(fns, shared_memory=shared_memory, num_workers=2) as envs:
            assert envs._plan.actions is None  # nothing of the actions in the segment
            assert bool(envs._plan.observation_slots) == shared_memory
            drive(reference, envs, NEXT, steps=40)
            # Gymnasium's own refusal for such a batch (its `iterate` raises), and a clear one
            # for a wrong count
            with pytest.raises(Exception) as gymnasium_refusal:
                list(iterate(envs.action_space, 0))
            with pytest.raises(type(gymnasium_refusal.value)) as refusal:
                envs.step(0)
            assert isinstance(refusal.value, fastvec.errors.InvalidActionsError)
            with pytest.raises(ValueError, match="one action for each of the 4 envs, got 3"):
                envs.step(envs.action_space.sample()[:3])
            actions = envs.action_space.sample()
            assert_same_step(reference.step(actions), envs.step(actions), "after refusals")
    finally:
        reference.close()


@pytest.mark.parametrize("shared_memory", [True, False], ids=["shm", "pipes"])
def test_discrete_dtypes_are_kept(shared_memory):
    fns = [functools.partial(test_envs.ActionEchoEnv,
                             spaces.Discrete(6, start=1, dtype=np.int32),
                             spaces.Discrete(4, start=-2, dtype=np.int8))] * 2
    reference = SyncVectorEnv(fns)
    try:
        with fastvec.AsyncVectorEnv(fns, shared_memory=shared_memory) as envs:
            obs, _ = envs.reset(seed=3)
            assert obs.dtype == np.int32
            assert_same(reference.reset(seed=3), (obs, {}), "reset")
            for t in range(5):
                actions = envs.action_space.sample()
                assert actions.dtype == np.int8
                expected, actual = reference.step(actions), envs.step(actions)
                assert_same_step(expected, actual, f"step {t}")
                assert actual[0].dtype == np.int32
                # the env got what Gymnasium gives it: a numpy scalar of the space's dtype
                assert list(actual[4]["action_type"]) == ["int8", "int8"]
    finally:
        reference.close()


def test_max_concurrency():
    with pytest.raises(ValueError, match=re.escape(
            "`max_concurrency` must be a positive or None, got 0.")):
        fastvec.AsyncVectorEnv(box_fns(), max_concurrency=0)
    with pytest.raises(ValueError, match=re.escape("`max_concurrency` must be an integer or None")):
        fastvec.AsyncVectorEnv(box_fns(), max_concurrency=1.5)

    delay = 0.15
    fns = box_fns(4, delay=delay)
    reference = SyncVectorEnv(box_fns(4))
    try:
        with fastvec.AsyncVectorEnv(fns, num_workers=4, max_concurrency=1) as envs:
            assert envs.max_concurrency == 1
            assert_same(reference.reset(seed=2), envs.reset(seed=2), "reset")
            actions = envs.action_space.sample()
            start = time.monotonic()
            result = envs.step(actions)
            assert time.monotonic() - start >= 4 * delay * 0.95  # serialised
            assert_same_step(reference.step(actions), result, "limited step")
        with fastvec.AsyncVectorEnv(fns, num_workers=4, max_concurrency=2) as envs:
            envs.reset(seed=2)
            start = time.monotonic()
            envs.step(actions)
            assert time.monotonic() - start >= 2 * delay * 0.95
        with fastvec.AsyncVectorEnv(fns, num_workers=4) as envs:
            envs.reset(seed=2)
            start = time.monotonic()
            envs.step(actions)
            assert time.monotonic() - start < 3.5 * delay  # parallel
    finally:
        reference.close()


def _segments() -> set[str]:
    """The fastvec segments in /dev/shm that this process created (others may run tests too)."""
    return fastvec_segments() & created_here


def test_constructor_failures_free_workers_and_segment():
    before_pids, before_segments = child_pids(), _segments()
    boxes = [spaces.Box(-1 - i, 1 + i, (3,), np.float32) for i in range(3)]
    fns = [functools.partial(test_envs.SpaceEnv, box, index=i) for i, box in enumerate(boxes)]
    with pytest.raises(RuntimeError, match="observation spaces are not equivalent") as excinfo:
        fastvec.AsyncVectorEnv(fns, num_workers=2)
    # checked while the traceback (and with it the half-built env) is still alive
    assert child_pids() <= before_pids and _segments() <= before_segments
    del excinfo

    fns = [functools.partial(test_envs.SpaceEnv, boxes[0]), test_envs.broken_env]
    with worker_error(test_envs.FailError, [1], match="cannot build this env") as excinfo:
        fastvec.AsyncVectorEnv(fns, num_workers=2)
    assert child_pids() <= before_pids and _segments() <= before_segments
    del excinfo


@pytest.mark.parametrize("context", ["fork", "forkserver", "spawn"])
def test_workers_survive_idle_periods(context):
    """Workers wake every few hundred ms to check on their parent; under forkserver their
    parent process is the server, which must not read as "the vector env is gone"."""
    fns = box_fns(3)
    reference = SyncVectorEnv(fns)
    try:
        with fastvec.AsyncVectorEnv(fns, num_workers=3, context=context) as envs:
            assert_same(reference.reset(seed=0), envs.reset(seed=0), "reset")
            workers = child_pids()
            time.sleep(1.2)
            actions = envs.action_space.sample()
            assert_same_step(reference.step(actions), envs.step(actions), "step after idling")
            assert child_pids() == workers
    finally:
        reference.close()


# -- 3. where fastvec is right and Gymnasium is not --------------------------------------------
@pytest.mark.parametrize("copy", [True, False])
def test_text_and_oneof_observations_are_fresh_every_step(copy):
    space = spaces.Tuple((spaces.Text(5), spaces.OneOf((spaces.Discrete(9),
                                                         spaces.Box(-1, 1, (2,))))))
    fns = [functools.partial(test_envs.SpaceEnv, space, index=i, episode_len=(50, 60))
           for i in range(3)]
    reference = SyncVectorEnv(fns)
    try:
        with fastvec.AsyncVectorEnv(fns, shared_memory=True, copy=copy, num_workers=2) as envs:
            assert_same(reference.reset(seed=9), envs.reset(seed=9), "reset")
            texts, choices = set(), set()
            for t in range(20):
                actions = envs.action_space.sample()
                expected, actual = reference.step(actions), envs.step(actions)
                assert_same_step(expected, actual, f"step {t}")
                texts.add(actual[0][0])
                choices.add(tuple(int(c[0]) for c in actual[0][1]))
            assert len(texts) == 20 and len(choices) > 1
    finally:
        reference.close()


def _bad_discrete_batches():
    return [
        pytest.param(np.array([1, 2]), id="too-few"),
        pytest.param(np.array([1, 2, 3, 0]), id="too-many"),
        pytest.param(np.zeros((3, 2), dtype=np.int64), id="wrong-shape"),
        pytest.param(np.array([0.5, 1.0, 2.0]), id="float-for-discrete"),
        pytest.param("abc", id="string"),
        pytest.param([object(), object(), object()], id="objects"),
        pytest.param(None, id="none"),
    ]


@pytest.mark.parametrize("bad", _bad_discrete_batches())
def test_wrong_action_batch_is_rejected_before_the_workers(bad):
    fns = box_fns(3)
    reference = SyncVectorEnv(fns)
    try:
        with fastvec.AsyncVectorEnv(fns, num_workers=2) as envs:
            assert_same(reference.reset(seed=1), envs.reset(seed=1), "reset")
            actions = np.array([0, 1, 2])
            assert_same_step(reference.step(actions), envs.step(actions), "first step")
            with pytest.raises(ValueError):
                envs.step_async(bad)
            with pytest.raises(NoAsyncCallError):
                envs.step_wait()
            assert envs.get_attr("t") == reference.get_attr("t")  # no env stepped
            for t in range(10):
                actions = np.array([t % 4, 3, (t + 1) % 4])
                assert_same_step(reference.step(actions), envs.step(actions), f"step {t}")
    finally:
        reference.close()


@pytest.mark.parametrize("bad", [
    pytest.param({"move": np.array([1, 2, 3])}, id="missing-key"),
    pytest.param({"move": np.array([1, 2, 3]), "force": np.zeros((3, 3), np.float32)},
                 id="leaf-wrong-shape"),
    pytest.param({"move": np.array([1, 2]), "force": np.zeros((3, 2), np.float32)},
                 id="leaf-wrong-count"),
    pytest.param({"move": np.array([1, 2, 3]), "force": np.zeros((3, 2), np.float32),
                  "extra": np.zeros(3)}, id="extra-key"),
    pytest.param((np.array([1, 2, 3]), np.zeros((3, 2), np.float32)), id="tuple-for-dict"),
])
def test_wrong_nested_action_batch_is_rejected(bad):
    fns = env_fns("nested", 3)
    reference = SyncVectorEnv(fns)
    try:
        with fastvec.AsyncVectorEnv(fns, num_workers=2) as envs:
            assert_same(reference.reset(seed=1), envs.reset(seed=1), "reset")
            with pytest.raises(ValueError):
                envs.step(bad)
            action_space = batch_space(reference.single_action_space, 3)
            action_space.seed(1)
            for t in range(10):
                actions = action_space.sample()
                assert_same_step(reference.step(actions), envs.step(actions), f"step {t}")
    finally:
        reference.close()


def _gymnasium_step_async_error(space_name: str, actions: Any) -> BaseException | None:
    """What Gymnasium's own AsyncVectorEnv raises in ``step_async`` for ``actions``."""
    reference = gym.vector.AsyncVectorEnv(env_fns(space_name, 3), context="fork")
    try:
        reference.reset(seed=1)
        reference.step_async(actions)
    except Exception as exc:
        return exc
    finally:
        with warnings.catch_warnings():  # "close while waiting for a pending call"
            warnings.simplefilter("ignore")
            reference.close(terminate=True)
    return None


@pytest.mark.parametrize(("space_name", "bad"), [
    *[pytest.param("box_f32", p.values[0], id=f"discrete-{p.id}") for p in _bad_discrete_batches()],
    pytest.param("box_f32", 0, id="discrete-scalar"),
    pytest.param("nested", 0, id="dict-scalar"),
    pytest.param("nested", {"move": np.array([1, 2, 3])}, id="dict-missing-key"),
    pytest.param("nested", [1, 2, 3], id="dict-list"),
    pytest.param("oneof", 5, id="tuple-scalar"),
])
def test_bad_action_batch_raises_what_gymnasium_raises(space_name, bad):
    gymnasium_error = _gymnasium_step_async_error(space_name, bad)
    with fastvec.AsyncVectorEnv(env_fns(space_name, 3), num_workers=2) as envs:
        envs.reset(seed=1)
        with pytest.raises(ValueError) as excinfo:
            envs.step_async(bad)
        # a handler written for Gymnasium's error catches fastvec's too
        if gymnasium_error is not None:
            assert isinstance(excinfo.value, type(gymnasium_error)), (
                f"Gymnasium raises {type(gymnasium_error).__name__}, fastvec "
                f"{type(excinfo.value).__mro__}")
        assert isinstance(excinfo.value, fastvec.errors.InvalidActionsError)
        assert str(excinfo.value).startswith("actions")  # fastvec's message names the leaf
        envs.step(envs.action_space.sample())  # still usable


def test_invalid_actions_errors_pickle():
    error = fastvec.errors.invalid_actions("actions: bad", KeyError)
    assert isinstance(error, KeyError) and str(error) == "actions: bad"
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error) and str(again) == "actions: bad"
    # also in a process that never made the mixed class (a pool, Ray)
    code = ("import pickle, sys; e = pickle.loads(sys.stdin.buffer.read()); "
            "print(type(e).__name__, isinstance(e, KeyError), isinstance(e, ValueError), e)")
    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(error),
                         capture_output=True, timeout=60, check=True).stdout.decode()
    assert out.split() == ["InvalidActionsKeyError", "True", "True", "actions:", "bad"]


def test_discrete_beyond_int64():
    # the kernels store int64: such a space has no layout, its actions travel pickled
    big = spaces.Discrete(4, start=2**63, dtype=np.uint64)
    fns = [functools.partial(test_envs.ActionEchoEnv, spaces.Discrete(3), big)] * 2
    with fastvec.AsyncVectorEnv(fns) as envs:
        assert envs._plan.actions is None
        envs.reset(seed=0)
        actions = envs.action_space.sample()
        assert envs.step(actions)[4]["action_type"].tolist() == ["uint64", "uint64"]
    obs_fns = [functools.partial(test_envs.ActionEchoEnv, big, spaces.Discrete(3))] * 2
    with pytest.raises(ValueError, match="shared_memory=False"):
        fastvec.AsyncVectorEnv(obs_fns)
    reference = SyncVectorEnv(obs_fns)
    try:
        with fastvec.AsyncVectorEnv(obs_fns, shared_memory=False) as envs:
            assert_same(reference.reset(seed=4), envs.reset(seed=4), "reset")
    finally:
        reference.close()


@contextlib.contextmanager
def worker_error(expected_type, workers, match=None):
    """Expect ``expected_type`` raised from sub-env errors, logged Gymnasium's way for each of
    ``workers`` (``gymnasium.logger.error`` warns, so the messages are recorded warnings)."""
    with pytest.warns(UserWarning) as record:
        with pytest.raises(expected_type, match=match) as excinfo:
            yield excinfo
    messages = [str(w.message) for w in record]
    for index in workers:
        assert any(f"Received the following error from Worker-{index}" in m
                   for m in messages), messages
    assert any("Raising the last exception back to the main process." in m for m in messages)
    excinfo.messages = messages


def _raise_from_step(envs, actions, expected_type, workers_in_log):
    with worker_error(expected_type, workers_in_log) as excinfo:
        envs.step(actions)
    return excinfo.value, excinfo.messages


@pytest.mark.parametrize("num_workers", [1, 2, 4])
def test_sub_env_exception_keeps_workers_alive(num_workers):
    with fastvec.AsyncVectorEnv(failing_fns(4, failing=(2,), fail_at=2),
                                num_workers=num_workers) as envs:
        workers = child_pids()
        assert len(workers) >= num_workers
        envs.reset(seed=0)
        obs, *_ = envs.step(np.array([0, 1, 2, 0]))
        assert obs[:, 1].tolist() == [1, 1, 1, 1]
        error, messages = _raise_from_step(envs, np.array([1, 1, 1, 1]),
                                           test_envs.FailError, [2])
        assert str(error) == "env 2 failed at t=2"
        assert isinstance(error.__cause__, RemoteTraceback)
        assert "FailError: env 2 failed at t=2" in error.__cause__.text
        assert "in step" in error.__cause__.text
        assert any("FailError" in m and "Traceback" in m for m in messages)
        # every worker is alive and the env is usable
        assert child_pids() == workers
        assert all(psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in workers)
        with pytest.raises(NoAsyncCallError):
            envs.step_wait()
        obs, _ = envs.reset(seed=1)
        assert obs[:, 1].tolist() == [0, 0, 0, 0]
        obs, rewards, *_ = envs.step(np.array([2, 2, 2, 2]))
        assert obs[:, 1].tolist() == [1, 1, 1, 1] and rewards.tolist() == [2.0] * 4
        assert child_pids() == workers


def test_several_sub_env_exceptions_are_all_logged():
    with fastvec.AsyncVectorEnv(failing_fns(4, failing=(1, 3), fail_at=1),
                                num_workers=2) as envs:
        envs.reset(seed=0)
        error, _ = _raise_from_step(envs, np.zeros(4, np.int64), test_envs.FailError,
                                           [1, 3])
        assert str(error) == "env 3 failed at t=1"  # the last one, as Gymnasium does
        obs, *_ = envs.step(np.zeros(4, np.int64))
        assert obs[:, 1].tolist() == [2, 2, 2, 2]


def test_sub_env_exception_in_reset_and_call():
    with fastvec.AsyncVectorEnv(failing_fns(3, failing=(0,), fail_reset=True),
                                num_workers=2) as envs:
        with worker_error(test_envs.FailError, [0], match="env 0 failed at t=0"):
            envs.reset(seed=0)
        envs.set_attr("fail_reset", False)
        obs, _ = envs.reset(seed=0)
        assert obs[:, 0].tolist() == [0, 1, 2]


@pytest.mark.timeout(30)
def test_unpicklable_exception_arrives_with_its_type():
    with fastvec.AsyncVectorEnv(failing_fns(3, failing=(1,), kind="lock"),
                                num_workers=2) as envs:
        envs.reset(seed=0)
        envs.step(np.zeros(3, np.int64))
        error, _ = _raise_from_step(envs, np.zeros(3, np.int64), test_envs.LockError, [1])
        assert "env 1 failed at t=2" in str(error)
        assert isinstance(error.__cause__, RemoteTraceback)
        assert "LockError: env 1 failed at t=2" in error.__cause__.text
        envs.reset(seed=0)
        envs.step(np.zeros(3, np.int64))


@pytest.mark.timeout(30)
def test_exception_whose_type_cannot_be_pickled_still_arrives():
    with fastvec.AsyncVectorEnv(failing_fns(3, failing=(2,), kind="local"),
                                num_workers=2) as envs:
        envs.reset(seed=0)
        envs.step(np.zeros(3, np.int64))
        error, _ = _raise_from_step(envs, np.zeros(3, np.int64), Exception, [2])
        assert "LocalError" in str(error) and "env 2 failed at t=2" in str(error)
        assert isinstance(error.__cause__, RemoteTraceback)
        assert "LocalError: env 2 failed at t=2" in error.__cause__.text
        assert "Traceback" in error.__cause__.text
        envs.reset(seed=0)
        obs, *_ = envs.step(np.zeros(3, np.int64))
        assert obs[:, 1].tolist() == [1, 1, 1]


def test_error_message_with_percent_signs():
    with fastvec.AsyncVectorEnv(failing_fns(2, failing=(1,), kind="percent"),
                                num_workers=2) as envs:
        envs.reset(seed=0)
        envs.step(np.zeros(2, np.int64))
        error, messages = _raise_from_step(envs, np.zeros(2, np.int64), test_envs.FailError,
                                           [1])
        assert str(error) == "env 1 failed at t=2 (100% of %d %s)"
        assert any("(100% of %d %s)" in m for m in messages)


# -- 4. an idle worker burns no CPU --------------------------------------------------------------
def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    return int(fields[11]) + int(fields[12])


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux /proc")
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_idle_workers_burn_no_cpu(context):
    before = child_pids()
    with fastvec.AsyncVectorEnv(box_fns(4), num_workers=2, context=context) as envs:
        workers = sorted(child_pids() - before)
        assert len(workers) == 2
        envs.reset(seed=0)
        envs.step(envs.action_space.sample())
        time.sleep(0.05)
        first = [_cpu_ticks(p) for p in workers]
        time.sleep(0.3)
        second = [_cpu_ticks(p) for p in workers]
        growth = [b - a for a, b in zip(first, second, strict=True)]
        assert all(g <= 2 for g in growth), growth


def _infrastructure() -> set[int]:
    import multiprocessing.forkserver
    import multiprocessing.resource_tracker

    pids = set()
    for pid in (getattr(multiprocessing.resource_tracker._resource_tracker, "_pid", None),
                getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)):
        if pid is not None:
            pids.add(pid)
    return pids


# -- 5. copy semantics ----------------------------------------------------------------------------
ARRAY_SPACE = spaces.Dict({
    "x": spaces.Box(-1, 1, (3,), np.float32),
    "y": spaces.Tuple((spaces.Discrete(50), spaces.MultiBinary(8))),
})


def _array_leaves(obs: Any) -> list[np.ndarray]:
    return [obs["x"], obs["y"][0], obs["y"][1]]


@pytest.mark.parametrize("shared_memory", [True, False])
def test_copy_true_results_never_change(shared_memory):
    fns = [functools.partial(test_envs.SpaceEnv, ARRAY_SPACE, index=i) for i in range(3)]
    with fastvec.AsyncVectorEnv(fns, shared_memory=shared_memory, copy=True,
                                num_workers=2) as envs:
        kept = [envs.reset(seed=0)]
        for _ in range(3):
            kept.append(envs.step(envs.action_space.sample()))
        snapshot = copy_module.deepcopy(kept)
        for _ in range(10):
            envs.step(envs.action_space.sample())
        envs.reset(seed=1)
        assert_same(snapshot, kept, "results kept with copy=True")
        views = [leaf for result in kept for leaf in _array_leaves(result[0])]
        assert not any(np.shares_memory(a, b) for a in views for b in views if a is not b)


@pytest.mark.parametrize("shared_memory", [True, False])
def test_copy_false_views_are_overwritten(shared_memory):
    fns = [functools.partial(test_envs.SpaceEnv, ARRAY_SPACE, index=i) for i in range(3)]
    envs = fastvec.AsyncVectorEnv(fns, shared_memory=shared_memory, copy=False, num_workers=2)
    try:
        envs.reset(seed=0)
        first, rewards, *_ = envs.step(envs.action_space.sample())
        snapshot = copy_module.deepcopy(first)
        rewards_snapshot = rewards.copy()
        second, *_ = envs.step(envs.action_space.sample())
        for old, new in zip(_array_leaves(first), _array_leaves(second), strict=True):
            assert np.shares_memory(old, new)
            np.testing.assert_array_equal(old, new)
        assert not data_equivalence(snapshot, first, exact=True)  # the views changed
        np.testing.assert_array_equal(rewards, rewards_snapshot)  # rewards are always copies
    finally:
        envs.close()
    # views still held at close stay readable (the mapping lives as long as they do)
    assert np.isfinite(first["x"]).all()


# -- copy=True hands out recycled segment slots, never one that is still referenced -------------
def _in_segment(array: np.ndarray) -> bool:
    return not array.flags.owndata and isinstance(array.base, memoryview)


def test_copy_true_recycles_slots_only_when_unreferenced():
    fns = [functools.partial(test_envs.SpaceEnv, ARRAY_SPACE, index=i) for i in range(3)]
    with fastvec.AsyncVectorEnv(fns, copy=True, num_workers=2) as envs:
        envs.reset(seed=0)
        first = envs.step(envs.action_space.sample())[0]
        second = envs.step(envs.action_space.sample())[0]
        assert _in_segment(first["x"]) and _in_segment(second["x"])
        assert not np.shares_memory(first["x"], second["x"])
        kept = copy_module.deepcopy((first, second))
        # both recycled slots are held: the next results are copies out of the scratch slot
        third = envs.step(envs.action_space.sample())[0]
        assert third["x"].flags.owndata
        assert_same(kept, (first, second), "held slots")
        # a slice of a result holds its slot too (numpy collapses view bases onto the root)
        row = first["x"][1]
        row_before = row.copy()
        del first, third
        for _ in range(5):
            fourth = envs.step(envs.action_space.sample())[0]
            assert fourth["x"].flags.owndata  # slot 0 (row) and slot 1 (second) still held
        np.testing.assert_array_equal(row, row_before)
        del row, second, fourth
        fifth = envs.step(envs.action_space.sample())[0]
        assert _in_segment(fifth["x"])


def test_reset_mask_keeps_observations_across_slots():
    fns = [functools.partial(test_envs.SpaceEnv, ARRAY_SPACE, index=i, episode_len=(50, 60))
           for i in range(4)]
    ref = SyncVectorEnv(fns, autoreset_mode=DISABLED)
    with fastvec.AsyncVectorEnv(fns, copy=True, num_workers=2,
                                autoreset_mode=DISABLED) as envs, contextlib.closing(ref):
        envs.reset(seed=3)
        ref.reset(seed=3)
        envs.action_space.seed(1)
        for _ in range(4):
            actions = envs.action_space.sample()
            held = envs.step(actions)[0]  # held while resetting: the reset goes to another slot
            ref.step(actions)
        mask = np.array([True, False, True, False])
        obs, _ = envs.reset(seed=5, options={"reset_mask": mask})
        expected, _ = ref.reset(seed=5, options={"reset_mask": mask})
        assert data_equivalence(obs, expected, exact=True)
        for leaf, before in zip(_array_leaves(obs), _array_leaves(held), strict=True):
            np.testing.assert_array_equal(leaf[~mask], before[~mask])


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs sched_getaffinity")
@pytest.mark.parametrize("pin", [True, False])
def test_pin_workers(pin):
    cores = sorted(os.sched_getaffinity(0))
    fns = [functools.partial(test_envs.SpaceEnv, ARRAY_SPACE, index=i) for i in range(3)]
    with fastvec.AsyncVectorEnv(fns, num_workers=2, pin_workers=pin) as envs:
        envs.reset(seed=0)
        workers = [psutil.Process(p.pid) for p in envs._pool.resources.processes]
        affinities = [sorted(w.cpu_affinity()) for w in workers]
    if pin:
        assert affinities == [[cores[0]], [cores[1 % len(cores)]]]
    else:
        assert affinities == [cores, cores]


@pytest.mark.timeout(30)
def test_unpicklable_info_and_call_result_are_errors_of_their_env():
    fns = [functools.partial(test_envs.UnpicklableInfoEnv, bad=i == 1) for i in range(3)]
    with fastvec.AsyncVectorEnv(fns, num_workers=2) as envs:
        envs.reset(seed=0)
        with pytest.warns(UserWarning) as record:
            with pytest.raises(TypeError, match="info of env 1 cannot be pickled"):
                envs.step(np.zeros(3, np.int64))
        assert any("Worker-1" in str(w.message) for w in record)
        with pytest.warns(UserWarning) as record:
            with pytest.raises(TypeError, match="result of env 1 cannot be pickled"):
                envs.call("get_lock")
        assert any("Worker-1" in str(w.message) for w in record)
        assert all(p.is_alive() for p in envs._pool.resources.processes)
        assert envs.get_attr("bad") == (False, True, False)


@pytest.mark.timeout(60)
def test_large_pipe_messages_do_not_deadlock():
    big = np.arange(1_000_000, dtype=np.float64)  # 8 MB: far beyond a pipe's buffer
    fns = [functools.partial(test_envs.SpaceEnv, ARRAY_SPACE, index=i) for i in range(3)]
    with fastvec.AsyncVectorEnv(fns, num_workers=2) as envs:
        envs.reset(seed=0, options={"tag": big})
        envs.set_attr("custom_attr", big)
        attrs = envs.get_attr("custom_attr")
        assert all(np.array_equal(a, big) for a in attrs)


def test_a_step_pickles_nothing_without_infos_or_errors(monkeypatch):
    # CartPole returns empty infos, also on the autoresets that happen in 300 steps
    fns = [functools.partial(gym.make, "CartPole-v1") for _ in range(4)]
    with fastvec.AsyncVectorEnv(fns, num_workers=2) as envs:
        envs.reset(seed=0)
        received = []
        original = WorkerPool.recv
        monkeypatch.setattr(WorkerPool, "recv",
                            lambda self, w: received.append(w) or original(self, w))
        episodes_ended = 0
        for _ in range(300):
            _, _, terminated, truncated, infos = envs.step(envs.action_space.sample())
            episodes_ended += int(np.sum(terminated | truncated))
            assert infos == {}
        assert episodes_ended > 0
        assert received == []


def test_masked_reset_ignores_edits_to_returned_arrays():
    # with copy=True the caller owns what it got: editing it must not leak into later resets
    fns = [functools.partial(test_envs.SpaceEnv, ARRAY_SPACE, index=i, episode_len=(50, 60))
           for i in range(2)]
    with fastvec.AsyncVectorEnv(fns, copy=True, num_workers=2,
                                autoreset_mode=DISABLED) as envs:
        envs.reset(seed=0)
        obs = envs.step(envs.action_space.sample())[0]
        expected = copy_module.deepcopy(obs)
        obs["x"] *= -1
        del obs
        mask = np.array([True, False])
        again, _ = envs.reset(seed=1, options={"reset_mask": mask})
        np.testing.assert_array_equal(again["x"][1], expected["x"][1])



def test_an_exception_whose_str_fails_does_not_kill_the_worker():
    fns = [functools.partial(test_envs.BrokenStrEnv, bad=i == 0) for i in range(2)]
    with fastvec.AsyncVectorEnv(fns, num_workers=1) as envs:
        envs.reset(seed=0)
        with pytest.warns(UserWarning):
            with pytest.raises(test_envs.BrokenStrError):
                envs.step(np.zeros(2, np.int64))
        assert all(p.is_alive() for p in envs._pool.resources.processes)
        assert envs.get_attr("bad") == (True, False)


@pytest.mark.parametrize("shared_memory", [True, False])
@pytest.mark.parametrize("copy", [True, False])
def test_copy_changed_after_construction_applies_to_the_next_step(shared_memory, copy):
    """``envs.copy`` is read at every reset and step, as Gymnasium's AsyncVectorEnv reads it:
    turned on, the batches returned afterwards no longer change; turned off, they are views
    of the segment again (with shared memory), or the one batch the env keeps (without)."""
    fns = [lambda: gym.make("CartPole-v1")] * 2
    with fastvec.AsyncVectorEnv(fns, shared_memory=shared_memory, copy=copy) as envs:
        envs.reset(seed=0)
        actions = np.ones(2, np.int64)
        envs.copy = not copy
        first, *_ = envs.step(actions)
        kept = first.copy()
        second, *_ = envs.step(actions)
        assert not np.array_equal(kept, second), "the envs moved"
        if envs.copy:
            np.testing.assert_array_equal(first, kept)
        elif shared_memory:
            assert not first.flags.owndata and not second.flags.owndata
        else:
            assert first is second
