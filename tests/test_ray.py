"""fastvec.ray on a local multi-node Ray cluster (``ray.cluster_utils.Cluster``).

One cluster per module (a head and a second node of one CPU each; starting Ray takes
seconds on two cores). The differential tests step the same seeded envs through
``fastvec.ray.RayVectorEnv`` and Gymnasium's ``SyncVectorEnv`` and compare every leaf of
every result, infos included; the others cover partial batches per node, the call states,
placement, an actor killed (raised, or restarted by Ray) and close leaving no actor, no
placement group and no segment.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import signal
import time
from typing import Any

import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.error import AlreadyPendingCallError, ClosedEnvironmentError, NoAsyncCallError
from gymnasium.vector import AutoresetMode, SyncVectorEnv

import envs as test_envs
from conftest import SHM_DIR
from fastvec.errors import WorkerDiedError
from test_partial import action, check_same, reference, row, row_info

# Ray is imported by the cluster fixture, not at collection: importing it imports filelock,
# whose fork audit hook (filelock >= 3.3x) makes concurrent os.fork calls from threads raise,
# which would break the thread tests of the modules collected with this one.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason="fastvec.ray needs Ray: pip install 'fastvec[ray]'")
ray: Any = None
RayVectorEnv: Any = None
ActorDiedError: Any = None

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
STEPS = 200
# how long Ray may take to report a killed actor, and a removed node (health checks below)
DEATH_BOUND = 15.0
NODE_DEATH_BOUND = 30.0

OBS_SPACE = spaces.Dict({
    "pos": spaces.Box(-5.0, 5.0, (3,), np.float32),
    "id": spaces.Discrete(7, start=2),
    "pair": spaces.Tuple((spaces.MultiBinary(2), spaces.Box(0, 255, (2, 2), np.uint8))),
})


@pytest.fixture(scope="module")
def cluster() -> Any:
    """Two Ray nodes of one CPU each; the test envs importable on both (PYTHONPATH)."""
    import ray as ray_module
    from ray.cluster_utils import Cluster

    import fastvec.ray

    globals().update(ray=ray_module, RayVectorEnv=fastvec.ray.RayVectorEnv,
                     ActorDiedError=fastvec.ray.ActorDiedError)
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS_DIR, saved) if p)
    local = Cluster(initialize_head=True, connect=False, head_node_args={
        "num_cpus": 1, "include_dashboard": False,
        "_system_config": {"health_check_initial_delay_ms": 0,
                           "health_check_period_ms": 500,
                           "health_check_timeout_ms": 500,
                           "health_check_failure_threshold": 4}})
    try:
        local.add_node(num_cpus=1)
        ray.init(address=local.address, log_to_driver=False)
        local.wait_for_nodes()
        yield local
    finally:
        ray.shutdown()
        local.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def space_fns(n: int, **kwargs: Any) -> list:
    return [functools.partial(test_envs.SpaceEnv, OBS_SPACE, index=i, **kwargs)
            for i in range(n)]


def leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [(k, x) for k in sorted(value) for x in leaves(value[k])]
    if isinstance(value, tuple):
        return [x for v in value for x in leaves(v)]
    return [value]


def assert_same(a: Any, b: Any, where: str) -> None:
    """Leaf by leaf: dict keys, dtypes and values (object arrays element by element)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {a.keys()} {b.keys()}"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, tuple):
        assert isinstance(b, tuple) and len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{k}]")
    elif isinstance(a, np.ndarray) and a.dtype == object:
        assert isinstance(b, np.ndarray) and b.dtype == object and a.shape == b.shape, where
        for k, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{k}]")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray), f"{where}: {type(b)}"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype} {b.dtype}"
        np.testing.assert_array_equal(a, b, err_msg=where)
    else:
        assert a == b or (a is None and b is None), f"{where}: {a!r} != {b!r}"


def segments_gone(names: list[str | None], within: float = 10.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(n and os.path.exists(os.path.join(SHM_DIR, n)) for n in names):
            return True
        time.sleep(0.1)
    return False


def processes_gone(pids: list[int | None], within: float = 10.0) -> bool:
    import psutil

    def alive(pid: int | None) -> bool:
        try:
            return pid is not None and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:  # also when it exits while being asked
            return False

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def owned_groups() -> list[str]:
    return [g for g, info in ray.util.placement_group_table().items()
            if info["state"] not in ("REMOVED",)]


# -- differential ------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", list(AutoresetMode))
def test_matches_sync_vector_env_for_200_steps(cluster: Any, mode: AutoresetMode) -> None:
    """7 envs over two nodes (4 + 3): the same seeded envs and actions as SyncVectorEnv,
    every observation, reward, flag and info equal for 200 steps (Disabled: reset by mask)."""
    fns = space_fns(7)
    envs = RayVectorEnv(fns, autoreset_mode=mode)
    ref = SyncVectorEnv(fns, autoreset_mode=mode)
    try:
        assert [len(n.envs) for n in envs.nodes] == [4, 3]
        assert len({n.node_id for n in envs.nodes}) == 2, "one actor per node"
        assert envs.observation_space == ref.observation_space
        assert envs.action_space == ref.action_space
        assert envs.metadata["autoreset_mode"] is mode
        assert_same(envs.reset(seed=11), ref.reset(seed=11), "reset")
        envs.action_space.seed(5)
        for t in range(STEPS):
            actions = envs.action_space.sample()
            got, expected = envs.step(actions), ref.step(actions)
            assert_same(got, expected, f"step {t}")
            if mode is AutoresetMode.DISABLED:
                done = got[2] | got[3]
                if done.any():
                    assert_same(envs.reset(options={"reset_mask": done}),
                                ref.reset(options={"reset_mask": done}), f"mask reset {t}")
        assert envs.np_random_seed == ref.np_random_seed == tuple(11 + i for i in range(7))
    finally:
        envs.close()
        ref.close()


def test_copy_false_and_seed_lists(cluster: Any) -> None:
    fns = space_fns(4)
    envs = RayVectorEnv(fns, copy=False)
    ref = SyncVectorEnv(fns)
    try:
        seeds = [3, None, 9, 1]
        envs.reset(seed=seeds)
        ref.reset(seed=seeds)
        assert envs.np_random_seed[::2] == (3, 9) and envs.np_random_seed[3] == 1
        first, *_ = envs.step(np.zeros(4, np.int64))
        ref.step(np.zeros(4, np.int64))
        keep = {k: np.copy(v) if isinstance(v, np.ndarray) else v for k, v in first.items()}
        second, *_ = envs.step(np.ones(4, np.int64))
        expected, *_ = ref.step(np.ones(4, np.int64))
        assert second["pos"] is first["pos"], "copy=False reuses the buffers"
        np.testing.assert_array_equal(second["pos"][[0, 2, 3]], expected["pos"][[0, 2, 3]])
        assert not np.array_equal(keep["pos"], second["pos"])
    finally:
        envs.close()
        ref.close()


# -- partial batches ---------------------------------------------------------------------------
def run_partial(envs: RayVectorEnv, seed: int, steps: int) -> list[list[Any]]:
    """Each env's results through send/recv, resending each env the moment it comes back."""
    n = envs.num_envs
    space = envs.single_observation_space
    results: list[list[Any]] = [[] for _ in range(n)]
    envs.async_reset(seed=seed)
    pending = set(range(n))
    while pending:
        obs, rewards, terminations, truncations, infos = envs.recv(timeout=60)
        ids = infos["env_id"].tolist()
        assert len(ids) >= min(envs.batch_size, len(pending))
        for k, i in enumerate(ids):
            assert i in pending, f"env {i} came back without being sent"
            pending.discard(i)
            results[i].append((row(space, obs, k), float(rewards[k]), bool(terminations[k]),
                               bool(truncations[k]), row_info(infos, k)))
        again = [i for i in ids if len(results[i]) <= steps and not (
            envs.autoreset_mode is AutoresetMode.DISABLED
            and (results[i][-1][2] or results[i][-1][3]))]
        if again:
            envs.send(np.array([action(i, len(results[i]) - 1) for i in again]), again)
            pending.update(again)
    return results


@pytest.mark.parametrize("mode", list(AutoresetMode))
def test_partial_batches_match_envs_stepped_alone(cluster: Any, mode: AutoresetMode) -> None:
    fns = test_envs.jitter_fns(6, jitter=0.002)
    envs = RayVectorEnv(fns, autoreset_mode=mode, batch_size=3)
    try:
        check_same(run_partial(envs, seed=4, steps=12), reference(fns, mode, 4, 12))
    finally:
        envs.close()


def test_a_slow_node_does_not_stall_the_other(cluster: Any) -> None:
    """Node 1's envs sleep 1 s a step: node 0 is stepped several times meanwhile."""
    fns = [functools.partial(test_envs.SpaceEnv, OBS_SPACE, index=i,
                             delay=1.0 if i >= 2 else 0.0) for i in range(4)]
    envs = RayVectorEnv(fns, batch_size=2)
    try:
        envs.async_reset(seed=0)
        first = envs.recv(timeout=30)[4]["env_id"].tolist()
        second = envs.recv(timeout=30)[4]["env_id"].tolist()
        assert sorted(first + second) == [0, 1, 2, 3]
        envs.send(np.zeros(2, np.int64), [2, 3])  # the slow node
        start = time.monotonic()
        for _ in range(3):
            envs.send(np.zeros(2, np.int64), [0, 1])
            *_, infos = envs.recv(timeout=30)
            assert sorted(infos["env_id"].tolist()) == [0, 1]
        assert time.monotonic() - start < 1.0, "the fast node waited for the slow one"
        assert sorted(envs.recv(timeout=30)[4]["env_id"].tolist()) == [2, 3]
    finally:
        envs.close()


# -- the call states ---------------------------------------------------------------------------
def test_call_states(cluster: Any) -> None:
    import multiprocessing

    fns = [functools.partial(test_envs.SpaceEnv, OBS_SPACE, index=i, delay=0.3)
           for i in range(4)]
    envs = RayVectorEnv(fns, batch_size=2)
    try:
        with pytest.raises(NoAsyncCallError):
            envs.step_wait()
        with pytest.raises(NoAsyncCallError):
            envs.recv()
        envs.reset(seed=0)
        envs.step_async(np.zeros(4, np.int64))
        with pytest.raises(AlreadyPendingCallError):
            envs.step_async(np.zeros(4, np.int64))
        with pytest.raises(AlreadyPendingCallError):
            envs.send(np.zeros(2, np.int64), [0, 1])
        with pytest.raises(multiprocessing.TimeoutError):
            envs.step_wait(timeout=0.01)
        _, rewards, *_ = envs.step_wait(timeout=30)  # still pending after the timeout
        assert rewards.shape == (4,)
        envs.send(np.zeros(2, np.int64), [0, 1])
        with pytest.raises(AlreadyPendingCallError, match="still in flight"):
            envs.send(np.zeros(1, np.int64), [1])
        with pytest.raises(AlreadyPendingCallError, match="recv"):
            envs.get_attr("index")
        with pytest.raises(multiprocessing.TimeoutError):
            envs.recv(timeout=0.01)
        assert sorted(envs.recv(timeout=30)[4]["env_id"].tolist()) == [0, 1]
        with pytest.raises(ValueError, match="unknown env ids"):
            envs.send(np.zeros(1, np.int64), [9])
        with pytest.raises(ValueError, match="expected one action"):
            envs.step_async(np.zeros(3, np.int64))
        with pytest.raises(ValueError, match="more than once"):
            envs.send(np.zeros(2, np.int64), [1, 1])
    finally:
        envs.close()
    with pytest.raises(ClosedEnvironmentError):
        envs.reset()


def test_call_get_attr_set_attr_render(cluster: Any) -> None:
    fns = [functools.partial(test_envs.SpaceEnv, OBS_SPACE, index=i, render_mode="rgb_array")
           for i in range(5)]
    envs = RayVectorEnv(fns)
    try:
        assert envs.get_attr("index") == (0, 1, 2, 3, 4)
        assert envs.call("scaled", 2.0, offset=1.0) == (1.0, 3.0, 5.0, 7.0, 9.0)
        envs.set_attr("custom_attr", [10, 11, 12, 13, 14])
        assert envs.get_attr("custom_attr") == (10, 11, 12, 13, 14)
        envs.set_attr("custom_attr", "all")
        assert envs.get_attr("custom_attr") == ("all",) * 5
        with pytest.raises(ValueError, match="Values must be a list"):
            envs.set_attr("custom_attr", [1, 2])
        envs.reset(seed=0)
        frames = envs.render()
        assert frames is not None and len(frames) == 5 and frames[4].shape == (4, 5, 3)
        assert envs.render_mode == "rgb_array"
    finally:
        envs.close()


def test_an_env_error_is_raised_and_the_env_stays_usable(cluster: Any) -> None:
    fns = [functools.partial(test_envs.FailingEnv, index=i, failing=(3,), fail_at=2)
           for i in range(4)]
    envs = RayVectorEnv(fns)
    try:
        envs.reset(seed=0)
        with pytest.raises(test_envs.FailError):
            for _ in range(3):
                envs.step(np.zeros(4, np.int64))
        assert envs.get_attr("index") == (0, 1, 2, 3)
    finally:
        envs.close()


# -- placement ---------------------------------------------------------------------------------
def test_placement_options(cluster: Any) -> None:
    fns = space_fns(7)
    envs = RayVectorEnv(fns, envs_per_actor=2, cpus_per_actor=0.5)
    try:
        assert [list(n.envs) for n in envs.nodes] == [[0, 1], [2, 3], [4, 5], [6]]
        envs.reset(seed=0)
        assert envs.step(np.zeros(7, np.int64))[1].shape == (7,)
    finally:
        envs.close()
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group([{"CPU": 0.5}, {"CPU": 0.5}], strategy="STRICT_SPREAD")
    try:
        envs = RayVectorEnv(space_fns(4), placement_group=group)
        try:
            assert [len(n.envs) for n in envs.nodes] == [2, 2]
            assert len({n.node_id for n in envs.nodes}) == 2
        finally:
            envs.close()
        assert group.id.hex() in ray.util.placement_group_table(), "the caller's group stays"
    finally:
        remove_placement_group(group)
    with pytest.raises(TimeoutError, match="could not place 3"):
        RayVectorEnv(space_fns(3), num_nodes=3, start_timeout=2)
    with pytest.raises(ValueError, match="at most one"):
        RayVectorEnv(space_fns(3), num_nodes=2, num_actors=2)
    with pytest.raises(ValueError, match=r"^fastvec\.ray\.RayVectorEnv does not run a custom"):
        RayVectorEnv(space_fns(3), worker=lambda *args: None)


# -- faults ------------------------------------------------------------------------------------
def test_close_leaves_no_actor_group_or_segment(cluster: Any) -> None:
    envs = RayVectorEnv(space_fns(4))
    envs.reset(seed=0)
    pids = [n.pid for n in envs.nodes] + [p for n in envs.nodes for p in n.worker_pids]
    names = [n.segment for n in envs.nodes]
    assert all(names) and all(os.path.exists(os.path.join(SHM_DIR, n)) for n in names)
    envs.close()
    assert processes_gone(pids), "an actor or a worker outlived close()"
    assert segments_gone(names), "a segment outlived close()"
    table = ray.util.placement_group_table()
    assert envs.placement.group is None
    assert all(info["state"] == "REMOVED" for info in table.values())


def test_a_killed_actor_raises_naming_it(cluster: Any) -> None:
    fns = [functools.partial(test_envs.SpaceEnv, OBS_SPACE, index=i, delay=0.2)
           for i in range(4)]
    envs = RayVectorEnv(fns)
    node = envs.nodes[1]
    names = [n.segment for n in envs.nodes]
    pids = [n.pid for n in envs.nodes] + [p for n in envs.nodes for p in n.worker_pids]
    try:
        envs.reset(seed=0)
        envs.step_async(np.zeros(4, np.int64))
        os.kill(node.pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(ActorDiedError) as info:
            envs.step_wait()
        assert time.monotonic() - start < DEATH_BOUND
        error = info.value
        assert isinstance(error, WorkerDiedError) and not error.restarted
        assert (error.actor, error.node_id, error.env_indices, error.pid) == (
            1, node.node_id, (2, 3), node.pid)
        assert f"pid {node.pid}" in str(error) and "envs 2..3" in str(error)
        assert node.node_id[:12] in str(error)
        with pytest.raises(ActorDiedError):
            envs.get_attr("index")
    finally:
        envs.close()
    assert processes_gone(pids)
    assert segments_gone(names)


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP])
def test_a_restarted_actor_comes_back_truncated(cluster: Any, mode: AutoresetMode) -> None:
    fns = space_fns(4, episode_len=(50, 60))
    envs = RayVectorEnv(fns, restart_workers=True, autoreset_mode=mode)
    try:
        envs.reset(seed=0)
        envs.step(np.zeros(4, np.int64))
        old = envs.nodes[0].pid
        os.kill(old, signal.SIGKILL)
        with pytest.warns(UserWarning, match="Ray is restarting it"):
            _, rewards, terminations, truncations, infos = envs.step(np.ones(4, np.int64))
        assert envs.nodes[0].pid != old
        assert truncations.tolist() == [True, True, False, False]
        assert terminations.tolist() == [False] * 4
        assert rewards[:2].tolist() == [0.0, 0.0] and (rewards[2:] != 0).all()
        assert infos["_worker_restarted"].tolist() == [True, True, False, False]
        assert envs.get_attr("t") == (0, 0, 2, 2), "the restarted envs were reset"
        _, rewards, terminations, truncations, infos = envs.step(np.ones(4, np.int64))
        if mode is AutoresetMode.NEXT_STEP:  # an autoreset step, as after any truncation
            assert rewards[:2].tolist() == [0.0, 0.0]
            assert envs.get_attr("t") == (0, 0, 3, 3)
        else:
            assert envs.get_attr("t") == (1, 1, 3, 3)
        assert not truncations.any()
        envs.step(np.ones(4, np.int64))
    finally:
        envs.close()


def test_a_restart_during_reset_raises_restarted(cluster: Any) -> None:
    envs = RayVectorEnv(space_fns(4), restart_workers=True)
    try:
        envs.reset(seed=0)
        os.kill(envs.nodes[1].pid, signal.SIGKILL)
        with pytest.warns(UserWarning, match="Ray is restarting it"):
            with pytest.raises(ActorDiedError) as info:
                envs.reset(seed=0)
        assert info.value.restarted and info.value.env_indices == (2, 3)
        envs.reset(seed=0)
        assert envs.np_random_seed == (0, 1, 2, 3)
    finally:
        envs.close()


def test_a_restarted_actor_in_a_partial_batch(cluster: Any) -> None:
    envs = RayVectorEnv(space_fns(4, episode_len=(50, 60)), restart_workers=True,
                        batch_size=2)
    try:
        envs.async_reset(seed=0)
        got = sorted(envs.recv(timeout=30)[4]["env_id"].tolist()
                     + envs.recv(timeout=30)[4]["env_id"].tolist())
        assert got == [0, 1, 2, 3]
        envs.send(np.zeros(1, np.int64), [0])
        envs.recv(timeout=30)
        os.kill(envs.nodes[0].pid, signal.SIGKILL)
        envs.send(np.zeros(1, np.int64), [0])
        with pytest.warns(UserWarning, match="Ray is restarting it"):
            *_, truncations, infos = envs.recv(timeout=60)
        assert infos["env_id"].tolist() == [0] and truncations.tolist() == [True]
        assert infos["worker_restarted"].tolist() == [True]
        # env 1 was idle when its actor died: it reports the restart on its next send
        envs.send(np.zeros(2, np.int64), [1, 2])
        *_, truncations, infos = envs.recv(timeout=30)
        rows = dict(zip(infos["env_id"].tolist(), truncations.tolist(), strict=True))
        assert rows[1] is True
        if 2 in rows:
            assert rows[2] is False
        else:
            envs.recv(timeout=30)
    finally:
        envs.close()


def test_a_removed_node_raises_naming_it(cluster: Any) -> None:
    """A third node, holding one actor, leaves the cluster: Ray's health checks (half a
    second, four misses here) declare it dead and the step raises."""
    doomed = cluster.add_node(num_cpus=1, resources={"doomed": 1})
    cluster.wait_for_nodes()
    envs = RayVectorEnv(space_fns(2, delay=0.2), num_actors=1,
                        resources_per_actor={"doomed": 1})
    try:
        node = envs.nodes[0]
        envs.reset(seed=0)
        envs.step_async(np.zeros(2, np.int64))
        cluster.remove_node(doomed)
        start = time.monotonic()
        with pytest.raises(ActorDiedError) as info:
            envs.step_wait()
        assert time.monotonic() - start < NODE_DEATH_BOUND
        assert info.value.node_id == node.node_id and info.value.env_indices == (0, 1)
    finally:
        envs.close()


def test_the_leak_guard_excludes_ray_daemons_and_never_an_actor(cluster: Any) -> None:
    import psutil

    from conftest import _is_ray_infrastructure, _live_children

    envs = RayVectorEnv(space_fns(2), num_actors=1)
    try:
        actor = psutil.Process(envs.nodes[0].pid)
        assert not _is_ray_infrastructure(actor)
        assert actor.pid in {p.pid for p in _live_children()}
        daemons = [p for p in psutil.Process().children(recursive=True)
                   if p.name() in ("raylet", "gcs_server")]
        assert len(daemons) >= 3 and all(_is_ray_infrastructure(p) for p in daemons)
    finally:
        envs.close()


def test_observation_modes_and_a_vector_wrapper(cluster: Any) -> None:
    import gymnasium as gym
    from gymnasium.vector.utils import batch_space
    from gymnasium.wrappers.vector import RecordEpisodeStatistics

    fns = [functools.partial(gym.make, "CartPole-v1")] * 4
    box = gym.make("CartPole-v1").observation_space
    custom = (batch_space(box, 4), box)
    envs = RecordEpisodeStatistics(RayVectorEnv(fns, observation_mode=custom))
    ref = RecordEpisodeStatistics(SyncVectorEnv(fns, observation_mode=custom))
    try:
        assert envs.observation_space == ref.observation_space
        assert_same(envs.reset(seed=2), ref.reset(seed=2), "reset")
        episodes = 0
        for t in range(60):
            actions = np.ones(4, np.int64)  # pushed one way, a pole falls within ~10 steps
            got, expected = envs.step(actions), ref.step(actions)
            for infos in (got[4], expected[4]):  # the episodes' wall-clock times differ
                if isinstance(infos.get("episode"), dict):
                    infos["episode"].pop("t")
            assert_same(got, expected, f"step {t}")
            episodes += int(got[4].get("_episode", np.zeros(4, bool)).sum())
        assert episodes >= 8
    finally:
        envs.close()
        ref.close()
    wide = [functools.partial(test_envs.SpaceEnv, spaces.Box(-i - 1.0, i + 1.0, (3,),
                                                             np.float32), index=i)
            for i in range(4)]
    envs = RayVectorEnv(wide, observation_mode="different")
    ref = SyncVectorEnv(wide, observation_mode="different")
    try:
        assert envs.observation_space == ref.observation_space
        assert_same(envs.reset(seed=1), ref.reset(seed=1), "reset")
    finally:
        envs.close()
        ref.close()
