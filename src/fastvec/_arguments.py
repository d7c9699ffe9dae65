"""The checks of the vector envs' arguments (fastvec.AsyncVectorEnv's and, where they are the
same, fastvec.ray.RayVectorEnv's), worded as Gymnasium words them, and the spaces read from
the first env: each function returns the argument as the vector env keeps it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
from gymnasium import Env, Space
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_differing_spaces, batch_space

from fastvec._pool import default_num_workers

__all__ = ["Common", "autoreset_mode", "batch_size", "call_env_ids", "common", "env_ids",
           "max_concurrency", "no_custom_worker", "num_envs", "num_workers", "read_spaces",
           "reset_mask", "seeds", "send_env_ids", "start_timeout"]


def max_concurrency(value: int | None) -> int | None:
    if value is not None:
        if not isinstance(value, (int, np.integer)):
            raise ValueError(f"`max_concurrency` must be an integer or None, got {type(value)}.")
        if value < 1:
            raise ValueError(f"`max_concurrency` must be a positive or None, got {value}.")
    return value


def env_ids(value: Any, num_envs: int) -> list[int]:
    """``env_ids`` as ints; unknown, repeated and non-int ids raise ``ValueError``."""
    if type(value) is np.ndarray and value.ndim == 1 and value.dtype.kind in "iu":
        out: list[int] = value.tolist()  # the common case: a recv's infos["env_id"]
    else:
        ids = np.asarray(value)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"`env_ids` must be a 1-d sequence of ints, got {value!r}")
        out = [int(i) for i in ids]
    bad = [i for i in out if not 0 <= i < num_envs]
    if bad:
        raise ValueError(f"`env_ids` holds unknown env ids {bad}: this vector env has "
                         f"envs 0..{num_envs - 1}")
    if len(set(out)) != len(out):
        raise ValueError(f"`env_ids` names an env more than once: {out}")
    return out


def call_env_ids(value: Sequence[int] | None, num_envs: int) -> list[int] | None:
    """``env_ids`` of ``call``/``get_attr``/``set_attr`` (:func:`env_ids`; None: every
    env)."""
    return None if value is None else env_ids(value, num_envs)


def send_env_ids(value: Any, num_envs: int, last: list[int] | None) -> list[int]:
    """``env_ids`` of ``send``/``async_reset`` (:func:`env_ids`, at least one); None: the
    envs of the last ``recv`` (``last``), or every env if there was none."""
    if value is None:
        return list(range(num_envs)) if last is None else list(last)
    out = env_ids(value, num_envs)
    if not out:
        raise ValueError("`env_ids` is empty: send needs at least one env")
    return out


def start_timeout(value: float | None) -> float | None:
    if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, (int, float, np.integer, np.floating))
            or not value > 0):
        raise ValueError(
            f"`start_timeout` must be a positive number of seconds or None, got {value!r}.")
    return None if value is None else float(value)


def no_custom_worker(worker: Callable[..., None] | None,
                     owner: str = "fastvec.AsyncVectorEnv") -> None:
    if worker is not None:
        raise ValueError(
            f"{owner} does not run a custom `worker`: its workers step "
            "groups of sub-environments through shared memory, which Gymnasium's per-env "
            "pipe worker protocol cannot drive. Use gymnasium.vector.AsyncVectorEnv for a "
            "custom worker."
        )


def num_envs(env_fns: Sequence[Callable[[], Env[Any, Any]]]) -> int:
    if len(env_fns) < 1:
        raise ValueError("`env_fns` must hold at least one environment function.")
    return len(env_fns)


def num_workers(value: int | None, envs: int, parent_group: bool = False) -> int:
    """The worker count (default: the usable cores, never more than ``envs``; with
    ``parent_group``, one fewer: the parent's group takes a core's share)."""
    low, high = (0, envs - 1) if parent_group else (1, envs)
    if value is None:
        value = default_num_workers(envs) - (1 if parent_group else 0)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
            or not low <= value <= high:
        also = " with parent_group=True (the parent's group has at least one env)" \
            if parent_group else ""
        raise ValueError(
            f"`num_workers` must be an integer in [{low}, {high}]{also}, got {value!r}.")
    return int(value)


def batch_size(value: int | None, envs: int) -> int:
    """How many envs ``recv`` returns (default: all of them, the synchronous shape)."""
    if value is None:
        value = envs
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
            or not 1 <= value <= envs:
        raise ValueError(
            f"`batch_size` must be an integer in [1, num_envs={envs}], got {value!r}.")
    return int(value)


def read_spaces(env_fns: Sequence[Callable[[], Env[Any, Any]]],
                observation_mode: str | tuple[Space[Any], Space[Any]],
                autoreset_mode: AutoresetMode
                ) -> tuple[dict[str, Any], str | None, Space[Any], Space[Any], Space[Any],
                           Space[Any]]:
    """``(metadata, render_mode, single_action_space, action_space,
    single_observation_space, observation_space)``, from a first env made and closed here."""
    n = len(env_fns)
    dummy_env = env_fns[0]()
    try:
        metadata = dict(dummy_env.metadata)
        metadata["autoreset_mode"] = autoreset_mode
        single_action_space = dummy_env.action_space
        action_space = batch_space(single_action_space, n)
        if isinstance(observation_mode, tuple) and len(observation_mode) == 2:
            if not all(isinstance(s, Space) for s in observation_mode):
                raise TypeError(
                    "Expected both elements of observation_mode to be Spaces, got "
                    f"{type(observation_mode[0])} and {type(observation_mode[1])}"
                )
            observation_space, single_observation_space = observation_mode
        elif observation_mode == "same":
            single_observation_space = dummy_env.observation_space
            observation_space = batch_space(single_observation_space, n)
        elif observation_mode == "different":
            env_spaces = [fn().observation_space for fn in env_fns]
            single_observation_space = env_spaces[0]
            observation_space = batch_differing_spaces(env_spaces)
        else:
            raise ValueError(
                "Invalid `observation_mode`, expected: 'same' or 'different' or tuple of "
                f"single and batch observation space, actual got {observation_mode}"
            )
        return (metadata, dummy_env.render_mode, single_action_space, action_space,
                single_observation_space, observation_space)
    finally:
        dummy_env.close()


def autoreset_mode(value: str | AutoresetMode) -> AutoresetMode:
    return value if isinstance(value, AutoresetMode) else AutoresetMode(value)


class Common(NamedTuple):
    """The arguments every fastvec vector env keeps as it checked them."""

    autoreset_mode: AutoresetMode
    max_concurrency: int | None
    start_timeout: float | None


def common(mode: str | AutoresetMode, concurrency: int | None, timeout: float | None,
           worker: Callable[..., None] | None, owner: str = "fastvec.AsyncVectorEnv"
           ) -> Common:
    """``autoreset_mode``, ``max_concurrency``, ``start_timeout`` and ``worker`` (which must
    be None) of :class:`fastvec.AsyncVectorEnv` and :class:`fastvec.ray.RayVectorEnv`
    (``owner``: the class named in the errors), checked in that order."""
    checked = Common(autoreset_mode(mode), max_concurrency(concurrency),
                     start_timeout(timeout))
    no_custom_worker(worker, owner)
    return checked


def seeds(seed: int | list[int | None] | None, num_envs: int) -> list[int | None]:
    """One seed per env: None for each, ``seed + i`` for env ``i``, or the list given."""
    if seed is None:
        return [None] * num_envs
    if isinstance(seed, int):
        return [seed + i for i in range(num_envs)]
    if len(seed) != num_envs:
        raise ValueError(
            f"If seeds are passed as a list the length must match num_envs={num_envs}"
            f" but got length={len(seed)}.")
    return list(seed)


def reset_mask(mask: Any, num_envs: int) -> np.ndarray:
    """``options["reset_mask"]`` of ``reset``: a bool array of one flag per env, not all
    False."""
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"`options['reset_mask']` must be a numpy array, got {type(mask)}")
    if mask.shape != (num_envs,):
        raise ValueError(f"`options['reset_mask']` must have shape `({num_envs},)`, "
                         f"got {mask.shape}")
    if mask.dtype != np.bool_:
        raise TypeError(f"`options['reset_mask']` must have `dtype=np.bool_`, got {mask.dtype}")
    if not np.any(mask):
        raise ValueError(
            "`options['reset_mask']` must contain a boolean array with at least one "
            f"True value, got reset_mask={mask}")
    return mask
