"""fastvec.integrations.sb3.FastVecEnv against Stable-Baselines3's DummyVecEnv: the same seeded
envs through both, every observation, reward, done, info and reset info compared leaf by
leaf; SB3's vec-env wrappers on top; and SB3's PPO learning CartPole on it."""

from __future__ import annotations

import functools

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

pytest.importorskip("stable_baselines3", reason="the SB3 adapter needs stable-baselines3 "
                    "(pip install 'fastvec[sb3]')")

from stable_baselines3 import PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import (
    DummyVecEnv,
    VecFrameStack,
    VecMonitor,
    VecNormalize,
)

from envs import SpaceEnv
from fastvec.integrations.sb3 import FastVecEnv

N = 5
BOX = spaces.Box(-2.0, 2.0, (3,), np.float32)
CASES = {
    "box-obs/discrete-act": (BOX, spaces.Discrete(4)),
    "discrete-obs/box-act": (spaces.Discrete(7), spaces.Box(-1.0, 1.0, (2,), np.float32)),
    "dict-obs/multidiscrete-act": (
        spaces.Dict({"pos": BOX, "cell": spaces.Discrete(5),
                     "bits": spaces.MultiBinary(4)}),
        spaces.MultiDiscrete([3, 2])),
}


def space_fns(obs_space, action_space, n=N, **kwargs):
    """Envs whose episodes have different lengths (index added), end by termination or
    truncation, and return step infos (scalars, arrays, nested dicts) and reset infos."""
    return [functools.partial(SpaceEnv, obs_space, action_space, index=i, **kwargs)
            for i in range(n)]


def assert_same(a, b, where=""):
    """Equal values of equal types, leaf by leaf (arrays: dtype, shape and values)."""
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict)), \
        f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), f"{where}: keys {list(a)} != {list(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: {len(a)} != {len(b)} items"
        for k, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{k}]")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a!r} != {b!r}"
        np.testing.assert_array_equal(a, b, err_msg=where)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def batch_actions(space, rng, n=N):
    space.seed(int(rng.integers(2**31)))
    return np.stack([space.sample() for _ in range(n)])


@pytest.mark.parametrize("options", [
    pytest.param({"num_workers": 2}, id="workers"),
    # the last group stepped in this process (fastvec's parent_group)
    pytest.param({"num_workers": 1, "parent_group": True}, id="parent-group"),
])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_dummy_vec_env(case, options):
    obs_space, action_space = CASES[case]
    fns = space_fns(obs_space, action_space)
    reference = DummyVecEnv(fns)
    adapter = FastVecEnv(fns, **options)
    rng = np.random.default_rng(3)
    ends = np.zeros(N, dtype=int)
    try:
        for venv in (reference, adapter):
            venv.seed(11)
        assert_same(reference.reset(), adapter.reset(), "reset")
        assert_same(reference.reset_infos, adapter.reset_infos, "reset_infos")
        for t in range(3000):
            if t == 1000:  # one set of options for every env: one fastvec reset
                for venv in (reference, adapter):
                    venv.seed(5)
                    venv.set_options({"tag": "all"})
                assert_same(reference.reset(), adapter.reset(), f"reset at {t}")
            if t == 2000:  # options that differ: one masked fastvec reset per value
                options = [{"tag": i % 2} for i in range(N)]
                options[3] = {}
                for venv in (reference, adapter):
                    venv.set_options(options)
                    venv.seed(None if t % 2 else 8)
                assert_same(reference.reset(), adapter.reset(), f"reset at {t}")
            actions = batch_actions(action_space, rng)
            expected, got = reference.step(actions), adapter.step(actions)
            assert_same(expected, got, f"step {t}")
            assert_same(reference.reset_infos, adapter.reset_infos, f"reset_infos {t}")
            ends += expected[2]
        # every env ended many times, by termination and by truncation
        assert (ends > 100).all(), ends
    finally:
        reference.close()
        adapter.close()


def test_options_difference_is_only_an_empty_options_dict():
    """The one documented difference: with differing options, empty options arrive as {}."""
    fns = space_fns(BOX, spaces.Discrete(4), n=3)
    with_options = FastVecEnv(fns, num_workers=2)
    try:
        with_options.set_options([{"tag": 1}, {}, {"tag": 1}])
        with_options.reset()
        assert with_options.reset_infos[0]["tag"] == 1
        assert "tag" not in with_options.reset_infos[1]
    finally:
        with_options.close()


def test_attributes_and_methods_match_dummy_vec_env():
    fns = [lambda i=i: Monitor(SpaceEnv(BOX, index=i)) for i in range(N)]
    reference, adapter = DummyVecEnv(fns), FastVecEnv(fns, num_workers=2)
    try:
        for venv in (reference, adapter):
            venv.seed(0)
            venv.reset()
        for indices in (None, 2, [1, 3], [3, 1], [0, -1], [-2], [4, 4], np.array([0, 2])):
            for name in ("index", "custom_attr", "length", "render_mode"):
                assert_same(reference.get_attr(name, indices), adapter.get_attr(name, indices))
            assert_same(reference.env_method("scaled", 2.0, indices=indices, offset=1.0),
                        adapter.env_method("scaled", 2.0, indices=indices, offset=1.0))
            assert_same(reference.env_is_wrapped(Monitor, indices),
                        adapter.env_is_wrapped(Monitor, indices))
            assert_same(reference.env_is_wrapped(gym.wrappers.TimeLimit, indices),
                        adapter.env_is_wrapped(gym.wrappers.TimeLimit, indices))
        for venv in (reference, adapter):
            # set_attr sets on the outermost wrapper (Monitor), as DummyVecEnv does
            venv.set_attr("custom_attr", "outer", indices=[1, 3])
            venv.env_method("set_wrapper_attr", "length", 99, indices=[0, 4])
        for name in ("custom_attr", "length"):
            assert_same(reference.get_attr(name), adapter.get_attr(name))
        assert adapter.get_attr("custom_attr") == [None, "outer", None, "outer", None]
        # env_method on indices [1, 3] ran on envs 1 and 3 only
        assert_same(reference.env_method("reset", indices=[1, 3]),
                    adapter.env_method("reset", indices=[1, 3]))
        assert adapter.get_attr("episodes") == [1, 2, 1, 2, 1]
        assert adapter.has_attr("scaled") and reference.has_attr("scaled")
        assert not adapter.has_attr("no_such_attr") and not reference.has_attr("no_such_attr")
        with pytest.raises(IndexError):
            adapter.get_attr("index", [N])
    finally:
        reference.close()
        adapter.close()


def test_render_and_images_match_dummy_vec_env():
    fns = space_fns(BOX, spaces.Discrete(4), n=4, render_mode="rgb_array")
    reference, adapter = DummyVecEnv(fns), FastVecEnv(fns, num_workers=2)
    try:
        assert adapter.render_mode == reference.render_mode == "rgb_array"
        assert adapter.metadata == reference.metadata
        for venv in (reference, adapter):
            venv.reset()
            venv.step(np.arange(4) % 4)
        assert_same(reference.get_images(), adapter.get_images())
        assert_same(reference.render(), adapter.render())  # tiled into one frame
    finally:
        reference.close()
        adapter.close()
    quiet = FastVecEnv(space_fns(BOX, spaces.Discrete(4), n=2), num_workers=1)
    try:
        with pytest.warns(UserWarning, match="assumes it is `rgb_array`"):
            assert quiet.get_images() == [None, None]
    finally:
        quiet.close()


def _without_times(infos):
    """VecMonitor's episode info holds wall-clock times ("t"), which differ between runs."""
    return [{k: ({**v, "t": 0.0} if k == "episode" else v) for k, v in info.items()}
            for info in infos]


def _step_alike(reference, adapter, rng, steps, actions, envs):
    """Step both ``steps`` times with the same random Discrete(``actions``) actions for
    ``envs`` envs: the same observations, rewards, dones and infos (but their times)."""
    for t in range(steps):
        batch = rng.integers(0, actions, envs)
        (obs_a, rew_a, done_a, info_a), (obs_b, rew_b, done_b, info_b) = (
            reference.step(batch), adapter.step(batch))
        assert_same((obs_a, rew_a, done_a), (obs_b, rew_b, done_b), f"step {t}")
        assert_same(_without_times(info_a), _without_times(info_b), f"infos {t}")


@pytest.mark.parametrize("wrap", [
    pytest.param(lambda v: VecNormalize(v, gamma=0.9), id="VecNormalize"),
    pytest.param(lambda v: VecFrameStack(v, n_stack=3), id="VecFrameStack"),
    pytest.param(VecMonitor, id="VecMonitor"),
    pytest.param(lambda v: VecNormalize(VecFrameStack(VecMonitor(v), 2)), id="stacked"),
])
def test_sb3_wrappers_on_top(wrap):
    fns = space_fns(spaces.Box(0, 255, (4, 4, 2), np.uint8), spaces.Discrete(4))
    reference, adapter = wrap(DummyVecEnv(fns)), wrap(FastVecEnv(fns, num_workers=2))
    rng = np.random.default_rng(0)
    try:
        for venv in (reference, adapter):
            venv.seed(2)
        assert_same(reference.reset(), adapter.reset())
        _step_alike(reference, adapter, rng, steps=300, actions=4, envs=N)
    finally:
        reference.close()
        adapter.close()


def test_make_vec_env_with_fastvec_options():
    kwargs = {"n_envs": 4, "seed": 0}
    reference = make_vec_env("CartPole-v1", **kwargs)
    adapter = make_vec_env("CartPole-v1", vec_env_cls=FastVecEnv,
                           vec_env_kwargs={"num_workers": 2, "pin_workers": False}, **kwargs)
    try:
        assert isinstance(adapter, FastVecEnv) and adapter.vector_env.num_workers == 2
        assert adapter.env_is_wrapped(Monitor) == [True] * 4
        assert_same(reference.reset(), adapter.reset())
        _step_alike(reference, adapter, np.random.default_rng(1), steps=600, actions=2, envs=4)
    finally:
        reference.close()
        adapter.close()


def test_fastvec_options_sb3_needs_are_refused():
    fns = space_fns(BOX, spaces.Discrete(4), n=2)
    for option in ({"autoreset_mode": "NextStep"}, {"batch_size": 1}):
        with pytest.raises(TypeError, match="sets"):
            FastVecEnv(fns, **option)


def test_ppo_learns_cartpole():
    """SB3's PPO on the adapter: a clear improvement over random play (about 22) in a few
    seconds of training."""
    torch = pytest.importorskip("torch", reason="SB3's PPO needs torch")
    torch.set_num_threads(1)
    venv = make_vec_env("CartPole-v1", n_envs=8, seed=0, vec_env_cls=FastVecEnv)
    try:
        model = PPO("MlpPolicy", venv, n_steps=64, batch_size=128, n_epochs=4,
                    learning_rate=2.5e-3, seed=0, device="cpu")
        model.learn(total_timesteps=20_480)
        returns = [info["r"] for info in model.ep_info_buffer]
    finally:
        venv.close()
    assert np.mean(returns[-20:]) > 100, returns
