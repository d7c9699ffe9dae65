"""The parent's record of its node actors and its waits on them.

:class:`Node` is one actor as the parent knows it (handle, envs, where it runs, which
incarnation); :func:`gather` waits for one result per node in slices, telling results,
env errors and actor deaths apart, so a dead actor ends the wait within Ray's detection
time and a caller's timeout leaves the call pending.
"""

from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from fastvec.ray.errors import ActorDiedError

__all__ = ["WAIT_SLICE", "Gathered", "Node", "died", "gather"]

# Seconds between the checks of a wait (the caller's deadline); Ray itself reports deaths.
WAIT_SLICE = 0.5


@dataclass
class Node:
    """One node actor: its handle, its envs (global ids) and where it runs."""

    index: int
    handle: Any
    envs: range
    pid: int | None = None
    node_id: str = ""
    node_ip: str = ""
    segment: str | None = None
    worker_pids: list[int] = field(default_factory=list)
    #: bumped at each restart: results sent to an older incarnation are lost
    generation: int = 0
    #: the last restart's reset ``(observations, infos)``, for rows lost with the old one
    recovered: tuple[Any, dict[str, Any]] | None = None

    def learn(self, description: dict[str, Any]) -> None:
        """Record what the actor's ``describe`` says about itself."""
        self.pid = description["pid"]
        self.node_id = description["node_id"]
        self.node_ip = description["node_ip"]
        self.segment = description["segment"]
        self.worker_pids = list(description["worker_pids"])

    def __str__(self) -> str:
        last = self.envs.stop - 1
        envs = f"env {last}" if len(self.envs) == 1 else f"envs {self.envs.start}..{last}"
        return (f"fastvec.ray actor {self.index} (pid {self.pid}, node {self.node_id[:12]} "
                f"at {self.node_ip}, {envs})")


def died(node: Node, exc: BaseException, restarted: bool, doing: str) -> ActorDiedError:
    """The :class:`ActorDiedError` of ``node``, dead while ``doing``."""
    cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if restarted:
        tail = ("Ray restarted it (restart_workers=True): its envs are back, reset; repeat "
                "the call.")
    else:
        tail = "The vector env is broken: close it."
    return ActorDiedError(
        f"{node} died during `{doing}` ({cause}). {tail}", actor=node.index,
        node_id=node.node_id, node_ip=node.node_ip, env_indices=tuple(node.envs),
        pid=node.pid, restarted=restarted, cause=cause)


@dataclass
class Gathered:
    """What came back from one call per node: results, env errors and deaths, by node."""

    results: dict[int, Any] = field(default_factory=dict)
    errors: dict[int, BaseException] = field(default_factory=dict)
    deaths: dict[int, BaseException] = field(default_factory=dict)


def _take(gathered: Gathered, k: int, ref: Any) -> None:
    try:
        gathered.results[k] = ray.get(ref)
    except RayActorError as exc:
        gathered.deaths[k] = exc
    except Exception as exc:  # an env's error, raised in the actor (Ray keeps its type)
        gathered.errors[k] = exc


def gather(refs: dict[int, Any], gathered: Gathered, timeout: float | None,
           name: str) -> Gathered:
    """Wait for every ref of ``refs`` (node index -> ref), moving each into ``gathered`` as
    it finishes. Past ``timeout``: ``multiprocessing.TimeoutError``, with the unfinished
    refs left in ``refs`` (wait again to go on)."""
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    if not gathered.results and not gathered.errors and not gathered.deaths:
        # the common case: every node answers within a slice, in one ray.get
        try:
            values = ray.get(list(refs.values()),
                             timeout=WAIT_SLICE if timeout is None else min(timeout, WAIT_SLICE))
        except (GetTimeoutError, Exception):
            pass
        else:
            gathered.results.update(zip(refs, values, strict=True))
            refs.clear()
            return gathered
    while refs:
        now = time.monotonic()
        wait = WAIT_SLICE if deadline is None else max(0.0, min(WAIT_SLICE, deadline - now))
        by_ref = {ref: k for k, ref in refs.items()}
        ready, _ = ray.wait(list(by_ref), num_returns=len(by_ref), timeout=wait)
        for ref in ready:
            k = by_ref[ref]
            del refs[k]
            _take(gathered, k, ref)
        if refs and deadline is not None and time.monotonic() >= deadline:
            raise multiprocessing.TimeoutError(
                f"The call to `{name}` has timed out after {timeout} second(s); "
                f"{len(refs)} node actors have not answered.")
    return gathered
