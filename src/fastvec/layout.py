"""Compile a Gymnasium space once into flat, typed leaves over a shared-memory region.

A :class:`Layout` is the space's plan: a tree of :class:`fastvec._kernels.Node` whose leaves
each own one array of shape ``(n, *leaf_shape)`` at a 64-byte aligned offset. The kernels copy
samples in and out by that plan; this module holds the policy: which spaces are supported,
how a value that the fast path refuses is validated, explained and converted.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from gymnasium import spaces
from gymnasium.error import CustomSpaceError

from fastvec import _kernels
from fastvec._kernels import Node, Segment

__all__ = [
    "ALIGNMENT",
    "DynamicShapeError",
    "Layout",
    "Leaf",
    "LeafError",
    "Segment",
    "align",
    "describe",
    "register_layout",
]

ALIGNMENT = 64

_KIND = _kernels.KIND
_INT64 = np.dtype(np.int64)
_INT64_MIN, _INT64_MAX = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)
_INT32 = np.dtype(np.int32)

_SpaceT = TypeVar("_SpaceT", bound=spaces.Space[Any])

_custom_layouts: dict[type[spaces.Space[Any]], Callable[[Any], spaces.Space[Any]]] = {}


class DynamicShapeError(TypeError):
    """A Graph or Sequence space: its samples have no fixed shape to lay out.

    A ``TypeError`` carrying Gymnasium's own sentence for the same case, so code written for
    ``gymnasium.vector.utils.create_shared_memory`` recognises it.
    """

    def __init__(self, space: spaces.Space[Any]) -> None:
        super().__init__(
            f"As {space} has a dynamic shape so its not possible to make a static shared "
            "memory. For `AsyncVectorEnv`, disable `shared_memory`: pass "
            "`shared_memory=False` to send its observations through pipes instead."
        )
        self.space = space


class LeafError(ValueError):
    """A value that does not fit its space, naming the leaf: ``obs["camera"]: expected ...``.

    Raised by :meth:`Layout.write_row`, :meth:`Layout.write_batch` and
    :meth:`Layout.write_rows` (nothing is written then), so callers can tell it from an error
    of their own code by its type.
    """


def align(nbytes: int) -> int:
    """Round ``nbytes`` up to the next multiple of :data:`ALIGNMENT`."""
    return (nbytes + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def register_layout(
    space_type: type[_SpaceT], equivalent: Callable[[_SpaceT], spaces.Space[Any]]
) -> None:
    """Teach fastvec the shared-memory layout of a custom ``Space`` subclass.

    Parameters
    ----------
    space_type
        The custom ``gymnasium.spaces.Space`` subclass.
    equivalent
        A function taking an instance of ``space_type`` and returning a built-in, fixed-shape
        space (Box, Discrete, MultiDiscrete, MultiBinary, Text, OneOf, Tuple, Dict) whose
        samples are the same Python objects as the custom space's samples. fastvec stores and
        reads the custom space's samples as samples of that space.

    Examples
    --------
    >>> class Angle(gymnasium.spaces.Box): ...          # doctest: +SKIP
    >>> register_layout(Angle, lambda s: Box(s.low, s.high, dtype=s.dtype))  # doctest: +SKIP
    """
    if not (isinstance(space_type, type) and issubclass(space_type, spaces.Space)):
        raise TypeError(f"space_type must be a Space subclass, got {space_type!r}")
    if not callable(equivalent):
        raise TypeError(f"equivalent must be callable, got {equivalent!r}")
    _custom_layouts[space_type] = equivalent


def _registered_equivalent(space: spaces.Space[Any]) -> spaces.Space[Any] | None:
    for klass in type(space).__mro__:
        if klass in _custom_layouts:
            equivalent = _custom_layouts[klass](space)
            if not isinstance(equivalent, spaces.Space) or type(equivalent) is type(space):
                raise TypeError(
                    f"the layout registered for {klass.__name__} must return a built-in "
                    f"gymnasium space, got {equivalent!r}"
                )
            return equivalent
    return None


@dataclass(frozen=True)
class Leaf:
    """One typed array of the layout: ``(n, *shape)`` of ``dtype`` at byte ``offset``."""

    path: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    offset: int
    nbytes: int


class _Builder:
    def __init__(self, n: int, base_offset: int, check_range: bool) -> None:
        self.n = n
        self.cursor = base_offset
        self.check_range = check_range
        self.leaves: list[Leaf] = []

    def leaf(self, path: str, dtype: np.dtype[Any], shape: tuple[int, ...]) -> tuple[int, int]:
        stride = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        offset = self.cursor
        self.leaves.append(Leaf(path, dtype, shape, offset, stride * self.n))
        self.cursor = offset + align(stride * self.n)
        return offset, stride

    def build(self, space: spaces.Space[Any], path: str) -> Node:
        if not isinstance(space, spaces.Space):
            raise TypeError(f"{path}: expected a gymnasium Space, got {type(space).__name__}")
        equivalent = _registered_equivalent(space)
        if equivalent is not None:
            return self.build(equivalent, path)
        if isinstance(space, (spaces.Graph, spaces.Sequence)):
            raise DynamicShapeError(space)
        if isinstance(space, (spaces.Box, spaces.MultiDiscrete, spaces.MultiBinary)):
            dtype = np.dtype(space.dtype)
            shape = tuple(int(d) for d in space.shape)
            offset, stride = self.leaf(path, dtype, shape)
            return Node(_KIND["array"], offset, stride, dtype, shape)
        if isinstance(space, spaces.Discrete):
            dtype = np.dtype(space.dtype)
            offset, stride = self.leaf(path, dtype, ())
            # the kernels store an int64; the dtype's own range always bounds what it takes
            info = np.iinfo(dtype)
            low, high = max(int(info.min), _INT64_MIN), min(int(info.max), _INT64_MAX)
            start, last = int(space.start), int(space.start) + int(space.n) - 1
            if start < _INT64_MIN or last > _INT64_MAX:
                raise CustomSpaceError(
                    f"{path}: {space} has values beyond int64, which fastvec's kernels do not "
                    "store; as an observation space pass `shared_memory=False` (actions of "
                    "such a space travel pickled)."
                )
            if self.check_range:
                low, high = max(low, start), min(high, last)
            return Node(_KIND["discrete"], offset, stride, dtype, (), low=low, high=high)
        if isinstance(space, spaces.Text):
            offset, stride = self.leaf(path, _INT32, (space.max_length,))
            characters = tuple(space.character_list)
            charmap = {char: index for index, char in enumerate(characters)}
            return Node(_KIND["text"], offset, stride, _INT32, (space.max_length,),
                        charmap=charmap, characters=characters,
                        max_length=space.max_length, min_length=space.min_length)
        if isinstance(space, spaces.OneOf):
            offset, stride = self.leaf(f"{path}[0]", _INT64, ())
            children = [self.build(sub, f"{path}[1]") for sub in space.spaces]
            return Node(_KIND["oneof"], offset, stride, _INT64, (), children=children)
        if isinstance(space, spaces.Tuple):
            children = [self.build(sub, f"{path}[{i}]") for i, sub in enumerate(space.spaces)]
            return Node(_KIND["tuple"], children=children)
        if isinstance(space, spaces.Dict):
            keys = tuple(space.spaces.keys())
            children = [self.build(space.spaces[k], _key_path(path, k)) for k in keys]
            return Node(_KIND["dict"], children=children, keys=keys)
        raise CustomSpaceError(
            f"Space of type `{type(space)}` has no fastvec layout. Register one with "
            "`fastvec.register_layout`, or pass `shared_memory=False`."
        )


def _bind(node: Node, buffer: Any, n: int) -> None:
    if node.kind in (_KIND["tuple"], _KIND["dict"]):
        for child in node.children:
            _bind(child, buffer, n)
        return
    # np.frombuffer, not np.ndarray(buffer=...): numpy 2 keeps no buffer export for the
    # latter, so the segment could be unmapped under a live view (a segfault on next access);
    # with an export, closing the segment raises BufferError while any view is alive.
    # A sub-array dtype gives the (n, *shape) array directly, so it is the root of every view
    # taken from it (numpy collapses view bases onto it) and its refcount says if it is in use.
    dtype = np.dtype((node.dtype, node.shape)) if node.shape else node.dtype
    node.batch_view = np.frombuffer(buffer, dtype=dtype, count=n, offset=node.offset)
    for child in node.children:
        _bind(child, buffer, n)


def _leaf_nodes(node: Node) -> list[Node]:
    nodes = [] if node.kind in (_KIND["tuple"], _KIND["dict"]) else [node]
    for child in node.children:
        nodes.extend(_leaf_nodes(child))
    return nodes


def _refcounts(nodes: list[Node]) -> list[int]:
    return [sys.getrefcount(node.batch_view) for node in nodes]


def _unbind(node: Node) -> None:
    node.batch_view = None
    for child in node.children:
        _unbind(child)


class Layout:
    """A space compiled for ``n`` environments, placed at ``base_offset`` in a segment.

    Parameters
    ----------
    space
        The single (unbatched) space.
    n
        The batch size (number of environments).
    base_offset
        Byte offset of the region in the segment; must be a multiple of :data:`ALIGNMENT`.
    check_range
        Reject Discrete values outside the space on writes (on for observations; off for
        actions, whose range the environment itself checks, as in Gymnasium).
    path
        The name used for the root in error messages (``"obs"``, ``"actions"``).
    """

    def __init__(self, space: spaces.Space[Any], n: int, base_offset: int = 0,
                 check_range: bool = True, path: str = "obs") -> None:
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        if base_offset % ALIGNMENT:
            raise ValueError(f"base_offset must be a multiple of {ALIGNMENT}, got {base_offset}")
        builder = _Builder(n, base_offset, check_range)
        self.space = space
        self.n = n
        self.path = path
        self.root: Node = builder.build(space, path)
        self.leaves: tuple[Leaf, ...] = tuple(builder.leaves)
        self.offset = base_offset
        self.nbytes = builder.cursor - base_offset
        self._segment: Segment | None = None
        self._bound: list[Node] = []
        self._baseline: list[int] = []

    def __repr__(self) -> str:
        return f"Layout({self.space}, n={self.n}, leaves={len(self.leaves)}, nbytes={self.nbytes})"

    # -- binding to a segment -------------------------------------------------------------
    def bind(self, segment: Segment, buffer: Any) -> None:
        """Build the batch views over ``buffer`` (once) and remember ``segment`` for writes."""
        if self.offset + self.nbytes > len(buffer):
            raise ValueError(
                f"the segment holds {len(buffer)} bytes but the layout needs "
                f"{self.offset + self.nbytes}"
            )
        _bind(self.root, buffer, self.n)
        self._segment = segment
        self._bound = _leaf_nodes(self.root)
        self._baseline = _refcounts(self._bound)

    def unbind(self) -> None:
        """Drop every view into the segment so that it can be closed."""
        _unbind(self.root)
        self._segment = None
        self._bound = []
        self._baseline = []

    def in_use(self) -> bool:
        """Whether anyone but the layout still refers to a leaf array or a view of one."""
        return _refcounts(self._bound) != self._baseline

    @property
    def segment(self) -> Segment:
        if self._segment is None:
            raise RuntimeError("the layout is not bound to a segment")
        return self._segment

    # -- writes ---------------------------------------------------------------------------
    def write_row(self, value: Any, env: int) -> None:
        """Write one env's sample into its row, converting it if needed.

        Raises ``ValueError`` naming the leaf path when the value does not fit; nothing is
        written then.
        """
        if not 0 <= env < self.n:
            raise IndexError(f"env index {env} out of range for {self.n} environments")
        segment = self.segment
        if _kernels.write_row(segment, self.root, value, env):
            return
        canonical = _coerce(self.root, value, self.path)
        if not _kernels.write_row(segment, self.root, canonical, env):
            raise AssertionError(f"{self.path}: converted value still refused by the kernel")

    def write_batch(self, value: Any) -> None:
        """Write a whole batch (every leaf with a leading dimension ``n``)."""
        segment = self.segment
        if _kernels.write_batch(segment, self.root, value, self.n):
            return
        canonical = _coerce_batch(self.root, value, self.path, self.n)
        if not _kernels.write_batch(segment, self.root, canonical, self.n):
            raise AssertionError(f"{self.path}: converted batch still refused by the kernel")

    def write_rows(self, value: Any, env_ids: list[int]) -> None:
        """Write a batch of ``len(env_ids)`` samples, its row ``k`` into env ``env_ids[k]``'s
        (distinct ids), as :meth:`write_batch` converts and checks a whole batch."""
        n = len(env_ids)
        if n and not (min(env_ids) >= 0 and max(env_ids) < self.n):
            raise IndexError(f"env indices {env_ids} out of range for {self.n} environments")
        segment = self.segment
        if _kernels.write_rows(segment, self.root, value, env_ids):
            return
        canonical = _coerce_batch(self.root, value, self.path, n)
        if not _kernels.write_rows(segment, self.root, canonical, env_ids):
            raise AssertionError(f"{self.path}: converted batch still refused by the kernel")

    # -- a per-step loop's row access ------------------------------------------------------
    def row_writer(self) -> Callable[[Any, int], bool]:
        """``write(value, env)``: the kernel's write of one env's row, bound to this layout,
        for a loop over envs. It returns False, writing nothing, when the value is not
        already in the leaves' dtypes and shapes: then call :meth:`write_row`, which converts
        or explains. Neither the env index nor the binding is checked: only while bound, and
        ``0 <= env < n``."""
        return partial(_kernels.write_row, self.segment, self.root)

    def row_reader(self) -> Callable[[int], Any]:
        """``read(env)``: one env's sample, a copy, as :meth:`read_row` returns it, without
        its index check (for a loop over envs known to be in range)."""
        return partial(_kernels.read_row, self.root)

    # -- reads ----------------------------------------------------------------------------
    def read_batch(self, copy: bool = True) -> Any:
        """The batch, as Gymnasium's shared-memory reader shapes it."""
        return _kernels.read_batch(self.root, copy)

    def read_row(self, env: int, copy: bool = True) -> Any:
        """One env's sample, as ``gymnasium.vector.utils.iterate`` would give it."""
        if not 0 <= env < self.n:
            raise IndexError(f"env index {env} out of range for {self.n} environments")
        return _kernels.read_row(self.root, env, copy)


# -- the slow path: validate, explain, convert ----------------------------------------------
def _key_path(path: str, key: Any) -> str:
    return f'{path}["{key}"]' if isinstance(key, str) else f"{path}[{key!r}]"


def describe(value: Any) -> str:
    """A short description of ``value`` for error messages."""
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape} and dtype {value.dtype}"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _as_array(node: Node, value: Any, path: str, shape: tuple[int, ...]) -> npt.NDArray[Any]:
    dtype = node.dtype
    try:
        array = np.asarray(value)
    except Exception as exc:  # ragged nesting and the like
        raise LeafError(f"{path}: expected an array of shape {shape} and dtype {dtype}, "
                         f"got {describe(value)} ({exc})") from None
    if array.shape != shape:
        raise LeafError(f"{path}: expected shape {shape}, got shape {array.shape}"
                         f" ({describe(value)})")
    if array.dtype == dtype:
        return _contiguous(array, dtype)
    if array.dtype.kind in "biu" and dtype.kind in "iu":
        if array.size:
            info = np.iinfo(dtype)
            low, high = array.min(), array.max()
            if low < info.min or high > info.max:
                raise LeafError(f"{path}: values in [{low}, {high}] do not fit dtype {dtype}")
        return _contiguous(array, dtype)
    if array.dtype.kind == "O" or not np.can_cast(array.dtype, dtype, casting="same_kind"):
        raise LeafError(f"{path}: cannot cast dtype {array.dtype} to the leaf dtype {dtype} "
                         "safely")
    return _contiguous(array, dtype)


def _contiguous(array: npt.NDArray[Any], dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    # Not np.ascontiguousarray: it turns 0-d arrays into shape (1,). Passing dtype also swaps
    # an equal dtype with another buffer format (np.longlong for int64) for the leaf's own.
    return np.asarray(array, dtype=dtype, order="C")


def _as_index(node: Node, value: Any, path: str) -> int:
    if isinstance(value, np.ndarray) and value.shape == () and value.dtype.kind in "biu":
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise LeafError(f"{path}: expected an integer, got {describe(value)}")
    number = int(value)
    if not node.low <= number <= node.high:
        raise LeafError(f"{path}: expected an integer in [{node.low}, {node.high}], "
                         f"got {number}")
    return number


def _coerce(node: Node, value: Any, path: str) -> Any:
    kind = node.kind
    if kind == _KIND["array"]:
        return _as_array(node, value, path, node.shape)
    if kind == _KIND["discrete"]:
        return _as_index(node, value, path)
    if kind == _KIND["text"]:
        if not isinstance(value, str):
            raise LeafError(f"{path}: expected a str, got {describe(value)}")
        if not node.min_length <= len(value) <= node.max_length:
            raise LeafError(f"{path}: expected a str of length {node.min_length} to "
                             f"{node.max_length}, got length {len(value)}")
        charmap = node.charmap
        assert charmap is not None  # _Builder.build gives every text node one
        unknown = sorted(set(value) - charmap.keys())
        if unknown:
            raise LeafError(f"{path}: characters {''.join(unknown)!r} are not in the "
                             "space's charset")
        return str(value)
    if kind in (_KIND["tuple"], _KIND["dict"]):
        return _coerce_children(node, value, path, _coerce)
    if kind == _KIND["oneof"]:
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise LeafError(f"{path}: expected a pair (subspace index, sample), got "
                             f"{describe(value)}")
        index = value[0]
        if isinstance(index, np.ndarray) and index.shape == ():
            index = index.item()
        if (isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer))
                or not 0 <= int(index) < len(node.children)):
            raise LeafError(f"{path}[0]: expected a subspace index in "
                             f"[0, {len(node.children) - 1}], got {describe(index)}")
        index = int(index)
        return (index, _coerce(node.children[index], value[1], f"{path}[1]"))
    raise LeafError(f"{path}: unsupported node kind {kind}")


def _coerce_children(node: Node, value: Any, path: str,
                     coerce: Callable[[Node, Any, str], Any]) -> Any:
    """A Tuple or Dict node's value, each child's part converted by ``coerce``."""
    if node.kind == _KIND["tuple"]:
        if not isinstance(value, (tuple, list)) or len(value) != len(node.children):
            raise LeafError(f"{path}: expected a tuple of length {len(node.children)}, "
                             f"got {describe(value)}")
        return tuple(coerce(child, item, f"{path}[{i}]")
                     for i, (child, item) in enumerate(zip(node.children, value, strict=True)))
    if not isinstance(value, Mapping):
        raise LeafError(f"{path}: expected a dict with keys {list(node.keys)}, "
                         f"got {describe(value)}")
    missing = [k for k in node.keys if k not in value]
    extra = [k for k in value if k not in node.keys]
    if missing or extra:
        raise LeafError(f"{path}: expected keys {list(node.keys)}, got keys "
                         f"{list(value)} (missing {missing}, unexpected {extra})")
    return {k: coerce(child, value[k], _key_path(path, k))
            for k, child in zip(node.keys, node.children, strict=True)}


def _coerce_batch(node: Node, value: Any, path: str, n: int) -> Any:
    kind = node.kind
    if kind in (_KIND["array"], _KIND["discrete"]):
        return _as_array(node, value, path, (n, *node.shape))
    if kind in (_KIND["tuple"], _KIND["dict"]):
        return _coerce_children(node, value, path,
                                lambda child, item, where: _coerce_batch(child, item, where, n))
    # Text and OneOf batches are a sequence of n per-env samples.
    try:
        count = None if isinstance(value, (str, bytes)) else len(value)
    except TypeError:  # no length, or a 0-d array's
        count = None
    if count != n:
        raise LeafError(f"{path}: expected a sequence of {n} samples, got {describe(value)}")
    return tuple(_coerce(node, item, f"{path}[{i}]") for i, item in enumerate(value))
