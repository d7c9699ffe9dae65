"""Tests for fastvec.layout and fastvec._kernels: spaces compiled to flat leaves in a segment.

The reference for every read is Gymnasium itself: ``read_batch`` must give what
``concatenate`` (and ``read_from_shared_memory``) give for the same samples, and
``read_row(i)`` what ``iterate(batch_space(space, n), batch)`` yields for env ``i``.
"""

from __future__ import annotations

import copy
import multiprocessing as mp
import re
import subprocess
import sys
import textwrap
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import pytest
from gymnasium.error import CustomSpaceError
from gymnasium.spaces import (
    Box,
    Dict,
    Discrete,
    Graph,
    MultiBinary,
    MultiDiscrete,
    OneOf,
    Sequence,
    Space,
    Text,
    Tuple,
)
from gymnasium.utils.env_checker import data_equivalence
from gymnasium.vector.utils import (
    batch_space,
    concatenate,
    create_empty_array,
    create_shared_memory,
    iterate,
    read_from_shared_memory,
    write_to_shared_memory,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastvec
import fastvec.layout
from conftest import bound_layout, segment_name
from fastvec._kernels import Segment
from fastvec.layout import Layout

BATCH_SIZES = [1, 3, 8]
JOIN_TIMEOUT = 60.0

PROPERTY_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- space strategies -------------------------------------------------------------------------
BOOL = np.dtype(np.bool_)
FLOAT_DTYPES = [np.dtype(t) for t in (np.float16, np.float32, np.float64)]
INT_DTYPES = [np.dtype(t) for t in (np.int8, np.int16, np.int32, np.int64,
                                    np.uint8, np.uint16, np.uint32, np.uint64)]
CHARSETS = ["abc", "01", "xyz !?", "αβγδ", "日本語", None]  # None: Gymnasium's alphanumerics
DICT_KEYS = ["pos", "vel", "camera", "id", "z", "a", "mask"]

shapes = st.lists(st.integers(1, 3), max_size=3).map(tuple)


@st.composite
def boxes(draw) -> Box:
    dtype = draw(st.sampled_from([*FLOAT_DTYPES, *INT_DTYPES, BOOL]))
    shape = draw(shapes)
    if dtype == BOOL:
        return Box(0, 1, shape, dtype)
    if dtype.kind == "f":
        limit = 6e4 if dtype.itemsize == 2 else 1e9
        low = draw(st.floats(-limit, limit, width=16 if dtype.itemsize == 2 else 32))
        high = draw(st.floats(low, limit, width=16 if dtype.itemsize == 2 else 32))
        return Box(low, high, shape, dtype)
    info = np.iinfo(dtype)
    # 64-bit bounds are kept where Gymnasium's float64-based sampler stays exact.
    lowest, highest = max(int(info.min), -(2**40)), min(int(info.max), 2**40)
    low = draw(st.integers(lowest, highest))
    high = draw(st.integers(low, highest))
    return Box(low, high, shape, dtype)


@st.composite
def discretes(draw) -> Discrete:
    dtype = draw(st.sampled_from(INT_DTYPES))
    start = draw(st.integers(0 if dtype.kind == "u" else -10, 10))
    return Discrete(draw(st.integers(1, 10)), start=start, dtype=dtype)


@st.composite
def multi_discretes(draw) -> MultiDiscrete:
    shape = draw(st.one_of(st.tuples(st.integers(1, 4)),
                           st.tuples(st.integers(1, 3), st.integers(1, 3))))
    nvec = np.array(draw(st.lists(st.integers(1, 6), min_size=int(np.prod(shape)),
                                  max_size=int(np.prod(shape))))).reshape(shape)
    dtype = draw(st.sampled_from([np.int64, np.int32]))
    start = None
    if draw(st.booleans()):
        start = np.array(draw(st.lists(st.integers(-5, 5), min_size=nvec.size,
                                       max_size=nvec.size))).reshape(shape)
    return MultiDiscrete(nvec, dtype=dtype, start=start)


@st.composite
def multi_binaries(draw) -> MultiBinary:
    n = draw(st.one_of(st.integers(1, 6), st.tuples(st.integers(1, 3), st.integers(1, 3))))
    return MultiBinary(n)


@st.composite
def texts(draw) -> Text:
    max_length = draw(st.integers(1, 8))
    min_length = draw(st.integers(0, max_length))
    charset = draw(st.sampled_from(CHARSETS))
    if charset is None:
        return Text(max_length, min_length=min_length)
    return Text(max_length, min_length=min_length, charset=charset)


leaf_spaces = st.one_of(boxes(), discretes(), multi_discretes(), multi_binaries(), texts())


def nested_spaces(depth: int) -> st.SearchStrategy[Space]:
    """Spaces whose containers (Tuple, Dict, OneOf) nest at most ``depth`` deep."""
    if depth == 0:
        return leaf_spaces
    children = nested_spaces(depth - 1)
    tuples = st.lists(children, min_size=1, max_size=3).map(Tuple)
    # Built from pairs so that the drawn (unsorted) key order is the space's order.
    dicts = st.lists(st.sampled_from(DICT_KEYS), min_size=1, max_size=3, unique=True).flatmap(
        lambda keys: st.tuples(*[children for _ in keys]).map(
            lambda subs, keys=keys: Dict(list(zip(keys, subs, strict=True)))))
    oneofs = st.lists(children, min_size=1, max_size=3).map(OneOf)
    # One draw picks the kind: st.one_of would flatten leaf_spaces' five branches into its
    # own and make leaves five times likelier than each container.
    by_kind = {"leaf": leaf_spaces, "tuple": tuples, "dict": dicts, "oneof": oneofs}
    return st.sampled_from(list(by_kind)).flatmap(by_kind.__getitem__)


@st.composite
def seeded_spaces(draw, depth: int = 3) -> Space:
    space = draw(nested_spaces(depth))
    space.seed(draw(st.integers(0, 2**32 - 1)))
    return space


# -- expected values, from Gymnasium ---------------------------------------------------------
def expected_batch(space: Space, samples: list) -> object:
    """``concatenate``'s batch, with each OneOf entry shaped as a row (see ``_oneof_row``)."""
    batch = concatenate(space, samples, create_empty_array(space, len(samples)))
    return _normalise_batch(space, batch)


def expected_rows(space: Space, samples: list) -> list:
    """What ``iterate(batch_space(space, n), batch)`` yields for each env."""
    batch = concatenate(space, samples, create_empty_array(space, len(samples)))
    return [_normalise_row(space, row) for row in iterate(batch_space(space, len(samples)), batch)]


def _normalise_row(space: Space, row: object) -> object:
    # Gymnasium's shared-memory reader gives a OneOf entry as (np.int64 index, the chosen
    # subspace's row), e.g. a numpy scalar rather than a 0-d array for a ()-shaped Box.
    if isinstance(space, OneOf):
        index, sample = row
        return (np.int64(index), expected_rows(space.spaces[index], [sample])[0])
    if isinstance(space, Tuple):
        return tuple(_normalise_row(sub, item) for sub, item in zip(space.spaces, row, strict=True))
    if isinstance(space, Dict):
        return {key: _normalise_row(sub, row[key]) for key, sub in space.spaces.items()}
    return row


def _normalise_batch(space: Space, batch: object) -> object:
    if isinstance(space, OneOf):
        return tuple(_normalise_row(space, item) for item in batch)
    if isinstance(space, Tuple):
        return tuple(_normalise_batch(sub, item)
                     for sub, item in zip(space.spaces, batch, strict=True))
    if isinstance(space, Dict):
        return {key: _normalise_batch(sub, batch[key]) for key, sub in space.spaces.items()}
    return batch


def contains_kind(space: Space, kinds: tuple[type, ...]) -> bool:
    if isinstance(space, kinds):
        return True
    if isinstance(space, (Tuple, OneOf)):
        return any(contains_kind(sub, kinds) for sub in space.spaces)
    if isinstance(space, Dict):
        return any(contains_kind(sub, kinds) for sub in space.spaces.values())
    return False


def gymnasium_reads_correctly(space: Space) -> bool:
    """False where Gymnasium's shared-memory reader is itself wrong: a OneOf with a Tuple or
    Dict subspace (it indexes the subspace's batch as if it were an array)."""
    if isinstance(space, OneOf):
        return all(not isinstance(sub, (Tuple, Dict)) and gymnasium_reads_correctly(sub)
                   for sub in space.spaces)
    if isinstance(space, Tuple):
        return all(gymnasium_reads_correctly(sub) for sub in space.spaces)
    if isinstance(space, Dict):
        return all(gymnasium_reads_correctly(sub) for sub in space.spaces.values())
    return True


def as_plain_python(space: Space, value: object) -> object:
    """The same sample as lists, ints and floats, dict keys reversed: the slow path's input."""
    if isinstance(space, Dict):
        return {key: as_plain_python(space.spaces[key], value[key])
                for key in reversed(list(space.spaces))}
    if isinstance(space, Tuple):
        return [as_plain_python(sub, item) for sub, item in zip(space.spaces, value, strict=True)]
    if isinstance(space, OneOf):
        index = int(value[0])
        return [index, as_plain_python(space.spaces[index], value[1])]
    if isinstance(space, Text):
        return value
    return np.asarray(value).tolist()


def assert_equivalent(actual: object, expected: object) -> None:
    assert data_equivalence(actual, expected, exact=True), (
        f"\nactual:   {actual!r}\nexpected: {expected!r}")
    assert_key_order(actual, expected)


def assert_key_order(actual: object, expected: object) -> None:
    if isinstance(expected, dict):
        assert list(actual) == list(expected), f"key order {list(actual)} != {list(expected)}"
        for key in expected:
            assert_key_order(actual[key], expected[key])
    elif isinstance(expected, tuple):
        for a, e in zip(actual, expected, strict=True):
            assert_key_order(a, e)


def segment_bytes(shm: shared_memory.SharedMemory) -> bytes:
    return bytes(shm.buf)


# -- round trips against Gymnasium ------------------------------------------------------------
@pytest.mark.parametrize("n", BATCH_SIZES)
@PROPERTY_SETTINGS
@given(space=seeded_spaces())
def test_write_row_round_trip(n: int, space: Space) -> None:
    first = [space.sample() for _ in range(n)]
    second = [space.sample() for _ in range(n)]
    with bound_layout(space, n) as (layout, _):
        # Plain lists and ints take the converting path; the samples themselves the fast path.
        for env, sample in enumerate(first):
            layout.write_row(as_plain_python(space, sample), env)
        assert_equivalent(layout.read_batch(copy=True), expected_batch(space, first))

        for env, sample in enumerate(second):
            layout.write_row(sample, env)
        expected = expected_batch(space, second)
        assert_equivalent(layout.read_batch(copy=True), expected)
        assert_equivalent(layout.read_batch(copy=False), expected)
        if not contains_kind(space, (Text, OneOf)):
            assert_equivalent(layout.read_batch(), concatenate(space, second,
                                                               create_empty_array(space, n)))

        for env, row in enumerate(expected_rows(space, second)):
            assert_equivalent(layout.read_row(env, copy=True), row)
            assert_equivalent(layout.read_row(env, copy=False), row)


@pytest.mark.parametrize("n", BATCH_SIZES)
@PROPERTY_SETTINGS
@given(space=seeded_spaces())
def test_matches_gymnasium_shared_memory(n: int, space: Space) -> None:
    samples = [space.sample() for _ in range(n)]
    reference = create_shared_memory(space, n, ctx=mp)
    for env, sample in enumerate(samples):
        write_to_shared_memory(space, env, sample, reference)
    with bound_layout(space, n) as (layout, _):
        for env, sample in enumerate(samples):
            layout.write_row(sample, env)
        if gymnasium_reads_correctly(space):
            assert_equivalent(layout.read_batch(), read_from_shared_memory(space, reference, n))
        else:
            assert_equivalent(layout.read_batch(), expected_batch(space, samples))


@pytest.mark.parametrize("n", BATCH_SIZES)
@PROPERTY_SETTINGS
@given(space=seeded_spaces())
def test_write_batch_round_trip(n: int, space: Space) -> None:
    batched = batch_space(space, n)
    batch = batched.sample()
    expected = _normalise_batch(space, batch)
    with bound_layout(space, n, check_range=False, path="actions") as (layout, _):
        layout.write_batch(batch)
        assert_equivalent(layout.read_batch(copy=True), expected)
        assert_equivalent(layout.read_batch(copy=False), expected)
        for env, row in enumerate(iterate(batched, batch)):
            assert_equivalent(layout.read_row(env), _normalise_row(space, row))


@pytest.mark.parametrize("n", BATCH_SIZES)
@PROPERTY_SETTINGS
@given(space=seeded_spaces(), data=st.data())
def test_write_rows_writes_each_row_where_write_row_would(n: int, space: Space,
                                                          data: st.DataObject) -> None:
    ids = data.draw(st.permutations(range(n)).flatmap(
        lambda order: st.integers(1, n).map(lambda k: list(order[:k]))))
    batched = batch_space(space, len(ids))
    batch, filler = batched.sample(), batch_space(space, n).sample()
    with bound_layout(space, n, check_range=False, path="actions") as (layout, _), \
            bound_layout(space, n, check_range=False, path="actions") as (reference, _):
        layout.write_batch(filler)
        reference.write_batch(filler)
        layout.write_rows(batch, ids)
        for k, row in enumerate(iterate(batched, batch)):
            reference.write_row(row, ids[k])
        assert_equivalent(layout.read_batch(), reference.read_batch())
        # plain lists take the converting path to the same rows
        if not contains_kind(space, (Text, OneOf)):
            layout.write_batch(filler)
            layout.write_rows(as_plain_python(batched, batch), ids)
            assert_equivalent(layout.read_batch(), reference.read_batch())


def test_write_rows_checks_ids_and_writes_nothing_it_refuses() -> None:
    space = Dict([("move", Box(-1, 1, (2,), np.float32)), ("jump", Discrete(2))])
    with bound_layout(space, 4, check_range=False, path="actions") as (layout, shm):
        layout.write_batch({"move": np.ones((4, 2), np.float32), "jump": np.ones(4, np.int64)})
        before = segment_bytes(shm)
        with pytest.raises(IndexError):
            layout.write_rows({"move": np.zeros((1, 2), np.float32),
                               "jump": np.zeros(1, np.int64)}, [4])
        with pytest.raises(ValueError, match=re.escape('actions["jump"]:')):
            layout.write_rows({"move": np.zeros((2, 2), np.float32),
                               "jump": np.zeros(3, np.int64)}, [3, 1])
        assert segment_bytes(shm) == before
        layout.write_rows({"move": np.full((2, 2), 0.5, np.float32),
                           "jump": np.zeros(2, np.int64)}, [3, 1])
        batch = layout.read_batch()
        np.testing.assert_array_equal(batch["jump"], [1, 0, 1, 0])
        np.testing.assert_array_equal(batch["move"][:, 0], [1, 0.5, 1, 0.5])


def test_dict_key_order_is_the_space_order() -> None:
    space = Dict([("z", Discrete(3)), ("a", Box(0, 1, (2,))), ("m", Text(3))], seed=1)
    sample = space.sample()
    with bound_layout(space, 2) as (layout, _):
        layout.write_row(sample, 0)
        layout.write_row({k: sample[k] for k in ("m", "a", "z")}, 1)
        assert list(layout.read_batch()) == ["z", "a", "m"]
        assert list(layout.read_row(1)) == ["z", "a", "m"]
        assert_equivalent(layout.read_row(1), layout.read_row(0))


def test_unsized_box_reads_a_numpy_scalar_per_env() -> None:
    space = Box(-1.0, 1.0, (), np.float32)
    with bound_layout(space, 3) as (layout, _):
        for env, value in enumerate([0.5, -0.25, 1.0]):
            layout.write_row(np.float32(value), env)
        assert layout.read_row(1) == np.float32(-0.25)
        assert type(layout.read_row(1)) is np.float32
        assert_equivalent(layout.read_batch(), np.array([0.5, -0.25, 1.0], np.float32))


def test_int64_leaf_accepts_every_int64_flavour() -> None:
    # np.longlong and np.int64 are equal dtypes with different buffer format characters.
    space = Dict([("box", Box(-10, 10, (3,), np.int64)), ("u", Box(0, 10, (2,), np.uint64))])
    with bound_layout(space, 2) as (layout, _):
        layout.write_row({"box": np.array([1, -2, 3], np.longlong),
                           "u": np.array([4, 5], np.ulonglong)}, 1)
        assert_equivalent(layout.read_row(1), {"box": np.array([1, -2, 3], np.int64),
                                                "u": np.array([4, 5], np.uint64)})
        layout.write_batch({"box": np.ones((2, 3), np.longlong),
                            "u": np.ones((2, 2), np.ulonglong)})
        assert_equivalent(layout.read_row(0), {"box": np.ones(3, np.int64),
                                                "u": np.ones(2, np.uint64)})


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
def test_discrete_keeps_its_dtype(dtype: np.dtype) -> None:
    # Gymnasium batches Discrete(..., dtype) as MultiDiscrete of that dtype: observations,
    # actions and each env's row keep it, whether written as a numpy scalar or a plain int
    start = 1 if dtype.kind == "u" else -2
    space = Discrete(5, start=start, dtype=dtype, seed=3)
    samples = [space.sample() for _ in range(3)]
    assert all(sample.dtype == dtype for sample in samples)
    with bound_layout(space, 3) as (layout, _):
        assert layout.leaves[0].dtype == dtype
        for env, sample in enumerate(samples):
            layout.write_row(sample if env % 2 else int(sample), env)
        assert_equivalent(layout.read_batch(), expected_batch(space, samples))
        for env, row in enumerate(expected_rows(space, samples)):
            assert_equivalent(layout.read_row(env), row)
        with pytest.raises(ValueError, match=re.escape(f"in [{start}, {start + 4}]")):
            layout.write_row(start + 5, 0)
    batched = batch_space(space, 3)
    with bound_layout(space, 3, check_range=False, path="actions") as (layout, _):
        batch = batched.sample()
        layout.write_batch(batch)
        assert_equivalent(layout.read_batch(), batch)
        for env, row in enumerate(iterate(batched, batch)):
            assert_equivalent(layout.read_row(env), row)
        # an action outside the space reaches the env (it checks), one outside the dtype not
        info = np.iinfo(dtype)
        low, high = max(int(info.min), -(2**63)), min(int(info.max), 2**63 - 1)
        layout.write_row(high, 0)
        assert layout.read_row(0) == high and layout.read_row(0).dtype == dtype
        with pytest.raises(ValueError, match=re.escape(f"in [{low}, {high}]")):
            layout.write_row(low - 1, 1)


@pytest.mark.parametrize("value", [
    np.arange(6, dtype=np.float32).reshape(3, 2).T,             # not contiguous
    np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
    np.arange(6, dtype=np.float64).reshape(2, 3),               # float64 into float32
    np.arange(6, dtype=np.int16).reshape(2, 3),                 # ints into a float leaf
    np.arange(6, dtype=np.float32).reshape(2, 3).astype(">f4"),  # other byte order
    [[0, 1, 2], [3, 4, 5]],
], ids=["transposed", "fortran", "float64", "int16", "big-endian", "lists"])
def test_write_row_converts_safe_values(value) -> None:
    with bound_layout(Box(0, 10, (2, 3), np.float32), 2) as (layout, _):
        layout.write_row(value, 1)
        np.testing.assert_array_equal(layout.read_row(1), np.asarray(value, np.float32))
        assert layout.read_row(1).dtype == np.float32


# -- the bound row access of a per-step loop ---------------------------------------------------
@pytest.mark.parametrize("n", BATCH_SIZES)
@PROPERTY_SETTINGS
@given(space=seeded_spaces())
def test_row_writer_and_reader_do_what_write_row_and_read_row_do(n: int, space: Space) -> None:
    samples = [space.sample() for _ in range(n)]
    with bound_layout(space, n) as (layout, _):
        write, read = layout.row_writer(), layout.row_reader()
        for env, sample in enumerate(samples):
            assert write(sample, env)  # a space's own samples need no converting
        expected = expected_batch(space, samples)
        assert_equivalent(layout.read_batch(copy=True), expected)
        for env, row in enumerate(expected_rows(space, samples)):
            assert_equivalent(read(env), row)
            assert_equivalent(read(env), layout.read_row(env))


def test_row_writer_refuses_what_needs_converting_and_writes_nothing() -> None:
    with bound_layout(Box(0, 10, (2, 3), np.float32), 2) as (layout, _):
        write = layout.row_writer()
        before = layout.read_batch(copy=True)
        lists = [[0, 1, 2], [3, 4, 5]]
        assert not write(np.arange(6, dtype=np.float64).reshape(2, 3), 1)
        assert not write(lists, 1)
        np.testing.assert_array_equal(layout.read_batch(copy=True), before)
        layout.write_row(lists, 1)  # the converting write the refusal calls for
        np.testing.assert_array_equal(layout.read_row(1), np.asarray(lists, np.float32))
        row = layout.row_reader()(1)
        row[:] = 9  # a copy: the segment keeps its row
        np.testing.assert_array_equal(layout.read_row(1), np.asarray(lists, np.float32))


def test_row_access_needs_a_bound_layout() -> None:
    layout = Layout(Box(0, 1, (2,), np.float32), 2)
    with pytest.raises(RuntimeError, match="not bound"):
        layout.row_writer()


# -- Text and OneOf are decoded on every read ------------------------------------------------
def test_text_is_decoded_on_every_read() -> None:
    space = Dict([("name", Text(6, min_length=0, charset="abcdef")), ("x", Discrete(2))])
    with bound_layout(space, 2) as (layout, _):
        layout.write_row({"name": "abc", "x": 1}, 0)
        layout.write_row({"name": "", "x": 0}, 1)
        assert layout.read_batch(copy=False)["name"] == ("abc", "")
        assert layout.read_row(0)["name"] == "abc"

        layout.write_row({"name": "fedcba", "x": 1}, 0)
        layout.write_row({"name": "f", "x": 0}, 1)
        assert layout.read_batch(copy=False)["name"] == ("fedcba", "f")
        assert layout.read_batch(copy=True)["name"] == ("fedcba", "f")
        assert layout.read_row(0, copy=False)["name"] == "fedcba"

        layout.write_row({"name": "a", "x": 1}, 0)  # shorter: no stale tail
        assert layout.read_row(0)["name"] == "a"


def test_oneof_is_decoded_on_every_read() -> None:
    space = OneOf([Box(0, 1, (2,), np.float32), Discrete(5, start=10), Text(3, charset="ab")])
    with bound_layout(space, 2) as (layout, _):
        layout.write_row((0, np.array([0.25, 0.5], np.float32)), 0)
        layout.write_row((1, 12), 1)
        assert_equivalent(layout.read_batch(copy=False),
                          ((np.int64(0), np.array([0.25, 0.5], np.float32)),
                           (np.int64(1), np.int64(12))))

        layout.write_row((2, "ba"), 0)
        layout.write_row((0, np.array([1.0, 0.0], np.float32)), 1)
        expected = ((np.int64(2), "ba"), (np.int64(0), np.array([1.0, 0.0], np.float32)))
        assert_equivalent(layout.read_batch(copy=False), expected)
        assert_equivalent(layout.read_batch(copy=True), expected)
        assert_equivalent(layout.read_row(0), expected[0])
        assert_equivalent(layout.read_row(1, copy=False), expected[1])


# -- copy semantics ---------------------------------------------------------------------------
COPY_SPACE = Dict([
    ("image", Box(0, 255, (2, 3), np.uint8)),
    ("scalar", Box(-1.0, 1.0, (), np.float32)),
    ("index", Discrete(5)),
    ("name", Text(4, charset="abcd")),
    ("either", OneOf([Box(0, 1, (2,), np.float32), Discrete(3)])),
])


def _copy_space_sample(fill: int) -> dict:
    return {
        "image": np.full((2, 3), fill, np.uint8),
        "scalar": np.array(fill / 10, np.float32),
        "index": np.int64(fill),
        "name": "abcd"[: fill] or "a",
        "either": (np.int64(0), np.full(2, fill / 10, np.float32)),
    }


def test_copied_reads_never_change_after_later_writes() -> None:
    with bound_layout(COPY_SPACE, 3) as (layout, shm):
        for env in range(3):
            layout.write_row(_copy_space_sample(1), env)
        batch = layout.read_batch(copy=True)
        row = layout.read_row(2, copy=True)
        batch_before, row_before = copy.deepcopy(batch), copy.deepcopy(row)

        for env in range(3):
            layout.write_row(_copy_space_sample(4), env)
        layout.write_batch(layout.read_batch(copy=True))

        assert_equivalent(batch, batch_before)
        assert_equivalent(row, row_before)
        buffer = np.frombuffer(shm.buf, np.uint8)
        for array in (batch["image"], batch["scalar"], batch["index"], row["image"],
                      batch["either"][0][1], row["either"][1]):
            assert not np.shares_memory(array, buffer)
        del buffer


def test_uncopied_reads_are_views_that_follow_later_writes() -> None:
    with bound_layout(COPY_SPACE, 3) as (layout, _shm):
        for env in range(3):
            layout.write_row(_copy_space_sample(1), env)
        batch = layout.read_batch(copy=False)
        row = layout.read_row(2, copy=False)

        for env in range(3):
            layout.write_row(_copy_space_sample(4), env)

        new = _copy_space_sample(4)
        assert (batch["image"] == new["image"]).all()
        assert (batch["scalar"] == new["scalar"]).all()
        assert (batch["index"] == new["index"]).all()
        assert (row["image"] == new["image"]).all()
        assert (batch["either"][0][1] == new["either"][1]).all()
        assert (row["either"][1] == new["either"][1]).all()
        # Decoded values are values: the next read decodes the new ones.
        assert batch["name"] == ("a",) * 3
        assert layout.read_batch(copy=False)["name"] == ("abcd",) * 3
        del batch, row


def test_live_views_keep_the_segment_from_closing() -> None:
    # A view must pin the mapping: were the segment unmapped under it, the next read of the
    # view would touch freed memory.
    layout = Layout(Dict([("a", Box(0, 1, (2,), np.float32)), ("b", Discrete(3))]), 2)
    shm = shared_memory.SharedMemory(create=True, size=layout.nbytes, name=segment_name())
    segment = Segment(shm.buf)
    layout.bind(segment, shm.buf)
    layout.write_row({"a": np.ones(2, np.float32), "b": 2}, 1)
    batch = layout.read_batch(copy=False)
    row = layout.read_row(1, copy=False)
    layout.unbind()
    segment.release()
    try:
        with pytest.raises(BufferError):
            shm.close()
        del batch
        with pytest.raises(BufferError):
            shm.close()
        assert (row["a"] == 1).all()
        del row
        shm.close()
    finally:
        shm.unlink()


# -- across processes -------------------------------------------------------------------------
def attach_and_write(name: str, space: Space, n: int, samples: dict[int, object]) -> None:
    """Child side: attach the parent's segment by name, lay it out, write, detach."""
    # Children share the parent's resource tracker, whose registry is a set: attaching
    # (which registers the name again before 3.13) is harmless, but unregistering here
    # would delete the parent's entry and make its unlink fail inside the tracker.
    options = {"track": False} if sys.version_info >= (3, 13) else {}
    shm = shared_memory.SharedMemory(name=name, **options)
    try:
        layout = Layout(space, n)
        segment = Segment(shm.buf)
        try:
            layout.bind(segment, shm.buf)
            for env, sample in samples.items():
                layout.write_row(sample, env)
        finally:
            layout.unbind()
            segment.release()
    finally:
        shm.close()


CROSS_PROCESS_SPACE = Dict([
    ("image", Box(0, 255, (4, 4, 3), np.uint8)),
    ("pose", Tuple([Box(-1.0, 1.0, (3,), np.float64), Box(-1, 1, (), np.float16)])),
    ("mode", Discrete(4, start=-1)),
    ("goal", Text(5, min_length=1, charset="nsew")),
    ("sensor", OneOf([MultiBinary((2, 2)), MultiDiscrete([3, 4]), Box(0, 1, (2,), np.bool_)])),
])


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_segment_written_in_another_process(method: str) -> None:
    space = copy.deepcopy(CROSS_PROCESS_SPACE)
    space.seed(7)
    n = 4
    samples = {env: space.sample() for env in range(n)}
    with bound_layout(space, n) as (layout, shm):
        child = mp.get_context(method).Process(target=attach_and_write,
                                               args=(shm.name, space, n, samples))
        child.start()
        child.join(JOIN_TIMEOUT)
        assert child.exitcode == 0
        assert_equivalent(layout.read_batch(), expected_batch(space, list(samples.values())))


TRACKER_SCRIPT = """
import multiprocessing as mp
import sys
sys.path.insert(0, {tests!r})
from conftest import bound_layout
from test_layout import CROSS_PROCESS_SPACE, attach_and_write

if __name__ == "__main__":
    for method in ("fork", "spawn"):
        with bound_layout(CROSS_PROCESS_SPACE, 2) as (layout, shm):
            sample = CROSS_PROCESS_SPACE.sample()
            child = mp.get_context(method).Process(
                target=attach_and_write, args=(shm.name, CROSS_PROCESS_SPACE, 2, {{1: sample}}))
            child.start()
            child.join(60)
            assert child.exitcode == 0, child.exitcode
            assert layout.read_row(1)["goal"] == sample["goal"]
    print("done")
"""


def test_attaching_children_leave_the_resource_tracker_quiet(tmp_path: Path) -> None:
    # The tracker reports at its own exit, after every test here: watch a fresh one.
    script = tmp_path / "attach.py"
    script.write_text(textwrap.dedent(TRACKER_SCRIPT.format(tests=str(Path(__file__).parent))))
    result = subprocess.run([sys.executable, "-W", "error", str(script)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("done")
    for symptom in ("resource_tracker", "leaked", "Traceback", "KeyError", "Warning"):
        assert symptom not in result.stderr, result.stderr


# -- errors: clear, named, and nothing half-written -------------------------------------------
ERROR_SPACE = Dict([
    ("camera", Tuple([Box(0, 255, (2, 2), np.uint8), Box(-1.0, 1.0, (3,), np.float32)])),
    ("flags", Box(0, 1, (2,), np.bool_)),
    ("small", Box(-5, 5, (2,), np.int8)),
    ("count", Discrete(4, start=-2)),
    ("label", Text(4, min_length=2, charset="abc")),
    ("choice", OneOf([Discrete(3), Box(0.0, 1.0, (2,), np.float32)])),
    ("nested", Dict([
        ("grid", MultiDiscrete([[2, 3], [4, 5]], start=[[1, 1], [0, 0]])),
        ("bits", MultiBinary(3)),
    ])),
])


def _set(path: tuple, new):
    """A mutation replacing the entry at ``path`` (dict keys / tuple indices) with ``new``."""
    def mutate(value):
        *parents, last = path
        holder = value
        trail = []
        for key in parents:
            trail.append((holder, key))
            holder = holder[key]
        if isinstance(holder, tuple):
            items = list(holder)
            items[last] = new
            rebuilt = tuple(items)
            parent, key = trail[-1]
            parent[key] = rebuilt
        else:
            holder[last] = new
        return value
    return mutate


def _delete(*path):
    def mutate(value):
        holder = value
        for key in path[:-1]:
            holder = holder[key]
        del holder[path[-1]]
        return value
    return mutate


def _replace(key, make):
    def mutate(value):
        value[key] = make(value[key])
        return value
    return mutate


ERROR_CASES = {
    "wrong shape": (_set(("camera", 0), np.zeros((2, 3), np.uint8)), 'obs["camera"][0]'),
    "wrong shape in second tuple item": (_set(("camera", 1), np.zeros(4, np.float32)),
                                         'obs["camera"][1]'),
    "scalar for an array": (_set(("camera", 1), 0.5), 'obs["camera"][1]'),
    "float into int leaf": (_set(("small",), np.array([1.5, 2.0])), 'obs["small"]'),
    "float32 into uint8 leaf": (_set(("camera", 0), np.zeros((2, 2), np.float32)),
                                'obs["camera"][0]'),
    "int into bool leaf": (_set(("flags",), np.array([1, 0])), 'obs["flags"]'),
    "python ints into bool leaf": (_set(("flags",), [1, 0]), 'obs["flags"]'),
    "out of range for int8": (_set(("small",), np.array([1, 300])), 'obs["small"]'),
    "out of range for int8, python list": (_set(("small",), [-200, 0]), 'obs["small"]'),
    "negative into uint8": (_set(("camera", 0), np.full((2, 2), -1)), 'obs["camera"][0]'),
    "256 into uint8": (_set(("camera", 0), np.full((2, 2), 256, np.int16)),
                       'obs["camera"][0]'),
    "float into MultiDiscrete": (_set(("nested", "grid"), np.ones((2, 2))),
                                 'obs["nested"]["grid"]'),
    "MultiBinary wrong shape": (_set(("nested", "bits"), np.ones(4, np.int8)),
                                'obs["nested"]["bits"]'),
    "missing key": (_delete("flags"), "obs", "flags"),
    "missing nested key": (_delete("nested", "bits"), 'obs["nested"]', "bits"),
    "extra key": (_set(("bogus",), 1), "obs", "bogus"),
    "not a dict": (_set(("nested",), [1, 2]), 'obs["nested"]'),
    "tuple too short": (_replace("camera", lambda t: t[:1]), 'obs["camera"]'),
    "tuple too long": (_replace("camera", lambda t: (*t, t[0])), 'obs["camera"]'),
    "text too long": (_set(("label",), "abcab"), 'obs["label"]'),
    "text too short": (_set(("label",), "a"), 'obs["label"]'),
    "text char outside charset": (_set(("label",), "abz"), 'obs["label"]', "z"),
    "text not a str": (_set(("label",), 12), 'obs["label"]'),
    "discrete above range": (_set(("count",), 2), 'obs["count"]'),
    "discrete below start": (_set(("count",), -3), 'obs["count"]'),
    "discrete numpy above range": (_set(("count",), np.int64(2)), 'obs["count"]'),
    "discrete float": (_set(("count",), 1.0), 'obs["count"]'),
    "oneof index too large": (_set(("choice",), (2, 0)), 'obs["choice"][0]'),
    "oneof negative index": (_set(("choice",), (-1, 0)), 'obs["choice"][0]'),
    "oneof float index": (_set(("choice",), (0.0, 0)), 'obs["choice"][0]'),
    "oneof not a pair": (_set(("choice",), (0,)), 'obs["choice"]'),
    "oneof child out of range": (_set(("choice",), (0, 3)), 'obs["choice"][1]'),
    "oneof child wrong shape": (_set(("choice",), (1, np.zeros(3, np.float32))),
                                'obs["choice"][1]'),
}


@pytest.mark.parametrize("case", list(ERROR_CASES), ids=list(ERROR_CASES))
def test_write_row_rejects_bad_values_naming_the_leaf(case: str) -> None:
    mutate, path, *mentions = ERROR_CASES[case]
    space = copy.deepcopy(ERROR_SPACE)
    space.seed(3)
    with bound_layout(space, 3) as (layout, shm):
        for env in range(3):
            layout.write_row(space.sample(), env)
        before = segment_bytes(shm)
        # A fresh sample, so that a partial write of its valid leaves would show in the bytes.
        bad = mutate(space.sample())
        with pytest.raises(ValueError, match=re.escape(path) + ":") as excinfo:
            layout.write_row(bad, 1)
        for mention in mentions:
            assert mention in str(excinfo.value)
        assert segment_bytes(shm) == before


def test_write_row_checks_the_env_index() -> None:
    with bound_layout(Discrete(3), 2) as (layout, _):
        with pytest.raises(IndexError):
            layout.write_row(0, 2)
        with pytest.raises(IndexError):
            layout.write_row(0, -1)


@pytest.mark.parametrize("bad, path", [
    ({"move": np.zeros((3, 2), np.float32), "jump": np.zeros(4, np.int64)}, 'actions["move"]'),
    ({"move": np.zeros((4, 2), np.float32), "jump": np.zeros(3, np.int64)}, 'actions["jump"]'),
    ({"move": np.zeros((4, 2), np.float32), "jump": np.zeros(4)}, 'actions["jump"]'),
    ({"move": np.zeros((4, 2), np.float32)}, "actions"),
])
def test_write_batch_rejects_bad_batches_naming_the_leaf(bad, path) -> None:
    space = Dict([("move", Box(-1, 1, (2,), np.float32)), ("jump", Discrete(2))])
    with bound_layout(space, 4, check_range=False, path="actions") as (layout, shm):
        layout.write_batch({"move": np.ones((4, 2), np.float32), "jump": np.ones(4, np.int64)})
        before = segment_bytes(shm)
        with pytest.raises(ValueError, match=re.escape(path) + ":"):
            layout.write_batch(bad)
        assert segment_bytes(shm) == before


def test_write_batch_of_text_needs_one_string_per_env() -> None:
    with bound_layout(Tuple([Text(3, charset="ab")]), 2, path="actions") as (layout, shm):
        before = segment_bytes(shm)
        for unsized in (np.array(0), 7):  # no length (a 0-d array's len() raises TypeError)
            with pytest.raises(ValueError, match=re.escape("actions[0]: expected a sequence")):
                layout.write_batch((unsized,))
            with pytest.raises(ValueError, match=re.escape("actions[0]: expected a sequence")):
                layout.write_rows((unsized,), [1, 0])
        with pytest.raises(ValueError, match=re.escape("actions[0]:")):
            layout.write_batch((("a", "b", "a"),))
        with pytest.raises(ValueError, match=re.escape("actions[0][1]:")):
            layout.write_batch((("a", "abab"),))
        assert segment_bytes(shm) == before


# -- unsupported and custom spaces ------------------------------------------------------------
@pytest.mark.parametrize("space", [
    Graph(node_space=Box(0, 1, (2,)), edge_space=Discrete(3)),
    Sequence(Discrete(3)),
    Dict([("ok", Discrete(2)), ("history", Sequence(Box(0, 1, (2,))))]),
    OneOf([Discrete(2), Graph(node_space=Discrete(2), edge_space=None)]),
], ids=["graph", "sequence", "sequence in dict", "graph in oneof"])
def test_dynamic_spaces_are_refused_with_advice(space: Space) -> None:
    with pytest.raises(fastvec.layout.DynamicShapeError) as excinfo:
        Layout(space, 2)
    assert isinstance(excinfo.value, TypeError)
    # Gymnasium's own sentence for the case, then fastvec's advice
    assert "has a dynamic shape so its not possible to make a static shared memory" in str(
        excinfo.value)
    assert "shared_memory=False" in str(excinfo.value)


class Unregistered(Space):
    def __init__(self) -> None:
        super().__init__((2,), np.float32)

    def sample(self, mask=None, probability=None):
        return np.zeros(2, np.float32)

    def contains(self, x) -> bool:
        return True


def test_discrete_beyond_int64_has_no_layout() -> None:
    # the kernels store an int64: such values would not survive, so there is no layout
    with pytest.raises(CustomSpaceError, match="beyond int64"):
        Layout(Discrete(4, start=2**63, dtype=np.uint64), 2)
    with pytest.raises(CustomSpaceError, match="beyond int64"):
        Layout(Dict({"id": Discrete(2, start=2**63 - 1, dtype=np.uint64)}), 2)


@pytest.mark.parametrize("space", [Unregistered(), Tuple([Discrete(2), Unregistered()])],
                         ids=["top level", "nested"])
def test_unknown_space_subclass_raises_custom_space_error(space: Space) -> None:
    with pytest.raises(CustomSpaceError):
        Layout(space, 2)


class Angles(Space):
    """A custom space of ``k`` angles in radians, sampled as float32."""

    def __init__(self, k: int, seed=None) -> None:
        self.k = k
        super().__init__((k,), np.float32, seed)

    def sample(self, mask=None, probability=None):
        return self.np_random.uniform(-np.pi, np.pi, self.k).astype(np.float32)

    def contains(self, x) -> bool:
        return isinstance(x, np.ndarray) and x.shape == (self.k,)


class Headings(Angles):
    """A subclass of a registered space uses its parent's layout."""


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fastvec.layout, "_custom_layouts", {})


@pytest.mark.usefixtures("fresh_registry")
def test_register_layout_end_to_end() -> None:
    fastvec.register_layout(Angles, lambda s: Box(-np.pi, np.pi, (s.k,), np.float32))
    space = Dict([("arm", Angles(3)), ("head", Headings(2)), ("grip", Discrete(2))], seed=5)
    samples = [space.sample() for _ in range(3)]
    with bound_layout(space, 3) as (layout, shm):
        for env, sample in enumerate(samples):
            layout.write_row(sample, env)
        batch = layout.read_batch()
        for env, sample in enumerate(samples):
            assert_equivalent(layout.read_row(env), sample)
            assert_equivalent(batch["arm"][env], sample["arm"])
        before = segment_bytes(shm)
        with pytest.raises(ValueError, match=re.escape('obs["arm"]:')):
            layout.write_row({**samples[0], "arm": np.zeros(4, np.float32)}, 0)
        assert segment_bytes(shm) == before


@pytest.mark.usefixtures("fresh_registry")
def test_register_layout_rejects_bad_registrations() -> None:
    with pytest.raises(TypeError):
        fastvec.register_layout(int, lambda s: Discrete(2))
    with pytest.raises(TypeError):
        fastvec.register_layout(Angles, "not callable")
    fastvec.register_layout(Angles, lambda s: "not a space")
    with pytest.raises(TypeError, match="Angles"):
        Layout(Angles(2), 2)


def test_layout_refuses_a_segment_that_is_too_small() -> None:
    layout = Layout(Box(0, 1, (100,), np.float64), 2)
    shm = shared_memory.SharedMemory(create=True, size=64, name=segment_name())
    segment = Segment(shm.buf)
    try:
        with pytest.raises(ValueError, match="bytes"):
            layout.bind(segment, shm.buf)
    finally:
        layout.unbind()
        segment.release()
        shm.close()
        shm.unlink()


def test_leaves_are_aligned_and_disjoint() -> None:
    space = Dict([("a", Box(0, 1, (3,), np.float16)), ("b", Discrete(3)),
                  ("c", Text(5)), ("d", OneOf([MultiBinary(3), Box(0, 1, (), np.float64)]))])
    layout = Layout(space, 5, base_offset=128)
    assert layout.offset == 128
    end = 128
    for leaf in layout.leaves:
        assert leaf.offset % fastvec.layout.ALIGNMENT == 0
        assert leaf.offset >= end
        end = leaf.offset + leaf.nbytes
    assert layout.offset + layout.nbytes >= end
    with pytest.raises(ValueError):
        Layout(space, 5, base_offset=100)
    with pytest.raises(ValueError):
        Layout(space, 0)
