"""The scripts in examples/ run, and the PPO example learns."""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from types import ModuleType

import numpy as np
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"fastvec_example_{name}",
                                                  EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module


def test_ppo_cartpole_learns_and_is_deterministic() -> None:
    ppo = _load("ppo_cartpole")
    curve = ppo.main(total_steps=30_000, seed=0)
    first, last = curve.mean_return(first=20), curve.mean_return(last=20)
    # a random policy averages about 22 on CartPole-v1; a trained one reaches 500
    assert first < 40, curve.returns[:20]
    assert last >= 2 * first and last >= 150, (first, last)
    assert curve.env_steps == sorted(curve.env_steps) and curve.env_steps[-1] <= 30_000 + 512
    again = ppo.main(total_steps=5_000, seed=0)
    assert again.returns == curve.returns[:len(again.returns)]


def test_ppo_gae_matches_a_hand_computation() -> None:
    ppo = _load("ppo_cartpole")
    # one env, three steps; the episode terminates at step 1 and a new one starts at step 2
    rewards = np.array([[1.0], [1.0], [1.0]])
    values = np.array([[0.5], [0.4], [0.3]])
    next_values = np.array([[0.4], [9.9], [0.2]])  # 9.9: the final obs, ignored (terminated)
    terminated = np.array([[0.0], [1.0], [0.0]])
    done = terminated.copy()
    gamma, lam = 0.9, 0.8
    adv, targets = ppo.gae(rewards, values, next_values, terminated, done, gamma, lam)
    d2 = 1.0 + gamma * 0.2 - 0.3
    d1 = 1.0 - 0.4
    d0 = 1.0 + gamma * 0.4 - 0.5
    np.testing.assert_allclose(adv[:, 0], [d0 + gamma * lam * d1, d1, d2])
    np.testing.assert_allclose(targets, adv + values)


@pytest.mark.skipif(
    importlib.util.find_spec("ale_py") is None or importlib.util.find_spec("cv2") is None,
    reason="ale-py or opencv is not installed (fastvec[atari])")
def test_atari_pong_example_fills_its_rollout_buffer() -> None:
    pong = _load("atari_pong")
    rollout = pong.main(num_envs=2, rollout_steps=6, rollouts=2, seed=0)
    assert rollout.obs.shape == (7, 2, 4, 84, 84) and rollout.obs.dtype == np.uint8
    # every stored frame stack is distinct storage holding real frames, not a shared view
    assert rollout.obs.any(axis=(2, 3, 4)).all()
    assert not np.array_equal(rollout.obs[1], rollout.obs[6])
    assert rollout.actions.shape == (6, 2) and rollout.rewards.shape == (6, 2)


def test_double_buffering_example_steps_each_env_as_if_alone() -> None:
    import gymnasium as gym

    example = _load("double_buffering")
    double, synchronous = example.main(num_envs=4, env_steps=600)
    assert double.env_steps >= 600 and synchronous.env_steps >= 600
    assert double.rate > 0 and synchronous.rate > 0
    assert sorted(double.transitions) == [0, 1, 2, 3]
    # every env's observations and rewards are those of the same env stepped alone with the
    # same actions (NEXT_STEP autoreset: the step after an episode's end resets it)
    for env_id, transitions in double.transitions.items():
        env = gym.make("CartPole-v1")
        obs, _ = env.reset(seed=env_id)
        reward, autoreset = 0.0, False
        for seen_obs, action, seen_reward in transitions:
            np.testing.assert_array_equal(seen_obs, obs)
            assert seen_reward == reward
            if autoreset:
                (obs, _), reward, autoreset = env.reset(), 0.0, False
            else:
                obs, reward, terminated, truncated, _ = env.step(action)
                autoreset = bool(terminated or truncated)
        env.close()


def test_torch_ppo_example_learns_double_buffered() -> None:
    pytest.importorskip("torch", reason="the PyTorch PPO example needs torch")
    ppo = _load("ppo_torch_cartpole")
    result = ppo.main(total_steps=12_000, seed=0, vector="fastvec-double")
    # a random policy averages about 22 on CartPole-v1
    assert result.mean_return(first=20) < 40, result.returns[:20]
    assert result.mean_return(last=20) >= 100, result.returns[-20:]
    assert result.env_steps == 12 * 8 * 128 and result.steps_per_second > 0


def test_torch_ppo_double_buffered_rollout_is_each_env_stepped_alone() -> None:
    """Each env's row of the double-buffered rollout holds that env's own consecutive
    transitions: replaying its actions in the same env stepped alone gives the same
    observations, rewards and episode ends (SAME_STEP autoreset), over two rollouts."""
    pytest.importorskip("torch", reason="the PyTorch PPO example needs torch")
    import gymnasium as gym
    import torch

    ppo = _load("ppo_torch_cartpole")
    torch.manual_seed(0)
    num_envs, steps = 4, 40
    agent = ppo.Agent(4, 2)
    envs = ppo.make_envs("fastvec-double", num_envs)
    rollouts = []
    try:
        obs, _ = envs.reset(seed=0)
        episodes = ppo.Episodes(num_envs, ppo.Result())
        for _ in range(2):
            rollout = ppo.Rollout(steps, num_envs, 4)
            obs = ppo.collect_double_buffered(envs, agent, rollout, obs, episodes)
            rollouts.append(rollout)
    finally:
        envs.close()
    assert episodes.result.env_steps == 2 * steps * num_envs
    for i in range(num_envs):
        env = gym.make("CartPole-v1")
        alone, _ = env.reset(seed=i)
        for rollout in rollouts:
            for t in range(steps):
                np.testing.assert_array_equal(rollout.obs[t, i].numpy(), alone)
                alone, reward, terminated, truncated, _ = env.step(
                    int(rollout.actions[t, i]))
                assert rollout.rewards[t, i] == reward
                assert rollout.dones[t, i] == float(terminated or truncated)
                if terminated or truncated:
                    alone, _ = env.reset()
        np.testing.assert_array_equal(obs[i], alone)
        env.close()


def test_sb3_ppo_example_learns() -> None:
    pytest.importorskip("stable_baselines3", reason="the SB3 example needs stable-baselines3 "
                        "(pip install 'fastvec[sb3]')")
    example = _load("sb3_ppo")
    trained = example.main(total_steps=16_384, n_envs=8, seed=0, eval_episodes=3)
    assert trained.env_steps >= 16_384 and trained.steps_per_second > 0
    assert trained.mean_return > 100, trained
