"""PPO in PyTorch, CleanRL-style (one file, ``ppo.py``'s agent, losses and defaults), on fastvec,
synchronous or double-buffered.

Run it::

    python examples/ppo_torch_cartpole.py --vector fastvec-double --total-steps 100000

``--vector`` picks what steps the envs: ``gym-sync`` and ``gym-async`` (Gymnasium's
``SyncVectorEnv`` and ``AsyncVectorEnv``), ``fastvec`` (``fastvec.AsyncVectorEnv``, the same
synchronous loop: only the constructor line differs), ``fastvec-parent`` (the same with
``parent_group=True``: this process steps one group of envs itself while it waits, which
holds up better when PyTorch's threads share the cores) or ``fastvec-double``: fastvec with
``batch_size = num_envs // 2``, whose collection loop computes the actions of one half of
the envs while the workers step the other half (``recv``/``send``, see
examples/double_buffering.py). Each env still contributes ``num_steps`` consecutive
transitions of its own to every update, so the PPO update is the same in all five.

Every vector env runs in ``SAME_STEP`` autoreset mode (what CleanRL's ``ppo.py`` was written
for): the step that ends an episode returns the next episode's first observation, and like
``ppo.py`` the loss does not bootstrap truncated episodes.
"""

from __future__ import annotations

import argparse
import functools
import time
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from torch import nn
from torch.distributions.categorical import Categorical

import fastvec

VECTORS = ("gym-sync", "gym-async", "fastvec", "fastvec-parent", "fastvec-double")


@dataclass
class Config:
    num_envs: int = 8
    num_steps: int = 128  # per env, per update
    learning_rate: float = 2.5e-3
    anneal_lr: bool = True
    gamma: float = 0.99
    gae_lambda: float = 0.95
    num_minibatches: int = 4
    update_epochs: int = 4
    clip_coef: float = 0.2
    ent_coef: float = 0.01
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    torch_threads: int = 1  # the envs' workers need the other cores


@dataclass
class Result:
    """Every finished episode's return, in the order they finished, and the training rate."""

    returns: list[float] = field(default_factory=list)
    env_steps: int = 0
    seconds: float = 0.0
    collect_seconds: float = 0.0  # of ``seconds``, the time spent collecting rollouts

    @property
    def steps_per_second(self) -> float:
        return self.env_steps / self.seconds if self.seconds else 0.0

    def mean_return(self, first: int | None = None, last: int | None = None) -> float:
        picked = self.returns[:first] if first is not None else self.returns[-(last or 0):]
        return float(np.mean(picked))


def layer_init(layer: nn.Linear, std: float = float(np.sqrt(2)), bias: float = 0.0) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias)
    return layer


class Agent(nn.Module):
    """CleanRL's ``ppo.py`` agent: separate 64-64 tanh MLPs for the value and the logits."""

    def __init__(self, n_obs: int, n_actions: int) -> None:
        super().__init__()
        self.critic = nn.Sequential(
            layer_init(nn.Linear(n_obs, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 1), std=1.0))
        self.actor = nn.Sequential(
            layer_init(nn.Linear(n_obs, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, n_actions), std=0.01))

    def get_value(self, x: torch.Tensor) -> torch.Tensor:
        return self.critic(x)

    def get_action_and_value(self, x: torch.Tensor, action: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        probs = Categorical(logits=self.actor(x))
        if action is None:
            action = probs.sample()
        return action, probs.log_prob(action), probs.entropy(), self.critic(x)


class Rollout:
    """``(num_steps, num_envs)`` storage; env ``i``'s ``t``-th transition is row ``[t, i]``."""

    def __init__(self, steps: int, num_envs: int, n_obs: int) -> None:
        self.obs = torch.zeros((steps, num_envs, n_obs))
        self.actions = torch.zeros((steps, num_envs), dtype=torch.long)
        self.logprobs = torch.zeros((steps, num_envs))
        self.values = torch.zeros((steps, num_envs))
        self.rewards = torch.zeros((steps, num_envs))
        self.dones = torch.zeros((steps, num_envs))  # the episode ended at this step


class Episodes:
    """Per-env running returns; finished ones go to the result."""

    def __init__(self, num_envs: int, result: Result) -> None:
        self.running = np.zeros(num_envs)
        self.result = result

    def add(self, env_ids: Any, rewards: np.ndarray, dones: np.ndarray) -> None:
        self.running[env_ids] += rewards
        for i in np.asarray(env_ids)[dones]:
            self.result.returns.append(float(self.running[i]))
            self.running[i] = 0.0
        self.result.env_steps += len(rewards)


def make_envs(vector: str, num_envs: int) -> gym.vector.VectorEnv:
    """The vector env each ``--vector`` choice names (only this line differs between them)."""
    fns = [functools.partial(gym.make, "CartPole-v1") for _ in range(num_envs)]
    mode = AutoresetMode.SAME_STEP
    if vector == "gym-sync":
        return gym.vector.SyncVectorEnv(fns, autoreset_mode=mode)
    if vector == "gym-async":
        return gym.vector.AsyncVectorEnv(fns, autoreset_mode=mode)
    if vector == "fastvec":
        return fastvec.AsyncVectorEnv(fns, autoreset_mode=mode)
    if vector == "fastvec-parent":
        return fastvec.AsyncVectorEnv(fns, autoreset_mode=mode, parent_group=True)
    if vector == "fastvec-double":
        return fastvec.AsyncVectorEnv(fns, autoreset_mode=mode, batch_size=num_envs // 2)
    raise ValueError(f"unknown vector {vector!r}: one of {VECTORS}")


def collect_synchronous(envs: gym.vector.VectorEnv, agent: Agent, rollout: Rollout,
                        obs: np.ndarray, episodes: Episodes) -> np.ndarray:
    """CleanRL's loop: the policy acts on every env, then every env steps."""
    all_envs = np.arange(envs.num_envs)
    for t in range(len(rollout.obs)):
        x = torch.as_tensor(obs, dtype=torch.float32)
        with torch.no_grad():
            action, logprob, _, value = agent.get_action_and_value(x)
        rollout.obs[t], rollout.actions[t] = x, action
        rollout.logprobs[t], rollout.values[t] = logprob, value.flatten()
        obs, reward, terminated, truncated, _ = envs.step(action.numpy())
        done = terminated | truncated
        rollout.rewards[t] = torch.as_tensor(reward, dtype=torch.float32)
        rollout.dones[t] = torch.as_tensor(done, dtype=torch.float32)
        episodes.add(all_envs, reward, done)
    return obs


def collect_double_buffered(envs: fastvec.AsyncVectorEnv, agent: Agent, rollout: Rollout,
                            obs: np.ndarray, episodes: Episodes) -> np.ndarray:
    """``recv`` the envs that finished, act for them, ``send``: the other half steps meanwhile.

    ``obs`` holds every env's current observation (none is in flight between updates); an env
    that has its ``num_steps`` transitions waits there for the next update.
    """
    steps, num_envs = rollout.obs.shape[:2]
    count = np.zeros(num_envs, dtype=int)  # transitions stored per env
    obs = obs.copy()

    def act(env_ids: np.ndarray) -> None:
        x = torch.as_tensor(obs[env_ids], dtype=torch.float32)
        with torch.no_grad():
            action, logprob, _, value = agent.get_action_and_value(x)
        t = count[env_ids]
        rollout.obs[t, env_ids], rollout.actions[t, env_ids] = x, action
        rollout.logprobs[t, env_ids], rollout.values[t, env_ids] = logprob, value.flatten()
        envs.send(action.numpy(), env_ids)

    in_flight = 0
    for half in np.array_split(np.arange(num_envs), num_envs // envs.batch_size):
        act(half)  # the second half's actions are computed while the first half steps
        in_flight += len(half)
    while in_flight:
        next_obs, reward, terminated, truncated, infos = envs.recv()
        env_ids = infos["env_id"]
        in_flight -= len(env_ids)
        done = terminated | truncated
        t = count[env_ids]
        rollout.rewards[t, env_ids] = torch.as_tensor(reward, dtype=torch.float32)
        rollout.dones[t, env_ids] = torch.as_tensor(done, dtype=torch.float32)
        count[env_ids] += 1
        obs[env_ids] = next_obs
        episodes.add(env_ids, reward, done)
        more = env_ids[count[env_ids] < steps]
        if len(more):
            act(more)
            in_flight += len(more)
    return obs


def advantages_and_returns(agent: Agent, rollout: Rollout, next_obs: np.ndarray,
                           cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over each env's own ``num_steps`` transitions (CleanRL's recursion)."""
    with torch.no_grad():
        next_value = agent.get_value(torch.as_tensor(next_obs, dtype=torch.float32)).flatten()
    advantages = torch.zeros_like(rollout.rewards)
    last = torch.zeros_like(next_value)
    steps = len(rollout.rewards)
    for t in reversed(range(steps)):
        next_values = next_value if t == steps - 1 else rollout.values[t + 1]
        nonterminal = 1.0 - rollout.dones[t]
        delta = rollout.rewards[t] + cfg.gamma * next_values * nonterminal - rollout.values[t]
        advantages[t] = last = delta + cfg.gamma * cfg.gae_lambda * nonterminal * last
    return advantages, advantages + rollout.values


def update(agent: Agent, optimizer: torch.optim.Optimizer, rollout: Rollout,
           advantages: torch.Tensor, returns: torch.Tensor, cfg: Config) -> None:
    """CleanRL's PPO update: minibatch epochs of the clipped surrogate, clipped value loss."""
    b_obs = rollout.obs.reshape(-1, rollout.obs.shape[-1])
    b_actions, b_logprobs = rollout.actions.reshape(-1), rollout.logprobs.reshape(-1)
    b_adv, b_returns = advantages.reshape(-1), returns.reshape(-1)
    b_values = rollout.values.reshape(-1)
    batch = len(b_obs)
    minibatch = batch // cfg.num_minibatches
    for _ in range(cfg.update_epochs):
        order = torch.randperm(batch)
        for start in range(0, batch, minibatch):
            idx = order[start:start + minibatch]
            _, newlogprob, entropy, newvalue = agent.get_action_and_value(b_obs[idx],
                                                                          b_actions[idx])
            ratio = (newlogprob - b_logprobs[idx]).exp()
            adv = b_adv[idx]
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
            pg_loss = torch.max(-adv * ratio,
                                -adv * torch.clamp(ratio, 1 - cfg.clip_coef, 1 + cfg.clip_coef)
                                ).mean()
            newvalue = newvalue.flatten()
            v_clipped = b_values[idx] + torch.clamp(newvalue - b_values[idx],
                                                    -cfg.clip_coef, cfg.clip_coef)
            v_loss = 0.5 * torch.max((newvalue - b_returns[idx]) ** 2,
                                     (v_clipped - b_returns[idx]) ** 2).mean()
            loss = pg_loss - cfg.ent_coef * entropy.mean() + cfg.vf_coef * v_loss
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
            optimizer.step()


def main(total_steps: int = 100_000, seed: int = 0, vector: str = "fastvec-double",
         config: Config | None = None, verbose: bool = False) -> Result:
    """Train for at least ``total_steps`` env steps; return the episodes and the rate."""
    cfg = config or Config()
    torch.manual_seed(seed)
    torch.set_num_threads(cfg.torch_threads)
    result = Result()
    envs = make_envs(vector, cfg.num_envs)
    try:
        n_obs = int(np.prod(envs.single_observation_space.shape))
        agent = Agent(n_obs, int(envs.single_action_space.n))
        optimizer = torch.optim.Adam(agent.parameters(), lr=cfg.learning_rate, eps=1e-5)
        rollout = Rollout(cfg.num_steps, cfg.num_envs, n_obs)
        episodes = Episodes(cfg.num_envs, result)
        collect = (collect_double_buffered if vector == "fastvec-double"
                   else collect_synchronous)
        updates = -(-total_steps // (cfg.num_steps * cfg.num_envs))
        started = time.perf_counter()
        obs, _ = envs.reset(seed=seed)
        for u in range(updates):
            if cfg.anneal_lr:
                optimizer.param_groups[0]["lr"] = (1.0 - u / updates) * cfg.learning_rate
            collect_started = time.perf_counter()
            obs = collect(envs, agent, rollout, obs, episodes)  # type: ignore[arg-type]
            result.collect_seconds += time.perf_counter() - collect_started
            advantages, returns = advantages_and_returns(agent, rollout, obs, cfg)
            update(agent, optimizer, rollout, advantages, returns, cfg)
            if verbose and result.returns and (u % 10 == 9 or u == updates - 1):
                print(f"{result.env_steps:>8} steps  {time.perf_counter() - started:6.1f} s  "
                      f"mean return (last 20 episodes) {result.mean_return(last=20):7.1f}")
        result.seconds = time.perf_counter() - started
    finally:
        envs.close()
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vector", choices=VECTORS, default="fastvec-double")
    parser.add_argument("--total-steps", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = main(args.total_steps, args.seed, args.vector, verbose=True)
    print(f"{args.vector}: {out.steps_per_second:,.0f} env-steps/s; mean return of the "
          f"first 20 episodes {out.mean_return(first=20):.1f}, of the last 20 "
          f"{out.mean_return(last=20):.1f}")
