"""fastvec.ray.RayVectorEnv: one fastvec pool per Ray node, behind Gymnasium's VectorEnv API.

The face holds Gymnasium's semantics (call states, spaces, seeds, infos) over a list of node
actors (:mod:`fastvec.ray._nodes`) placed by :mod:`fastvec.ray._placement`; each actor runs
a local :class:`fastvec.AsyncVectorEnv` (:mod:`fastvec.ray._actor`). A step sends each actor
its slice of the action batch in one remote call and joins the slices they return.
"""

from __future__ import annotations

import multiprocessing
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import ray
from gymnasium import Env, Space, logger
from gymnasium.error import AlreadyPendingCallError, ClosedEnvironmentError, NoAsyncCallError
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_differing_spaces, batch_space
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.util.placement_group import PlacementGroup

from fastvec import _arguments as A
from fastvec.ray import _batches as B
from fastvec.ray._infos import merge_infos, restarted_infos, take_infos
from fastvec.ray._nodes import WAIT_SLICE, Gathered, Node, died, gather
from fastvec.ray._placement import Placement, plan_placement, release, reserve, start_actors
from fastvec.ray.errors import ActorDiedError
from fastvec.vector_env import DEFAULT_START_TIMEOUT, AsyncState

__all__ = ["RayVectorEnv"]

StepResult = tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]

# Seconds between calls to an actor Ray is still restarting.
RESTART_POLL = 0.1


class _Entry:
    """Envs sent to one node by ``send``/``async_reset``, not yet returned by ``recv``."""

    def __init__(self, node: Node, ids: list[int], reset: bool) -> None:
        self.node, self.ids, self.reset = node, ids, reset
        self.generation = node.generation
        self.result: StepResult | None = None
        self.error: BaseException | None = None


class RayVectorEnv(VectorEnv):
    """A Gymnasium ``VectorEnv`` over a Ray cluster: one fastvec pool per node actor.

    Each actor (a Ray actor asking for ``cpus_per_actor`` CPUs) owns a local
    :class:`fastvec.AsyncVectorEnv` over a contiguous slice of the envs, with one worker
    process per CPU, its shared-memory segment on its own node, and the autoreset mode
    asked for here. A step is one remote call per actor (its slice of the action batch)
    and one gather of their results through Ray's object store; nothing is pickled per env.
    The API is :class:`fastvec.AsyncVectorEnv`'s: Gymnasium's methods, spaces, autoreset
    modes, seeding (env ``i`` gets ``seed + i`` on whichever node it runs), infos (batched
    per node, merged with the ``_key`` masks), ``call``/``get_attr``/``set_attr``,
    ``close()``, and partial batches (``batch_size``, ``send``, ``recv``, ``async_reset``)
    at node granularity.

    ``ray.init`` is the caller's: on a laptop ``ray.init()``; on a cluster
    ``ray.init(address="auto")`` (or ``"ray://head:10001"``). The env functions travel to
    the actors pickled by Ray (cloudpickle): they and the modules they import must be
    importable on every node.

    Parameters
    ----------
    env_fns
        Functions that create the sub-environments (env ``i`` is ``env_fns[i]``).
    shared_memory, copy, context, daemon, worker, observation_mode, autoreset_mode
        As for :class:`fastvec.AsyncVectorEnv` (``shared_memory``, ``context``, ``daemon``
        and ``max_concurrency`` apply inside each actor's local pool). ``copy=False``
        reuses one output buffer per leaf, overwritten by the next call.
    max_concurrency
        At most this many envs of one actor step at once.
    num_nodes
        One actor on each of this many nodes (placement strategy ``STRICT_SPREAD``).
    num_actors
        This many actors, spread over the nodes as Ray can (``SPREAD``: several may share
        a node).
    envs_per_actor
        Envs per actor (the last may have fewer); with neither of the above, it sets the
        number of actors.
    cpus_per_actor
        CPUs each actor asks Ray for; its pool runs one worker per whole CPU (at most one
        per env). Default 1.
    resources_per_actor
        Custom Ray resources each actor asks for (e.g. ``{"sim_node": 1}``).
    placement_group
        A placement group of the caller's (ready or not): one actor per bundle, with the
        bundle's CPUs and resources. It is not removed at close. Give at most one of
        ``num_nodes``, ``num_actors`` and ``placement_group``; with none, one actor per
        alive node.
    restart_workers
        ``True``: a dead actor is restarted by Ray (``max_restarts=-1``), and a dead
        worker process inside an actor by its local pool. The restarted actor builds its
        envs anew and resets them (seed ``None``); during ``step``/``recv`` its envs come
        back ``truncated=True``, reward 0, the fresh reset's observation and
        ``infos["worker_restarted"]``, and in NEXT_STEP mode their next step is an
        autoreset step, as in the local pool. During ``reset``/``call``/``set_attr`` the
        call raises :class:`~fastvec.ray.errors.ActorDiedError` with ``restarted=True``
        once the actor is back. ``False`` (default): a dead actor raises
        :class:`~fastvec.ray.errors.ActorDiedError` naming the actor, its node and its
        envs, and the vector env is broken.
    start_timeout
        Seconds to wait for the placement group, for the actors to start (and build their
        envs), and for a restarted actor to be back; past it ``TimeoutError`` (at
        construction) or a broken vector env. ``None`` waits forever.
    batch_size
        How many envs :meth:`recv` returns at least: whole node results, the first to
        finish, until there are ``batch_size`` rows (or every outstanding env). Default
        ``num_envs`` (synchronous ``step``). Make it a multiple of the envs per actor for
        batches of one size.
    """

    def __init__(
        self,
        env_fns: Sequence[Callable[[], Env]],
        shared_memory: bool = True,
        copy: bool = True,
        context: str | None = None,
        daemon: bool = True,
        worker: Callable[..., None] | None = None,
        observation_mode: str | tuple[Space[Any], Space[Any]] = "same",
        autoreset_mode: str | AutoresetMode = AutoresetMode.NEXT_STEP,
        max_concurrency: int | None = None,
        *,
        num_nodes: int | None = None,
        num_actors: int | None = None,
        envs_per_actor: int | None = None,
        cpus_per_actor: float = 1,
        resources_per_actor: dict[str, float] | None = None,
        placement_group: PlacementGroup | None = None,
        restart_workers: bool = False,
        start_timeout: float | None = DEFAULT_START_TIMEOUT,
        batch_size: int | None = None,
    ) -> None:
        self._state = AsyncState.DEFAULT
        self.closed = False
        self._nodes: list[Node] = []
        self._broken: ActorDiedError | None = None
        if not ray.is_initialized():
            raise RuntimeError(
                "fastvec.ray.RayVectorEnv needs a Ray connection: call `ray.init()` (a local "
                "cluster) or `ray.init(address=...)` (an existing one) first.")
        A.no_custom_worker(worker)
        self.env_fns, self.shared_memory, self.copy = env_fns, shared_memory, copy
        self.context, self.daemon = context, daemon
        self.observation_mode = observation_mode
        self.autoreset_mode = (autoreset_mode if isinstance(autoreset_mode, AutoresetMode)
                               else AutoresetMode(autoreset_mode))
        self.max_concurrency = A.max_concurrency(max_concurrency)
        self.start_timeout = A.start_timeout(start_timeout)
        self.restart_workers = bool(restart_workers)
        self.num_envs = A.num_envs(env_fns)
        self.batch_size = A.batch_size(batch_size, self.num_envs)
        self.placement: Placement = plan_placement(
            self.num_envs, num_nodes=num_nodes, num_actors=num_actors,
            envs_per_actor=envs_per_actor, cpus_per_actor=cpus_per_actor,
            resources_per_actor=resources_per_actor, placement_group=placement_group)
        self._pending: dict[int, Any] = {}  # the synchronous call's refs, by node
        self._gathered = Gathered()
        self._call_args: tuple[str, tuple[Any, ...], dict[str, Any]] | None = None
        self._out: Any = None  # copy=False's reused observation buffers
        self._node_obs: list[Any] = []  # each node's last observations (whole batches)
        # partial batches: envs in flight (oldest send first), finished entries, stale envs
        self._flight: dict[Any, _Entry] = {}
        self._done: deque[_Entry] = deque()
        self._stale: dict[int, set[int]] = {}
        self._last_ids: list[int] | None = None
        self._start(env_fns, observation_mode)

    # -- start -----------------------------------------------------------------------------
    def _start(self, env_fns: Sequence[Callable[[], Env]],
               observation_mode: str | tuple[Space[Any], Space[Any]]) -> None:
        placement = self.placement
        reserve(placement, self.start_timeout)
        options = {
            "shared_memory": self.shared_memory, "context": self.context,
            "daemon": self.daemon, "autoreset_mode": self.autoreset_mode,
            "max_concurrency": self.max_concurrency, "restart_workers": self.restart_workers,
            "start_timeout": self.start_timeout,
        }
        handles: list[Any] = []
        try:
            handles = start_actors(placement, list(env_fns),
                                   {**options, "observation_mode": "same"
                                    if isinstance(observation_mode, tuple)
                                    else observation_mode},
                                   self.restart_workers)
            self._nodes = [Node(k, h, spec.envs)
                           for k, (h, spec) in enumerate(zip(handles, placement.actors,
                                                             strict=True))]
            descriptions = self._ask_all("describe", timeout=self.start_timeout)
            for node, description in zip(self._nodes, descriptions, strict=True):
                node.learn(description)
            self._read_spaces(observation_mode)
        except BaseException:
            self.closed = True
            release(placement, handles)
            raise

    def _ask_all(self, method: str, *args: Any, timeout: float | None = None) -> list[Any]:
        """``method(*args)`` on every actor, waited for; a death raises at once."""
        refs = {n.index: getattr(n.handle, method).remote(*args) for n in self._nodes}
        gathered = gather(refs, Gathered(), timeout, method)
        for k, exc in gathered.deaths.items():
            raise died(self._nodes[k], exc, False, method) from exc
        for exc in gathered.errors.values():
            raise exc
        return [gathered.results[n.index] for n in self._nodes]

    def _read_spaces(self, observation_mode: str | tuple[Space[Any], Space[Any]]) -> None:
        answers = self._ask_all("spaces")
        metadata, self.render_mode, self.single_action_space, single_obs = answers[0]
        self.metadata = dict(metadata)
        self.metadata["autoreset_mode"] = self.autoreset_mode
        if any(a[2] != self.single_action_space for a in answers[1:]):
            raise RuntimeError(
                f"Some environments have an action space different from "
                f"`{self.single_action_space}`. In order to batch actions, the action spaces "
                "from all environments must be equal.")
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        if isinstance(observation_mode, tuple):
            self.observation_space, self.single_observation_space = observation_mode
        elif observation_mode == "different":
            per_env = [space for node_spaces in self._ask_all(
                "call", "observation_space", (), {}) for space in node_spaces]
            self.single_observation_space = per_env[0]
            self.observation_space = batch_differing_spaces(per_env)
        else:
            if any(a[3] != single_obs for a in answers[1:]):
                raise RuntimeError(
                    "RayVectorEnv(..., observation_mode='same') however some of the "
                    "sub-environments observation spaces are not equivalent. If this is "
                    "intentional, use `observation_mode='different'` instead.")
            self.single_observation_space = single_obs
            self.observation_space = batch_space(single_obs, self.num_envs)

    # -- properties ------------------------------------------------------------------------
    @property
    def nodes(self) -> tuple[Node, ...]:
        """The node actors: handle, envs, pid, Ray node id and address, segment name."""
        return tuple(self._nodes)

    @property
    def num_actors(self) -> int:
        return len(self._nodes)

    @property
    def np_random_seed(self) -> tuple[int, ...]:  # type: ignore[override]
        """The ``np_random_seed`` of every sub-environment."""
        return self.get_attr("np_random_seed")

    @property  # type: ignore[misc]
    def np_random(self) -> tuple[np.random.Generator, ...]:  # type: ignore[override]
        """The ``np_random`` generator of every sub-environment."""
        return self.get_attr("np_random")

    # -- checks ----------------------------------------------------------------------------
    def _assert_is_running(self) -> None:
        if self.closed:
            raise ClosedEnvironmentError(
                f"Trying to operate on `{type(self).__name__}`, after a call to `close()`.")
        if self._broken is not None:
            raise self._broken

    def _outstanding(self) -> int:
        return (sum(len(e.ids) for e in self._flight.values())
                + sum(len(e.ids) for e in self._done))

    def _busy(self) -> list[int]:
        return sorted(i for e in (*self._flight.values(), *self._done) for i in e.ids)

    def _assert_not_pending(self, method: str, end: str = ".") -> None:
        if self._state != AsyncState.DEFAULT:
            raise AlreadyPendingCallError(
                f"Calling `{method}` while waiting for a pending call to "
                f"`{self._state.value}` to complete{end}", str(self._state.value))
        outstanding = self._outstanding()
        if outstanding:
            raise AlreadyPendingCallError(
                f"Calling `{method}` while {outstanding} envs sent with `send` or "
                f"`async_reset` have not been received (envs {self._busy()}): `recv` them "
                "first.", "recv")

    def _assert_pending(self, state: AsyncState, method: str, start: str) -> None:
        if self._state != state:
            raise NoAsyncCallError(
                f"Calling `{method}` without any prior call to `{start}`.", state.value)

    # -- the synchronous calls -------------------------------------------------------------
    def _submit(self, state: AsyncState, calls: dict[int, Any]) -> None:
        self._pending = calls
        self._gathered = Gathered()
        self._state = state

    def _wait_all(self, state: AsyncState, method: str, start: str,
                  timeout: float | None) -> Gathered:
        """Every node's answer to the pending call; deaths are restarted or raised (the
        call is over either way), the first env error is raised."""
        self._assert_is_running()
        self._assert_pending(state, method, start)
        gathered = gather(self._pending, self._gathered, timeout, state.value)
        self._state = AsyncState.DEFAULT
        self._last_ids = None
        if gathered.deaths:
            self._deaths(gathered, state)
        for k in sorted(gathered.errors):
            raise gathered.errors[k]
        return gathered

    def _deaths(self, gathered: Gathered, state: AsyncState) -> None:
        """Restart (or raise for) the nodes that died during the call; during a step a
        restarted node's answer is its rows reported restarted."""
        doing = state.value
        for k, exc in sorted(gathered.deaths.items()):
            node = self._nodes[k]
            if not self.restart_workers:
                self._broken = died(node, exc, False, doing)
                raise self._broken from exc
            self._recover(node, exc, doing)
            if state is not AsyncState.WAITING_STEP:
                raise died(node, exc, True, doing) from exc
            gathered.results[k] = self._restarted_rows(node, list(node.envs))

    def _recover(self, node: Node, exc: BaseException, doing: str) -> None:
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
                    self._broken = died(node, timeout, False, doing)
                    raise self._broken from exc
                cause = got.deaths.get(node.index)
                if (isinstance(cause, ActorUnavailableError)
                        and (deadline is None or time.monotonic() < deadline)):
                    time.sleep(RESTART_POLL)  # still restarting: Ray refuses calls until up
                    continue
                break
            if node.index not in got.results:
                cause = next(iter((*got.deaths.values(), *got.errors.values())))
                self._broken = died(node, cause, False, doing)
                raise self._broken from exc
            if method == "describe":
                node.learn(got.results[node.index])
            else:
                node.recovered = got.results[node.index]
        node.generation += 1
        self._stale[node.index] = set(node.envs)

    def _restarted_rows(self, node: Node, ids: list[int]) -> StepResult:
        """The rows of ``ids`` (global) of a restarted node: its fresh reset's
        observations, reward 0, truncated, info ``worker_restarted``."""
        assert node.recovered is not None
        obs, reset_infos = node.recovered
        local = [i - node.envs.start for i in ids]
        n = len(ids)
        infos = restarted_infos(
            n, take_infos(reset_infos, local, len(node.envs))
            if self.autoreset_mode is AutoresetMode.SAME_STEP else None)
        stale = self._stale.get(node.index)
        if stale is not None:
            stale.difference_update(ids)
        return (B.take(self.single_observation_space, obs, local), np.zeros(n),
                np.zeros(n, np.bool_), np.ones(n, np.bool_), infos)

    def _join(self, results: Sequence[StepResult], sizes: Sequence[int],
              record: bool = False) -> StepResult:
        """Node results one after the other, as one batch (infos merged at offsets);
        ``record``: one whole result per node, kept as the nodes' last observations."""
        if record:
            # every node's observations as Ray returned them (read-only, so never changed):
            # what a reset_mask that leaves a node out returns for its rows
            self._node_obs = [r[0] for r in results]
        total = sum(sizes)
        infos: dict[str, Any] = {}
        offset = 0
        for (_, _, _, _, part), n in zip(results, sizes, strict=True):
            if part:
                infos = merge_infos(infos, part, offset, n, total)
            offset += n
        obs = B.join(self.single_observation_space, [r[0] for r in results])
        if not self.copy:
            obs = self._reuse(obs)
        return (obs, *(np.concatenate([r[k] for r in results]) for k in (1, 2, 3)), infos)

    def _reuse(self, obs: Any) -> Any:
        """copy=False: the batch written into the buffers the last call returned."""
        if self._out is None or not B.same_shape(self._out, obs):
            self._out = obs
            return obs
        B.copy_into(self._out, obs)
        return self._out

    # -- reset -----------------------------------------------------------------------------
    def reset(self, *, seed: int | list[int | None] | None = None,
              options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        """Reset every sub-environment (or those in ``options["reset_mask"]``)."""
        self.reset_async(seed=seed, options=options)
        return self.reset_wait()

    def _seeds(self, seed: int | list[int | None] | None) -> list[int | None]:
        if seed is None:
            return [None] * self.num_envs
        if isinstance(seed, int):
            return [seed + i for i in range(self.num_envs)]
        if len(seed) != self.num_envs:
            raise ValueError(
                f"If seeds are passed as a list the length must match num_envs={self.num_envs}"
                f" but got length={len(seed)}.")
        return list(seed)

    def reset_async(self, seed: int | list[int | None] | None = None,
                    options: dict[str, Any] | None = None) -> None:
        """Send each node its envs' seeds (env ``i`` gets ``seed + i``) and the options."""
        self._assert_is_running()
        seeds = self._seeds(seed)
        self._assert_not_pending("reset_async", end="")
        mask = None
        if options is not None and "reset_mask" in options:
            mask = options["reset_mask"]
            if not isinstance(mask, np.ndarray):
                raise TypeError(
                    f"`options['reset_mask']` must be a numpy array, got {type(mask)}")
            if mask.shape != (self.num_envs,):
                raise ValueError(f"`options['reset_mask']` must have shape "
                                 f"`({self.num_envs},)`, got {mask.shape}")
            if mask.dtype != np.bool_:
                raise TypeError(f"`options['reset_mask']` must have `dtype=np.bool_`, got "
                                f"{mask.dtype}")
            if not np.any(mask):
                raise ValueError(
                    "`options['reset_mask']` must contain a boolean array with at least one "
                    f"True value, got reset_mask={mask}")
        calls = {}
        for node in self._nodes:
            node_options = options
            if mask is not None:
                own = mask[node.envs.start:node.envs.stop]
                if not own.any():
                    continue  # nothing to reset there: its rows keep their observations
                node_options = {**options, "reset_mask": own.copy()}  # type: ignore[dict-item]
            calls[node.index] = node.handle.reset.remote(
                seeds[node.envs.start:node.envs.stop], node_options)
        self._reset_mask = mask
        self._stale.clear()
        self._submit(AsyncState.WAITING_RESET, calls)

    def reset_wait(self, timeout: float | None = None) -> tuple[Any, dict[str, Any]]:
        """Wait for the reset sent by :meth:`reset_async`; ``(observations, infos)``."""
        gathered = self._wait_all(AsyncState.WAITING_RESET, "reset_wait", "reset_async",
                                  timeout)
        for k in gathered.results:
            self._nodes[k].recovered = None
        results: list[StepResult] = []
        for node in self._nodes:
            if node.index in gathered.results:
                obs, infos = gathered.results[node.index]
            else:  # masked out entirely: the node's last observations stand
                obs, infos = self._node_obs[node.index], {}
            results.append((obs, np.zeros(0), np.zeros(0), np.zeros(0), infos))
        obs, _, _, _, infos = self._join(results, [len(n.envs) for n in self._nodes], True)
        return obs, infos

    # -- step ------------------------------------------------------------------------------
    def step(self, actions: Any, env_ids: Any = None) -> StepResult:
        """Step every sub-environment; with ``batch_size < num_envs`` (or ``env_ids``),
        ``send(actions, env_ids)`` then ``recv()``."""
        if env_ids is None and self.batch_size == self.num_envs:
            self.step_async(actions)
            return self.step_wait()
        self.send(actions, env_ids)
        return self.recv()

    def step_async(self, actions: Any) -> None:
        """Send each node its slice of the action batch, one remote call per node."""
        self._assert_is_running()
        self._assert_not_pending("step_async")
        B.check_rows(self.action_space, actions, self.num_envs)
        space = self.single_action_space
        calls = {}
        for node in self._nodes:
            part = B.cut(space, actions, node.envs.start, node.envs.stop)
            stale = self._stale.get(node.index)
            if stale:  # a restarted node's idle envs: reported now, not stepped
                calls[node.index] = self._step_around_stale(node, part, stale)
            else:
                calls[node.index] = node.handle.step.remote(part)
        self._submit(AsyncState.WAITING_STEP, calls)

    def _step_around_stale(self, node: Node, actions: Any, stale: set[int]) -> Any:
        local = [i - node.envs.start for i in node.envs if i not in stale]
        if not local:
            return None
        return node.handle.step_some.remote(
            B.take(self.single_action_space, actions, local), local, True)

    def step_wait(self, timeout: float | None = None) -> StepResult:
        """Wait for the step sent by :meth:`step_async`; the batched results."""
        stale = {k: set(s) for k, s in self._stale.items() if s}
        pending = {k: ref for k, ref in self._pending.items() if ref is not None}
        skipped = [k for k, ref in self._pending.items() if ref is None]
        self._pending = pending
        gathered = self._wait_all(AsyncState.WAITING_STEP, "step_wait", "step_async", timeout)
        results = []
        for node in self._nodes:
            k = node.index
            if k in stale and k not in gathered.deaths:
                results.append(self._with_stale(node, gathered.results.get(k), stale[k],
                                                k in skipped))
            else:
                results.append(gathered.results[k])
        return self._join(results, [len(n.envs) for n in self._nodes], True)

    def _with_stale(self, node: Node, stepped: StepResult | None, stale: set[int],
                    skipped: bool) -> StepResult:
        """A node's rows: its stale envs reported restarted, the others as stepped."""
        ids = sorted(stale)
        restarted = self._restarted_rows(node, ids)
        if skipped or stepped is None:
            return restarted
        others = [i for i in node.envs if i not in stale]
        order = others + ids
        joined = self._join_rows([stepped, restarted], [len(others), len(ids)])
        position = {i: k for k, i in enumerate(order)}
        rows = [position[i] for i in node.envs]
        obs, rewards, terminations, truncations, infos = joined
        return (B.take(self.single_observation_space, obs, rows), rewards[rows],
                terminations[rows], truncations[rows],
                take_infos(infos, rows, len(order)))

    def _join_rows(self, results: Sequence[StepResult], sizes: Sequence[int]) -> StepResult:
        copy, self.copy = self.copy, True
        try:
            return self._join(results, sizes)
        finally:
            self.copy = copy

    # -- partial batches -------------------------------------------------------------------
    def _env_ids(self, env_ids: Any) -> list[int]:
        if env_ids is None:
            return (list(range(self.num_envs)) if self._last_ids is None
                    else list(self._last_ids))
        ids = np.asarray(env_ids)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"`env_ids` must be a 1-d sequence of ints, got {env_ids!r}")
        out = [int(i) for i in ids]
        bad = [i for i in out if not 0 <= i < self.num_envs]
        if bad:
            raise ValueError(f"`env_ids` holds unknown env ids {bad}: this vector env has "
                             f"envs 0..{self.num_envs - 1}")
        if len(set(out)) != len(out):
            raise ValueError(f"`env_ids` names an env more than once: {out}")
        if not out:
            raise ValueError("`env_ids` is empty: send needs at least one env")
        return out

    def _node_of(self, env: int) -> Node:
        for node in self._nodes:
            if env in node.envs:
                return node
        raise AssertionError(env)

    def send(self, actions: Any, env_ids: Any = None) -> None:
        """Send each node its envs' actions (one remote call per node touched) and return
        at once; :meth:`recv` collects the results, node by node as they finish."""
        self._assert_is_running()
        if self._state != AsyncState.DEFAULT:
            raise AlreadyPendingCallError(
                f"Calling `send` while waiting for a pending call to `{self._state.value}` "
                "to complete.", str(self._state.value))
        ids = self._env_ids(env_ids)
        busy = set(self._busy())
        if busy.intersection(ids):
            raise AlreadyPendingCallError(
                f"Calling `send` for envs {sorted(busy.intersection(ids))}, which are still in "
                "flight (sent and not yet returned by `recv`).", "recv")
        B.check_rows(batch_space(self.single_action_space, len(ids)), actions, len(ids))
        by_node: dict[int, list[int]] = {}
        for k, i in enumerate(ids):
            by_node.setdefault(self._node_of(i).index, []).append(k)
        for n, positions in by_node.items():
            node = self._nodes[n]
            node_ids = [ids[k] for k in positions]
            stale = self._stale.get(n, set())
            now = [i for i in node_ids if i in stale]
            keep = [k for k in positions if ids[k] not in stale]
            if now:  # a restarted node's idle envs: reported at once, not stepped
                entry = _Entry(node, now, False)
                entry.result = self._restarted_rows(node, now)
                self._done.append(entry)
            if keep:
                local = [ids[k] - node.envs.start for k in keep]
                part = B.take(self.single_action_space, actions, keep)
                self._flight[node.handle.step_some.remote(part, local)] = _Entry(
                    node, [ids[k] for k in keep], False)

    def async_reset(self, seed: int | list[int | None] | None = None,
                    options: dict[str, Any] | None = None) -> None:
        """Start a reset of every env (one call per node) and return at once; :meth:`recv`
        returns the nodes as they finish (reward 0, both flags False, the reset's infos)."""
        self._assert_is_running()
        seeds = self._seeds(seed)
        if options is not None and "reset_mask" in options:
            raise ValueError("`async_reset` resets every env: `options['reset_mask']` is for "
                             "`reset`.")
        self._assert_not_pending("async_reset")
        self._stale.clear()
        for node in self._nodes:
            ref = node.handle.reset.remote(seeds[node.envs.start:node.envs.stop], options)
            self._flight[ref] = _Entry(node, list(node.envs), True)

    def recv(self, timeout: float | None = None) -> StepResult:
        """The first nodes to finish, until at least ``batch_size`` rows (or every
        outstanding env): ``(observations, rewards, terminations, truncations, infos)``
        over their rows, ``infos["env_id"]`` naming each row's env. A node's env error is
        raised here (its envs are no longer in flight; the other finished nodes stay).
        On ``multiprocessing.TimeoutError`` nothing is taken."""
        self._assert_is_running()
        if self._state != AsyncState.DEFAULT:
            raise AlreadyPendingCallError(
                f"Calling `recv` while waiting for a pending call to `{self._state.value}` "
                "to complete.", str(self._state.value))
        outstanding = self._outstanding()
        if not outstanding:
            raise NoAsyncCallError(
                "Calling `recv` without any env sent by `send` or `async_reset`.", "recv")
        want = min(self.batch_size, outstanding)
        deadline = None if timeout is None else time.monotonic() + timeout
        while sum(len(e.ids) for e in self._done if e.error is None) < want and not any(
                e.error is not None for e in self._done):
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise multiprocessing.TimeoutError(
                    f"The call to `recv` has timed out after {timeout} second(s); envs "
                    f"{sorted(i for e in self._flight.values() for i in e.ids)} are still "
                    "in flight.")
            wait = WAIT_SLICE if deadline is None else min(WAIT_SLICE, deadline - now)
            ready, _ = ray.wait(list(self._flight), num_returns=1, timeout=wait)
            for ref in ready:
                self._finish(ref, self._flight.pop(ref))
        failed = [e for e in self._done if e.error is not None]
        if failed:
            self._done.remove(failed[0])
            raise failed[0].error  # type: ignore[misc]
        taken: list[_Entry] = []
        while sum(len(e.ids) for e in taken) < want:
            taken.append(self._done.popleft())
        return self._batch(taken)

    def _finish(self, ref: Any, entry: _Entry) -> None:
        """Move a finished call to the done entries (its rows, an error, or its node's
        restart)."""
        node = entry.node
        try:
            value = ray.get(ref)
        except RayActorError as exc:
            if not self.restart_workers:
                self._broken = died(node, exc, False, "recv")
                raise self._broken from exc
            if entry.generation == node.generation:
                self._recover(node, exc, "recv")
            entry.result = self._restarted_rows(node, entry.ids)
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
        self._done.append(entry)

    def _batch(self, entries: list[_Entry]) -> StepResult:
        results = [e.result for e in entries]
        assert all(r is not None for r in results)
        obs, rewards, terminations, truncations, infos = self._join_rows(
            results, [len(e.ids) for e in entries])  # type: ignore[arg-type]
        ids = [i for e in entries for i in e.ids]
        self._last_ids = ids
        infos["env_id"] = np.array(ids, dtype=np.int64)
        return obs, rewards, terminations.astype(np.bool_), truncations.astype(np.bool_), infos

    # -- call, get_attr, set_attr, render --------------------------------------------------
    def call(self, name: str, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
        """Call ``name`` (a method, or read an attribute) on every sub-environment."""
        self.call_async(name, *args, **kwargs)
        return self.call_wait()

    def render(self) -> tuple[Any, ...] | None:
        """The rendered frame of every sub-environment."""
        return self.call("render")

    def call_async(self, name: str, *args: Any, **kwargs: Any) -> None:
        """Send ``call(name, *args, **kwargs)`` to every node."""
        self._assert_is_running()
        self._assert_not_pending("call_async")
        self._submit(AsyncState.WAITING_CALL,
                     {n.index: n.handle.call.remote(name, args, kwargs) for n in self._nodes})

    def call_wait(self, timeout: float | None = None) -> tuple[Any, ...]:
        """Wait for the call sent by :meth:`call_async`; one result per sub-environment."""
        gathered = self._wait_all(AsyncState.WAITING_CALL, "call_wait", "call_async", timeout)
        return tuple(r for n in self._nodes for r in gathered.results[n.index])

    def get_attr(self, name: str) -> tuple[Any, ...]:
        """The attribute ``name`` of every sub-environment."""
        return self.call(name)

    def set_attr(self, name: str, values: list[Any] | tuple[Any, ...] | object) -> None:
        """Set ``name`` on every sub-environment (one value each, or one for all)."""
        self._assert_is_running()
        if not isinstance(values, (list, tuple)):
            values = [values for _ in range(self.num_envs)]
        if len(values) != self.num_envs:
            raise ValueError(
                "Values must be a list or tuple with length equal to the number of "
                f"environments. Got `{len(values)}` values for {self.num_envs} environments.")
        self._assert_not_pending("set_attr")
        self._submit(AsyncState.WAITING_CALL, {
            n.index: n.handle.set_attr.remote(name, list(values[n.envs.start:n.envs.stop]))
            for n in self._nodes})
        self._wait_all(AsyncState.WAITING_CALL, "set_attr", "set_attr", None)

    # -- close -----------------------------------------------------------------------------
    def close_extras(self, timeout: float | None = None, terminate: bool = False) -> None:
        """Close every node's envs and pool, kill every actor and free the placement group.

        Parameters
        ----------
        timeout
            Seconds to wait for the nodes to close their envs; past it the actors are
            killed anyway (their pools die with them and their segments are freed).
        terminate
            Kill the actors at once without closing the sub-environments.
        """
        if not ray.is_initialized():
            # the caller shut Ray down first: the actors went with it (a remote call now
            # would start a new local Ray instance)
            self._nodes = []
            self.placement.group = None
            return
        if self._state != AsyncState.DEFAULT and self._broken is None:
            logger.warn(f"Calling `close` while waiting for a pending call to "
                        f"`{self._state.value}` to complete.")
        if self._outstanding() and self._broken is None:
            logger.warn(f"Calling `close` while {self._outstanding()} envs sent with `send` "
                        "or `async_reset` have not been received: their results are dropped.")
        live = [n for n in self._nodes if self._broken is None or n.index != self._broken.actor]
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
        self._flight.clear()
        self._done.clear()
        self._pending = {}
        self._state = AsyncState.DEFAULT
        release(self.placement, [n.handle for n in self._nodes])

    def __enter__(self) -> RayVectorEnv:
        return self

    def __exit__(self, *args: Any) -> Literal[False]:
        self.close()
        return False

    def __del__(self) -> None:
        if not getattr(self, "closed", True) and getattr(self, "_nodes", None):
            try:
                self.close(terminate=True)
            except Exception:
                pass
