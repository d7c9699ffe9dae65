"""Partial batches over the node actors: the envs sent and not yet returned by ``recv``.

:class:`PartialBatches` belongs to one :class:`fastvec.ray.RayVectorEnv` (which alone calls
it, after its own checks), as :class:`fastvec._partial.PartialBatches` belongs to
:class:`fastvec.AsyncVectorEnv`. ``send`` and ``async_reset`` make one remote call per node
touched; each call is an *entry*, in flight until Ray has its result, then done (its rows,
an env's error, or its node's restart) in the FIFO that ``recv`` takes whole entries from.
"""

from __future__ import annotations

import multiprocessing
import time
from collections import deque
from typing import Any

import numpy as np
import ray
from gymnasium.error import AlreadyPendingCallError
from gymnasium.vector.utils import batch_space
from ray.exceptions import RayActorError

from fastvec import _arguments as A
from fastvec.ray import _batches as B
from fastvec.ray._batches import StepResult
from fastvec.ray._cluster import Cluster
from fastvec.ray._nodes import WAIT_SLICE, Node, died

__all__ = ["PartialBatches"]


class _Entry:
    """Envs sent to one node by ``send``/``async_reset``, not yet returned by ``recv``."""

    def __init__(self, node: Node, ids: list[int], reset: bool) -> None:
        self.node, self.ids, self.reset = node, ids, reset
        self.generation = node.generation
        self.result: StepResult | None = None
        self.error: BaseException | None = None


class PartialBatches:
    """The envs sent with ``send``/``async_reset`` and not yet returned by ``recv``."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.num_envs = cluster.num_envs
        # the calls in flight (oldest send first) and the finished entries
        self.flight: dict[Any, _Entry] = {}
        self.done: deque[_Entry] = deque()
        self.last_ids: list[int] | None = None  # the envs of the last recv

    # -- state -----------------------------------------------------------------------------
    @property
    def outstanding(self) -> int:
        """Envs sent and not yet returned by :meth:`recv`."""
        return (sum(len(e.ids) for e in self.flight.values())
                + sum(len(e.ids) for e in self.done))

    def busy(self) -> list[int]:
        """The outstanding envs, sorted."""
        return sorted(i for e in (*self.flight.values(), *self.done) for i in e.ids)

    def forget(self) -> None:
        """Drop every outstanding env (``close``)."""
        self.flight.clear()
        self.done.clear()

    # -- send ------------------------------------------------------------------------------
    def send(self, actions: Any, env_ids: Any) -> None:
        """Send each node its envs' actions (one remote call per node touched); a restarted
        node's stale envs are done at once, reported restarted, not stepped."""
        cluster = self.cluster
        ids = A.send_env_ids(env_ids, self.num_envs, self.last_ids)
        busy = set(self.busy())
        if busy.intersection(ids):
            raise AlreadyPendingCallError(
                f"Calling `send` for envs {sorted(busy.intersection(ids))}, which are still in "
                "flight (sent and not yet returned by `recv`).", "recv")
        space = cluster.single_action_space
        B.check_rows(batch_space(space, len(ids)), actions, len(ids))
        by_node: dict[int, list[int]] = {}
        for k, i in enumerate(ids):
            by_node.setdefault(cluster.node_of(i).index, []).append(k)
        for n, positions in by_node.items():
            node = cluster.nodes[n]
            node_ids = [ids[k] for k in positions]
            stale = cluster.stale.get(n, set())
            now = [i for i in node_ids if i in stale]
            keep = [k for k in positions if ids[k] not in stale]
            if now:  # a restarted node's idle envs: reported at once, not stepped
                entry = _Entry(node, now, False)
                entry.result = cluster.restarted_rows(node, now)
                self.done.append(entry)
            if keep:
                local = [ids[k] - node.envs.start for k in keep]
                part = B.take(space, actions, keep)
                self.flight[node.handle.step_some.remote(part, local)] = _Entry(
                    node, [ids[k] for k in keep], False)

    def reset(self, seeds: list[int | None], options: dict[str, Any] | None) -> None:
        """Send every node the reset of its envs (``async_reset``)."""
        for node in self.cluster.nodes:
            ref = node.handle.reset.remote(seeds[node.envs.start:node.envs.stop], options)
            self.flight[ref] = _Entry(node, list(node.envs), True)

    # -- recv ------------------------------------------------------------------------------
    def recv(self, batch_size: int, timeout: float | None) -> StepResult:
        """The first nodes to finish, until at least ``batch_size`` rows (or every
        outstanding env); a node's env error is raised instead."""
        want = min(batch_size, self.outstanding)
        deadline = None if timeout is None else time.monotonic() + timeout
        while sum(len(e.ids) for e in self.done if e.error is None) < want and not any(
                e.error is not None for e in self.done):
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise multiprocessing.TimeoutError(
                    f"The call to `recv` has timed out after {timeout} second(s); envs "
                    f"{sorted(i for e in self.flight.values() for i in e.ids)} are still "
                    "in flight.")
            wait = WAIT_SLICE if deadline is None else min(WAIT_SLICE, deadline - now)
            ready, _ = ray.wait(list(self.flight), num_returns=1, timeout=wait)
            for ref in ready:
                self._finish(ref, self.flight.pop(ref))
        failed = [e for e in self.done if e.error is not None]
        if failed:
            self.done.remove(failed[0])
            raise failed[0].error  # type: ignore[misc]
        taken: list[_Entry] = []
        while sum(len(e.ids) for e in taken) < want:
            taken.append(self.done.popleft())
        return self._batch(taken)

    def _finish(self, ref: Any, entry: _Entry) -> None:
        """Move a finished call to the done entries (its rows, an error, or its node's
        restart)."""
        cluster, node = self.cluster, entry.node
        try:
            value = ray.get(ref)
        except RayActorError as exc:
            if not cluster.restart_workers:
                cluster.broken = died(node, exc, False, "recv")
                raise cluster.broken from exc
            if entry.generation == node.generation:
                cluster.recover(node, exc, "recv")
            entry.result = cluster.restarted_rows(node, entry.ids)
        except Exception as exc:
            entry.error = exc
        else:
            if entry.reset:
                obs, infos = value
                n = len(entry.ids)
                node.recovered = None
                entry.result = (obs, np.zeros(n), np.zeros(n, np.bool_),
                                np.zeros(n, np.bool_), infos)
            else:
                *rows, infos = value
                local = infos.pop("env_id")
                entry.ids = [int(i) + node.envs.start for i in local]
                entry.result = (rows[0], rows[1], rows[2], rows[3], infos)
        self.done.append(entry)

    def _batch(self, entries: list[_Entry]) -> StepResult:
        results = [e.result for e in entries]
        assert all(r is not None for r in results)
        obs, rewards, terminations, truncations, infos = B.join_results(
            self.cluster.single_observation_space, results,  # type: ignore[arg-type]
            [len(e.ids) for e in entries])
        ids = [i for e in entries for i in e.ids]
        self.last_ids = ids
        infos["env_id"] = np.array(ids, dtype=np.int64)
        return obs, rewards, terminations.astype(np.bool_), truncations.astype(np.bool_), infos
