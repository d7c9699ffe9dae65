"""The construction warning for PyTorch's intra-op threads beside the workers
(:class:`fastvec.errors.TrainerThreadsWarning`): given exactly when the threads and the workers
are more than the usable cores, with the advice that fixes it, pointed at the caller's line."""

from __future__ import annotations

import os
import sys
import types
import warnings

import gymnasium as gym
import pytest

import fastvec
from fastvec._oversubscription import torch_threads, warn_if_oversubscribed
from fastvec.errors import OversubscribedWarning, TrainerThreadsWarning

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@pytest.fixture
def fake_torch(monkeypatch):
    """A stand-in ``torch`` module in ``sys.modules`` whose thread count a test sets."""
    module = types.ModuleType("torch")
    module.threads = 1  # type: ignore[attr-defined]
    module.get_num_threads = lambda: module.threads  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", module)
    return module


def _warnings(num_workers: int, num_envs: int, cores: int) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_oversubscribed(num_workers, num_envs, cores, stacklevel=1)
    return caught


def test_no_torch_no_threads(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert torch_threads() == 0
    assert _warnings(2, 8, 2) == []
    # a module left half-imported by a failed import has no get_num_threads
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    assert torch_threads() == 0


@pytest.mark.parametrize(("threads", "workers", "cores", "advised"), [
    (2, 2, 2, 1),   # PyTorch's default on 2 cores, one worker per core
    (8, 2, 8, 6),   # the workers' cores taken out of PyTorch's
    (4, 8, 8, 1),   # never advise fewer than one thread
    (3, 1, 3, 2),
])
def test_threads_and_workers_beyond_the_cores_warn_with_the_count_to_set(
        fake_torch, threads, workers, cores, advised):
    fake_torch.threads = threads
    [caught] = _warnings(workers, 8, cores)
    assert caught.category is TrainerThreadsWarning
    assert issubclass(TrainerThreadsWarning, OversubscribedWarning)  # one filter for both
    text = str(caught.message)
    assert f"PyTorch runs {threads} intra-op threads" in text
    assert f"{workers} fastvec worker(s) on {cores} usable core(s)" in text
    assert f"torch.set_num_threads({advised})" in text


@pytest.mark.parametrize(("threads", "workers", "cores"), [
    (1, 2, 2),   # one thread is the caller's own: nothing to fix
    (2, 2, 4),   # room for both
    (6, 2, 8),
])
def test_threads_that_fit_beside_the_workers_do_not_warn(fake_torch, threads, workers, cores):
    fake_torch.threads = threads
    assert _warnings(workers, 8, cores) == []


def test_too_many_workers_and_threads_give_both_warnings(fake_torch):
    fake_torch.threads = 2
    caught = _warnings(4, 8, 2)
    assert [w.category for w in caught] == [OversubscribedWarning, TrainerThreadsWarning]
    assert "num_workers=4" in str(caught[0].message)


def test_construction_warns_at_the_callers_line_with_real_torch():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(CORES + 1)
    try:
        advice = rf"torch\.set_num_threads\({max(1, CORES - 1)}\)"
        with pytest.warns(TrainerThreadsWarning, match=advice) as record:
            envs = fastvec.AsyncVectorEnv([lambda: gym.make("CartPole-v1")] * 2, num_workers=1)
        envs.close()
        [caught] = [w for w in record if w.category is TrainerThreadsWarning]
        assert caught.filename == __file__  # the user's construction, not fastvec's code
        torch.set_num_threads(1)
        with warnings.catch_warnings():
            warnings.simplefilter("error", OversubscribedWarning)
            fastvec.AsyncVectorEnv([lambda: gym.make("CartPole-v1")] * 2, num_workers=1).close()
    finally:
        torch.set_num_threads(before)
