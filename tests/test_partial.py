"""Partial batches: ``batch_size``, ``send``/``recv``/``async_reset`` and ``step(actions)``
with ``batch_size < num_envs``.

The differential tests step deterministic envs that sleep a random time per step (so they
finish in a shuffled order) under partial batches, and check every env's sequence of
observations, rewards, flags and infos against the same env stepped alone in Gymnasium's
``SyncVectorEnv`` with the same actions; every ``send`` gets exactly one result per env, and
no env waits for more than a bounded number of ``recv`` calls.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
import signal
import sys
import time
from typing import Any

import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.error import AlreadyPendingCallError, ClosedEnvironmentError, NoAsyncCallError
from gymnasium.vector import AutoresetMode, SyncVectorEnv

import crash_envs
import envs as test_envs
import fastvec
from fastvec.errors import InvalidActionsError, WorkerDiedError

STEPS = 10  # steps per env after its reset


def action(env: int, count: int) -> int:
    """The action of env ``env``'s ``count``-th step (deterministic)."""
    return (7 * env + 3 * count) % 4


def row(space: spaces.Space, batch: Any, k: int) -> Any:
    """Row ``k`` of a batch (Gymnasium's shapes), as plain Python values."""
    if isinstance(space, spaces.Dict):
        return {key: row(space[key], batch[key], k) for key in space}
    if isinstance(space, spaces.Tuple):
        return tuple(row(part, batch[n], k) for n, part in enumerate(space))
    return plain(batch[k])


def plain(value: Any) -> Any:
    """Nested numpy values as comparable Python values."""
    if isinstance(value, dict):
        return {key: plain(v) for key, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    return value


def row_info(infos: dict[str, Any], k: int) -> dict[str, Any]:
    """Row ``k``'s info out of Gymnasium-batched infos (``env_id`` left out)."""
    out: dict[str, Any] = {}
    for key, value in infos.items():
        if key.startswith("_") or key == "env_id":
            continue
        mask = infos.get(f"_{key}")
        if mask is not None and not mask[k]:
            continue
        out[key] = row_info(value, k) if isinstance(value, dict) else plain(value[k])
    return out


def reference(fns: list, mode: AutoresetMode, seed: int, steps: int) -> list[list[Any]]:
    """Each env stepped alone (a SyncVectorEnv of one env) with the same actions: its reset
    (reward 0, flags False) and ``steps`` results (in Disabled mode, up to its episode's
    end: nothing resets it there)."""
    out = []
    for i, fn in enumerate(fns):
        env = SyncVectorEnv([functools.partial(fn, jitter=0)], autoreset_mode=mode)
        space = env.single_observation_space
        obs, infos = env.reset(seed=seed + i)
        results = [(row(space, obs, 0), 0.0, False, False, row_info(infos, 0))]
        for count in range(steps):
            if mode is AutoresetMode.DISABLED and (results[-1][2] or results[-1][3]):
                break
            obs, r, te, tr, infos = env.step(np.array([action(i, count)]))
            results.append((row(space, obs, 0), float(r[0]), bool(te[0]), bool(tr[0]),
                            row_info(infos, 0)))
        env.close()
        out.append(results)
    return out


def run_partial(envs: fastvec.AsyncVectorEnv, seed: int, steps: int) -> list[list[Any]]:
    """Double-buffered loop over ``envs``: every env's results, checking that each send gets
    exactly one result and that no env waits for more than a bounded number of recvs."""
    n, batch = envs.num_envs, envs.batch_size
    space = envs.single_observation_space
    results: list[list[Any]] = [[] for _ in range(n)]
    envs.async_reset(seed=seed)
    pending = dict.fromkeys(range(n), 0)  # sent, not yet received: recv calls waited
    finished: dict[int, int] = {}  # done, not yet received: recv calls waited since
    # A finished env comes back first-done first-out: within ceil(n / batch) recv calls. An
    # env in flight waits for its worker, which a busy machine may deschedule for a while:
    # a generous bound, which only starvation (an env passed over for good) would break.
    rounds = math.ceil(n / batch)
    bound = 6 * rounds + n
    while pending:
        obs, rewards, terminations, truncations, infos = envs.recv()
        for i in list(envs._partial.ready):
            finished[i] = finished.get(i, 0) + 1
            assert finished[i] <= rounds, f"finished env {i} waited {finished[i]} recv calls"
        ids = infos["env_id"]
        assert ids.dtype.kind == "i" and len(ids) == min(batch, len(pending))
        assert len(rewards) == len(terminations) == len(truncations) == len(ids)
        for k, i in enumerate(ids.tolist()):
            assert i in pending, f"env {i} came back without being sent"
            del pending[i]
            finished.pop(i, None)
            results[i].append((row(space, obs, k), float(rewards[k]), bool(terminations[k]),
                               bool(truncations[k]), row_info(infos, k)))
        for i in pending:
            pending[i] += 1
            assert pending[i] <= bound, f"env {i} starved for {pending[i]} recv calls"
        again = [i for i in ids.tolist() if len(results[i]) <= steps and not (
            envs.autoreset_mode is AutoresetMode.DISABLED
            and (results[i][-1][2] or results[i][-1][3]))]
        if again:
            envs.send(np.array([action(i, len(results[i]) - 1) for i in again]), again)
            pending.update(dict.fromkeys(again, 0))
    return results


def check_same(got: list[list[Any]], expected: list[list[Any]]) -> None:
    for i, (mine, theirs) in enumerate(zip(got, expected, strict=True)):
        assert len(mine) == len(theirs), f"env {i}"
        for t, (a, b) in enumerate(zip(mine, theirs, strict=True)):
            assert a == b, f"env {i}, result {t}: {a} != {b}"


# -- differential ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", list(AutoresetMode))
@pytest.mark.parametrize("copy", [True, False])
@pytest.mark.parametrize(("num_envs", "batch_size", "num_workers"),
                         [(6, 3, 1), (6, 3, 2), (6, 2, 6), (5, 2, 3), (4, 1, 2)])
def test_partial_batches_match_envs_stepped_alone(mode, copy, num_envs, batch_size,
                                                  num_workers):
    fns = test_envs.jitter_fns(num_envs)
    with fastvec.AsyncVectorEnv(fns, copy=copy, autoreset_mode=mode, batch_size=batch_size,
                                num_workers=num_workers, context="fork") as envs:
        got = run_partial(envs, seed=11, steps=STEPS)
    check_same(got, reference(fns, mode, seed=11, steps=STEPS))


@pytest.mark.parametrize("context", ["forkserver", "spawn"])
def test_partial_batches_under_other_start_methods(context):
    fns = test_envs.jitter_fns(4)
    mode = AutoresetMode.SAME_STEP
    with fastvec.AsyncVectorEnv(fns, autoreset_mode=mode, batch_size=2, num_workers=2,
                                context=context) as envs:
        got = run_partial(envs, seed=3, steps=6)
    check_same(got, reference(fns, mode, seed=3, steps=6))


def test_partial_batches_without_shared_memory():
    fns = test_envs.jitter_fns(4)
    mode = AutoresetMode.NEXT_STEP
    with fastvec.AsyncVectorEnv(fns, shared_memory=False, autoreset_mode=mode, batch_size=2,
                                num_workers=2, context="fork") as envs:
        got = run_partial(envs, seed=5, steps=6)
    check_same(got, reference(fns, mode, seed=5, steps=6))


def test_envs_finish_out_of_order_and_come_back_first_done_first():
    """A slow env does not hold back the fast ones: they come back while it is in flight."""
    fns = [functools.partial(test_envs.SpaceEnv, spaces.Box(-1, 1, (2,)), index=i,
                             delay=0.3 if i == 0 else 0.0) for i in range(4)]
    with fastvec.AsyncVectorEnv(fns, batch_size=2, num_workers=4, context="fork") as envs:
        envs.reset(seed=0)
        envs.send(np.zeros(4, np.int64))
        _, _, _, _, first = envs.recv()
        _, _, _, _, second = envs.recv()
        assert 0 not in first["env_id"] and 0 in second["env_id"]


@pytest.mark.parametrize("obs_space", [
    spaces.Dict({"text": spaces.Text(6), "pick": spaces.OneOf([spaces.Discrete(3),
                                                               spaces.Box(-1, 1, (2,))])}),
    spaces.Tuple((spaces.MultiBinary(3), spaces.Discrete(5, start=-2),
                  spaces.Box(0, 255, (2, 2), np.uint8))),
], ids=["text-oneof", "tuple"])
def test_partial_rows_of_every_space(obs_space):
    fns = [functools.partial(test_envs.SpaceEnv, obs_space, index=i) for i in range(4)]

    def expected(i: int) -> list[Any]:
        env = SyncVectorEnv([fns[i]])
        obs, _ = env.reset(seed=i)
        rows = [row(env.single_observation_space, obs, 0)]
        for count in range(3):
            obs, *_ = env.step(np.array([action(i, count)]))
            rows.append(row(env.single_observation_space, obs, 0))
        env.close()
        return rows

    got: dict[int, list[Any]] = {i: [] for i in range(4)}
    with fastvec.AsyncVectorEnv(fns, batch_size=3, num_workers=2, context="fork",
                                observation_mode="different") as envs:
        envs.async_reset(seed=0)
        while any(len(v) < 4 for v in got.values()):
            obs, _, _, _, infos = envs.recv()
            ids = infos["env_id"].tolist()
            for k, i in enumerate(ids):
                got[i].append(row(envs.single_observation_space, obs, k))
            again = [i for i in ids if len(got[i]) < 4]
            if again:
                envs.send(np.array([action(i, len(got[i]) - 1) for i in again]), again)
    assert got == {i: expected(i) for i in range(4)}


# -- step(actions) with batch_size < num_envs ------------------------------------------------
def test_step_is_send_then_recv():
    fns = test_envs.jitter_fns(4, jitter=0)
    with fastvec.AsyncVectorEnv(fns, batch_size=2, num_workers=2, context="fork") as envs:
        obs, _ = envs.reset(seed=0)
        assert obs["pos"].shape == (4, 2)  # reset is Gymnasium's: every env
        obs, rewards, _, _, infos = envs.step(np.array([action(i, 0) for i in range(4)]))
        assert len(rewards) == 2 and obs["pos"].shape == (2, 2)
        first = infos["env_id"].tolist()
        # the default env_ids: the envs of the last recv
        obs, rewards, _, _, infos = envs.step(np.array([action(i, 1) for i in first]))
        assert len(rewards) == 2
        _, _, _, _, infos = envs.step(np.zeros(2, np.int64), env_ids=infos["env_id"])
        envs.recv()  # the two envs still outstanding
        with pytest.raises(NoAsyncCallError):
            envs.recv()


def test_default_batch_size_keeps_the_synchronous_step():
    with fastvec.AsyncVectorEnv(test_envs.jitter_fns(3, jitter=0), context="fork") as envs:
        assert envs.batch_size == 3
        envs.reset(seed=0)
        _, _, _, _, infos = envs.step(np.zeros(3, np.int64))
        assert "env_id" not in infos
        # send/recv work with the full batch too
        envs.send(np.zeros(3, np.int64))
        _, rewards, _, _, infos = envs.recv()
        assert sorted(infos["env_id"].tolist()) == [0, 1, 2] and len(rewards) == 3


@pytest.mark.parametrize("batch_size", [0, 5, -1, 1.5, True])
def test_batch_size_is_checked(batch_size):
    with pytest.raises(ValueError, match="`batch_size` must be an integer in"):
        fastvec.AsyncVectorEnv(test_envs.jitter_fns(4), batch_size=batch_size)


# -- the state machine ---------------------------------------------------------------------------
@pytest.fixture
def slow_envs():
    slow = [functools.partial(test_envs.SpaceEnv, spaces.Box(-1, 1, (2,)), index=i,
                              delay=0.2) for i in range(4)]
    envs = fastvec.AsyncVectorEnv(slow, batch_size=2, num_workers=2, context="fork")
    yield envs
    envs.close(terminate=True)


def test_synchronous_calls_while_envs_are_in_flight_raise(slow_envs):
    envs = slow_envs
    envs.reset(seed=0)
    envs.send(np.zeros(2, np.int64), [1, 2])
    for call in (lambda: envs.step_async(np.zeros(4, np.int64)), envs.reset,
                 envs.reset_async, envs.async_reset,
                 lambda: envs.call("render"), lambda: envs.get_attr("t"),
                 lambda: envs.set_attr("custom_attr", 1)):
        with pytest.raises(AlreadyPendingCallError, match=r"envs \[1, 2\]"):
            call()
    with pytest.raises(AlreadyPendingCallError, match=r"envs \[2\], which are still in flight"):
        envs.send(np.zeros(2, np.int64), [2, 3])
    _, _, _, _, infos = envs.recv()
    assert sorted(infos["env_id"].tolist()) == [1, 2]
    # nothing in flight: the synchronous calls work again
    assert envs.get_attr("index") == (0, 1, 2, 3)
    envs.reset(seed=1)
    with pytest.raises(NoAsyncCallError, match="without any env sent"):
        envs.recv()


def test_send_and_recv_while_a_synchronous_call_is_pending(slow_envs):
    envs = slow_envs
    envs.reset(seed=0)
    envs.step_async(np.zeros(4, np.int64))
    with pytest.raises(AlreadyPendingCallError, match="pending call to `step`"):
        envs.send(np.zeros(1, np.int64), [0])
    with pytest.raises(AlreadyPendingCallError, match="pending call to `step`"):
        envs.recv()
    envs.step_wait()


@pytest.mark.parametrize(("env_ids", "error", "match"), [
    ([4], ValueError, r"unknown env ids \[4\]"),
    ([-1], ValueError, r"unknown env ids \[-1\]"),
    ([1, 1], ValueError, "more than once"),
    ([], ValueError, "is empty"),
    ([[0, 1]], ValueError, "1-d sequence of ints"),
    ([0.5], ValueError, "1-d sequence of ints"),
])
def test_send_checks_env_ids(slow_envs, env_ids, error, match):
    slow_envs.reset(seed=0)
    with pytest.raises(error, match=match):
        slow_envs.send(np.zeros(max(1, len(env_ids)), np.int64), env_ids)
    assert slow_envs._partial.outstanding == 0


def test_send_checks_the_action_count(slow_envs):
    slow_envs.reset(seed=0)
    with pytest.raises(InvalidActionsError, match="each of the 2 envs of `env_ids`, got 3"):
        slow_envs.send(np.zeros(3, np.int64), [0, 1])
    with pytest.raises(ValueError):
        slow_envs.send(np.zeros(4, np.int64), [0, 1])
    assert slow_envs._partial.outstanding == 0
    slow_envs.send(np.zeros(2, np.int64), [0, 1])  # still usable
    slow_envs.recv()


def test_async_reset_rejects_a_reset_mask(slow_envs):
    with pytest.raises(ValueError, match="reset_mask"):
        slow_envs.async_reset(options={"reset_mask": np.ones(4, np.bool_)})


def test_recv_timeout_leaves_the_envs_in_flight(slow_envs):
    envs = slow_envs
    envs.reset(seed=0)
    envs.send(np.zeros(4, np.int64))
    with pytest.raises(multiprocessing.TimeoutError, match="`recv` has timed out"):
        envs.recv(timeout=0.01)
    assert envs._partial.outstanding == 4
    seen = []
    for _ in range(2):
        _, rewards, _, _, infos = envs.recv()
        seen += infos["env_id"].tolist()
        assert len(rewards) == 2
    assert sorted(seen) == [0, 1, 2, 3]


def test_recv_timeout_then_same_results():
    """A timed-out recv shifts nothing: the results equal those of a run without one."""
    fns = test_envs.jitter_fns(4, jitter=0.05)
    mode = AutoresetMode.NEXT_STEP
    got: list[list[Any]] = [[] for _ in range(4)]
    timeouts = 0
    with fastvec.AsyncVectorEnv(fns, batch_size=2, num_workers=2, context="fork") as envs:
        space = envs.single_observation_space
        envs.async_reset(seed=2)
        pending = set(range(4))
        while pending:
            try:
                obs, rewards, te, tr, infos = envs.recv(timeout=0.005)
            except multiprocessing.TimeoutError:
                timeouts += 1
                continue
            ids = infos["env_id"].tolist()
            for k, i in enumerate(ids):
                pending.discard(i)
                got[i].append((row(space, obs, k), float(rewards[k]), bool(te[k]),
                               bool(tr[k]), row_info(infos, k)))
            again = [i for i in ids if len(got[i]) <= 4]
            if again:
                envs.send(np.array([action(i, len(got[i]) - 1) for i in again]), again)
                pending.update(again)
    assert timeouts > 0
    check_same(got, reference(fns, mode, seed=2, steps=4))


@pytest.mark.parametrize("terminate", [False, True])
def test_close_with_envs_in_flight(terminate):
    slow = [functools.partial(test_envs.SpaceEnv, spaces.Box(-1, 1, (2,)), index=i,
                              delay=0.3) for i in range(4)]
    envs = fastvec.AsyncVectorEnv(slow, batch_size=2, num_workers=2, context="fork")
    envs.reset(seed=0)
    envs.send(np.zeros(4, np.int64))
    start = time.monotonic()
    if terminate:
        envs.close(terminate=True)
    else:
        with pytest.warns(UserWarning, match="4 envs sent with `send`"):
            envs.close()
    assert time.monotonic() - start < 5
    assert envs.closed
    with pytest.raises(ClosedEnvironmentError):
        envs.recv()
    # the leak guards (conftest) check that no process or segment is left


def test_close_timeout_with_envs_in_flight_terminates():
    slow = [functools.partial(test_envs.SpaceEnv, spaces.Box(-1, 1, (2,)), index=i,
                              delay=5.0) for i in range(2)]
    envs = fastvec.AsyncVectorEnv(slow, batch_size=1, num_workers=2, context="fork")
    envs.reset(seed=0)
    envs.send(np.zeros(2, np.int64))
    start = time.monotonic()
    with pytest.warns(UserWarning, match="2 envs sent"):
        envs.close(timeout=0.2)
    assert time.monotonic() - start < 4


# -- errors, deaths and restarts ---------------------------------------------------------------
def test_a_failing_env_is_raised_and_the_others_stay():
    fns = [functools.partial(test_envs.FailingEnv, index=i, failing=(1,), fail_at=1)
           for i in range(4)]
    with fastvec.AsyncVectorEnv(fns, batch_size=4, num_workers=2, context="fork") as envs:
        envs.reset(seed=0)
        envs.send(np.ones(4, np.int64))
        # gymnasium.logger.error warns (see test_vector_env.py)
        with pytest.warns(UserWarning) as record:
            with pytest.raises(test_envs.FailError, match="env 1 failed") as excinfo:
                envs.recv()
        assert any("Received the following error from Worker-1" in str(w.message)
                   for w in record)
        if sys.version_info >= (3, 11):
            assert "raised by env 1 in a partial batch" in "".join(excinfo.value.__notes__)
        # the failed env is no longer in flight; the three others are not lost
        obs, rewards, _, _, infos = envs.recv()
        assert sorted(infos["env_id"].tolist()) == [0, 2, 3]
        assert (rewards == 1.0).all()
        for k, i in enumerate(infos["env_id"].tolist()):
            assert obs[k].tolist() == [i, 1]
        envs.send(np.ones(1, np.int64), [1])  # it may be sent again
        _, _, _, _, infos = envs.recv()
        assert infos["env_id"].tolist() == [1]


def test_a_dead_worker_raises_within_a_second():
    fns = crash_envs.crash_fns(4, crashing=(2,), where="step", how="exit", crash_at=2)
    with fastvec.AsyncVectorEnv(fns, batch_size=2, num_workers=2, context="fork") as envs:
        envs.reset(seed=0)
        envs.send(np.ones(4, np.int64))
        envs.recv()
        envs.recv()
        envs.send(np.ones(4, np.int64), range(4))
        start = time.monotonic()
        with pytest.raises(WorkerDiedError) as info:
            for _ in range(2):
                envs.recv()
        assert time.monotonic() - start < 1.5
        assert info.value.worker == 1 and info.value.env_indices == (2, 3)
        with pytest.raises(WorkerDiedError):
            envs.send(np.ones(1, np.int64), [0])


def test_killed_worker_in_flight_raises():
    fns = crash_envs.crash_fns(4, delay=0.2)
    with fastvec.AsyncVectorEnv(fns, batch_size=2, num_workers=2, context="fork") as envs:
        envs.reset(seed=0)
        pids = envs.call("pid")
        envs.send(np.ones(4, np.int64))
        os.kill(pids[3], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerDiedError, match="killed by signal SIGKILL"):
            envs.recv()
            envs.recv()
        assert time.monotonic() - start < 1.5


@pytest.mark.parametrize("mode", list(AutoresetMode))
def test_restarted_worker_envs_come_back_truncated(mode):
    fns = crash_envs.crash_fns(6, crashing=(2,), where="step", how="kill", crash_at=2)
    with fastvec.AsyncVectorEnv(fns, batch_size=3, num_workers=3, context="fork",
                                restart_workers=True, autoreset_mode=mode) as envs:
        envs.reset(seed=0)
        envs.send(np.ones(6, np.int64))
        envs.recv()
        envs.recv()
        envs.send(np.ones(6, np.int64), range(6))
        results: dict[int, tuple] = {}
        with pytest.warns(UserWarning, match=r"fastvec worker 1 .* restarted it as pid"):
            while len(results) < 6:
                obs, rewards, te, tr, infos = envs.recv()
                for k, i in enumerate(infos["env_id"].tolist()):
                    restarted = bool(infos.get("_worker_restarted", np.zeros(3, bool))[k])
                    results[i] = (obs[k].tolist(), float(rewards[k]), bool(te[k]),
                                  bool(tr[k]), restarted)
        for i in (2, 3):  # fresh envs, reset with seed None: [index, t=0, resets=1]
            assert results[i] == ([i, 0, 1], 0.0, False, True, True)
        for i in (0, 1, 4, 5):
            assert results[i] == ([i, 2, 1], 1.5, False, False, False)
        # the envs go on: the replaced group's next step (an autoreset in NextStep mode)
        envs.send(np.ones(6, np.int64), range(6))
        seen = []
        for _ in range(2):
            _, _, _, _, infos = envs.recv()
            seen += infos["env_id"].tolist()
            assert "worker_restarted" not in infos
        assert sorted(seen) == list(range(6))


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP])
def test_idle_envs_of_a_restarted_worker_report_it_on_their_next_send(mode):
    fns = crash_envs.crash_fns(6, crashing=(2,), where="step", how="kill", crash_at=1)
    with fastvec.AsyncVectorEnv(fns, batch_size=1, num_workers=3, context="fork",
                                restart_workers=True, autoreset_mode=mode) as envs:
        envs.reset(seed=0)
        envs.send(np.ones(1, np.int64), [2])  # env 3 (same worker) stays idle
        with pytest.warns(UserWarning, match=r"fastvec worker 1 .* restarted it as pid"):
            obs, rewards, _, truncations, infos = envs.recv()
        assert infos["env_id"].tolist() == [2] and truncations.tolist() == [True]
        assert infos["worker_restarted"].tolist() == [True] and obs[0].tolist() == [2, 0, 1]
        # env 3 was rebuilt too: its next send reports that instead of stepping it
        envs.send(np.ones(1, np.int64), [3])
        obs, rewards, _, truncations, infos = envs.recv()
        assert infos["env_id"].tolist() == [3] and truncations.tolist() == [True]
        assert infos["worker_restarted"].tolist() == [True] and obs[0].tolist() == [3, 0, 1]
        assert rewards.tolist() == [0.0]
        envs.send(np.ones(1, np.int64), [3])
        obs, rewards, _, truncations, infos = envs.recv()
        assert "worker_restarted" not in infos and truncations.tolist() == [False]
        if mode is AutoresetMode.NEXT_STEP:  # the step after a truncation resets
            assert obs[0].tolist() == [3, 0, 2] and rewards.tolist() == [0.0]
        else:
            assert obs[0].tolist() == [3, 1, 1] and rewards.tolist() == [1.5]


def test_pickled_actions_reach_their_envs():
    """An action space with no layout: each worker's actions travel pickled, in its entry's
    order, also when some envs of the send are stale (reported, not stepped)."""
    def pair(i: int, count: int) -> tuple:
        return (action(i, count), np.array([i, count], np.float32))

    fns = [functools.partial(test_envs.SpaceEnv, spaces.Box(-1, 1, (2,)),
                             test_envs.PairSpace(), episode_len=(50, 50), index=i)
           for i in range(4)]
    expected = {}
    for i, fn in enumerate(fns):
        env = fn()
        env.reset(seed=i)
        expected[i] = [env.step(pair(i, count))[1] for count in range(3)]
    got: dict[int, list[float]] = {i: [] for i in range(4)}
    with fastvec.AsyncVectorEnv(fns, batch_size=2, num_workers=2, context="fork") as envs:
        assert envs._plan.actions is None
        envs.reset(seed=0)
        ids = [3, 0, 2, 1]  # not in group order
        envs.send(tuple(pair(i, 0) for i in ids), ids)
        while any(len(v) < 3 for v in got.values()):
            _, rewards, _, _, infos = envs.recv()
            again = []
            for k, i in enumerate(infos["env_id"].tolist()):
                got[i].append(float(rewards[k]))
                if len(got[i]) < 3:
                    again.append(i)
            if again:
                envs.send(tuple(pair(i, len(got[i])) for i in again), again)
    assert got == expected


def test_an_env_is_done_as_soon_as_its_results_are_in():
    """Within one entry (one worker, one send) the first env comes back while the worker
    still steps the second; a second send to the same worker queues behind the first."""
    fns = [functools.partial(test_envs.SpaceEnv, spaces.Box(-1, 1, (2,)), index=i,
                             delay=0.0 if i == 0 else 0.5) for i in range(3)]
    with fastvec.AsyncVectorEnv(fns, batch_size=1, num_workers=1, context="fork") as envs:
        envs.reset(seed=0)
        start = time.monotonic()
        envs.send(np.zeros(2, np.int64), [0, 1])
        envs.send(np.zeros(1, np.int64), [2])  # queued: the worker is busy with env 1
        _, _, _, _, infos = envs.recv()
        assert infos["env_id"].tolist() == [0]
        assert time.monotonic() - start < 0.4
        _, _, _, _, infos = envs.recv()
        assert infos["env_id"].tolist() == [1]
        envs.send(np.zeros(1, np.int64), [0])  # behind env 2 in the queue
        _, _, _, _, infos = envs.recv()
        assert infos["env_id"].tolist() == [2]
        _, _, _, _, infos = envs.recv()
        assert infos["env_id"].tolist() == [0]


class _InfoEnv(test_envs.SpaceEnv):
    """A SpaceEnv whose every step returns an info naming its env and step."""

    def step(self, action: Any) -> tuple[Any, ...]:
        obs, reward, terminated, truncated, _ = super().step(action)
        self.steps = getattr(self, "steps", 0) + 1
        return obs, reward, terminated, truncated, {"who": self.index, "step": self.steps}


@pytest.mark.parametrize("shared_memory", [True, False])
def test_an_env_with_an_info_is_done_as_soon_as_its_results_are_in(shared_memory):
    """An env whose step returned an info (or, without shared memory, whose observation goes
    by pipe) comes back while its worker still steps the next env of the same entry: its
    reply travels on its own, not with the rest of the entry."""
    fns = [functools.partial(_InfoEnv, spaces.Box(-1, 1, (2,)), index=i,
                             delay=0.0 if i == 0 else 1.5) for i in range(2)]
    with fastvec.AsyncVectorEnv(fns, batch_size=1, num_workers=1, context="fork",
                                shared_memory=shared_memory) as envs:
        reference = SyncVectorEnv([functools.partial(_InfoEnv, spaces.Box(-1, 1, (2,)),
                                                     index=i) for i in range(2)])
        obs0, _ = envs.reset(seed=0)
        expected, _ = reference.reset(seed=0)
        np.testing.assert_array_equal(obs0, expected)
        expected, *_, expected_infos = reference.step(np.zeros(2, np.int64))
        envs.send(np.zeros(2, np.int64), [0, 1])
        obs, _, _, _, infos = envs.recv(timeout=0.75)  # env 1 is still asleep
        assert infos["env_id"].tolist() == [0]
        assert infos["who"].tolist() == [0] and infos["step"].tolist() == [1]
        assert expected_infos["who"].tolist() == [0, 1]  # what the env alone returns
        assert expected_infos["step"].tolist() == [1, 1]
        np.testing.assert_array_equal(obs[0], expected[0])
        obs, _, _, _, infos = envs.recv(timeout=5)
        assert infos["env_id"].tolist() == [1] and infos["who"].tolist() == [1]
        np.testing.assert_array_equal(obs[0], expected[1])
        reference.close()


def test_workers_wake_the_parent_only_once_its_recv_can_return():
    """The parent sleeping in ``recv`` asks for ``need`` more completions: envs that finish
    before then count without waking it (one wake per recv, not one per env); the last one
    needed wakes it at once. Driven in-process: a Worker over a local buffer, the parent's
    sleep in a thread."""
    import threading

    from conftest import local_worker
    from fastvec import _segment as S

    with local_worker(4) as worker:
        plan = worker.plan
        doorbells = worker.doorbells
        completed_word = plan.parent_line + S.COMPLETED
        completed = 0xFFFFFFFE  # the count wraps around on the way
        doorbells.store(completed_word, completed)
        line = plan.parent_line
        doorbells.store(line + S.TARGET, (completed + 3) & 0xFFFFFFFF)
        doorbells.store(line + S.WAITING, 1)
        woke: list[bool] = []
        sleeper = threading.Thread(target=lambda: woke.append(doorbells.wait_while_equal(
            completed_word, completed, 10.0, 0.0, False)))
        sleeper.start()
        try:
            time.sleep(0.1)  # asleep in the kernel by now
            worker.signal()
            worker.signal()
            sleeper.join(0.3)
            assert sleeper.is_alive(), "two completions of the three needed woke the parent"
            start = time.monotonic()
            worker.signal()
            sleeper.join(5.0)
            assert woke == [True] and time.monotonic() - start < 2.0
        finally:
            doorbells.store(line + S.TARGET, 0)
            worker.signal()
            sleeper.join(10.0)


def test_a_worker_restarted_during_async_reset_reports_its_envs_reset_not_truncated():
    """A reset that a dead worker's replacement stands in for is a reset: reward 0, both
    flags False, the fresh reset's info plus ``worker_restarted``; the other envs' resets are
    their own."""
    import robust_envs

    fns = [functools.partial(robust_envs.SlowEnv, index=i) for i in range(4)]
    with fastvec.AsyncVectorEnv(fns, batch_size=2, num_workers=2, context="fork",
                                restart_workers=True) as envs:
        envs.reset(seed=0)
        envs.set_attr("reset_delay", 0.5)  # the replacement's fresh envs reset at once
        envs.async_reset(seed=10)
        time.sleep(0.2)
        os.kill(envs._pool.resources.processes[1].pid, signal.SIGKILL)
        results: dict[int, tuple] = {}
        with pytest.warns(UserWarning, match=r"fastvec worker 1 .* restarted it as pid"):
            while len(results) < 4:
                obs, rewards, te, tr, infos = envs.recv(timeout=10)
                for k, i in enumerate(infos["env_id"].tolist()):
                    restarted = bool(infos.get("_worker_restarted", np.zeros(2, bool))[k])
                    results[i] = (obs[k].tolist(), float(rewards[k]), bool(te[k]),
                                  bool(tr[k]), restarted, infos["seed"][k])
        assert results[0] == ([0, 0], 0.0, False, False, False, 10)
        assert results[1] == ([1, 0], 0.0, False, False, False, 11)
        for i in (2, 3):  # fresh envs, reset with seed None
            assert results[i] == ([i, 0], 0.0, False, False, True, None)
        envs.send(np.ones(4, np.int64), range(4))  # and they step on
        seen = []
        for _ in range(2):
            _, rewards, _, tr, infos = envs.recv(timeout=10)
            seen += infos["env_id"].tolist()
            assert not tr.any() and "worker_restarted" not in infos
        assert sorted(seen) == list(range(4))

def test_async_reset_of_some_envs_while_others_are_in_flight():
    """Disabled autoreset in a partial batch: a finished env is reset alone with
    ``async_reset(env_ids=...)`` while the others step; every env's results are those of the
    env stepped alone with the same seeds and actions (two episodes each)."""
    fns = test_envs.jitter_fns(6)
    mode = AutoresetMode.DISABLED
    expected = []
    for i, fn in enumerate(fns):
        env = SyncVectorEnv([functools.partial(fn, jitter=0)], autoreset_mode=mode)
        space = env.single_observation_space
        results: list[Any] = []
        count = 0
        for seed in (20 + i, None):
            obs, infos = env.reset(seed=seed)
            results.append((row(space, obs, 0), 0.0, False, False, row_info(infos, 0)))
            while not (results[-1][2] or results[-1][3]):
                obs, r, te, tr, infos = env.step(np.array([action(i, count)]))
                count += 1
                results.append((row(space, obs, 0), float(r[0]), bool(te[0]), bool(tr[0]),
                                row_info(infos, 0)))
        env.close()
        expected.append(results)

    got: list[list[Any]] = [[] for _ in fns]
    steps = [0] * len(fns)
    resets = [1] * len(fns)
    with fastvec.AsyncVectorEnv(fns, autoreset_mode=mode, batch_size=2, num_workers=2) as envs:
        space = envs.single_observation_space
        envs.async_reset(seed=20)
        outstanding = len(fns)
        while outstanding:
            obs, rewards, terminations, truncations, infos = envs.recv()
            outstanding -= len(infos["env_id"])
            for k, i in enumerate(infos["env_id"].tolist()):
                got[i].append((row(space, obs, k), float(rewards[k]), bool(terminations[k]),
                               bool(truncations[k]), row_info(infos, k)))
                if terminations[k] or truncations[k]:
                    if resets[i] == 2:
                        continue
                    resets[i] += 1
                    busy = [j for j in range(len(fns)) if j in envs._partial.in_flight]
                    if busy:  # an env in flight cannot be reset
                        with pytest.raises(AlreadyPendingCallError, match="still in flight"):
                            envs.async_reset(env_ids=[busy[0]])
                    envs.async_reset(env_ids=[i])
                else:
                    envs.send(np.array([action(i, steps[i])]), [i])
                    steps[i] += 1
                outstanding += 1
    check_same(got, expected)
