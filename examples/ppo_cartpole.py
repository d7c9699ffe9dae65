"""PPO on CartPole with fastvec, in plain numpy: rollouts, GAE, the clipped surrogate, Adam.

Run it::

    python examples/ppo_cartpole.py --total-steps 60000 --seed 0

Eight CartPole-v1 envs step in fastvec's worker processes; the policy (an MLP over the
4 observations, softmax over the 2 actions) and the value function (a separate MLP) run in
this process and are trained by hand-written backpropagation. Nothing here is specific to
fastvec except the first line of :func:`main`: swap in ``gymnasium.vector.SyncVectorEnv`` and
it trains the same way.

The vector env runs with ``autoreset_mode=SAME_STEP``: when an episode ends, ``step`` already
returns the next episode's first observation, and the last observation of the finished one
is in ``infos["final_obs"]``. So every step is a real transition (no reset steps to mask
out), and a truncated episode (500 steps) bootstraps from the value of its final observation.
"""

from __future__ import annotations

import argparse
import functools
import time
from dataclasses import dataclass, field

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode

import fastvec


@dataclass
class Config:
    num_envs: int = 8
    rollout_steps: int = 64  # per env, per update: 512 transitions a batch
    epochs: int = 4
    minibatches: int = 4
    hidden: int = 32
    learning_rate: float = 3e-3
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    entropy_coef: float = 0.01
    max_grad_norm: float = 0.5


# -- a two-layer MLP with its own backward pass ------------------------------------------------

class MLP:
    """``tanh(x @ w1 + b1) @ w2 + b2``; :meth:`backward` returns the parameter gradients."""

    def __init__(self, rng: np.random.Generator, sizes: tuple[int, int, int],
                 out_scale: float) -> None:
        n_in, n_hidden, n_out = sizes
        self.params = {
            "w1": rng.standard_normal((n_in, n_hidden)) * np.sqrt(1.0 / n_in),
            "b1": np.zeros(n_hidden),
            "w2": rng.standard_normal((n_hidden, n_out)) * np.sqrt(1.0 / n_hidden) * out_scale,
            "b2": np.zeros(n_out),
        }

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The output and the hidden activations (what :meth:`backward` needs)."""
        p = self.params
        hidden = np.tanh(x @ p["w1"] + p["b1"])
        return hidden @ p["w2"] + p["b2"], hidden

    def backward(self, x: np.ndarray, hidden: np.ndarray,
                 d_out: np.ndarray) -> dict[str, np.ndarray]:
        p = self.params
        d_hidden = (d_out @ p["w2"].T) * (1.0 - hidden**2)
        return {"w1": x.T @ d_hidden, "b1": d_hidden.sum(0),
                "w2": hidden.T @ d_out, "b2": d_out.sum(0)}


class Adam:
    def __init__(self, params: dict[str, np.ndarray], learning_rate: float) -> None:
        self.params, self.lr, self.t = params, learning_rate, 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, grads: dict[str, np.ndarray], beta1: float = 0.9, beta2: float = 0.999,
             eps: float = 1e-8) -> None:
        self.t += 1
        for k, g in grads.items():
            self.m[k] = beta1 * self.m[k] + (1 - beta1) * g
            self.v[k] = beta2 * self.v[k] + (1 - beta2) * g * g
            m_hat = self.m[k] / (1 - beta1**self.t)
            v_hat = self.v[k] / (1 - beta2**self.t)
            self.params[k] -= self.lr * m_hat / (np.sqrt(v_hat) + eps)


def _clip_by_global_norm(grads: dict[str, np.ndarray], max_norm: float) -> None:
    norm = np.sqrt(sum(float(np.sum(g * g)) for g in grads.values()))
    if norm > max_norm:
        for grad in grads.values():
            np.multiply(grad, max_norm / norm, out=grad)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


# -- PPO ---------------------------------------------------------------------------------------

@dataclass
class LearningCurve:
    """Every finished episode, in the order they finished."""

    env_steps: list[int] = field(default_factory=list)  # total env steps when it finished
    returns: list[float] = field(default_factory=list)

    def mean_return(self, first: int | None = None, last: int | None = None) -> float:
        picked = self.returns[:first] if first is not None else self.returns[-(last or 0):]
        return float(np.mean(picked))


def gae(rewards: np.ndarray, values: np.ndarray, next_values: np.ndarray,
        terminated: np.ndarray, done: np.ndarray, gamma: float,
        lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Generalised advantage estimates and value targets over a ``(T, num_envs)`` rollout.

    ``next_values[t]`` is the value of the observation after step ``t`` (the final
    observation when the episode ended there); it counts unless the episode *terminated*.
    ``done`` (terminated or truncated) cuts the ``lambda``-chain between episodes.
    """
    advantages = np.zeros_like(rewards)
    running = np.zeros(rewards.shape[1])
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + gamma * next_values[t] * (1.0 - terminated[t]) - values[t]
        running = delta + gamma * lam * (1.0 - done[t]) * running
        advantages[t] = running
    return advantages, advantages + values


def main(total_steps: int = 60_000, seed: int = 0, config: Config | None = None,
         verbose: bool = False) -> LearningCurve:
    """Train for ``total_steps`` env steps; return every finished episode's return."""
    cfg = config or Config()
    envs = fastvec.AsyncVectorEnv(
        [functools.partial(gym.make, "CartPole-v1")] * cfg.num_envs,
        autoreset_mode=AutoresetMode.SAME_STEP,
    )
    rng = np.random.default_rng(seed)
    n_obs = envs.single_observation_space.shape[0]
    n_act = envs.single_action_space.n
    policy = MLP(rng, (n_obs, cfg.hidden, n_act), out_scale=0.01)  # near-uniform at first
    value = MLP(rng, (n_obs, cfg.hidden, 1), out_scale=1.0)
    policy_opt = Adam(policy.params, cfg.learning_rate)
    value_opt = Adam(value.params, cfg.learning_rate)

    T, N = cfg.rollout_steps, cfg.num_envs
    obs_buf = np.zeros((T, N, n_obs))
    act_buf = np.zeros((T, N), dtype=np.int64)
    logp_buf = np.zeros((T, N))
    rew_buf = np.zeros((T, N))
    val_buf = np.zeros((T, N))
    next_val_buf = np.zeros((T, N))
    term_buf = np.zeros((T, N))
    done_buf = np.zeros((T, N))

    curve = LearningCurve()
    episode_return = np.zeros(N)
    steps = 0
    started = time.perf_counter()
    try:
        obs, _ = envs.reset(seed=seed)
        while steps < total_steps:
            # -- rollout: the policy acts, fastvec steps the envs in parallel --
            for t in range(T):
                logits, _ = policy.forward(obs)
                logp_all = _log_softmax(logits)
                # sample from the softmax with the Gumbel-max trick
                actions = np.argmax(logp_all - np.log(-np.log(rng.random(logp_all.shape))),
                                    axis=1)
                obs_buf[t] = obs
                act_buf[t] = actions
                logp_buf[t] = logp_all[np.arange(N), actions]
                val_buf[t] = value.forward(obs)[0][:, 0]

                obs, rewards, terminated, truncated, infos = envs.step(actions)
                done = terminated | truncated
                # the observation after this step: the final one where an episode ended
                after = obs
                if done.any():
                    after = obs.copy()
                    after[infos["_final_obs"]] = np.stack(infos["final_obs"][infos["_final_obs"]])
                next_val_buf[t] = value.forward(after)[0][:, 0]
                rew_buf[t], term_buf[t], done_buf[t] = rewards, terminated, done

                steps += N
                episode_return += rewards
                for i in np.flatnonzero(done):
                    curve.env_steps.append(steps)
                    curve.returns.append(float(episode_return[i]))
                    episode_return[i] = 0.0

            advantages, targets = gae(rew_buf, val_buf, next_val_buf, term_buf, done_buf,
                                      cfg.gamma, cfg.gae_lambda)

            # -- update: a few epochs of minibatch steps on the clipped surrogate --
            b_obs = obs_buf.reshape(T * N, n_obs)
            b_act, b_logp = act_buf.reshape(-1), logp_buf.reshape(-1)
            b_adv, b_target = advantages.reshape(-1), targets.reshape(-1)
            size = T * N // cfg.minibatches
            for _ in range(cfg.epochs):
                order = rng.permutation(T * N)
                for start in range(0, T * N, size):
                    idx = order[start:start + size]
                    _update_policy(policy, policy_opt, b_obs[idx], b_act[idx], b_logp[idx],
                                   b_adv[idx], cfg)
                    _update_value(value, value_opt, b_obs[idx], b_target[idx], cfg)

            updates = steps // (T * N)
            if verbose and curve.returns and (updates % 10 == 0 or steps >= total_steps):
                recent = curve.returns[-20:]
                print(f"{steps:>8} steps  {time.perf_counter() - started:6.1f} s  "
                      f"mean return (last {len(recent)} episodes) {np.mean(recent):7.1f}")
    finally:
        envs.close()
    return curve


def _update_policy(policy: MLP, opt: Adam, obs: np.ndarray, actions: np.ndarray,
                   old_logp: np.ndarray, adv: np.ndarray, cfg: Config) -> None:
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    n = len(obs)
    logits, hidden = policy.forward(obs)
    logp_all = _log_softmax(logits)
    probs = np.exp(logp_all)
    logp = logp_all[np.arange(n), actions]
    ratio = np.exp(logp - old_logp)
    clipped = np.clip(ratio, 1.0 - cfg.clip, 1.0 + cfg.clip)
    # loss = -mean(min(ratio * adv, clipped * adv)) - entropy_coef * mean(entropy).
    # Its gradient flows through `ratio` only where the unclipped term is the smaller one.
    through = ratio * adv <= clipped * adv
    d_logp = -(adv * ratio * through) / n
    onehot = np.zeros_like(probs)
    onehot[np.arange(n), actions] = 1.0
    d_logits = d_logp[:, None] * (onehot - probs)  # d log p(a) / d logits = onehot - p
    entropy = -(probs * logp_all).sum(axis=1)
    d_entropy = -probs * (logp_all + entropy[:, None])  # d entropy / d logits
    d_logits -= cfg.entropy_coef * d_entropy / n
    grads = policy.backward(obs, hidden, d_logits)
    _clip_by_global_norm(grads, cfg.max_grad_norm)
    opt.step(grads)


def _update_value(value: MLP, opt: Adam, obs: np.ndarray, targets: np.ndarray,
                  cfg: Config) -> None:
    prediction, hidden = value.forward(obs)
    d_out = (prediction[:, 0] - targets)[:, None] / len(obs)  # of 0.5 * mean squared error
    grads = value.backward(obs, hidden, d_out)
    _clip_by_global_norm(grads, cfg.max_grad_norm)
    opt.step(grads)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--total-steps", type=int, default=60_000,
                        help="env steps to train for (default: 60000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of everything (default: 0)")
    args = parser.parse_args()
    result = main(args.total_steps, args.seed, verbose=True)
    print(f"{len(result.returns)} episodes; mean return of the first 20: "
          f"{result.mean_return(first=20):.1f}, of the last 20: {result.mean_return(last=20):.1f}")
