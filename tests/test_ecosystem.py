"""fastvec among Gymnasium's own tools: vector wrappers, make_vec, registration, benchmarks.

The wrapper tests are differential: the same wrapper over ``gymnasium.vector.SyncVectorEnv``
and over ``fastvec.AsyncVectorEnv``, the same seeds and actions, and every output compared.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.envs.classic_control import CartPoleEnv
from gymnasium.utils.performance import benchmark_vector_step
from gymnasium.vector import AutoresetMode, SyncVectorEnv, VectorEnv
from gymnasium.wrappers import vector as vw

import envs as test_envs
import fastvec

STEPS = 120
NUM_ENVS = 4

# -- differential wrappers -------------------------------------------------------------------


def _cartpole() -> gym.Env:
    return gym.make("CartPole-v1")


def _pendulum() -> gym.Env:
    return gym.make("Pendulum-v1", max_episode_steps=50)


def _space_env_fns() -> list[Callable[[], gym.Env]]:
    obs = spaces.Dict({"pos": spaces.Box(-1.0, 1.0, (3,), np.float32),
                       "id": spaces.Discrete(7)})
    return [functools.partial(test_envs.SpaceEnv, obs, index=i) for i in range(NUM_ENVS)]


def _double(obs: np.ndarray) -> np.ndarray:
    return obs * 2.0 + 1.0


# name -> (env functions, wrap, a wider action space to sample from or None)
WRAPPED: dict[str, tuple[Callable[[], list], Callable[[VectorEnv], VectorEnv], Any]] = {
    "RecordEpisodeStatistics": (lambda: [_cartpole] * NUM_ENVS, vw.RecordEpisodeStatistics,
                                None),
    "NormalizeObservation": (lambda: [_cartpole] * NUM_ENVS, vw.NormalizeObservation, None),
    "NormalizeReward": (lambda: [_cartpole] * NUM_ENVS,
                        functools.partial(vw.NormalizeReward, gamma=0.9), None),
    "ClipAction": (lambda: [_pendulum] * NUM_ENVS, vw.ClipAction,
                   spaces.Box(-5.0, 5.0, (NUM_ENVS, 1), np.float32)),
    "TransformObservation": (lambda: [_cartpole] * NUM_ENVS,
                             functools.partial(vw.TransformObservation, func=_double), None),
    "DictInfoToList": (_space_env_fns, vw.DictInfoToList, None),
    "DictInfoToList(RecordEpisodeStatistics)": (
        lambda: [_cartpole] * NUM_ENVS,
        lambda env: vw.DictInfoToList(vw.RecordEpisodeStatistics(env)), None),
    "RescaleAction": (lambda: [_pendulum] * NUM_ENVS,
                      functools.partial(vw.RescaleAction, min_action=np.float32(-1.0),
                                        max_action=np.float32(1.0)),
                      None),
    "FlattenObservation": (_space_env_fns, vw.FlattenObservation, None),
    "ClipReward": (lambda: [_pendulum] * NUM_ENVS,
                   functools.partial(vw.ClipReward, min_reward=-3.0, max_reward=-0.5), None),
}


def _without_elapsed_time(info: Any) -> Any:
    """RecordEpisodeStatistics' wall-clock episode time ("t") differs from run to run."""
    if isinstance(info, dict):
        return {k: _without_elapsed_time(v) for k, v in info.items()
                if not (k == "t" and isinstance(info.get("l"), (np.ndarray, int, np.integer)))}
    if isinstance(info, (list, tuple)):
        return type(info)(_without_elapsed_time(v) for v in info)
    return info


def assert_same(expected: Any, got: Any, where: str = "") -> None:
    """Exactly equal, leaf by leaf: values, dtypes, keys and their order, list lengths."""
    if isinstance(expected, dict):
        assert isinstance(got, dict), f"{where}: {type(got)} is not a dict"
        assert list(expected) == list(got), f"{where}: keys {list(got)} != {list(expected)}"
        for key in expected:
            assert_same(expected[key], got[key], f"{where}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert type(got) is type(expected) and len(got) == len(expected), where
        for i, (e, g) in enumerate(zip(expected, got, strict=True)):
            assert_same(e, g, f"{where}[{i}]")
    elif isinstance(expected, np.ndarray):
        assert isinstance(got, np.ndarray), f"{where}: {type(got)} is not an array"
        assert got.dtype == expected.dtype, f"{where}: dtype {got.dtype} != {expected.dtype}"
        np.testing.assert_array_equal(got, expected, err_msg=where)
    else:
        assert got == expected, f"{where}: {got!r} != {expected!r}"


def _rollout(envs: VectorEnv, actions: list[Any]) -> list[tuple]:
    # copy=False hands out views: copy each record before the next step overwrites it
    out = [_copied(envs.reset(seed=7))]
    for action in actions:
        out.append(_copied(envs.step(action)))
    return out


def _copied(x: Any) -> Any:
    if isinstance(x, tuple):
        return tuple(_copied(v) for v in x)
    if isinstance(x, np.ndarray):
        return x.copy()
    if isinstance(x, dict):
        return {k: _copied(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_copied(v) for v in x]
    return x


@pytest.mark.parametrize("copy", [True, False], ids=["copy", "no-copy"])
@pytest.mark.parametrize("name", list(WRAPPED))
def test_vector_wrapper_matches_sync(name: str, copy: bool) -> None:
    make_fns, wrap, action_space = WRAPPED[name]
    reference = wrap(SyncVectorEnv(make_fns()))
    wrapped = wrap(fastvec.AsyncVectorEnv(make_fns(), copy=copy))
    try:
        assert wrapped.single_observation_space == reference.single_observation_space
        assert wrapped.action_space == reference.action_space
        sampler = action_space if action_space is not None else reference.action_space
        sampler.seed(3)
        actions = [sampler.sample() for _ in range(STEPS)]
        expected = _rollout(reference, actions)
        got = _rollout(wrapped, actions)
    finally:
        wrapped.close()
        reference.close()
    assert any(np.any(r[2] | r[3]) for r in expected[1:]), "no episode ended: test too short"
    for t, (e, g) in enumerate(zip(expected, got, strict=True)):
        assert_same(_without_elapsed_time(e), _without_elapsed_time(g), f"{name} t={t}")


def test_record_episode_statistics_queues_match_sync() -> None:
    reference = vw.RecordEpisodeStatistics(SyncVectorEnv([_cartpole] * NUM_ENVS))
    wrapped = vw.RecordEpisodeStatistics(fastvec.AsyncVectorEnv([_cartpole] * NUM_ENVS))
    try:
        reference.action_space.seed(0)
        actions = [reference.action_space.sample() for _ in range(STEPS)]
        _rollout(reference, actions)
        _rollout(wrapped, actions)
        assert list(wrapped.return_queue) == list(reference.return_queue)
        assert list(wrapped.length_queue) == list(reference.length_queue)
        assert len(wrapped.return_queue) > NUM_ENVS
    finally:
        wrapped.close()
        reference.close()


# -- make_vec ----------------------------------------------------------------------------------

def test_fastvec_make_vec_builds_a_fastvec_env_with_gymnasiums_spec() -> None:
    envs = fastvec.make_vec("CartPole-v1", 3, vector_kwargs={"num_workers": 1},
                            wrappers=[gym.wrappers.RecordEpisodeStatistics],
                            max_episode_steps=5)
    try:
        assert isinstance(envs, fastvec.AsyncVectorEnv)
        assert envs.num_envs == 3 and envs.num_workers == 1
        assert envs.spec is not None and envs.spec.id == "CartPole-v1"
        assert envs.spec.kwargs["vectorization_mode"] == "async"
        assert envs.spec.kwargs["max_episode_steps"] == 5
        envs.reset(seed=0)
        truncated = np.zeros(3, dtype=bool)
        for _ in range(5):
            _, _, _, truncated, infos = envs.step(np.zeros(3, dtype=np.int64))
        assert truncated.all()  # max_episode_steps reached the sub-envs
        assert infos["_episode"].all()  # and so did the per-env wrapper
    finally:
        envs.close()


def make_fast_cartpole(num_envs: int, **kwargs: Any) -> fastvec.AsyncVectorEnv:
    """A ``vector_entry_point`` given as a string: ``"test_ecosystem:make_fast_cartpole"``."""
    return fastvec.make_vec("CartPole-v1", num_envs, **kwargs)


@pytest.fixture
def register() -> Iterator[Callable[..., str]]:
    """``gymnasium.register`` for this test only."""
    ids: list[str] = []

    def _register(env_id: str, **kwargs: Any) -> str:
        gym.register(env_id, **kwargs)
        ids.append(env_id)
        return env_id

    yield _register
    for env_id in ids:
        gym.registry.pop(env_id, None)


VECTOR_ENTRY_POINTS = {
    # the documented recipe: a partial of fastvec.make_vec over a single-env id
    "partial": functools.partial(fastvec.make_vec, "CartPole-v1"),
    # its own id works too: fastvec.make_vec builds single envs from `entry_point`
    "partial-self": functools.partial(fastvec.make_vec, "FastCartPole-v0",
                                      vector_kwargs={"num_workers": 1}),
    "string": "test_ecosystem:make_fast_cartpole",
}


@pytest.mark.parametrize("mode", [None, "vector_entry_point"])
@pytest.mark.parametrize("how", list(VECTOR_ENTRY_POINTS))
def test_gymnasium_make_vec_through_a_vector_entry_point(register, how: str,
                                                         mode: str | None) -> None:
    env_id = register("FastCartPole-v0", entry_point=CartPoleEnv, max_episode_steps=6,
                      vector_entry_point=VECTOR_ENTRY_POINTS[how])
    envs = gym.make_vec(env_id, num_envs=2, vectorization_mode=mode)
    try:
        assert isinstance(envs, fastvec.AsyncVectorEnv)
        assert envs.spec.kwargs["vectorization_mode"] == "vector_entry_point"
        envs.reset(seed=1)
        for _ in range(6):
            _, _, _, truncated, _ = envs.step(np.ones(2, dtype=np.int64))
        # gymnasium passes the spec's max_episode_steps on to the entry point
        assert truncated.all()
    finally:
        envs.close()


# -- an env registered in the parent only --------------------------------------------------

def _cartpole_by_value(**kwargs: Any) -> gym.Env:
    return CartPoleEnv(**kwargs)


PARENT_ONLY_ENTRY_POINTS = {
    "string": "gymnasium.envs.classic_control.cartpole:CartPoleEnv",
    # a lambda is pickled by value: the worker needs no importable name at all
    "lambda": lambda **kwargs: _cartpole_by_value(**kwargs),  # noqa: PLW0108 - a lambda on purpose
}


@pytest.mark.parametrize("entry", list(PARENT_ONLY_ENTRY_POINTS))
@pytest.mark.parametrize("context", ["fork", "forkserver", "spawn"])
def test_make_vec_runs_an_env_registered_only_in_the_parent(register, context: str,
                                                            entry: str) -> None:
    # Spawned and forkserver workers re-import modules but never see this registration;
    # fastvec.make_vec hands them the EnvSpec itself, so they need no registry lookup.
    env_id = register(f"ParentOnly{entry.title()}-v0",
                      entry_point=PARENT_ONLY_ENTRY_POINTS[entry], max_episode_steps=3)
    envs = fastvec.make_vec(env_id, 2, vector_kwargs={"context": context, "num_workers": 1})
    try:
        obs, _ = envs.reset(seed=0)
        assert obs.shape == (2, 4)
        for _ in range(3):
            _, _, _, truncated, _ = envs.step(np.zeros(2, dtype=np.int64))
        assert truncated.all()
    finally:
        envs.close()


@pytest.mark.parametrize("context", ["forkserver", "spawn"])
def test_make_by_id_in_a_spawned_worker_names_the_missing_env(register, context: str) -> None:
    # An env function that looks the id up again runs that lookup in the worker, whose
    # registry lacks the id: the error says which, and nothing is left behind.
    env_id = register("ParentOnlyLookup-v0", entry_point=CartPoleEnv)
    # the parent makes one env itself (to read the spaces), which finds the id
    with pytest.warns(UserWarning) as logged:  # gymnasium.logger.error warns
        with pytest.raises(gym.error.NameNotFound, match="ParentOnlyLookup") as excinfo:
            fastvec.AsyncVectorEnv([lambda: gym.make(env_id)] * 2, context=context,
                                   num_workers=1)
    assert any("Received the following error from Worker-0" in str(w.message) for w in logged)
    # and it says what to do about it
    hint = "".join(getattr(excinfo.value, "__notes__", [])) + str(excinfo.value)
    assert "fastvec.make_vec" in hint and "context='fork'" in hint


# -- gymnasium.utils.performance -------------------------------------------------------------

@pytest.mark.parametrize("autoreset_mode", list(AutoresetMode), ids=lambda m: m.value)
def test_benchmark_vector_step(autoreset_mode: AutoresetMode) -> None:
    envs = fastvec.AsyncVectorEnv([_cartpole] * NUM_ENVS, autoreset_mode=autoreset_mode)
    try:
        rate = benchmark_vector_step(envs, target_duration=0.2, seed=0)  # type: ignore[arg-type]
    finally:
        envs.close()
    assert rate > 1000
