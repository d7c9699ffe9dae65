"""Typical use of fastvec's public API, type-checked by mypy in tests/test_packaging.py.

Never run: mypy reads it to check that fastvec's annotations and stubs give what a user's
code expects (``assert_type``), and that mistakes are caught (``type: ignore[...]``, which
``warn_unused_ignores`` turns into an error if the mistake stopped being one).
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import gymnasium as gym
import numpy as np
from gymnasium.spaces import Box
from gymnasium.vector import AutoresetMode, VectorEnv
from typing_extensions import assert_type

import fastvec
from fastvec import AsyncVectorEnv, errors, make_vec, register_layout
from fastvec._kernels import Node, Segment, read_batch, write_row
from fastvec._sync import HAVE_FUTEX, Doorbells


class Angles(Box):
    """A user's custom space."""


def build() -> AsyncVectorEnv:
    envs = AsyncVectorEnv(
        [functools.partial(gym.make, "CartPole-v1")] * 4,
        shared_memory=True,
        copy=False,
        context="spawn",
        autoreset_mode=AutoresetMode.SAME_STEP,
        num_workers=2,
    )
    assert_type(envs.num_envs, int)
    assert_type(envs.num_workers, int)
    return envs


def use() -> None:
    assert_type(fastvec.__version__, str)
    envs = build()
    as_gymnasium: VectorEnv = envs  # a drop-in: usable wherever a VectorEnv is
    _obs, infos = envs.reset(seed=0)
    assert_type(infos, dict[str, Any])
    _obs, rewards, _terminations, _truncations, infos = envs.step(np.zeros(4, dtype=np.int64))
    assert_type(rewards, np.ndarray)
    envs.step_async(np.zeros(4, dtype=np.int64))
    envs.step_wait(timeout=1.0)
    envs.close(terminate=True)
    as_gymnasium.close()

    made = make_vec("CartPole-v1", 8, vector_kwargs={"num_workers": 2},
                    wrappers=[gym.wrappers.RecordEpisodeStatistics], max_episode_steps=100)
    assert_type(made, AsyncVectorEnv)
    made.close()

    tuned = fastvec.autotune([functools.partial(gym.make, "CartPole-v1")] * 4, budget=5.0,
                             num_workers=[1, 2], pin=(None, False, True), partial=True)
    assert_type(tuned, fastvec.AutotuneResult)
    assert_type(tuned.best, dict[str, Any])
    assert_type(tuned.busy, bool | None)
    AsyncVectorEnv([functools.partial(gym.make, "CartPole-v1")] * 4, **tuned.best).close()
    fastvec.autotune([], budget="30")  # type: ignore[arg-type]

    register_layout(Angles, lambda s: Box(s.low, s.high, dtype=s.dtype))
    register_layout(Angles)  # type: ignore[call-arg]

    try:
        build().step(np.zeros(4, dtype=np.int64))
    except errors.WorkerDiedError as exc:
        assert_type(exc.worker, int)
        assert_type(exc.pid, int | None)
        assert_type(exc.exitcode, int | None)
        died: RuntimeError = exc
        del died
    except (errors.AlreadyPendingCallError, errors.NoAsyncCallError,
            errors.ClosedEnvironmentError):
        pass


def compiled_modules(buffer: bytearray) -> None:
    segment = Segment(buffer)
    assert_type(segment.size, int)
    assert_type(segment.released, bool)
    node = Node(0, offset=0, shape=(2,))
    assert_type(write_row(segment, node, [1, 2], 0), bool)
    read_batch(node, copy=False)
    segment.release()
    Segment()  # type: ignore[call-arg]

    assert_type(HAVE_FUTEX, bool)
    with Doorbells(buffer) as bells:
        assert_type(bells.load(0), int)
        bells.store(0, 1)
        assert_type(bells.wait_while_equal(0, 1, timeout=0.1), Literal[0, 1])
        bells.store("0", 1)  # type: ignore[arg-type]

    class Louder(Doorbells):  # type: ignore[misc]  # final
        pass
