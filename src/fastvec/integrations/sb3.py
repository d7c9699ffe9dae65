"""Stable-Baselines3 over fastvec: :class:`FastVecEnv`, an SB3 ``VecEnv`` over a
:class:`fastvec.AsyncVectorEnv`.

SB3 takes only its own ``VecEnv``; this one is built like SB3's ``SubprocVecEnv`` and behaves
as its ``DummyVecEnv`` does, step for step::

    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from fastvec.integrations.sb3 import FastVecEnv

    vec_env = make_vec_env("CartPole-v1", n_envs=8, vec_env_cls=FastVecEnv)
    PPO("MlpPolicy", vec_env).learn(100_000)

The fastvec env runs in Gymnasium's ``SAME_STEP`` autoreset mode, which is SB3's: an env that
ends is reset in the same step, its last observation travels (pickled, only then) as
``final_obs`` and becomes ``infos[i]["terminal_observation"]``, its step info becomes
``infos[i]`` and its reset info ``reset_infos[i]``. The per-env infos are taken as the envs
returned them (fastvec's Gymnasium info batching is bypassed), so every info is the env's own
object, as in ``DummyVecEnv``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import concatenate, create_empty_array

from fastvec.vector_env import AsyncVectorEnv

try:
    from stable_baselines3.common.env_util import is_wrapped
    from stable_baselines3.common.vec_env.base_vec_env import (
        VecEnv,
        VecEnvIndices,
        VecEnvObs,
        VecEnvStepReturn,
    )
    from stable_baselines3.common.vec_env.patch_gym import _patch_env
except ImportError as exc:  # pragma: no cover - exercised only without Stable-Baselines3
    raise ImportError(
        "fastvec.integrations.sb3 needs Stable-Baselines3: pip install 'fastvec[sb3]'"
    ) from exc

__all__ = ["FastVecEnv"]

# fastvec options FastVecEnv decides itself: SB3's semantics need both
_FIXED_OPTIONS = ("autoreset_mode", "batch_size")
# what fastvec's SAME_STEP autoreset adds to the info of an env that ended
_FINAL_KEYS = ("final_obs", "final_info")
PerEnv = dict[int, dict[str, Any]]  # an info per env index, for the envs that returned one
_SIMPLE_SPACES = (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)


class _PerEnvInfos(AsyncVectorEnv):
    """A fastvec env whose ``infos`` map each env index to the info that env returned
    (Gymnasium's batching turns values into arrays; SB3 wants the envs' own dicts)."""

    def _add_info(self, vector_infos: dict[Any, Any], env_info: dict[str, Any],
                  env_num: int) -> dict[Any, Any]:
        vector_infos[env_num] = env_info
        return vector_infos

    def reset_envs(self, seeds: list[int | None], options: dict[str, Any] | None
                   ) -> tuple[Any, PerEnv]:
        """``reset``, its infos by env index."""
        obs, infos = self.reset(seed=seeds, options=options)
        return obs, cast(PerEnv, infos)

    def step_envs_wait(self) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, PerEnv]:
        """``step_wait``, its infos by env index."""
        obs, rewards, terminations, truncations, infos = self.step_wait()
        return obs, rewards, terminations, truncations, cast(PerEnv, infos)


class _MakeEnv:
    """An env function as SB3's vec envs call it: its env passed through ``_patch_env``
    (old Gym envs converted by Shimmy). A class, so that it pickles to spawn workers."""

    def __init__(self, env_fn: Callable[[], Any]) -> None:
        self.env_fn = env_fn

    def __call__(self) -> gym.Env[Any, Any]:
        env: gym.Env[Any, Any] = _patch_env(self.env_fn())
        return env


# -- run in the workers by ``call`` (one per env) ---------------------------------------------
def _get_attr(env: gym.Env[Any, Any], name: str) -> Any:
    return env.get_wrapper_attr(name)


def _has_attr(env: gym.Env[Any, Any], name: str) -> bool:
    try:
        env.get_wrapper_attr(name)
    except AttributeError:
        return False
    return True


def _set_attr(env: gym.Env[Any, Any], name: str, value: Any) -> None:
    setattr(env, name, value)  # on the outermost wrapper, as DummyVecEnv does


def _env_method(env: gym.Env[Any, Any], name: str, args: tuple[Any, ...],
                kwargs: dict[str, Any]) -> Any:
    return env.get_wrapper_attr(name)(*args, **kwargs)


def _is_wrapped(env: gym.Env[Any, Any], wrapper_class: type[gym.Wrapper[Any, Any, Any, Any]]
                ) -> bool:
    return bool(is_wrapped(env, wrapper_class))


class FastVecEnv(VecEnv):
    """An SB3 ``VecEnv`` whose envs step in fastvec's worker processes.

    Built like SB3's ``SubprocVecEnv`` and usable wherever it is (``make_vec_env(...,
    vec_env_cls=FastVecEnv, vec_env_kwargs={...})``, ``VecNormalize``, ``VecFrameStack``,
    ``VecMonitor`` on top); it returns what ``DummyVecEnv`` returns for the same seeded
    envs: observations, rewards (float32), dones, infos with ``"TimeLimit.truncated"`` and,
    when an env ends, ``"terminal_observation"``, ``reset_infos``, seeds (``seed(s)``: env
    ``i`` gets ``s + i`` at the next ``reset``) and options (``set_options``).

    Parameters
    ----------
    env_fns
        Functions that create the envs.
    start_method
        The ``multiprocessing`` start method (fastvec's ``context``). ``None``: fastvec's
        default (the platform's), not ``SubprocVecEnv``'s forkserver.
    **fastvec_options
        Passed to :class:`fastvec.AsyncVectorEnv` (``num_workers``, ``pin_workers``,
        ``shared_memory``, ``restart_workers``, ``start_timeout``...), except
        ``autoreset_mode`` and ``batch_size``, which SB3's semantics fix.

    Notes
    -----
    ``set_options`` with options that differ between envs resets the envs in one masked
    fastvec reset per distinct options; an env with empty options there gets
    ``options={}`` where ``DummyVecEnv`` passes none. An index given twice to ``env_method``
    & co. runs one call per index, in order, as ``DummyVecEnv`` does.
    """

    def __init__(self, env_fns: Sequence[Callable[[], Any]], start_method: str | None = None,
                 **fastvec_options: Any) -> None:
        fixed = [name for name in _FIXED_OPTIONS if name in fastvec_options]
        if fixed:
            raise TypeError(f"FastVecEnv sets {fixed} itself (SB3 resets an env in the step "
                            "that ends it, and steps every env at once)")
        self.vector_env = _PerEnvInfos([_MakeEnv(fn) for fn in env_fns], context=start_method,
                                       autoreset_mode=AutoresetMode.SAME_STEP,
                                       **fastvec_options)
        self._simple_actions = isinstance(self.vector_env.single_action_space, _SIMPLE_SPACES)
        try:
            super().__init__(len(env_fns), self.vector_env.single_observation_space,
                             self.vector_env.single_action_space)
            self.metadata = self.get_attr("metadata", 0)[0]
        except BaseException:
            self.vector_env.close(terminate=True)
            raise

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return bool(self.vector_env.closed)

    # -- reset and step --------------------------------------------------------------------
    def reset(self) -> VecEnvObs:
        """Reset every env with its seed and options (used once, as in ``DummyVecEnv``)."""
        seeds, groups = list(self._seeds), _options_groups(self._options)
        if len(groups) == 1:
            obs, infos = self.vector_env.reset_envs(seeds, groups[0][0] or None)
            self.reset_infos = [infos.get(i, {}) for i in range(self.num_envs)]
        else:
            for options, ids in groups:
                mask = np.zeros(self.num_envs, dtype=bool)
                mask[ids] = True
                obs, infos = self.vector_env.reset_envs(seeds, {**options, "reset_mask": mask})
                for i in ids:
                    self.reset_infos[i] = infos.get(i, {})
        self._reset_seeds()
        self._reset_options()
        return cast(VecEnvObs, obs)

    def step_async(self, actions: np.ndarray) -> None:
        """Send one action per env (an array or a sequence of per-env actions)."""
        self.vector_env.step_async(self._batch(actions))

    def step_wait(self) -> VecEnvStepReturn:
        """The step's observations, rewards, dones and per-env infos (``DummyVecEnv``'s)."""
        obs, rewards, terminations, truncations, raw = self.vector_env.step_envs_wait()
        dones = terminations | truncations
        time_limits = (truncations & ~terminations).tolist()
        if not raw:  # the common step: no env returned an info, none ended
            infos = [{"TimeLimit.truncated": t} for t in time_limits]
        else:
            infos = [raw.get(i) or {} for i in range(self.num_envs)]
            for i, info in raw.items():
                if dones[i] and "final_obs" in info:
                    step_info = info["final_info"]
                    step_info["TimeLimit.truncated"] = time_limits[i]
                    step_info["terminal_observation"] = info["final_obs"]
                    self.reset_infos[i] = {k: v for k, v in info.items()
                                           if k not in _FINAL_KEYS}
                    infos[i] = step_info
            for i, info in enumerate(infos):
                if "TimeLimit.truncated" not in info:
                    info["TimeLimit.truncated"] = time_limits[i]
        return obs, rewards.astype(np.float32), dones, infos

    def _batch(self, actions: Any) -> Any:
        """SB3's actions (indexed by env) as fastvec's batch of the action space."""
        if self._simple_actions:
            return np.asarray(actions)
        space = self.vector_env.single_action_space
        out: Any = create_empty_array(space, self.num_envs)
        return concatenate(space, [actions[i] for i in range(self.num_envs)], out)

    def close(self) -> None:
        """Close the envs, end the workers and free the shared memory."""
        self.vector_env.close()

    # -- render ----------------------------------------------------------------------------
    def get_images(self) -> Sequence[np.ndarray | None]:
        """Each env's ``render()`` (``rgb_array`` render mode only, as in SB3)."""
        if self.render_mode != "rgb_array":
            warnings.warn(f"The render mode is {self.render_mode}, but this method assumes "
                          "it is `rgb_array` to obtain images.", stacklevel=2)
            return [None for _ in range(self.num_envs)]
        return list(self.vector_env.call("render"))

    # -- attributes and methods --------------------------------------------------------------
    def has_attr(self, attr_name: str) -> bool:
        """Whether every env has ``attr_name`` (through its wrappers)."""
        return all(self.vector_env.call(_has_attr, attr_name))

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """``attr_name`` of the envs in ``indices`` (through their wrappers)."""
        return self._run(indices, _get_attr, attr_name)

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        """Set ``attr_name`` on the outermost wrapper of the envs in ``indices``."""
        self._run(indices, _set_attr, attr_name, value)

    def env_method(self, method_name: str, *method_args: Any, indices: VecEnvIndices = None,
                   **method_kwargs: Any) -> list[Any]:
        """Call ``method_name`` on the envs in ``indices``; only those envs run it."""
        return self._run(indices, _env_method, method_name, method_args, method_kwargs)

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper[Any, Any, Any, Any]],
                       indices: VecEnvIndices = None) -> list[bool]:
        """Whether each env in ``indices`` is wrapped by ``wrapper_class``."""
        return self._run(indices, _is_wrapped, wrapper_class)

    def _run(self, indices: VecEnvIndices, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """``fn(env, *args)`` in the workers of the envs in ``indices``, in their order."""
        ids = self._env_ids(indices)
        if ids is None:
            return list(self.vector_env.call(fn, *args))
        if len(set(ids)) == len(ids):
            return list(self.vector_env.call(fn, *args, env_ids=ids))
        return [self.vector_env.call(fn, *args, env_ids=[i])[0] for i in ids]

    def _env_ids(self, indices: VecEnvIndices) -> list[int] | None:
        """SB3's indices (an int, a sequence, negatives from the end) as env ids; None for
        every env in order."""
        if indices is None:
            return None
        n = self.num_envs
        ids = [int(i) for i in _as_iterable(indices)]
        for i in ids:
            if not -n <= i < n:
                raise IndexError(f"env index {i} out of range for {n} envs")
        return [i % n for i in ids]


def _as_iterable(indices: int | Iterable[int]) -> Iterable[int]:
    return [indices] if isinstance(indices, (int, np.integer)) else indices


def _options_groups(options: list[dict[str, Any]]) -> list[tuple[dict[str, Any], list[int]]]:
    """The envs' reset options as ``(options, env ids)`` for each distinct value."""
    groups: list[tuple[dict[str, Any], list[int]]] = []
    for i, value in enumerate(options):
        for known, ids in groups:
            if known == value:
                ids.append(i)
                break
        else:
            groups.append((value, [i]))
    return groups
