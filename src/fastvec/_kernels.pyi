"""Type stubs for fastvec._kernels (copying samples between Python objects and the segment)."""

from typing import Any, Final

from typing_extensions import Buffer, Self, disjoint_base

KIND: Final[dict[str, int]]

@disjoint_base
class Segment:
    """A writable buffer pinned for direct writes; release it before closing its owner."""

    size: Final[int]
    # Cython's __cinit__ takes the argument, so it is __new__ that has the signature
    def __new__(cls, buffer: Buffer) -> Self: ...
    def release(self) -> None: ...
    @property
    def released(self) -> bool: ...

@disjoint_base
class Node:
    """One node of a compiled space: a leaf over the segment or a container of nodes."""

    kind: Final[int]
    offset: Final[int]
    stride: Final[int]
    dtype: Final[Any]
    shape: Final[tuple[int, ...]]
    ndim: Final[int]
    children: Final[list[Node]]
    keys: Final[tuple[Any, ...]]
    low: Final[int]
    high: Final[int]
    charmap: Final[dict[str, int] | None]
    characters: Final[tuple[str, ...] | None]
    max_length: Final[int]
    min_length: Final[int]
    batch_view: Any
    def __init__(
        self,
        kind: int,
        offset: int = 0,
        stride: int = 0,
        dtype: Any = None,
        shape: tuple[int, ...] = (),
        children: list[Node] | None = None,
        keys: tuple[Any, ...] | None = None,
        low: int | None = None,
        high: int | None = None,
        charmap: dict[str, int] | None = None,
        characters: tuple[str, ...] | None = None,
        max_length: int = 0,
        min_length: int = 0,
    ) -> None: ...

def write_row(segment: Segment, node: Node, value: Any, env: int) -> bool: ...
def write_batch(segment: Segment, node: Node, value: Any, n: int) -> bool: ...
def write_rows(segment: Segment, node: Node, value: Any, env_ids: list[int]) -> bool: ...
def read_row(node: Node, env: int, copy: bool = True) -> Any: ...
def read_batch(node: Node, copy: bool = True) -> Any: ...
