"""Write 32 envs' observations and read the batch back: Gymnasium's shared-memory helpers
against fastvec's layout kernels, side by side in each group.

Run ``pytest bench/ --benchmark-only`` (``--benchmark-disable`` for a smoke run). Each group
holds one Gymnasium baseline and one fastvec run, so the ratio comes from a single run.
"""

from __future__ import annotations

import copy
import multiprocessing as mp

import numpy as np
import pytest
from gymnasium.spaces import Box, Dict, Discrete
from gymnasium.vector.utils import (
    create_shared_memory,
    read_from_shared_memory,
    write_to_shared_memory,
)

N = 32

SPACES = {
    "box-84x84x4-uint8": Box(0, 255, (84, 84, 4), np.uint8),
    "box-4-float32": Box(-1.0, 1.0, (4,), np.float32),
    "dict-image-vector-id": Dict([
        ("image", Box(0, 255, (64, 64, 3), np.uint8)),
        ("vector", Box(-1.0, 1.0, (32,), np.float32)),
        ("id", Discrete(5)),
    ]),
}


def _samples(name: str) -> tuple:
    space = copy.deepcopy(SPACES[name])
    space.seed(0)
    return space, [space.sample() for _ in range(N)]


def _gymnasium_step(space, memory, samples, deep_copy: bool):
    for env, sample in enumerate(samples):
        write_to_shared_memory(space, env, sample, memory)
    batch = read_from_shared_memory(space, memory, N)
    # AsyncVectorEnv(copy=True) hands out deepcopy(observations).
    return copy.deepcopy(batch) if deep_copy else batch


def _fastvec_step(layout, samples, copy_out: bool):
    write_row = layout.write_row
    for env, sample in enumerate(samples):
        write_row(sample, env)
    return layout.read_batch(copy=copy_out)


@pytest.mark.parametrize("copy_out", [False, True], ids=["copy=False", "copy=True"])
@pytest.mark.parametrize("name", list(SPACES))
def test_gymnasium(benchmark, name: str, copy_out: bool) -> None:
    benchmark.group = f"{name} {'copy=True' if copy_out else 'copy=False'}"
    space, samples = _samples(name)
    memory = create_shared_memory(space, N, ctx=mp.get_context())
    batch = benchmark(_gymnasium_step, space, memory, samples, copy_out)
    _check(space, batch, samples)


@pytest.mark.parametrize("copy_out", [False, True], ids=["copy=False", "copy=True"])
@pytest.mark.parametrize("name", list(SPACES))
def test_fastvec(benchmark, bound_layout, name: str, copy_out: bool) -> None:
    benchmark.group = f"{name} {'copy=True' if copy_out else 'copy=False'}"
    space, samples = _samples(name)
    layout = bound_layout(space, N)
    batch = benchmark(_fastvec_step, layout, samples, copy_out)
    _check(space, batch, samples)
    del batch  # views must go before the segment closes


def _check(space, batch, samples) -> None:
    if isinstance(space, Dict):
        for key in space.spaces:
            np.testing.assert_array_equal(batch[key], np.stack([s[key] for s in samples]))
    else:
        np.testing.assert_array_equal(batch, np.stack(samples))
