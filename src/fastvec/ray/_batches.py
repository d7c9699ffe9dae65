"""Batches cut per node and joined again, leaf by leaf (no per-env loop for array leaves)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium import Space, spaces

from fastvec.ray._infos import merge_infos

__all__ = ["StepResult", "check_rows", "copy_into", "cut", "join", "join_results",
           "same_shape", "take"]

#: ``(observations, rewards, terminations, truncations, infos)`` over some rows.
StepResult = tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]


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


def join_results(space: Space[Any], results: Sequence[StepResult],
                 sizes: Sequence[int]) -> StepResult:
    """Results of ``sizes`` rows each, one after the other, as one result: observations of
    ``space`` joined, infos merged at their offsets (the ``_key`` masks too)."""
    total = sum(sizes)
    infos: dict[str, Any] = {}
    offset = 0
    for (_, _, _, _, part), n in zip(results, sizes, strict=True):
        if part:
            infos = merge_infos(infos, part, offset, n, total)
        offset += n
    obs = join(space, [r[0] for r in results])
    return (obs, *(np.concatenate([r[k] for r in results]) for k in (1, 2, 3)), infos)


def take(space: Space[Any], batch: Any, rows: Sequence[int]) -> Any:
    """Rows ``rows`` of a batch, in that order (copies)."""
    if isinstance(space, spaces.Dict):
        return {key: take(space[key], batch[key], rows) for key in space}
    if isinstance(space, spaces.Tuple):
        return tuple(take(part, batch[n], rows) for n, part in enumerate(space))
    if isinstance(batch, np.ndarray):
        return batch[list(rows)]
    return tuple(batch[i] for i in rows)


def check_rows(space: Space[Any], actions: Any, n: int) -> None:
    """A ``ValueError`` (before any node sees the batch) unless every leaf of ``actions``
    holds ``n`` rows (``space`` is the batched action space)."""
    if isinstance(space, spaces.Dict):
        if not isinstance(actions, dict):
            raise ValueError(f"actions: expected a dict for {space}, got {type(actions)}")
        for key in space:
            if key not in actions:
                raise ValueError(f"actions: missing key {key!r} of {space}")
            check_rows(space[key], actions[key], n)
        return
    if isinstance(space, spaces.Tuple):
        if not isinstance(actions, tuple) or len(actions) != len(space):
            raise ValueError(f"actions: expected a tuple of {len(space)} parts for {space}")
        for part, batch in zip(space, actions, strict=True):
            check_rows(part, batch, n)
        return
    if isinstance(space, (spaces.Box, spaces.Discrete, spaces.MultiDiscrete,
                          spaces.MultiBinary)):
        rows = np.shape(actions)[0] if np.ndim(actions) else None
    else:
        try:
            rows = len(actions)
        except TypeError:
            rows = None
    if rows != n:
        raise ValueError(f"actions: expected one action for each of the {n} envs, got "
                         f"{'a scalar' if rows is None else rows}")


def same_shape(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return bool(a.shape == b.shape and a.dtype == b.dtype)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_shape(a[k], b[k]) for k in a)
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        return all(same_shape(x, y) for x, y in zip(a, b, strict=True)) and not any(
            not isinstance(x, (np.ndarray, dict, tuple)) for x in a)
    return False


def copy_into(out: Any, batch: Any) -> None:
    if isinstance(out, np.ndarray):
        np.copyto(out, batch)
    elif isinstance(out, dict):
        for key in out:
            copy_into(out[key], batch[key])
    else:
        for o, b in zip(out, batch, strict=True):
            copy_into(o, b)
