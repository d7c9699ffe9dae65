"""Info rows: a step's info of a few scalars travels in its env's row of the segment.

Unit tests of :class:`fastvec._info_rows.InfoRows` (two sides over one buffer, every value
type round-tripping as itself, what falls back to the pipe), then end to end: infos that
switch between the row and the pipe (a different set of keys, empty, a value of another
type, an array) match Gymnasium's ``SyncVectorEnv`` leaf by leaf and dtype by dtype, across
autoreset modes, worker counts, the parent's group, start methods and partial batches; a
replaced worker's envs start over on the pipe; an env's error leaves the others' rows right.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from gymnasium.vector import AutoresetMode, SyncVectorEnv

import envs as test_envs
import fastvec
from fastvec._info_rows import MAX_VALUES, ROW, InfoRows, schema_of
from test_partial import STEPS as PARTIAL_STEPS
from test_partial import check_same, plain, reference, row_info, run_partial
from test_vector_env import MODES, drive, worker_error

N = 5
VALUES = [True, -(2**63), 2**63 - 1, 0.1, np.bool_(True), np.int8(-128), np.int16(300),
          np.int32(-7), np.int64(2**62), np.uint8(255), np.uint16(65535), np.uint32(2**32 - 1),
          np.uint64(2**64 - 1), np.float16(0.1), np.float32(1 / 3), np.float64(np.pi)]


def two_sides(num_envs: int = 3, first: int = 0) -> tuple[InfoRows, InfoRows, bytearray]:
    """A worker's and the parent's view of the rows of envs ``first..num_envs - 1``."""
    buffer = bytearray(64 + ROW * num_envs)
    view = memoryview(buffer)
    return (InfoRows(view, 64, first, num_envs - first), InfoRows(view, 64, 0, num_envs),
            buffer)


def test_every_value_type_round_trips_as_itself():
    for value in VALUES:
        worker, parent, _ = two_sides()
        info = {"a": value, "b": 1}
        worker.learn([(2, info)])
        parent.learn([(2, info)])
        assert worker.learned == parent.learned == 1
        assert worker.write(2, info)
        assert parent.set_rows() == [2]
        got = parent.read(2)
        assert got == info and [type(v) for v in got.values()] == [type(value), int]
        assert list(got) == ["a", "b"]
        worker.release()
        parent.release()


class _Rows:
    """Gymnasium's own info batching over ``num_envs`` rows, the reference."""

    _add_info = SyncVectorEnv._add_info

    def __init__(self, num_envs: int) -> None:
        self.num_envs = num_envs


def gymnasium_batch(infos: list[dict]) -> dict:
    rows, batched = _Rows(len(infos)), {}
    for k, info in enumerate(infos):
        batched = rows._add_info(batched, info, k)
    return batched


def same_infos(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        np.testing.assert_array_equal(got[key], value)
        if value.dtype == object:  # the values themselves, each of its own type
            assert [type(v) for v in got[key]] == [type(v) for v in value], key


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 1, 0], [2]])
def test_a_batch_of_rows_is_batched_as_gymnasium_batches_it(order):
    worker, parent, _ = two_sides(4)
    schema_info = {f"k{n}": value for n, value in enumerate(VALUES[:MAX_VALUES])}
    step_infos = [{key: type(value)(value if isinstance(value, (bool, np.bool_)) else
                                    value // 2 if isinstance(value, (int, np.integer)) else
                                    value / (env + 1))
                   for key, value in schema_info.items()} for env in range(4)]
    for env in range(4):
        worker.learn([(env, schema_info)])
        parent.learn([(env, schema_info)])
        assert worker.write(env, step_infos[env])
    same_infos(parent.read_batch(order), gymnasium_batch([step_infos[e] for e in order]))
    # the same through each row, as the batch falls back to
    same_infos(parent.read_batch(order), gymnasium_batch([parent.read(e) for e in order]))
    worker.release()
    parent.release()


def test_rows_not_batched_at_once_are_left_to_the_one_by_one_path():
    worker, parent, _ = two_sides(3)
    for env, info in enumerate([{"a": 1}, {"a": 1}, {"a": 1.5}]):
        worker.learn([(env, info)])
        parent.learn([(env, info)])
        worker.write(env, info)
    assert parent.read_batch([0, 1]) is not None
    assert parent.read_batch([0, 2]) is None  # two schemas
    assert parent.read_batch([]) is None
    worker.clear(1)
    assert parent.read_batch([0, 1]) is None  # env 1's info is not in its row
    for keys in (["final_obs"], ["x", "_x"]):  # Gymnasium batches these otherwise
        info = dict.fromkeys(keys, 2)
        worker.learn([(0, info)])
        parent.learn([(0, info)])
        assert worker.write(0, info)
        assert parent.read_batch([0]) is None
    worker.release()
    parent.release()


def test_a_worker_writes_only_the_schema_it_sent():
    worker, parent, buffer = two_sides(4, first=2)  # the worker holds envs 2 and 3
    info = {"lives": np.int32(3), "score": 1.5}
    assert not worker.write(3, info)  # nothing learned yet: the pipe
    worker.learn([(3, info)])
    parent.learn([(3, info)])
    assert worker.write(3, {"lives": np.int32(2), "score": -1.0})
    assert parent.read(3) == {"lives": 2, "score": -1.0}
    assert parent.read(2) is None and parent.set_rows() == [3]
    # another order, another type, another key, an int beyond int64: the pipe, row cleared
    for other in ({"score": 1.0, "lives": np.int32(2)}, {"lives": 2, "score": 1.0},
                  {"lives": np.int32(2)}, {"lives": np.int32(2), "score": 1.0, "x": 1}):
        assert worker.write(3, info)
        assert not worker.write(3, other)
        assert parent.read(3) is None and parent.set_rows() == []
    worker.learn([(3, {"n": 1})])
    assert not worker.write(3, {"n": 2**64})
    assert parent.read(3) is None
    # the parent forgets a replaced worker's envs and clears their rows
    worker.learn([(3, info)])
    assert worker.write(3, info)
    parent.forget([2, 3])
    assert parent.learned == 0 and parent.set_rows() == []
    assert not any(any(buffer[64 + j * ROW:64 + j * ROW + 8]) for j in range(4))  # states
    worker.release()
    parent.release()


def test_what_does_not_fit_a_row_has_no_schema():
    assert schema_of({}) is None
    assert schema_of({"arr": np.zeros(2)}) is None
    assert schema_of({"nested": {"a": 1}}) is None
    assert schema_of({"s": "text"}) is None
    assert schema_of({"c": 1j}) is None
    assert schema_of({str(k): k for k in range(MAX_VALUES + 1)}) is None
    full = {str(k): k for k in range(MAX_VALUES)}
    schema = schema_of(full)
    assert schema is not None and schema.fits(full) and schema_of(dict(full)) is schema
    assert 8 * (MAX_VALUES + 1) == ROW


def test_learning_counts_envs_with_a_schema():
    worker, parent, _ = two_sides()
    parent.learn([(0, {"a": 1}), (1, {"a": np.zeros(1)}), (2, {"b": 2.0})])
    assert parent.learned == 2
    parent.learn([(0, {"a": np.zeros(1)})])
    assert parent.learned == 1
    parent.learn([(1, {"a": 1}), (1, {"a": 2})])
    assert parent.learned == 2
    worker.release()
    parent.release()


# -- end to end ------------------------------------------------------------------------------
def _fns(n: int = N, **kwargs):
    return test_envs.scalar_info_fns(n, **kwargs)


def _run_against_sync(mode: AutoresetMode, steps: int = 80, **options) -> None:
    fns = _fns()
    reference_envs = SyncVectorEnv(fns, autoreset_mode=mode)
    try:
        with fastvec.AsyncVectorEnv(fns, autoreset_mode=mode, **options) as subject:
            drive(reference_envs, subject, mode, steps=steps)
            # the scalar infos did go by row: every env learned its schema
            assert subject._pool.info_rows.learned > 0
    finally:
        reference_envs.close()


@pytest.mark.parametrize("num_workers", [1, 2, N])
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_infos_through_rows_match_sync_vector_env(mode, num_workers):
    _run_against_sync(mode, num_workers=num_workers, context="fork")


@pytest.mark.parametrize("copy", [True, False])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_infos_through_rows_in_the_parents_group(num_workers, copy):
    _run_against_sync(AutoresetMode.NEXT_STEP, num_workers=num_workers, parent_group=True,
                      copy=copy, context="fork")


@pytest.mark.parametrize("context", ["forkserver", "spawn"])
def test_infos_through_rows_under_other_start_methods(context):
    _run_against_sync(AutoresetMode.SAME_STEP, steps=40, num_workers=2, context=context)


@pytest.mark.parametrize("parent_group", [False, True])
@pytest.mark.parametrize("mode", list(AutoresetMode))
def test_infos_through_rows_in_partial_batches(mode, parent_group):
    fns = _fns(6, jitter=0.002)
    with fastvec.AsyncVectorEnv(fns, autoreset_mode=mode, batch_size=3, num_workers=2,
                                parent_group=parent_group, context="fork") as envs:
        got = run_partial(envs, seed=5, steps=PARTIAL_STEPS)
        assert envs._pool.info_rows.learned > 0
    check_same(got, reference(fns, mode, seed=5, steps=PARTIAL_STEPS))


def _expected(index: int, n: int) -> dict:
    return plain(test_envs.ScalarInfoEnv.info_at(index, n))


def test_a_replaced_workers_envs_start_over_on_the_pipe():
    n = 4  # two workers: worker 1 holds envs 2 and 3
    actions = np.ones(n, dtype=np.int64)
    with pytest.warns(UserWarning, match="was killed by signal SIGKILL during `step`"), \
            fastvec.AsyncVectorEnv(_fns(n), num_workers=2, restart_workers=True,
                                   autoreset_mode=AutoresetMode.DISABLED,
                                   context="fork") as envs:
        envs.reset(seed=0)
        counts = [0] * n
        for _ in range(5):
            infos = envs.step(actions)[4]
            counts = [c + 1 for c in counts]
            assert [row_info(infos, i) for i in range(n)] == [
                _expected(i, c) for i, c in enumerate(counts)]
        assert envs._pool.info_rows.set_rows() == list(range(n))
        victim = envs._pool.resources.processes[1]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(2.0)
        infos = envs.step(actions)[4]
        assert list(infos["_worker_restarted"]) == [False, False, True, True]
        assert [row_info(infos, i) for i in range(2)] == [_expected(i, 6) for i in range(2)]
        counts = [7, 7, 1, 1]
        for _ in range(3):  # the fresh envs teach their schemas again, then use their rows
            infos = envs.step(actions)[4]
            assert [row_info(infos, i) for i in range(n)] == [
                _expected(i, c) for i, c in enumerate(counts)]
            counts = [c + 1 for c in counts]
        assert envs._pool.info_rows.set_rows() == list(range(n))


def test_an_envs_error_leaves_the_other_rows_right():
    n = 4
    actions = np.ones(n, dtype=np.int64)
    with fastvec.AsyncVectorEnv(_fns(n, failing=(1,), fail_at=4), num_workers=2,
                                autoreset_mode=AutoresetMode.DISABLED,
                                context="fork") as envs:
        envs.reset(seed=0)
        for _ in range(3):
            envs.step(actions)
        with worker_error(test_envs.FailError, [1], match="env 1 failed at step 4"):
            envs.step(actions)
        for c in (5, 6):  # every env goes on from its own count
            infos = envs.step(actions)[4]
            assert [row_info(infos, i) for i in range(n)] == [_expected(i, c) for i in range(n)]


def test_a_reset_after_a_row_info_is_not_read_as_that_info():
    """Disabled mode's partial batches: finished envs reset with an empty info while the
    others are in flight; the rows their last steps wrote are not theirs any more."""
    n = 4
    with fastvec.AsyncVectorEnv(_fns(n), num_workers=2, batch_size=2,
                                autoreset_mode=AutoresetMode.DISABLED,
                                context="fork") as envs:
        envs.async_reset(seed=0)
        for _ in range(6):
            ids = envs.recv()[4]["env_id"]
            envs.send(np.ones(len(ids), dtype=np.int64), ids)
        ids = envs.recv()[4]["env_id"]
        assert envs._pool.info_rows.set_rows()  # the last steps' infos are in rows
        envs.async_reset(env_ids=ids, options={"quiet": True})
        reset: dict[int, dict] = {}
        while len(reset) < len(ids):
            infos = envs.recv()[4]
            for k, i in enumerate(infos["env_id"].tolist()):
                if i in ids:
                    reset[i] = row_info(infos, k)
        assert reset == {i: {} for i in ids.tolist()}
