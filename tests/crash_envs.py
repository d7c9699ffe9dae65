"""Environments that kill the worker process running them, for the worker-death tests.

Importable by spawn and forkserver workers (``pythonpath = ["tests"]``). An env crashes only
inside a worker process, never in the test process, which builds one env itself to read the
spaces. Build env functions with :func:`functools.partial` (picklable by reference).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import time
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

EXIT_CODE = 7


def in_worker() -> bool:
    """Whether this process is a multiprocessing child (a fastvec worker)."""
    return multiprocessing.parent_process() is not None


class CrashError(RuntimeError):
    """What ``die("raise")`` raises: an ordinary, picklable env error (no death)."""


def die(how: str) -> None:
    """End this process abruptly: ``"exit"`` (``os._exit(EXIT_CODE)``), ``"segv"`` (a
    segmentation fault inside a C function), ``"kill"`` (SIGKILL to itself) or ``"abort"``;
    ``"raise"`` raises :class:`CrashError` instead."""
    if how == "raise":
        raise CrashError(f"crashing in pid {os.getpid()}")
    if how == "exit":
        os._exit(EXIT_CODE)
    if how == "segv":
        # faulthandler (enabled by pytest, inherited by forked workers) would print a
        # traceback for the expected crash: let the signal kill the process quietly
        import faulthandler

        faulthandler.disable()
        ctypes.string_at(0)
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "abort":
        import faulthandler

        faulthandler.disable()
        os.abort()
    time.sleep(60)  # a signal may take a moment to land
    raise AssertionError(f"die({how!r}) returned")


class CrashEnv(gym.Env):
    """A small Box env that kills its worker in one chosen method.

    Parameters
    ----------
    index
        The env's index in the batch.
    crashing
        Indices of the envs that crash; the others behave.
    where
        ``"init"``, ``"reset"``, ``"step"``, ``"close"``, ``"call"`` (the ``crash`` method) or
        ``"reply"``: ``step`` returns an info that ends the process when it is pickled, so the
        worker dies after finishing the step and signalling it, before its reply is sent.
    how
        See :func:`die`.
    crash_at
        For ``"step"`` and ``"reply"``: the step (counted from the last reset, from 1) that
        crashes.
    delay
        Seconds every ``step`` sleeps.
    arm_file
        If given, the env crashes only if this file exists when it is built (so a test can
        let the first workers start and make their replacements fail).
    """

    metadata = {"render_modes": []}

    def __init__(self, index: int = 0, crashing: tuple[int, ...] = (), where: str = "step",
                 how: str = "exit", crash_at: int = 1, delay: float = 0.0,
                 arm_file: str | None = None) -> None:
        self.observation_space = spaces.Box(-1e6, 1e6, (3,), np.float64)
        self.action_space = spaces.Discrete(5)
        self.index = index
        self.armed = (index in crashing and in_worker()
                      and (arm_file is None or os.path.exists(arm_file)))
        self.where = where
        self.how = how
        self.crash_at = crash_at
        self.delay = delay
        self.t = 0
        self.resets = 0
        self.value = index
        if where == "init":
            self._maybe_die("init")

    def _maybe_die(self, where: str) -> None:
        if self.armed and self.where == where:
            die(self.how)

    def _obs(self) -> np.ndarray:
        return np.array([self.index, self.t, self.resets], dtype=np.float64)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._maybe_die("reset")
        self.t = 0
        self.resets += 1
        return self._obs(), {}

    def step(self, action):
        if self.delay:
            time.sleep(self.delay)
        self.t += 1
        info: dict[str, Any] = {}
        if self.t == self.crash_at:
            self._maybe_die("step")
            if self.armed and self.where == "reply":
                info = {"bomb": Bomb(self.how)}
        return self._obs(), float(action) + 0.5, False, False, info

    def crash(self) -> int:
        self._maybe_die("call")
        return self.index

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        self._maybe_die("close")


class Bomb:
    """Ends the process that pickles it."""

    def __init__(self, how: str) -> None:
        self.how = how

    def __reduce__(self):
        die(self.how)
        raise AssertionError("unreachable")


def crash_fns(n: int = 4, **kwargs: Any) -> list:
    import functools

    return [functools.partial(CrashEnv, index=i, **kwargs) for i in range(n)]
