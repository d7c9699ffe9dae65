"""fastvec.ray.RayVectorEnv: one fastvec pool per Ray node, behind Gymnasium's VectorEnv API.

The face holds Gymnasium's semantics (call states, spaces, seeds, infos) over the node
actors of a :class:`fastvec.ray._cluster.Cluster` (started, restarted, placed by
:mod:`fastvec.ray._placement`); each actor runs a local :class:`fastvec.AsyncVectorEnv`
(:mod:`fastvec.ray._actor`). A step sends each actor its slice of the action batch in one
remote call and joins the slices they return. Partial batches (``send``, ``recv``,
``async_reset``) are :class:`fastvec.ray._partial.PartialBatches`'.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import ray
from gymnasium import Env, Space, logger
from gymnasium.error import AlreadyPendingCallError, ClosedEnvironmentError, NoAsyncCallError
from gymnasium.vector import AutoresetMode, VectorEnv
from ray.util.placement_group import PlacementGroup

from fastvec import _arguments as A
from fastvec.ray import _batches as B
from fastvec.ray._batches import StepResult
from fastvec.ray._cluster import Cluster
from fastvec.ray._nodes import Gathered, Node, gather
from fastvec.ray._partial import PartialBatches
from fastvec.ray._placement import Placement, plan_placement
from fastvec.vector_env import DEFAULT_START_TIMEOUT, AsyncState

__all__ = ["RayVectorEnv"]


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
        if not ray.is_initialized():
            raise RuntimeError(
                "fastvec.ray.RayVectorEnv needs a Ray connection: call `ray.init()` (a local "
                "cluster) or `ray.init(address=...)` (an existing one) first.")
        self.env_fns, self.shared_memory, self.copy = env_fns, shared_memory, copy
        self.context, self.daemon = context, daemon
        self.observation_mode = observation_mode
        self.autoreset_mode, self.max_concurrency, self.start_timeout = A.common(
            autoreset_mode, max_concurrency, start_timeout, worker, "fastvec.ray.RayVectorEnv")
        self.restart_workers = bool(restart_workers)
        self.num_envs = A.num_envs(env_fns)
        self.batch_size = A.batch_size(batch_size, self.num_envs)
        self.placement: Placement = plan_placement(
            self.num_envs, num_nodes=num_nodes, num_actors=num_actors,
            envs_per_actor=envs_per_actor, cpus_per_actor=cpus_per_actor,
            resources_per_actor=resources_per_actor, placement_group=placement_group)
        self._pending: dict[int, Any] = {}  # the synchronous call's refs, by node
        self._gathered = Gathered()
        self._out: Any = None  # copy=False's reused observation buffers
        self._node_obs: list[Any] = []  # each node's last observations (whole batches)
        self._cluster = cluster = Cluster(self.placement, self.num_envs, self.autoreset_mode,
                                          self.restart_workers, self.start_timeout)
        self._partial = PartialBatches(cluster)
        options = {
            "shared_memory": shared_memory, "context": context, "daemon": daemon,
            "autoreset_mode": self.autoreset_mode, "max_concurrency": self.max_concurrency,
            "restart_workers": self.restart_workers, "start_timeout": self.start_timeout,
        }
        try:
            (self.metadata, self.render_mode, self.single_action_space, self.action_space,
             self.single_observation_space, self.observation_space) = cluster.start(
                env_fns, options, observation_mode)
        except BaseException:
            self.closed = True
            raise

    # -- properties ------------------------------------------------------------------------
    @property
    def nodes(self) -> tuple[Node, ...]:
        """The node actors: handle, envs, pid, Ray node id and address, segment name."""
        return tuple(self._cluster.nodes)

    @property
    def num_actors(self) -> int:
        return len(self._cluster.nodes)

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
        if self._cluster.broken is not None:
            raise self._cluster.broken

    def _assert_no_call(self, method: str, end: str = ".") -> None:
        """Gymnasium's ``AlreadyPendingCallError`` if a synchronous call is pending."""
        if self._state != AsyncState.DEFAULT:
            raise AlreadyPendingCallError(
                f"Calling `{method}` while waiting for a pending call to "
                f"`{self._state.value}` to complete{end}", str(self._state.value))

    def _assert_not_pending(self, method: str, end: str = ".") -> None:
        """The same, and if envs sent with ``send``/``async_reset`` are outstanding."""
        self._assert_no_call(method, end)
        outstanding = self._partial.outstanding
        if outstanding:
            raise AlreadyPendingCallError(
                f"Calling `{method}` while {outstanding} envs sent with `send` or "
                f"`async_reset` have not been received (envs {self._partial.busy()}): `recv` "
                "them first.", "recv")

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
        self._partial.last_ids = None
        if gathered.deaths:
            self._cluster.deaths(gathered, state)
        for k in sorted(gathered.errors):
            raise gathered.errors[k]
        return gathered

    def _join(self, results: Sequence[StepResult]) -> StepResult:
        """One whole result per node, one after the other, as one batch (infos merged at
        offsets); the nodes' observations are kept as their last ones."""
        # every node's observations as Ray returned them (read-only, so never changed):
        # what a reset_mask that leaves a node out returns for its rows
        self._node_obs = [r[0] for r in results]
        obs, rewards, terminations, truncations, infos = B.join_results(
            self.single_observation_space, results, [len(n.envs) for n in self._cluster.nodes])
        if not self.copy:
            obs = self._reuse(obs)
        return obs, rewards, terminations, truncations, infos

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

    def reset_async(self, seed: int | list[int | None] | None = None,
                    options: dict[str, Any] | None = None) -> None:
        """Send each node its envs' seeds (env ``i`` gets ``seed + i``) and the options."""
        self._assert_is_running()
        seeds = A.seeds(seed, self.num_envs)
        self._assert_not_pending("reset_async", end="")
        mask = None
        if options is not None and "reset_mask" in options:
            mask = A.reset_mask(options["reset_mask"], self.num_envs)
        calls = self._cluster.reset_calls(seeds, options, mask)
        self._cluster.stale.clear()
        self._submit(AsyncState.WAITING_RESET, calls)

    def reset_wait(self, timeout: float | None = None) -> tuple[Any, dict[str, Any]]:
        """Wait for the reset sent by :meth:`reset_async`; ``(observations, infos)``."""
        gathered = self._wait_all(AsyncState.WAITING_RESET, "reset_wait", "reset_async",
                                  timeout)
        for k in gathered.results:
            self._cluster.nodes[k].recovered = None
        results: list[StepResult] = []
        for node in self._cluster.nodes:
            if node.index in gathered.results:
                obs, infos = gathered.results[node.index]
            else:  # masked out entirely: the node's last observations stand
                obs, infos = self._node_obs[node.index], {}
            results.append((obs, np.zeros(0), np.zeros(0), np.zeros(0), infos))
        obs, _, _, _, infos = self._join(results)
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
        self._submit(AsyncState.WAITING_STEP, self._cluster.step_calls(actions))

    def step_wait(self, timeout: float | None = None) -> StepResult:
        """Wait for the step sent by :meth:`step_async`; the batched results."""
        stale = {k: set(s) for k, s in self._cluster.stale.items() if s}
        pending = {k: ref for k, ref in self._pending.items() if ref is not None}
        skipped = [k for k, ref in self._pending.items() if ref is None]
        self._pending = pending
        gathered = self._wait_all(AsyncState.WAITING_STEP, "step_wait", "step_async", timeout)
        results = []
        for node in self._cluster.nodes:
            k = node.index
            if k in stale and k not in gathered.deaths:
                results.append(self._cluster.with_stale(node, gathered.results.get(k),
                                                        stale[k], k in skipped))
            else:
                results.append(gathered.results[k])
        return self._join(results)

    # -- partial batches -------------------------------------------------------------------
    def send(self, actions: Any, env_ids: Any = None) -> None:
        """Send each node its envs' actions (one remote call per node touched) and return
        at once; :meth:`recv` collects the results, node by node as they finish."""
        self._assert_is_running()
        self._assert_no_call("send")
        self._partial.send(actions, env_ids)

    def async_reset(self, seed: int | list[int | None] | None = None,
                    options: dict[str, Any] | None = None) -> None:
        """Start a reset of every env (one call per node) and return at once; :meth:`recv`
        returns the nodes as they finish (reward 0, both flags False, the reset's infos)."""
        self._assert_is_running()
        seeds = A.seeds(seed, self.num_envs)
        if options is not None and "reset_mask" in options:
            raise ValueError("`async_reset` resets every env: `options['reset_mask']` is for "
                             "`reset`.")
        self._assert_not_pending("async_reset")
        self._cluster.stale.clear()
        self._partial.reset(seeds, options)

    def recv(self, timeout: float | None = None) -> StepResult:
        """The first nodes to finish, until at least ``batch_size`` rows (or every
        outstanding env): ``(observations, rewards, terminations, truncations, infos)``
        over their rows, ``infos["env_id"]`` naming each row's env. A node's env error is
        raised here (its envs are no longer in flight; the other finished nodes stay).
        On ``multiprocessing.TimeoutError`` nothing is taken."""
        self._assert_is_running()
        self._assert_no_call("recv")
        if not self._partial.outstanding:
            raise NoAsyncCallError(
                "Calling `recv` without any env sent by `send` or `async_reset`.", "recv")
        return self._partial.recv(self.batch_size, timeout)

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
                     {n.index: n.handle.call.remote(name, args, kwargs)
                      for n in self._cluster.nodes})

    def call_wait(self, timeout: float | None = None) -> tuple[Any, ...]:
        """Wait for the call sent by :meth:`call_async`; one result per sub-environment."""
        gathered = self._wait_all(AsyncState.WAITING_CALL, "call_wait", "call_async", timeout)
        return tuple(r for n in self._cluster.nodes for r in gathered.results[n.index])

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
            for n in self._cluster.nodes})
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
            self._cluster.nodes = []
            self.placement.group = None
            return
        if self._state != AsyncState.DEFAULT and self._cluster.broken is None:
            logger.warn(f"Calling `close` while waiting for a pending call to "
                        f"`{self._state.value}` to complete.")
        if self._partial.outstanding and self._cluster.broken is None:
            logger.warn(f"Calling `close` while {self._partial.outstanding} envs sent with "
                        "`send` or `async_reset` have not been received: their results are "
                        "dropped.")
        self._cluster.close(timeout, terminate)
        self._partial.forget()
        self._pending = {}
        self._state = AsyncState.DEFAULT
        self._cluster.release()

    def __enter__(self) -> RayVectorEnv:
        return self

    def __exit__(self, *args: Any) -> Literal[False]:
        self.close()
        return False

    def __del__(self) -> None:
        cluster = getattr(self, "_cluster", None)
        if not getattr(self, "closed", True) and cluster is not None and cluster.nodes:
            try:
                self.close(terminate=True)
            except Exception:
                pass
