"""Tests for fastvec._waiting: how long waiters spin before they sleep."""

from __future__ import annotations

import gymnasium as gym
import pytest

import fastvec
from conftest import local_worker
from fastvec._waiting import PARENT_SPIN_LIMIT, WORKER_SPIN_LIMIT, SpinBudget


def settled(budget: SpinBudget, waited: float, times: int = 40) -> SpinBudget:
    for _ in range(times):
        budget.record(waited)
    return budget


def test_a_fresh_waiter_spins_the_floor() -> None:
    assert SpinBudget().budget() == SpinBudget.FLOOR


@pytest.mark.parametrize("limit", [PARENT_SPIN_LIMIT, WORKER_SPIN_LIMIT])
def test_short_waits_are_spun_through_twice_over(limit: float) -> None:
    waited = limit / 4
    assert settled(SpinBudget(limit), waited).budget() == pytest.approx(2 * waited, rel=1e-3)


@pytest.mark.parametrize("limit", [PARENT_SPIN_LIMIT, WORKER_SPIN_LIMIT])
def test_the_spin_stops_at_the_limit(limit: float) -> None:
    assert settled(SpinBudget(limit), 0.75 * limit).budget() == pytest.approx(limit)


@pytest.mark.parametrize("limit", [PARENT_SPIN_LIMIT, WORKER_SPIN_LIMIT])
def test_waits_past_the_limit_sleep_at_once_and_short_ones_bring_the_spin_back(
        limit: float) -> None:
    budget = settled(SpinBudget(limit), 10 * limit)
    assert budget.budget() == 0.0
    # one very long wait weighs as at most four limits: a few short waits undo it
    for _ in range(8):
        budget.record(1e-6)
    assert 0.0 < budget.budget() < limit


def test_a_trainers_pause_is_spun_through_by_a_worker_not_by_the_parent() -> None:
    # a policy's forward pass of 1.2 ms between two steps: the worker waiting for its next
    # command spins through it; the parent's limit (its waits are the workers' steps) is
    # shorter, and a wait that long puts it to sleep at once
    pause = 1.2e-3
    assert PARENT_SPIN_LIMIT < pause < WORKER_SPIN_LIMIT / 2
    assert settled(SpinBudget(WORKER_SPIN_LIMIT), pause).budget() >= pause
    assert settled(SpinBudget(PARENT_SPIN_LIMIT), pause).budget() == 0.0


def test_a_worker_waits_with_the_worker_limit_and_the_pool_with_the_parents() -> None:
    with local_worker(2) as served:
        assert served.spin.limit == WORKER_SPIN_LIMIT
    envs = fastvec.AsyncVectorEnv([lambda: gym.make("CartPole-v1")] * 2)
    try:
        assert envs._pool.machine.spin.limit == PARENT_SPIN_LIMIT
    finally:
        envs.close()


@pytest.mark.parametrize("limit", [0.0, -1.0, SpinBudget.FLOOR / 2, float("nan"), float("inf")])
def test_a_limit_below_the_floor_is_refused(limit: float) -> None:
    with pytest.raises(ValueError, match="spin limit"):
        SpinBudget(limit)
