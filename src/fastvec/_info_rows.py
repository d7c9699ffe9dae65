"""Small infos in the segment: a step's info of a few scalars goes into its env's row.

Many envs return the same few scalars every step (ALE's ``lives`` and frame numbers,
MuJoCo's rewards and positions). Pickled through the pipe they cost a message per worker per
step (per env, in partial batches): a pickle, a write, a poll and two reads, on the worker
that should be stepping and on the parent that should be returning. Instead, each env has a
row of :data:`ROW` bytes in the segment: a state word (1: this step's info is in the row),
then the values.

What the values mean is the env's *schema*: the keys of its info and the type of each value,
in order. Both sides keep, per env, the schema of the last info of that env that crossed the
pipe (``None`` when it does not fit a row: a nested dict, an array, an object, too many
values). A worker writes a step's info into the row only when it has exactly that schema,
and sends it by pipe otherwise; the parent reads a row with the schema it learned from that
same message. Each side learns where the message is (un)pickled, for every info a message
holds, so the two never disagree: a worker cannot write a row before the parent has read the
message that taught it, because the parent reads every message of an env before it can send
that env its next command. A replaced worker starts knowing nothing, and the parent forgets
its envs' schemas and clears their rows before the replacement starts.

The values round-trip exactly: Python ``bool``, ``int`` (int64's range) and ``float``, and
NumPy's bool, integer and float16/32/64 scalars, each coming back as its own type. An info
with anything else goes by pipe, as before.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["MAX_VALUES", "ROW", "InfoRows", "Schema", "schema_of"]

#: Bytes per env: the state word, then up to MAX_VALUES values of 8 bytes.
ROW = 128
MAX_VALUES = ROW // 8 - 1
_VALUES = 8  # offset of the values in a row
_WORDS = ROW // 8  # a row's length in state words: env j's state is word j * _WORDS

# a value's type -> its struct code and what turns the unpacked Python value back into it
_CODES: dict[type, tuple[str, Callable[[Any], Any] | None]] = {
    bool: ("?", None), int: ("q", None), float: ("d", None), np.bool_: ("?", np.bool_),
}
_NUMPY: list[tuple[str, list[type[Any]]]] = [
    ("q", [np.int8, np.int16, np.int32, np.int64]),
    ("Q", [np.uint8, np.uint16, np.uint32, np.uint64]),
    ("d", [np.float16, np.float32, np.float64]),  # float16 and float32 are exact in a double
]
for _code, _types in _NUMPY:
    for _t in _types:
        _CODES[_t] = (_code, _t)


class Schema:
    """The keys of an info and the types of its values, with the struct that packs them."""

    __slots__ = ("columns", "convert", "dtypes", "keys", "struct", "types")

    def __init__(self, keys: tuple[Any, ...], types: tuple[type, ...]) -> None:
        self.keys = keys
        self.types = types
        self.struct = struct.Struct("<" + "".join(_CODES[t][0] for t in types))
        converters = tuple(_CODES[t][1] for t in types)
        self.convert = converters if any(c is not None for c in converters) else None
        # whether Gymnasium's batching of infos of this schema is one array and one mask per
        # key (not so for its "final_obs", or a key whose mask's name is another key)
        self.columns = "final_obs" not in keys and not any(f"_{k}" in keys for k in keys)
        # each value's array in Gymnasium's batch: of the value's type for Python's bool, int
        # and float and NumPy's numbers, else of objects (NumPy's bool is no np.number)
        self.dtypes = tuple(t if t in (bool, int, float) or issubclass(t, np.number)
                            else object for t in types)

    def fits(self, info: Mapping[str, Any]) -> bool:
        """Whether ``info`` has exactly these keys, in this order, with these value types."""
        return (len(info) == len(self.keys) and tuple(info) == self.keys
                and tuple(map(type, info.values())) == self.types)

    def decode(self, values: tuple[Any, ...]) -> dict[str, Any]:
        if self.convert is not None:
            values = tuple(v if c is None else c(v)
                           for c, v in zip(self.convert, values, strict=True))
        return dict(zip(self.keys, values, strict=True))


_KNOWN: dict[tuple[tuple[Any, ...], tuple[type, ...]], Schema] = {}


def schema_of(info: Mapping[str, Any]) -> Schema | None:
    """The schema of ``info``, or None if it does not fit a row (or is empty)."""
    if not info or len(info) > MAX_VALUES:
        return None
    types = tuple(map(type, info.values()))
    if not all(t in _CODES for t in types):
        return None
    keys = tuple(info)
    schema = _KNOWN.get((keys, types))
    if schema is None:
        if len(_KNOWN) >= 1024:  # envs whose keys never repeat: keep the cache bounded
            _KNOWN.clear()
        schema = _KNOWN[(keys, types)] = Schema(keys, types)
    return schema


class InfoRows:
    """One side's view of the info rows of envs ``first .. first + count - 1``, with the
    schema each of them last taught this side through the pipe."""

    def __init__(self, buffer: memoryview, offset: int, first: int, count: int) -> None:
        self.first = first
        self._bytes: memoryview | None = buffer[offset + first * ROW:
                                                offset + (first + count) * ROW]
        self._words: memoryview | None = self._bytes.cast("q")
        self._schemas: list[Schema | None] = [None] * count
        #: how many envs have a schema (none: no row can be set, nothing to read)
        self.learned = 0

    def release(self) -> None:
        """Drop the views into the segment."""
        for view in (self._words, self._bytes):
            if view is not None:
                view.release()
        self._words = self._bytes = None

    # -- both sides ------------------------------------------------------------------------
    def learn(self, infos: Iterable[tuple[int, Mapping[str, Any]]]) -> None:
        """Take the schemas of infos that crossed the pipe, ``(env, info)`` each."""
        schemas = self._schemas
        for env, info in infos:
            j = env - self.first
            old = schemas[j]
            schemas[j] = new = schema_of(info)
            self.learned += (new is not None) - (old is not None)

    def forget(self, envs: Iterable[int]) -> None:
        """Forget the schemas of ``envs`` and clear their rows (their worker was replaced)."""
        words = self._words
        assert words is not None
        for env in envs:
            j = env - self.first
            if self._schemas[j] is not None:
                self._schemas[j] = None
                self.learned -= 1
            words[j * _WORDS] = 0

    # -- a worker --------------------------------------------------------------------------
    def write(self, env: int, info: Mapping[str, Any]) -> bool:
        """Write ``info`` into env ``env``'s row if it has the env's schema (True), else leave
        the row's state cleared (False: send it by pipe)."""
        j = env - self.first
        schema = self._schemas[j]
        words = self._words
        assert words is not None
        if schema is not None and schema.fits(info):
            try:
                schema.struct.pack_into(self._bytes, j * ROW + _VALUES,  # type: ignore[arg-type]
                                        *info.values())
            except struct.error:  # an int beyond int64, say
                pass
            else:
                words[j * _WORDS] = 1
                return True
        words[j * _WORDS] = 0
        return False

    def clear(self, env: int) -> None:
        """This step's info of ``env`` is not in its row."""
        words = self._words
        assert words is not None
        words[(env - self.first) * _WORDS] = 0

    # -- the parent ------------------------------------------------------------------------
    def read(self, env: int) -> dict[str, Any] | None:
        """Env ``env``'s info from its row, or None if its latest result's info is not
        there."""
        j = env - self.first
        words = self._words
        assert words is not None
        if not words[j * _WORDS]:
            return None
        schema = self._schemas[j]
        assert schema is not None, f"env {env}'s info row is set, but no schema was learned"
        return schema.decode(schema.struct.unpack_from(self._bytes,  # type: ignore[arg-type]
                                                       j * ROW + _VALUES))

    def read_batch(self, envs: Sequence[int]) -> dict[str, Any] | None:
        """The infos of ``envs`` batched as Gymnasium's ``VectorEnv._add_info`` batches them
        over ``len(envs)`` rows, in that order, if every one of them has its latest result's
        info in its row and all share one schema; else None (batch them one by one).

        Each key becomes one array of its value type (Python ``int``: int64, as
        ``np.zeros(n, dtype=int)``; NumPy's bool, which Gymnasium does not count as a number:
        objects) and its mask ``_key`` all True: the same arrays, dtypes and key order as
        Gymnasium's, built a column at a time instead of a row at a time.
        """
        words = self._words
        if not envs or words is None:
            return None
        schemas, first = self._schemas, self.first
        schema = schemas[envs[0] - first]
        if schema is None or not schema.columns:
            return None
        unpack, data = schema.struct.unpack_from, self._bytes
        values = []
        for env in envs:
            j = env - first
            if not words[j * _WORDS] or schemas[j] is not schema:
                return None
            values.append(unpack(data, j * ROW + _VALUES))  # type: ignore[arg-type]
        infos: dict[str, Any] = {}
        for key, kind, dtype, column in zip(schema.keys, schema.types, schema.dtypes,
                                            zip(*values, strict=True), strict=True):
            if dtype is object:  # the values as themselves, as the row-by-row path has them
                infos[key] = np.array([kind(v) for v in column], dtype=object)
            else:
                infos[key] = np.array(column, dtype=dtype)
            infos[f"_{key}"] = np.ones(len(envs), dtype=np.bool_)
        return infos

    def set_rows(self) -> list[int]:
        """The envs whose row holds their latest result's info, ascending."""
        words = self._words
        if not self.learned or words is None:
            return []
        return [self.first + j for j in range(len(self._schemas)) if words[j * _WORDS]]
