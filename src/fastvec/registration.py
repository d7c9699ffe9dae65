"""``fastvec.make_vec``: Gymnasium's ``make_vec(..., vectorization_mode="async")``, on fastvec."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import gymnasium
from gymnasium import Env
from gymnasium.envs.registration import EnvSpec

from fastvec.vector_env import AsyncVectorEnv

__all__ = ["make_vec"]

# what Gymnasium's make_vec takes as a wrapper: usually the Wrapper class itself
_WrapperFactory: TypeAlias = Callable[[Env[Any, Any]], gymnasium.Wrapper[Any, Any, Any, Any]]


def make_vec(
    id: str | EnvSpec,
    num_envs: int = 1,
    vector_kwargs: dict[str, Any] | None = None,
    wrappers: Sequence[_WrapperFactory] | None = None,
    **kwargs: Any,
) -> AsyncVectorEnv:
    """Create a fastvec :class:`AsyncVectorEnv` of ``num_envs`` copies of a registered env.

    Mirrors ``gymnasium.make_vec(id, num_envs, vectorization_mode="async", vector_kwargs=...,
    wrappers=..., **kwargs)``: ``vector_kwargs`` go to :class:`AsyncVectorEnv` (fastvec's own
    options such as ``num_workers`` included), ``wrappers`` wrap each sub-environment, and
    ``kwargs`` go to ``gymnasium.make``.

    Workers receive the env's :class:`~gymnasium.envs.registration.EnvSpec` itself, not its
    id, so an env registered only in the calling process (``gymnasium.register`` in a script
    or a notebook) works under every start method: ``"spawn"`` and ``"forkserver"`` workers
    re-import modules but never see such a registration. (An env function of your own that
    calls ``gymnasium.make(id)`` does look the id up in the worker, and fails there with
    ``NameNotFound`` unless the registration runs on import of a module the worker imports.)

    To make ``gymnasium.make_vec`` build fastvec envs, register a ``vector_entry_point``::

        gymnasium.register(
            "MyEnv-v0",
            entry_point="my_package.envs:MyEnv",
            vector_entry_point=functools.partial(
                fastvec.make_vec, "MyEnv-v0", vector_kwargs={"num_workers": 4}),
        )
        envs = gymnasium.make_vec("MyEnv-v0", num_envs=16)   # a fastvec.AsyncVectorEnv

    Gymnasium calls the entry point with ``num_envs`` and the env's keyword arguments
    (``max_episode_steps`` included); Gymnasium refuses ``vector_kwargs`` and ``wrappers`` in
    this mode, so fix them in the ``partial``. A string such as
    ``"my_package.envs:make_fast_vec"`` naming ``def make_fast_vec(num_envs, **kwargs)`` that
    calls ``fastvec.make_vec`` works too.
    """
    if isinstance(id, EnvSpec):
        env_spec = id
    elif isinstance(id, str):
        env_spec = gymnasium.spec(id)
    else:
        raise gymnasium.error.Error(f"Invalid id type: {type(id)}. Expected `str` or `EnvSpec`")
    env_spec = copy.deepcopy(env_spec)
    env_kwargs = dict(env_spec.kwargs)
    env_spec.kwargs = {}
    num_envs = env_kwargs.pop("num_envs", num_envs)
    env_kwargs.pop("vectorization_mode", None)
    vector_kwargs = dict(env_kwargs.pop("vector_kwargs", vector_kwargs) or {})
    wrappers = list(env_kwargs.pop("wrappers", wrappers) or [])
    env_kwargs.update(kwargs)
    if env_spec.entry_point is None:
        raise gymnasium.error.Error(
            f"Cannot create vectorized environment for {env_spec.id} because it doesn't have an "
            "entry point defined."
        )

    def create_env() -> Env[Any, Any]:
        env = gymnasium.make(env_spec, **env_kwargs.copy())
        for wrapper in wrappers:
            env = wrapper(env)
        return env

    envs = AsyncVectorEnv([create_env for _ in range(num_envs)], **vector_kwargs)
    spec = copy.deepcopy(env_spec)
    spec.kwargs = env_kwargs.copy()
    if num_envs != 1:
        spec.kwargs["num_envs"] = num_envs
    spec.kwargs["vectorization_mode"] = "async"
    if vector_kwargs:
        spec.kwargs["vector_kwargs"] = vector_kwargs
    if wrappers:
        spec.kwargs["wrappers"] = wrappers
    envs.unwrapped.spec = spec
    return envs
