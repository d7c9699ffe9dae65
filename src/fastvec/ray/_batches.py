"""Batches cut per node and joined again, leaf by leaf (no per-env loop for array leaves)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium import Space, spaces

__all__ = ["cut", "join", "take"]


def cut(space: Space[Any], batch: Any, start: int, stop: int) -> Any:
    """Rows ``start .. stop - 1`` of a batch of ``space`` (views for array leaves)."""
    if isinstance(space, spaces.Dict):
        return {key: cut(space[key], batch[key], start, stop) for key in space}
    if isinstance(space, spaces.Tuple):
        return tuple(cut(part, batch[n], start, stop) for n, part in enumerate(space))
    if isinstance(batch, np.ndarray):
        return batch[start:stop]
    return tuple(batch[start:stop])  # a space batched as a tuple of rows


def join(space: Space[Any], parts: Sequence[Any]) -> Any:
    """The batches ``parts`` (of ``space``'s single rows) one after the other, as one batch
    of fresh, writable arrays (what Ray hands back from its object store is read-only)."""
    if isinstance(space, spaces.Dict):
        return {key: join(space[key], [p[key] for p in parts]) for key in space}
    if isinstance(space, spaces.Tuple):
        return tuple(join(part, [p[n] for p in parts]) for n, part in enumerate(space))
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts, axis=0)
    return tuple(row for part in parts for row in part)


def take(space: Space[Any], batch: Any, rows: Sequence[int]) -> Any:
    """Rows ``rows`` of a batch, in that order (copies)."""
    if isinstance(space, spaces.Dict):
        return {key: take(space[key], batch[key], rows) for key in space}
    if isinstance(space, spaces.Tuple):
        return tuple(take(part, batch[n], rows) for n, part in enumerate(space))
    if isinstance(batch, np.ndarray):
        return batch[list(rows)]
    return tuple(batch[i] for i in rows)
