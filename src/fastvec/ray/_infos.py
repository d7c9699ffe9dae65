"""Infos batched per node, merged into one batch the Gymnasium way.

Each node returns its infos already batched over its own rows (Gymnasium's ``_key`` masks
included); :func:`merge_infos` places them at the node's offset in the whole batch, so the
result is what :meth:`gymnasium.vector.VectorEnv._add_info` would have built env by env.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["merge_infos", "restarted_infos", "take_infos"]


def _mask_keys(infos: dict[str, Any]) -> set[str]:
    """The keys of ``infos`` that are the ``_key`` mask of another key."""
    return {f"_{key}" for key in infos if f"_{key}" in infos}


def merge_infos(total: dict[str, Any], part: dict[str, Any], offset: int, rows: int,
                num_rows: int) -> dict[str, Any]:
    """Add ``part`` (infos batched over ``rows`` rows) into ``total`` (over ``num_rows``
    rows) at rows ``offset .. offset + rows - 1``; returns ``total``."""
    masks = _mask_keys(part)
    where = slice(offset, offset + rows)
    for key, value in part.items():
        if key in masks:
            continue
        merged: Any
        if isinstance(value, dict):
            merged = merge_infos(total.get(key, {}), value, offset, rows, num_rows)
        else:
            merged = _place(total.get(key), np.asarray(value), where, num_rows)
        mask = total.get(f"_{key}")
        if mask is None:
            mask = np.zeros(num_rows, dtype=np.bool_)
        own = part.get(f"_{key}")
        mask[where] = True if own is None else own
        total[key], total[f"_{key}"] = merged, mask
    return total


def _place(target: np.ndarray | None, value: np.ndarray, where: slice,
           num_rows: int) -> np.ndarray:
    """``value``'s rows written at ``where`` of ``target`` (made as Gymnasium makes it when
    missing: zeros of the value's dtype and row shape, or an object array of None)."""
    if target is None:
        if value.dtype == object:
            target = np.full(num_rows, None, dtype=object)
        else:
            target = np.zeros((num_rows, *value.shape[1:]), dtype=value.dtype)
    elif value.dtype == object and target.dtype != object:
        # a row of another node holds objects where this key held numbers so far
        widened = np.full(num_rows, None, dtype=object)
        for k in range(num_rows):
            widened[k] = target[k]
        target = widened
    if target.dtype == object and value.ndim > 1:
        for k, row in zip(range(where.start, where.stop), value, strict=True):
            target[k] = row
    else:
        target[where] = value
    return target


def restarted_infos(rows: int, reset_infos: dict[str, Any] | None) -> dict[str, Any]:
    """The infos of ``rows`` rows of a restarted node: ``worker_restarted`` (masked), over
    ``reset_infos`` (the fresh reset's, SAME_STEP only) when given."""
    infos = dict(reset_infos or {})
    infos["worker_restarted"] = np.ones(rows, dtype=np.bool_)
    infos["_worker_restarted"] = np.ones(rows, dtype=np.bool_)
    return infos


def take_infos(infos: dict[str, Any], rows: list[int], num_rows: int) -> dict[str, Any]:
    """The infos of rows ``rows`` (in that order) of infos batched over ``num_rows`` rows;
    keys that none of those rows has are left out."""
    out: dict[str, Any] = {}
    masks = _mask_keys(infos)
    for key, value in infos.items():
        if key in masks:
            continue
        mask = infos.get(f"_{key}")
        own = np.ones(num_rows, np.bool_) if mask is None else np.asarray(mask)
        if not own[rows].any():
            continue
        if isinstance(value, dict):
            out[key] = take_infos(value, rows, num_rows)
        else:
            out[key] = np.asarray(value)[rows]
        out[f"_{key}"] = own[rows].copy()
    return out
