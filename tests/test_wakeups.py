"""No wake-up is lost: the parent wakes only a worker that says it sleeps (``SLEEPING`` in its
line), so every command must still reach a worker that went to sleep just before it.

The workers here never spin (the pool's SPIN word off, as on a contended machine) and their
wait slices are made so long that a lost wake-up would stall a step for a minute: each step
must finish within seconds, thousands of times over."""

from __future__ import annotations

import time

import gymnasium as gym
import numpy as np
import pytest

import fastvec
from fastvec import _segment as S
from fastvec import worker as worker_module

STEPS = 1500
STEP_TIMEOUT = 10.0  # a lost wake-up waits for the worker's slice: 10 x 6 s here


def sleepy_env(monkeypatch: pytest.MonkeyPatch, **kwargs: object) -> fastvec.AsyncVectorEnv:
    monkeypatch.setattr(worker_module, "WAIT_SLICE", 6.0)  # forked workers inherit it
    envs = fastvec.AsyncVectorEnv([lambda: gym.make("CartPole-v1")] * 4, num_workers=2,
                                  context="fork", **kwargs)
    pool = envs._pool
    if pool._broadcast:  # fewer cores than workers: they sleep on one bell, rung for all
        envs.close()
        pytest.skip("needs a core per worker (with fewer, workers share one bell)")
    pool.doorbells.store(pool.plan.parent_line + S.SPIN, 0)  # workers sleep at once
    pool.machine.contention.check = lambda now: False  # and stay so
    return envs


def test_every_synchronous_step_reaches_sleeping_workers(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    envs = sleepy_env(monkeypatch)
    try:
        envs.reset(seed=0)
        actions = np.zeros(4, np.int64)
        for _ in range(STEPS):
            envs.step_async(actions)
            envs.step_wait(timeout=STEP_TIMEOUT)
        # the workers do sleep: each raises its flag once it is back waiting for a command
        lines = [envs._pool.plan.worker_line(w) for w in range(2)]
        deadline = time.monotonic() + STEP_TIMEOUT
        while not all(envs._pool.doorbells.load(line + S.SLEEPING) for line in lines):
            assert time.monotonic() < deadline, "a worker never said it sleeps"
            time.sleep(0.001)
    finally:
        envs.close()


def test_every_partial_entry_reaches_sleeping_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    envs = sleepy_env(monkeypatch, batch_size=2)
    try:
        envs.async_reset(seed=0)
        *_, infos = envs.recv(timeout=STEP_TIMEOUT)
        for _ in range(STEPS):
            envs.send(np.zeros(2, np.int64), infos["env_id"])
            *_, infos = envs.recv(timeout=STEP_TIMEOUT)
        envs.recv(timeout=STEP_TIMEOUT)  # the two still out since the reset
    finally:
        envs.close()
