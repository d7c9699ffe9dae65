"""The node actors of one :class:`fastvec.ray.RayVectorEnv`, as one set: started, restarted.

:class:`Cluster` is to the face (:mod:`fastvec.ray.vector_env`) and its partial batches
(:mod:`fastvec.ray._partial`) what :class:`fastvec._pool.WorkerPool` is to
:class:`fastvec.AsyncVectorEnv`: it starts the actors of a placement and reads their spaces,
waits for Ray to restart a dead actor (``restart_workers``) or marks the vector env broken,
and makes up the rows of a restarted node's envs. After a restart a node's envs are *stale*
until they are reported: truncated, reward 0, the fresh reset's observation and info
``worker_restarted``, instead of being stepped.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from gymnasium import Env, Space, logger
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_differing_spaces, batch_space
from ray.exceptions import ActorUnavailableError

from fastvec.ray import _batches as B
from fastvec.ray._batches import StepResult
from fastvec.ray._infos import restarted_infos, take_infos
from fastvec.ray._nodes import Gathered, Node, died, gather
from fastvec.ray._placement import Placement, release, reserve, start_actors
from fastvec.ray.errors import ActorDiedError
from fastvec.vector_env import AsyncState

__all__ = ["Cluster"]

# Seconds between calls to an actor Ray is still restarting.
RESTART_POLL = 0.1

#: ``(metadata, render_mode, single_action_space, action_space, single_observation_space,
#: observation_space)``, as :func:`fastvec._arguments.read_spaces` gives them
Spaces = tuple[dict[str, Any], str | None, Space[Any], Space[Any], Space[Any], Space[Any]]


class Cluster:
    """The node actors of one placement, their restarts and their stale envs."""

    def __init__(self, placement: Placement, num_envs: int, autoreset_mode: AutoresetMode,
                 restart_workers: bool, start_timeout: float | None) -> None:
        self.placement = placement
        self.num_envs = num_envs
        self.autoreset_mode = autoreset_mode
        self.restart_workers = restart_workers
        self.start_timeout = start_timeout
        self.nodes: list[Node] = []
        self.broken: ActorDiedError | None = None
        #: a restarted node's envs not yet reported restarted, by node
        self.stale: dict[int, set[int]] = {}
        # known once started
        self.single_action_space: Space[Any]
        self.single_observation_space: Space[Any]

    # -- start -----------------------------------------------------------------------------
    def start(self, env_fns: Sequence[Callable[[], Env]], options: dict[str, Any],
              observation_mode: str | tuple[Space[Any], Space[Any]]) -> Spaces:
        """Start one actor per planned actor (each building its envs with ``options``) and
        read the vector env's spaces; on any error the actors and the group are released."""
        placement = self.placement
        reserve(placement, self.start_timeout)
        handles: list[Any] = []
        try:
            handles = start_actors(placement, list(env_fns),
                                   {**options, "observation_mode": "same"
                                    if isinstance(observation_mode, tuple)
                                    else observation_mode},
                                   self.restart_workers)
            self.nodes = [Node(k, h, spec.envs)
                          for k, (h, spec) in enumerate(zip(handles, placement.actors,
                                                            strict=True))]
            descriptions = self._ask_all("describe", timeout=self.start_timeout)
            for node, description in zip(self.nodes, descriptions, strict=True):
                node.learn(description)
            return self._read_spaces(observation_mode)
        except BaseException:
            release(placement, handles)
            raise

    def _ask_all(self, method: str, *args: Any, timeout: float | None = None) -> list[Any]:
        """``method(*args)`` on every actor, waited for; a death raises at once."""
        refs = {n.index: getattr(n.handle, method).remote(*args) for n in self.nodes}
        gathered = gather(refs, Gathered(), timeout, method)
        for k, exc in gathered.deaths.items():
            raise died(self.nodes[k], exc, False, method) from exc
        for exc in gathered.errors.values():
            raise exc
        return [gathered.results[n.index] for n in self.nodes]

    def _read_spaces(self, observation_mode: str | tuple[Space[Any], Space[Any]]) -> Spaces:
        answers = self._ask_all("spaces")
        metadata, render_mode, single_action_space, single_obs = answers[0]
        metadata = dict(metadata)
        metadata["autoreset_mode"] = self.autoreset_mode
        if any(a[2] != single_action_space for a in answers[1:]):
            raise RuntimeError(
                f"Some environments have an action space different from "
                f"`{single_action_space}`. In order to batch actions, the action spaces "
                "from all environments must be equal.")
        action_space = batch_space(single_action_space, self.num_envs)
        if isinstance(observation_mode, tuple):
            observation_space, single_obs = observation_mode
        elif observation_mode == "different":
            per_env = [space for node_spaces in self._ask_all(
                "call", "observation_space", (), {}) for space in node_spaces]
            single_obs = per_env[0]
            observation_space = batch_differing_spaces(per_env)
        else:
            if any(a[3] != single_obs for a in answers[1:]):
                raise RuntimeError(
                    "RayVectorEnv(..., observation_mode='same') however some of the "
                    "sub-environments observation spaces are not equivalent. If this is "
                    "intentional, use `observation_mode='different'` instead.")
            observation_space = batch_space(single_obs, self.num_envs)
        self.single_action_space, self.single_observation_space = single_action_space, single_obs
        return (metadata, render_mode, single_action_space, action_space, single_obs,
                observation_space)

    # -- the nodes -------------------------------------------------------------------------
    def node_of(self, env: int) -> Node:
        for node in self.nodes:
            if env in node.envs:
                return node
        raise AssertionError(env)

    def close(self, timeout: float | None, terminate: bool) -> None:
        """Have every live actor close its envs and pool (``terminate``: at once), waiting
        ``timeout`` seconds and a margin (the actors are killed by :meth:`release` anyway)."""
        live = [n for n in self.nodes if self.broken is None or n.index != self.broken.actor]
        if not terminate and live:
            refs = {n.index: n.handle.close.remote(timeout, False) for n in live}
            try:
                gather(refs, Gathered(), 30.0 if timeout is None else timeout + 5.0, "close")
            except multiprocessing.TimeoutError:
                pass
        else:
            refs = {n.index: n.handle.close.remote(0, True) for n in live}
            try:
                gather(refs, Gathered(), 10.0, "close")
            except multiprocessing.TimeoutError:
                pass

    def release(self) -> None:
        """Kill every actor and free the placement group (unless it is the caller's)."""
        release(self.placement, [n.handle for n in self.nodes])

    # -- the synchronous calls' remote calls, by node -------------------------------------
    def reset_calls(self, seeds: list[int | None], options: dict[str, Any] | None,
                    mask: np.ndarray | None) -> dict[int, Any]:
        """Each node's reset of its envs (of those ``mask`` names; none where it names
        none, whose rows keep their observations)."""
        calls = {}
        for node in self.nodes:
            node_options = options
            if mask is not None:
                own = mask[node.envs.start:node.envs.stop]
                if not own.any():
                    continue  # nothing to reset there: its rows keep their observations
                node_options = {**options, "reset_mask": own.copy()}  # type: ignore[dict-item]
            calls[node.index] = node.handle.reset.remote(
                seeds[node.envs.start:node.envs.stop], node_options)
        return calls

    def step_calls(self, actions: Any) -> dict[int, Any]:
        """Each node's step of its slice of ``actions``, around its stale envs (None where
        all of them are)."""
        calls = {}
        for node in self.nodes:
            part = B.cut(self.single_action_space, actions, node.envs.start, node.envs.stop)
            stale = self.stale.get(node.index)
            if stale:  # a restarted node's idle envs: reported now, not stepped
                calls[node.index] = self._step_around_stale(node, part, stale)
            else:
                calls[node.index] = node.handle.step.remote(part)
        return calls

    def _step_around_stale(self, node: Node, actions: Any, stale: set[int]) -> Any:
        local = [i - node.envs.start for i in node.envs if i not in stale]
        if not local:
            return None
        return node.handle.step_some.remote(
            B.take(self.single_action_space, actions, local), local, True)

    # -- deaths and restarts ---------------------------------------------------------------
    def deaths(self, gathered: Gathered, state: AsyncState) -> None:
        """Restart (or raise for) the nodes that died during the call; during a step a
        restarted node's answer is its rows reported restarted."""
        doing = state.value
        for k, exc in sorted(gathered.deaths.items()):
            node = self.nodes[k]
            if not self.restart_workers:
                self.broken = died(node, exc, False, doing)
                raise self.broken from exc
            self.recover(node, exc, doing)
            if state is not AsyncState.WAITING_STEP:
                raise died(node, exc, True, doing) from exc
            gathered.results[k] = self.restarted_rows(node, list(node.envs))

    def recover(self, node: Node, exc: BaseException, doing: str) -> None:
        """Wait for Ray to restart ``node``'s actor and reset its envs (seed None)."""
        logger.warn(f"{node} died during `{doing}`; Ray is restarting it "
                    "(restart_workers=True).")
        deadline = None if self.start_timeout is None else time.monotonic() + self.start_timeout
        for method in ("describe", "recover"):
            while True:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                refs = {node.index: getattr(node.handle, method).remote()}
                try:
                    got = gather(refs, Gathered(), left, method)
                except multiprocessing.TimeoutError as timeout:
                    self.broken = died(node, timeout, False, doing)
                    raise self.broken from exc
                cause = got.deaths.get(node.index)
                if (isinstance(cause, ActorUnavailableError)
                        and (deadline is None or time.monotonic() < deadline)):
                    time.sleep(RESTART_POLL)  # still restarting: Ray refuses calls until up
                    continue
                break
            if node.index not in got.results:
                cause = next(iter((*got.deaths.values(), *got.errors.values())))
                self.broken = died(node, cause, False, doing)
                raise self.broken from exc
            if method == "describe":
                node.learn(got.results[node.index])
            else:
                node.recovered = got.results[node.index]
        node.generation += 1
        self.stale[node.index] = set(node.envs)

    def restarted_rows(self, node: Node, ids: list[int]) -> StepResult:
        """The rows of ``ids`` (global) of a restarted node: its fresh reset's
        observations, reward 0, truncated, info ``worker_restarted``."""
        assert node.recovered is not None
        obs, reset_infos = node.recovered
        local = [i - node.envs.start for i in ids]
        n = len(ids)
        infos = restarted_infos(
            n, take_infos(reset_infos, local, len(node.envs))
            if self.autoreset_mode is AutoresetMode.SAME_STEP else None)
        stale = self.stale.get(node.index)
        if stale is not None:
            stale.difference_update(ids)
        return (B.take(self.single_observation_space, obs, local), np.zeros(n),
                np.zeros(n, np.bool_), np.ones(n, np.bool_), infos)

    def with_stale(self, node: Node, stepped: StepResult | None, stale: set[int],
                   skipped: bool) -> StepResult:
        """A node's rows: its stale envs reported restarted, the others as stepped."""
        ids = sorted(stale)
        restarted = self.restarted_rows(node, ids)
        if skipped or stepped is None:
            return restarted
        others = [i for i in node.envs if i not in stale]
        order = others + ids
        joined = B.join_results(self.single_observation_space, [stepped, restarted],
                                [len(others), len(ids)])
        position = {i: k for k, i in enumerate(order)}
        rows = [position[i] for i in node.envs]
        obs, rewards, terminations, truncations, infos = joined
        return (B.take(self.single_observation_space, obs, rows), rewards[rows],
                terminations[rows], truncations[rows],
                take_infos(infos, rows, len(order)))
