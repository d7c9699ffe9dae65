"""Where the node actors go: how many, which envs each, and the Ray placement group.

:func:`plan_placement` turns the constructor's placement options into a :class:`Placement`
(one :class:`ActorSpec` per actor); :func:`start_actors` reserves the placement group (or
uses the caller's) and starts one :class:`~fastvec.ray._actor.NodePool` actor per bundle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from fastvec._pool import split_groups
from fastvec.ray._actor import NodePool

__all__ = ["ActorSpec", "Placement", "plan_placement", "release", "reserve", "start_actors"]


@dataclass(frozen=True)
class ActorSpec:
    """One node actor: its envs (global ids), the CPUs it asks Ray for and its bundle."""

    envs: range
    cpus: float
    resources: dict[str, float]
    bundle: int

    @property
    def num_workers(self) -> int:
        """Its local pool's worker processes: one per whole CPU, at most one per env."""
        return max(1, min(int(self.cpus), len(self.envs)))


@dataclass
class Placement:
    """The actors and the placement group that holds them (``owned``: made here, removed at
    close; else the caller's)."""

    actors: list[ActorSpec]
    strategy: str
    group: PlacementGroup | None = None
    owned: bool = True


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    return value


def _split(num_envs: int, num_actors: int, envs_per_actor: int | None) -> list[range]:
    if envs_per_actor is None:
        if num_actors > num_envs:
            raise ValueError(f"{num_actors} actors for {num_envs} envs: every actor needs at "
                             "least one env.")
        return split_groups(num_envs, num_actors)
    groups = [range(s, min(s + envs_per_actor, num_envs))
              for s in range(0, num_envs, envs_per_actor)]
    if len(groups) != num_actors:
        raise ValueError(f"{num_envs} envs at `envs_per_actor={envs_per_actor}` make "
                         f"{len(groups)} actors, not {num_actors}.")
    return groups


def _alive_nodes(cpus: float) -> int:
    return len([node for node in ray.nodes()
                if node.get("Alive") and node.get("Resources", {}).get("CPU", 0) >= cpus])


def plan_placement(num_envs: int, *, num_nodes: int | None, num_actors: int | None,
                   envs_per_actor: int | None, cpus_per_actor: float,
                   resources_per_actor: dict[str, float] | None,
                   placement_group: PlacementGroup | None) -> Placement:
    """The actors for ``num_envs`` envs. At most one of ``num_nodes`` (one actor per node,
    ``STRICT_SPREAD``), ``num_actors`` (``SPREAD``) and ``placement_group`` (one actor per
    bundle); with none, ``envs_per_actor`` decides the count, else one actor per alive node
    with ``cpus_per_actor`` CPUs."""
    given = [n for n, v in (("num_nodes", num_nodes), ("num_actors", num_actors),
                            ("placement_group", placement_group)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one of `num_nodes`, `num_actors` and "
                         f"`placement_group`, got {', '.join(given)}.")
    if envs_per_actor is not None:
        _positive_int("envs_per_actor", envs_per_actor)
    if isinstance(cpus_per_actor, bool) or not cpus_per_actor > 0:
        raise ValueError(f"`cpus_per_actor` must be a positive number, got {cpus_per_actor!r}.")
    resources = dict(resources_per_actor or {})
    if placement_group is not None:
        bundles = placement_group.bundle_specs
        groups = _split(num_envs, len(bundles), envs_per_actor)
        actors = [ActorSpec(g, float(b.get("CPU", 0)),
                            {k: v for k, v in b.items() if k not in ("CPU", "memory")}, i)
                  for i, (g, b) in enumerate(zip(groups, bundles, strict=True))]
        return Placement(actors, "caller's", placement_group, owned=False)
    if num_nodes is not None:
        count, strategy = _positive_int("num_nodes", num_nodes), "STRICT_SPREAD"
    elif num_actors is not None:
        count, strategy = _positive_int("num_actors", num_actors), "SPREAD"
    elif envs_per_actor is not None:
        count, strategy = math.ceil(num_envs / envs_per_actor), "SPREAD"
    else:
        count, strategy = max(1, min(num_envs, _alive_nodes(cpus_per_actor))), "STRICT_SPREAD"
    groups = _split(num_envs, count, envs_per_actor)
    actors = [ActorSpec(g, float(cpus_per_actor), resources, i) for i, g in enumerate(groups)]
    return Placement(actors, strategy)


def reserve(placement: Placement, timeout: float | None) -> None:
    """Make and wait for the placement group (unless the caller gave one); past
    ``timeout`` it is removed and ``TimeoutError`` says what could not be placed."""
    if placement.group is None:
        bundles = [{"CPU": a.cpus, **a.resources} for a in placement.actors]
        placement.group = placement_group(bundles, strategy=placement.strategy)
        placement.owned = True
    ready = placement.group.ready()
    done, _ = ray.wait([ready], timeout=timeout)
    if not done:
        if placement.owned:
            remove_placement_group(placement.group)
            placement.group = None
        spec = placement.actors[0]
        raise TimeoutError(
            f"Ray could not place {len(placement.actors)} fastvec node actors ({spec.cpus:g} "
            f"CPUs{', ' + str(spec.resources) if spec.resources else ''} each, strategy "
            f"{placement.strategy}) within {timeout} s: the cluster has "
            f"{ray.cluster_resources().get('CPU', 0):g} CPUs on "
            f"{len([n for n in ray.nodes() if n.get('Alive')])} alive nodes and "
            f"{ray.available_resources().get('CPU', 0):g} free.")


_REMOTE: dict[str, Any] = {}


def start_actors(placement: Placement, env_fns: list[Any], options: dict[str, Any],
                 restart: bool) -> list[Any]:
    """One started (not yet ready) actor per spec, in its bundle."""
    remote = _REMOTE.get("NodePool")
    if remote is None:
        remote = _REMOTE["NodePool"] = ray.remote(NodePool)
    assert placement.group is not None, "reserve() first"
    handles = []
    for spec in placement.actors:
        actor_options = {
            "num_cpus": spec.cpus,
            "resources": spec.resources or None,
            "max_restarts": -1 if restart else 0,
            "max_task_retries": 0,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement.group, placement_group_bundle_index=spec.bundle),
        }
        handles.append(remote.options(**actor_options).remote(
            [env_fns[i] for i in spec.envs], spec.envs.start,
            {**options, "num_workers": spec.num_workers}))
    return handles


def release(placement: Placement, handles: list[Any]) -> None:
    """Kill every actor (no restart) and remove the placement group if it is ours."""
    for handle in handles:
        try:
            ray.kill(handle, no_restart=True)
        except Exception:
            pass
    if placement.owned and placement.group is not None:
        try:
            remove_placement_group(placement.group)
        except Exception:
            pass
        placement.group = None
