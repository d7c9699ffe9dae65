"""Reliability: Ctrl-C, timeouts, bad inputs and outputs, a soak run, and the security of the
segment and the pipes.

``gymnasium.logger.error`` reports through ``warnings.warn`` (a ``UserWarning``), which
``filterwarnings = error`` turns into an exception; tests that provoke a sub-environment error
wrap the call in ``pytest.warns(UserWarning)`` and inspect the recorded messages.
"""

from __future__ import annotations

import functools
import gc
import json
import math
import multiprocessing
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import psutil
import pytest
from gymnasium import spaces
from gymnasium.vector import SyncVectorEnv
from gymnasium.vector.utils import iterate
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastvec
import robust_envs
from fastvec import _segment as P

TESTS_DIR = Path(__file__).resolve().parent
SHM_DIR = "/dev/shm"


def workers_of(envs: fastvec.AsyncVectorEnv) -> list[psutil.Process]:
    return [psutil.Process(p.pid) for p in envs._pool.resources.processes]


def all_alive(envs: fastvec.AsyncVectorEnv) -> bool:
    return all(p.is_alive() for p in envs._pool.resources.processes)


def slow_fns(n: int = 4, **kwargs: Any) -> list:
    return [functools.partial(robust_envs.SlowEnv, i, **kwargs) for i in range(n)]


# -- 4. Ctrl-C ------------------------------------------------------------------------------
# Run as its own session leader so that SIGINT can go to its whole process group (parent and
# workers, as a terminal's Ctrl-C does) without reaching pytest.
CTRL_C_SCRIPT = textwrap.dedent("""
    import functools, json, multiprocessing, os, sys, time
    import numpy as np, psutil
    import fastvec, robust_envs

    wait, context = sys.argv[1], sys.argv[2]
    fns = [functools.partial(robust_envs.SlowEnv, i) for i in range(4)]
    envs = fastvec.AsyncVectorEnv(fns, num_workers=2, context=context)
    envs.reset(seed=0)
    segment = envs._pool.resources.shm.name
    workers = [p.pid for p in envs._pool.resources.processes]
    if wait == "step":
        envs.set_attr("step_delay", 2.0)
        envs.step_async(np.array([1, 2, 3, 0]))
    elif wait == "reset":
        envs.set_attr("reset_delay", 2.0)
        envs.reset_async(seed=5)
    else:
        envs.call_async("slow", 2.0)
    print(json.dumps({"segment": segment, "workers": workers}), flush=True)
    start = time.monotonic()
    try:
        getattr(envs, wait + "_wait")()
    except KeyboardInterrupt:
        interrupted_after = time.monotonic() - start
    else:
        interrupted_after = None
    report = {"interrupted_after": interrupted_after}
    if wait == "step":  # the interrupted step is still pending: finish it, then step again
        obs, rewards, *_ = envs.step_wait()
        report["rewards"] = rewards.tolist()
        envs.set_attr("step_delay", 0.0)
        obs, rewards, *_ = envs.step(np.array([0, 0, 0, 0]))
        report["next_rewards"] = rewards.tolist()
    start = time.monotonic()
    envs.close()  # with a call still pending for "reset" and "call": it warns and waits
    report["close_seconds"] = time.monotonic() - start
    report["segment_exists"] = os.path.exists("/dev/shm/" + segment)
    helpers = set()
    from multiprocessing import forkserver, resource_tracker
    for pid in (getattr(resource_tracker._resource_tracker, "_pid", None),
                getattr(forkserver._forkserver, "_forkserver_pid", None)):
        if pid is not None:
            helpers.add(pid)
    report["children"] = [c.pid for c in psutil.Process().children(recursive=True)
                          if c.pid not in helpers and c.status() != psutil.STATUS_ZOMBIE]
    print(json.dumps(report), flush=True)
    sys.exit(0)
""")


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("wait", "context"), [("step", "fork"), ("call", "fork"),
                                               ("reset", "spawn")])
def test_ctrl_c_during_a_wait(wait, context):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C_SCRIPT, wait, context],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        first = None
        for line in proc.stdout:  # skip anything else the interpreter may print first
            if line.startswith('{"segment"'):
                first = json.loads(line)
                break
        assert first is not None, proc.communicate(timeout=30)
        time.sleep(0.5)  # well inside the 2 s wait
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, (stdout, stderr)
    report = json.loads(stdout.strip().splitlines()[-1])
    # the parent's wait ran the signal handler at once, long before the call finished
    assert report["interrupted_after"] is not None, (stdout, stderr)
    assert report["interrupted_after"] < 1.0, (stdout, stderr)
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    if wait == "step":
        assert report["rewards"] == [0 + 10 * 1 + 1, 1 + 10 * 2 + 1, 2 + 10 * 3 + 1, 3 + 1]
        assert report["next_rewards"] == [2.0, 3.0, 4.0, 5.0]
    else:
        assert "Calling `close` while waiting for a pending call" in stderr
    assert not report["segment_exists"]
    assert report["children"] == []
    assert not (Path(SHM_DIR) / first["segment"]).exists()
    for pid in first["workers"]:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


# -- 5. Timeouts -----------------------------------------------------------------------------
TIMEOUTS = (0.0, 0.05, 0.2, 0.5)
TOLERANCE = 0.05


def _timed_out_after(wait, timeout: float) -> float:
    start = time.monotonic()
    with pytest.raises(multiprocessing.TimeoutError, match=re.escape(
            f"has timed out after {timeout} second(s)")):
        wait(timeout=timeout)
    return time.monotonic() - start


@pytest.mark.timeout(60)
@pytest.mark.parametrize("call", ["reset", "step", "call"])
def test_timeouts_are_honoured_and_the_call_completes(call):
    """Every timeout fires within 50 ms of its value; the call stays pending and then completes
    with the right result."""
    delay = sum(TIMEOUTS) + 0.6
    with fastvec.AsyncVectorEnv(slow_fns(4), num_workers=2) as envs:
        envs.reset(seed=0)
        if call == "reset":
            envs.set_attr("reset_delay", delay)
            envs.reset_async(seed=7)
            wait = envs.reset_wait
        elif call == "step":
            envs.set_attr("step_delay", delay)
            envs.step_async(np.array([3, 2, 1, 0]))
            wait = envs.step_wait
        else:
            envs.call_async("slow", delay)
            wait = envs.call_wait
        started = time.monotonic()
        errors = []
        for timeout in TIMEOUTS:
            elapsed = _timed_out_after(wait, timeout)
            errors.append(elapsed - timeout)
        assert all(-1e-3 <= e <= TOLERANCE for e in errors), list(zip(TIMEOUTS, errors,
                                                                     strict=True))
        assert time.monotonic() - started < delay  # the call really was still running
        result = wait(timeout=30)
        if call == "reset":
            obs, infos = result
            np.testing.assert_array_equal(obs, [[i, 0] for i in range(4)])
            assert list(infos["seed"]) == [7, 8, 9, 10]
        elif call == "step":
            obs, rewards, terminations, truncations, _ = result
            np.testing.assert_array_equal(obs, [[i, 1] for i in range(4)])
            np.testing.assert_array_equal(rewards, [31.0, 22.0, 13.0, 4.0])
            assert not terminations.any() and not truncations.any()
        else:
            assert result == (0, 100, 200, 300)
        # and the env goes on as if nothing happened
        envs.set_attr("step_delay", 0.0)
        envs.set_attr("reset_delay", 0.0)
        _, rewards, *_ = envs.step(np.array([1, 1, 1, 1]))
        t = 2 if call == "step" else 1
        np.testing.assert_array_equal(rewards, [i + 10 + t for i in range(4)])


def test_timeout_on_a_fast_call_returns_at_once():
    with fastvec.AsyncVectorEnv(slow_fns(4), num_workers=2) as envs:
        envs.reset(seed=0)
        for _ in range(20):
            envs.step_async(np.zeros(4, np.int64))
            start = time.monotonic()
            envs.step_wait(timeout=5.0)
            assert time.monotonic() - start < 0.5


@pytest.mark.timeout(60)
@pytest.mark.parametrize("call", ["reset", "step", "call"])
def test_close_terminate_after_a_timeout_ends_everything_at_once(call):
    envs = fastvec.AsyncVectorEnv(slow_fns(4), num_workers=2)
    try:
        envs.reset(seed=0)
        segment = envs._pool.resources.shm.name
        workers = workers_of(envs)
        if call == "reset":
            envs.set_attr("reset_delay", 30.0)
            envs.reset_async()
        elif call == "step":
            envs.set_attr("step_delay", 30.0)
            envs.step_async(np.zeros(4, np.int64))
        else:
            envs.call_async("slow", 30.0)
        _timed_out_after(getattr(envs, f"{call}_wait"), 0.1)
    except BaseException:
        envs.close(terminate=True)
        raise
    start = time.monotonic()
    envs.close(terminate=True)
    elapsed = time.monotonic() - start
    assert elapsed < 1.0, elapsed
    assert envs.closed
    _, alive = psutil.wait_procs(workers, timeout=0.5)
    assert not alive
    assert not os.path.exists(os.path.join(SHM_DIR, segment))


# -- 6. Bad inputs: actions ------------------------------------------------------------------
N_FUZZ = 3
# Examples per fuzz test; raise it for a long hunt: FASTVEC_FUZZ_EXAMPLES=5000 pytest -k fuzz
FUZZ_EXAMPLES = int(os.environ.get("FASTVEC_FUZZ_EXAMPLES", "150"))
FUZZ_SETTINGS = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.too_slow,
                                                HealthCheck.data_too_large,
                                                HealthCheck.filter_too_much])
BOX = spaces.Box(-1.0, 1.0, (2,), np.float32)
DISCRETE = spaces.Discrete(3)
DICT = spaces.Dict({"d": spaces.Discrete(3), "b": spaces.Box(-1.0, 1.0, (2,), np.float32)})
ACTION_SPACES = {"box": BOX, "discrete": DISCRETE, "dict": DICT}

_float32_values = st.floats(width=32, allow_nan=True, allow_infinity=True)
_small_ints = st.integers(-5, 5)


def _array_variants(array: np.ndarray) -> st.SearchStrategy[np.ndarray]:
    """The same values in other memory layouts: Fortran order, a strided view, byte-swapped."""
    def strided(a: np.ndarray) -> np.ndarray:
        wide = np.zeros((*a.shape, 2), a.dtype)
        wide[..., 0] = a
        return wide[..., 0]

    return st.sampled_from([
        array,
        np.asfortranarray(array),
        strided(array),
        array.astype(array.dtype.newbyteorder()),
    ])


def _good_float_batches(shape: tuple[int, ...]) -> st.SearchStrategy:
    """Batches that must be accepted: any float dtype, NaN and infinities included (Gymnasium
    passes them on; checking them is the env's business), and small integers."""
    floats = st.sampled_from([np.float16, np.float32, np.float64]).flatmap(
        lambda dtype: hnp.arrays(dtype, shape, elements=_float32_values
                                 if dtype != np.float16 else st.floats(width=16)))
    ints = hnp.arrays(st.sampled_from([np.int8, np.int32, np.int64, np.uint8]), shape,
                      elements=st.integers(0, 5))
    arrays = st.one_of(floats, ints).flatmap(_array_variants)
    nested_lists = hnp.arrays(np.float64, shape, elements=_float32_values).map(
        lambda a: a.tolist())
    return st.one_of(arrays, nested_lists)


def _good_index_batches(n: int) -> st.SearchStrategy:
    """Integer batches (values outside the space are the env's business, as in Gymnasium)."""
    arrays = hnp.arrays(st.sampled_from([np.int8, np.int16, np.int32, np.int64, np.uint8,
                                         np.uint32, np.bool_]), (n,),
                        elements=None).flatmap(_array_variants)
    lists = st.lists(st.integers(-10, 10), min_size=n, max_size=n)
    return st.one_of(arrays, lists, lists.map(tuple))


def _wrong_shape(shape: tuple[int, ...]) -> st.SearchStrategy[tuple[int, ...]]:
    return hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4).filter(
        lambda s: s != shape)


def _bad_batches(shape: tuple[int, ...], dtype: np.dtype) -> st.SearchStrategy:
    """Batches that cannot be an action batch: they must be refused before any worker."""
    wrong_shape = _wrong_shape(shape).flatmap(
        lambda s: hnp.arrays(dtype, s, elements=st.just(0)))
    wrong_kind = st.sampled_from([np.complex64, np.complex128, "U3", "S2", "m8[s]", "M8[D]"]
                                 ).map(lambda d: np.zeros(shape, d))
    objects = st.just(np.zeros(shape, object))
    others = st.sampled_from([None, "abc", b"xyz", 1.5, object(), {"a": 1}, [[1, 2], [3]],
                              set()])
    return st.one_of(wrong_shape, wrong_kind, objects, others)


def _action_cases(space_name: str) -> st.SearchStrategy[tuple[str, Any]]:
    n = N_FUZZ
    if space_name == "box":
        good = _good_float_batches((n, 2))
        bad = st.one_of(_bad_batches((n, 2), np.dtype(np.float32)),
                        st.sampled_from([(np.zeros((n, 2)),), [np.zeros(2)] * (n + 1)]))
    elif space_name == "discrete":
        good = _good_index_batches(n)
        floats = hnp.arrays(st.sampled_from([np.float32, np.float64]), (n,),
                            elements=st.floats(0, 2))  # Discrete holds int64: no float casts
        too_big = st.just(np.array([2**63, 0, 1], dtype=np.uint64))
        bad = st.one_of(_bad_batches((n,), np.dtype(np.int64)), floats, too_big)
    else:
        good = st.fixed_dictionaries({"d": _good_index_batches(n),
                                      "b": _good_float_batches((n, 2))})
        valid = {"d": np.zeros(n, np.int64), "b": np.zeros((n, 2), np.float32)}
        bad = st.one_of(
            st.fixed_dictionaries({"d": _bad_batches((n,), np.dtype(np.int64)),
                                   "b": st.just(valid["b"])}),
            st.fixed_dictionaries({"d": st.just(valid["d"]),
                                   "b": _bad_batches((n, 2), np.dtype(np.float32))}),
            st.sampled_from([{"d": valid["d"]}, {**valid, "x": valid["d"]},
                             (valid["d"], valid["b"]), [valid["b"], valid["d"]], None,
                             np.zeros(n), {"D": valid["d"], "b": valid["b"]}]),
        )
    return st.one_of(good.map(lambda a: ("good", a)), bad.map(lambda a: ("bad", a)))


def _same_action(space: spaces.Space, got: Any, want: Any) -> bool:
    if isinstance(space, spaces.Dict):
        return all(_same_action(space[k], got[k], want[k]) for k in space.spaces)
    if isinstance(space, spaces.Discrete):
        return int(got) == int(want)
    want = np.asarray(want, dtype=space.dtype)
    return (isinstance(got, np.ndarray) and got.dtype == space.dtype
            and np.array_equal(got, want, equal_nan=True))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("space_name", sorted(ACTION_SPACES))
def test_fuzz_actions(space_name):
    """Every batch is either refused with a ValueError naming the action leaf before any
    worker sees it, or delivered to each env exactly as Gymnasium's ``iterate`` splits it
    (cast to the space's dtype); NaN reaches the env. The env stays usable either way."""
    space = ACTION_SPACES[space_name]
    batched = gym.vector.utils.batch_space(space, N_FUZZ)
    fns = [functools.partial(robust_envs.RecordingEnv, space, i) for i in range(N_FUZZ)]
    valid = batched.sample()
    counts = {"good": 0, "bad": 0}
    with fastvec.AsyncVectorEnv(fns, num_workers=2) as envs:
        envs.reset(seed=0)
        expected_steps = 0

        @FUZZ_SETTINGS
        @given(case=_action_cases(space_name))
        def check(case):
            nonlocal expected_steps
            kind, actions = case
            counts[kind] += 1
            if kind == "bad":
                with pytest.raises(ValueError, match=r"^actions"):
                    envs.step_async(actions)
                with pytest.raises(gym.error.NoAsyncCallError):
                    envs.step_wait()
                assert envs.get_attr("steps") == (expected_steps,) * N_FUZZ  # nobody stepped
            else:
                want = list(iterate(batched, actions))
                envs.step(actions)
                expected_steps += 1
                got = envs.get_attr("last_action")
                for i in range(N_FUZZ):
                    assert _same_action(space, got[i], want[i]), (i, got[i], want[i])
            # a correct step still works and delivers its actions
            envs.step(valid)
            expected_steps += 1
            got = envs.get_attr("last_action")
            assert all(_same_action(space, got[i], w)
                       for i, w in enumerate(iterate(batched, valid)))

        check()
        assert all_alive(envs)
    assert counts["good"] > 20 and counts["bad"] > 20, counts


def test_nan_action_reaches_the_env():
    fns = [functools.partial(robust_envs.RecordingEnv, BOX, i) for i in range(2)]
    with fastvec.AsyncVectorEnv(fns, num_workers=2) as envs:
        envs.reset(seed=0)
        envs.step(np.array([[np.nan, 0.5], [np.inf, -np.nan]], np.float32))
        first, second = envs.get_attr("last_action")
        assert math.isnan(first[0]) and first[1] == 0.5
        assert second[0] == np.inf and math.isnan(second[1])


# -- 6. Bad outputs --------------------------------------------------------------------------
BAD_ENV = 1
_scalars = st.one_of(st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True),
                     st.sampled_from([np.bool_(True), np.bool_(False), np.int64(0),
                                      np.int8(1), np.float32(0.5), np.float64("nan"),
                                      np.uint8(2)]))
_odd_objects = st.sampled_from([None, "abc", "", "1.5", b"x", 1 + 2j, [], [0.0], [1.0, 2.0],
                                (1,), {}, {"a": 1}, object(), set(), slice(1)])
_ARRAY_DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int64, np.uint8, np.uint64,
                 np.bool_, np.complex64, "U3"]
# object arrays hold values that must pickle to reach the env through set_attr
_object_elements = st.one_of(st.none(), st.floats(), st.integers(-5, 5), st.text(max_size=2))


def _arrays(shape: Any) -> st.SearchStrategy[np.ndarray]:
    return st.one_of(hnp.arrays(st.sampled_from(_ARRAY_DTYPES), shape, elements=None),
                     hnp.arrays(object, shape, elements=_object_elements))


_any_arrays = _arrays(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3))


def _obs_values() -> st.SearchStrategy:
    return st.one_of(_any_arrays, _arrays((2,)), _odd_objects, _scalars,
                     st.lists(st.floats(-2, 2), min_size=0, max_size=3))


def _output_cases() -> st.SearchStrategy[tuple[str, Any]]:
    # Arrays of object dtype hold arbitrary objects; keep them small.
    flags = st.one_of(_scalars, _odd_objects, _any_arrays)
    return st.one_of(
        st.tuples(st.just("obs"), _obs_values()),
        st.tuples(st.just("reset_obs"), _obs_values()),
        st.tuples(st.just("reward"), st.one_of(_scalars, _odd_objects, _any_arrays)),
        st.tuples(st.sampled_from(["terminated", "truncated"]), flags),
        st.tuples(st.just("info"), st.one_of(
            _odd_objects, _any_arrays,
            st.dictionaries(st.text(min_size=1, max_size=3),
                            st.one_of(_scalars, st.text(max_size=3)), max_size=2),
            st.just({"lock": robust_envs.Unpicklable()}))),
        st.tuples(st.just("result"), st.one_of(
            _odd_objects,
            st.lists(st.integers(0, 1), min_size=0, max_size=7).map(tuple))),
    )


def _run_sync(case: tuple[str, Any]) -> tuple[str, Any]:
    """What Gymnasium's SyncVectorEnv does with ``case``: ("ok", results) or ("error", exc)."""
    fns = [functools.partial(robust_envs.BadOutputEnv, i) for i in range(N_FUZZ)]
    reference = SyncVectorEnv(fns)
    try:
        reference.envs[BAD_ENV].bad = case
        try:
            if case[0] == "reset_obs":
                return "ok", reference.reset(seed=0)
            reference.reset(seed=0)
            return "ok", reference.step(np.ones(N_FUZZ, np.int64))
        except Exception as exc:
            return "error", exc
    finally:
        reference.close()


def _assert_same_results(got: tuple, want: tuple) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        if isinstance(w, dict):
            assert g.keys() == w.keys()
            for key in w:
                _assert_same_results((g[key],), (w[key],))
        else:
            g_arr, w_arr = np.asarray(g), np.asarray(w)
            assert g_arr.shape == w_arr.shape and g_arr.dtype == w_arr.dtype, (g, w)
            if w_arr.dtype.kind in "fc":
                assert np.array_equal(g_arr, w_arr, equal_nan=True), (g, w)
            else:
                assert np.array_equal(g_arr, w_arr), (g, w)


@pytest.mark.timeout(120)
def test_fuzz_bad_env_outputs():
    """A sub-env that returns something Gymnasium's SyncVectorEnv accepts gives the same
    results; anything it refuses is an error whose own message names the env, logged as from
    ``Worker-<index>``; no worker dies, and after a reset the vector env steps correctly."""
    fns = [functools.partial(robust_envs.BadOutputEnv, i) for i in range(N_FUZZ)]
    counts = {"accepted": 0, "refused": 0}
    outcomes: dict[str, set] = {}
    with fastvec.AsyncVectorEnv(fns, num_workers=2) as envs:
        envs.reset(seed=0)

        @settings(FUZZ_SETTINGS, max_examples=FUZZ_EXAMPLES * 5 // 3)
        @given(case=_output_cases())
        # a cast that overflows float32 warns, and the warning filter makes it an error
        @example(case=("obs", np.array([3.40282357e38, 3.40282357e38])))
        def check(case):
            field = case[0]
            sync_outcome, sync_value = _run_sync(case)
            bad = [None] * N_FUZZ
            bad[BAD_ENV] = case
            envs.set_attr("bad", bad)

            def run():
                if field == "reset_obs":
                    return envs.reset(seed=0)
                envs.reset(seed=0)
                return envs.step(np.ones(N_FUZZ, np.int64))

            if field == "info" and isinstance(case[1], dict) and robust_envs.Unpicklable() in \
                    case[1].values():
                # the one known difference: an info must pickle to leave its worker
                sync_outcome, expected = "error", "the info of env 1 cannot be pickled"
            else:
                expected = f"env {BAD_ENV}"
            if sync_outcome == "ok":
                counts["accepted"] += 1
                outcomes.setdefault(field, set()).add("accepted")
                _assert_same_results(run(), sync_value)
            else:
                counts["refused"] += 1
                outcomes.setdefault(field, set()).add("refused")
                with pytest.warns(UserWarning) as record:
                    with pytest.raises((ValueError, TypeError)) as excinfo:
                        run()
                message = str(excinfo.value)
                assert expected in message, (case, message)
                messages = [str(w.message) for w in record]
                assert any(f"Received the following error from Worker-{BAD_ENV}" in m
                           for m in messages), messages
            assert all_alive(envs)
            envs.set_attr("bad", None)
            obs, _ = envs.reset(seed=0)
            np.testing.assert_array_equal(obs, [[i, 0] for i in range(N_FUZZ)])
            obs, rewards, terminations, truncations, infos = envs.step(
                np.ones(N_FUZZ, np.int64))
            np.testing.assert_array_equal(obs, [[i, 1] for i in range(N_FUZZ)])
            np.testing.assert_array_equal(rewards, [i + 1 for i in range(N_FUZZ)])
            assert not terminations.any() and not truncations.any() and infos == {}

        check()
        assert all_alive(envs)
    print("\nbad-output fuzz:", counts, {k: sorted(v) for k, v in sorted(outcomes.items())})
    assert counts["accepted"] > 20 and counts["refused"] > 20, counts


@pytest.mark.parametrize(("case", "expected"), [
    (("obs", np.zeros(3, np.float32)),
     "env 1 returned an observation that does not fit the observation space: obs: expected "
     "shape (2,), got shape (3,)"),
    (("obs", "abc"), "env 1 returned an observation that does not fit"),
    (("obs", np.zeros(2, np.complex64)), "env 1 returned an observation that does not fit"),
    (("reset_obs", np.zeros((2, 2))), "env 1 returned an observation that does not fit"),
    (("reward", np.array([1.0, 2.0])),
     "env 1 returned a reward that is not a real number: an array of shape (2,)"),
    (("reward", "abc"), "env 1 returned a reward that is not a real number: str 'abc'"),
    (("reward", 1 + 2j), "env 1 returned a reward that is not a real number"),
    (("terminated", np.array([True, False])),
     "env 1 returned a `terminated` flag that is not a bool: an array of shape (2,)"),
    (("truncated", np.zeros((1, 2), bool)),
     "env 1 returned a `truncated` flag that is not a bool"),
    (("info", [1, 2]), "env 1 returned an info that is not a dict: list [1, 2]"),
    (("info", None), "env 1 returned an info that is not a dict: NoneType None"),
    (("info", np.zeros(3)), "env 1 returned an info that is not a dict"),
    (("info", {"lock": robust_envs.Unpicklable()}), "the info of env 1 cannot be pickled"),
    (("result", (1, 2, 3)),
     "env 1 returned a step result that is not (obs, reward, terminated, truncated, info)"),
    (("result", None), "env 1 returned a step result that is not"),
])
@pytest.mark.parametrize("mode", [gym.vector.AutoresetMode.NEXT_STEP,
                                  gym.vector.AutoresetMode.SAME_STEP])
def test_bad_env_output_messages(case, expected, mode):
    fns = [functools.partial(robust_envs.BadOutputEnv, i) for i in range(N_FUZZ)]
    with fastvec.AsyncVectorEnv(fns, num_workers=2, autoreset_mode=mode) as envs:
        envs.set_attr("bad", [None, case, None])
        with pytest.warns(UserWarning) as record:
            with pytest.raises((ValueError, TypeError)) as excinfo:
                envs.reset(seed=0)
                envs.step(np.ones(N_FUZZ, np.int64))
        assert expected in str(excinfo.value)
        assert any("Received the following error from Worker-1" in str(w.message)
                   for w in record)
        assert all_alive(envs)
        envs.set_attr("bad", None)
        envs.reset(seed=0)
        _, rewards, *_ = envs.step(np.ones(N_FUZZ, np.int64))
        np.testing.assert_array_equal(rewards, [1.0, 2.0, 3.0])


@pytest.mark.parametrize(("field", "value", "flag"), [
    ("terminated", np.bool_(True), True), ("terminated", 1, True), ("terminated", 0, False),
    ("truncated", np.int64(1), True), ("truncated", np.float32(0.0), False),
    ("terminated", np.array(True), True), ("truncated", None, False),
])
def test_non_bool_flags_are_accepted_like_gymnasium(field, value, flag):
    """Gymnasium stores flags into a bool array, so anything numpy turns into a bool is
    accepted; the autoreset that follows must agree with the stored flag."""
    fns = [functools.partial(robust_envs.BadOutputEnv, i) for i in range(N_FUZZ)]
    reference = SyncVectorEnv(fns)
    try:
        with fastvec.AsyncVectorEnv(fns, num_workers=2) as envs:
            for vec in (reference, envs):
                vec.set_attr("bad", [None, (field, value), None])
                vec.reset(seed=0)
            column = 2 if field == "terminated" else 3
            for t in range(4):  # with the flag set, the next step is an autoreset
                want = reference.step(np.ones(N_FUZZ, np.int64))
                got = envs.step(np.ones(N_FUZZ, np.int64))
                _assert_same_results(got, want)
                assert bool(got[column][BAD_ENV]) is (flag and t % 2 == 0)
    finally:
        reference.close()


# -- 7. Soak ---------------------------------------------------------------------------------
def _mapped_segments(processes: list[psutil.Process]) -> set[str]:
    """The fastvec segments mapped by ``processes`` (/dev/shm is shared with other sessions,
    so its listing alone cannot tell whose segments are whose)."""
    names = set()
    for process in processes:
        with open(f"/proc/{process.pid}/maps") as maps:
            for line in maps:
                path = line.split(maxsplit=5)[-1].strip()
                if path.startswith(f"{SHM_DIR}/fastvec_"):
                    names.add(os.path.basename(path.removesuffix(" (deleted)")))
    return names


def _rss_mb(process: psutil.Process) -> float:
    return process.memory_info().rss / 2**20


def _soak(total_env_steps: int, num_envs: int = 16) -> dict[str, Any]:
    fns = [lambda: gym.wrappers.RecordEpisodeStatistics(gym.make("CartPole-v1"))] * num_envs
    parent = psutil.Process()
    vector_steps = total_env_steps // num_envs
    warmup = max(vector_steps // 10, 500)
    rng = np.random.default_rng(0)
    actions = rng.integers(0, 2, size=(1024, num_envs))
    episodes = 0
    gc.collect()  # segments of earlier tests that wait in reference cycles are unmapped now
    with fastvec.AsyncVectorEnv(fns) as envs:
        workers = workers_of(envs)
        envs.reset(seed=0)
        own = envs._pool.resources.shm.name.lstrip("/")
        segments_during = _mapped_segments([parent, *workers])
        start = time.perf_counter()
        for t in range(vector_steps):
            if t == warmup:
                gc.collect()
                before = {
                    "parent_rss_mb": _rss_mb(parent),
                    "worker_rss_mb": [_rss_mb(w) for w in workers],
                    "parent_fds": parent.num_fds(),
                    "worker_fds": [w.num_fds() for w in workers],
                }
                warm_start = time.perf_counter()
            _, _, _, _, infos = envs.step(actions[t % 1024])
            if "episode" in infos:
                episodes += int(infos["_episode"].sum())
        elapsed = time.perf_counter() - start
        gc.collect()
        after = {
            "parent_rss_mb": _rss_mb(parent),
            "worker_rss_mb": [_rss_mb(w) for w in workers],
            "parent_fds": parent.num_fds(),
            "worker_fds": [w.num_fds() for w in workers],
        }
        segments_end = _mapped_segments([parent, *workers])
        measured_steps = (vector_steps - warmup) * num_envs
        report = {
            "env_steps": vector_steps * num_envs, "num_envs": num_envs,
            "num_workers": envs.num_workers, "episodes": episodes,
            "seconds": elapsed, "env_steps_per_second": vector_steps * num_envs / elapsed,
            "measured_env_steps": measured_steps,
            "measured_seconds": time.perf_counter() - warm_start,
            "before": before, "after": after,
            "segment": own, "segments_during": sorted(segments_during),
            "segments_end": sorted(segments_end),
        }
    report["segment_exists_after_close"] = os.path.exists(os.path.join(SHM_DIR, own))
    report["segments_after_close"] = sorted(_mapped_segments([parent]))
    return report


def _check_soak(report: dict[str, Any]) -> None:
    print("\nsoak:", json.dumps(report, indent=1))
    before, after = report["before"], report["after"]
    assert report["episodes"] > report["env_steps"] // 500  # infos came at episode ends
    assert after["parent_rss_mb"] - before["parent_rss_mb"] < 5.0, report
    for b, a in zip(before["worker_rss_mb"], after["worker_rss_mb"], strict=True):
        assert a - b < 5.0, report
    assert after["parent_fds"] <= before["parent_fds"], report
    assert after["worker_fds"] == before["worker_fds"], report
    assert report["segments_during"] == [report["segment"]]
    assert report["segments_end"] == [report["segment"]]
    assert report["segments_after_close"] == []
    assert not report["segment_exists_after_close"]


@pytest.mark.timeout(120)
def test_soak_smoke():
    _check_soak(_soak(100_000))


@pytest.mark.stress
@pytest.mark.timeout(900)
def test_soak_one_million_steps():
    _check_soak(_soak(1_000_000))


# -- 8. Security -----------------------------------------------------------------------------
def test_segment_mode_and_unguessable_names():
    with fastvec.AsyncVectorEnv(slow_fns(2), num_workers=2) as first, \
            fastvec.AsyncVectorEnv(slow_fns(2), num_workers=1) as second:
        names = [env._pool.resources.shm.name.lstrip("/") for env in (first, second)]
        for name in names:
            assert re.fullmatch(r"fastvec_[0-9a-f]{24}", name), name
            info = os.stat(os.path.join(SHM_DIR, name))
            assert stat.S_IMODE(info.st_mode) == 0o600, oct(info.st_mode)
            assert info.st_uid == os.getuid()
        assert names[0] != names[1]


def _plan(num_envs: int = 4, num_workers: int = 2) -> P.SegmentPlan:
    return P.SegmentPlan(num_envs, num_workers, spaces.Discrete(3),
                         spaces.Box(-1, 1, (2,), np.float32))


def test_check_header_accepts_its_own_segment():
    plan = _plan()
    buffer = bytearray(plan.nbytes)
    plan.write_header(buffer)
    plan.check_header(buffer)
    _plan().check_header(buffer)  # another process builds the same plan from the same spaces


@pytest.mark.parametrize(("corrupt", "message"), [
    (lambda buffer: buffer.__setitem__(slice(0, 8), b"NOTFASTV"),
     "is not a fastvec segment (magic 0x5654534146544f4e"),
    (lambda buffer: buffer.__setitem__(slice(0, 8), bytes(8)),
     "is not a fastvec segment (magic 0x0"),
    (lambda buffer: P.HEADER.pack_into(buffer, 0, P.MAGIC, P.LAYOUT_VERSION + 1, 4, 2, 0,
                                       _plan().nbytes),
     f"layout version {P.LAYOUT_VERSION + 1}, this fastvec reads version {P.LAYOUT_VERSION}"),
])
def test_check_header_rejects_a_foreign_segment(corrupt, message):
    plan = _plan()
    buffer = bytearray(plan.nbytes)
    plan.write_header(buffer)
    corrupt(buffer)
    with pytest.raises(RuntimeError, match=re.escape(message)):
        plan.check_header(buffer)


@pytest.mark.parametrize("other", [
    pytest.param(lambda: _plan(num_envs=5), id="num_envs"),
    pytest.param(lambda: _plan(num_workers=1), id="num_workers"),
    pytest.param(lambda: P.SegmentPlan(4, 2, spaces.Discrete(3),
                                       spaces.Box(-1, 1, (3,), np.float32)), id="obs-space"),
    pytest.param(lambda: P.SegmentPlan(4, 2, spaces.Box(-1, 1, (9,)),
                                       spaces.Box(-1, 1, (2,), np.float32)), id="action-space"),
])
def test_check_header_rejects_a_mismatched_layout(other):
    theirs = other()
    buffer = bytearray(max(theirs.nbytes, _plan().nbytes))
    theirs.write_header(buffer)
    with pytest.raises(RuntimeError, match="does not match this vector env's layout"):
        _plan().check_header(buffer)


def test_check_header_rejects_a_short_segment():
    plan = _plan()
    buffer = bytearray(plan.nbytes)
    plan.write_header(buffer)
    with pytest.raises(RuntimeError, match="too small"):
        plan.check_header(buffer[:plan.nbytes - 64])
    with pytest.raises(RuntimeError, match="too small"):
        plan.check_header(bytearray(8))


@pytest.mark.parametrize("context", ["fork", "spawn"])
@pytest.mark.parametrize(("header", "message"), [
    ((0x1234, P.LAYOUT_VERSION), "is not a fastvec segment (magic 0x1234"),
    ((P.MAGIC, P.LAYOUT_VERSION + 1), f"layout version {P.LAYOUT_VERSION + 1}"),
])
def test_workers_refuse_a_segment_their_parent_did_not_lay_out(monkeypatch, context, header,
                                                               message):
    """A worker checks the header before it touches the segment; the parent reports the
    worker's refusal as the constructor's error and frees everything."""
    magic, version = header

    def forged_header(plan, buffer):
        P.HEADER.pack_into(buffer, 0, magic, version, plan.num_envs, plan.num_workers,
                           plan.digest, plan.nbytes)

    monkeypatch.setattr(P.SegmentPlan, "write_header", forged_header)
    with pytest.warns(UserWarning) as record:
        with pytest.raises(RuntimeError, match=re.escape(message)):
            fastvec.AsyncVectorEnv(slow_fns(2), num_workers=2, context=context)
    assert any("Received the following error from Worker-0" in str(w.message) for w in record)


def _named_endpoints(pid: int) -> list[str]:
    """Every open fd of ``pid`` that another process could reach by name: a named FIFO, a
    socket bound to a path, or a TCP/UDP socket."""
    found = []
    process = psutil.Process(pid)
    for conn in process.net_connections(kind="inet"):
        found.append(f"inet {conn}")
    for conn in process.net_connections(kind="unix"):
        if conn.laddr or conn.status == psutil.CONN_LISTEN:
            found.append(f"unix {conn}")
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
            mode = os.stat(os.path.join(fd_dir, fd)).st_mode
        except OSError:
            continue
        if stat.S_ISFIFO(mode) and target.startswith("/"):
            found.append(f"named fifo {target}")
    return found


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_no_process_can_reach_the_workers_by_name(context):
    """Replies are unpickled only from the anonymous pipes the parent made for its own workers:
    nothing listens on a port or a path, and there is no named FIFO, in the parent or any
    worker."""
    with fastvec.AsyncVectorEnv(slow_fns(4), num_workers=2, context=context) as envs:
        envs.reset(seed=0)
        envs.step(np.zeros(4, np.int64))
        pids = [os.getpid()] + [w.pid for w in workers_of(envs)]
        for pid in pids:
            assert _named_endpoints(pid) == [], pid
        for pid in pids[1:]:
            sockets = psutil.Process(pid).net_connections(kind="all")
            assert all(c.family == 1 and not c.laddr and not c.raddr for c in sockets), sockets
