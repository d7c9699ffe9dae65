"""The machine-load monitor and what the pool does on a busy machine: no spinning, no pinning
while other work takes the cores, and back once it is gone; a warning for more workers than
cores."""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import sys
import time

import gymnasium as gym
import numpy as np
import pytest

import fastvec
from fastvec import _segment as S
from fastvec._load import Contention, MachineLoad, process_cpu_seconds
from fastvec.bench.contention import BusyProcesses
from fastvec.errors import OversubscribedWarning

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]


def test_contention_needs_busy_work_to_start_and_two_quiet_samples_to_end():
    contention = Contention(None)
    assert not contention.contended
    assert not contention.update(Contention.BUSY - 0.01)  # not enough
    assert contention.update(Contention.BUSY)  # changed: contended
    assert contention.contended
    assert not contention.update(0.0)  # one quiet sample is not enough
    assert not contention.update(Contention.BUSY)  # busy again: the count starts over
    assert not contention.update(Contention.QUIET - 0.01)
    assert contention.contended
    assert contention.update(0.0)  # the second quiet sample in a row: calm
    assert not contention.contended


def test_check_samples_once_per_interval():
    samples: list[float] = []

    class Load:
        def sample(self, now: float) -> float:
            samples.append(now)
            return 1.0

    contention = Contention(Load())  # type: ignore[arg-type]
    assert contention.check(10.0)
    assert not contention.check(10.0 + Contention.INTERVAL / 2)
    contention.check(10.0 + Contention.INTERVAL)
    assert samples == [10.0, 10.0 + Contention.INTERVAL]
    assert contention.others == 1.0


def _named_spinner(name: bytes, seconds: float) -> None:
    ctypes.CDLL(None).prctl(15, name)  # PR_SET_NAME: the comm field of /proc/<pid>/stat
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@linux
def test_process_cpu_seconds_reads_a_process_with_spaces_and_parens_in_its_name():
    process = multiprocessing.get_context("fork").Process(
        target=_named_spinner, args=(b"a) (b c", 0.6))
    process.start()
    try:
        time.sleep(0.4)
        assert process_cpu_seconds(process.pid) > 0.1  # type: ignore[arg-type]
        with open(f"/proc/{process.pid}/stat", "rb") as f:
            assert b"(a) (b c)" in f.read()
    finally:
        process.join(5)
    assert process_cpu_seconds(process.pid) == 0.0  # type: ignore[arg-type]  # reaped


@linux
def test_machine_load_counts_other_processes_but_not_the_pools_own():
    """The same busy process, seen as other work by one monitor and as the pool's by another:
    the two readings differ by exactly its CPU time (whatever else the machine does)."""
    with BusyProcesses(1) as busy:
        (pid,) = busy.pids
        others = MachineLoad(CORES, list)
        ours = MachineLoad(CORES, lambda: [pid])
        start, cpu_before = time.monotonic(), process_cpu_seconds(pid)
        others.sample(start)
        ours.sample(start)
        time.sleep(0.6)
        now = time.monotonic()
        seen_as_other, seen_as_ours = others.sample(now), ours.sample(now)
        busy_cores = (process_cpu_seconds(pid) - cpu_before) / (now - start)
    assert seen_as_other is not None and seen_as_ours is not None
    assert busy_cores > 0.05, "the busy loop ran"
    assert seen_as_other >= busy_cores - 0.1
    # the readings are made a few microseconds apart, in ticks of 10 ms over 0.6 s
    assert abs((seen_as_other - seen_as_ours) - busy_cores) < 0.15


class ScriptedLoad:
    """Stands in for MachineLoad: returns the next scripted amount of other work."""

    def __init__(self, script: list[float]) -> None:
        self.script = script

    def sample(self, now: float) -> float | None:
        return self.script.pop(0) if self.script else None


def _affinities(envs: fastvec.AsyncVectorEnv) -> list[set[int]]:
    return [os.sched_getaffinity(p.pid) for p in envs._pool.resources.processes]


def _step_until(envs: fastvec.AsyncVectorEnv, condition, seconds: float = 5.0) -> None:
    """Step until ``condition()``: synchronously, or with partial batches (each recv's envs
    sent back) when ``batch_size < num_envs``, received to the last env at the end."""
    deadline = time.monotonic() + seconds
    if envs.batch_size == envs.num_envs:
        while not condition():
            assert time.monotonic() < deadline, "the pool did not adapt in time"
            envs.step(np.zeros(envs.num_envs, np.int64))
            time.sleep(Contention.INTERVAL / 5)
        return
    envs.async_reset(seed=0)
    while True:
        *_, infos = envs.recv(timeout=5)
        if condition():
            break
        assert time.monotonic() < deadline, "the pool did not adapt in time"
        envs.send(np.zeros(len(infos["env_id"]), np.int64), infos["env_id"])
        time.sleep(Contention.INTERVAL / 5)
    while envs._partial.outstanding:
        envs.recv(timeout=5)


@linux
@pytest.mark.parametrize("batch_size", [None, 1])
def test_the_pool_unpins_and_stops_spinning_while_the_machine_is_busy(batch_size):
    """Scripted load: busy, then quiet twice. Workers start pinned and spinning, are unpinned
    and told not to spin once the machine is busy, and come back once it is quiet."""
    n = len(CORES)
    fns = [lambda: gym.make("CartPole-v1")] * (2 * n)
    with fastvec.AsyncVectorEnv(fns, num_workers=n, batch_size=batch_size) as envs:
        pool = envs._pool
        pool.machine.contention.load = ScriptedLoad([])  # type: ignore[assignment]  # no opinion yet
        spin_word = pool.plan.parent_line + S.SPIN
        envs.reset(seed=0)
        assert _affinities(envs) == [{CORES[w]} for w in range(n)]
        assert pool.doorbells.load(spin_word) == 1
        pool.machine.contention.load = ScriptedLoad([2.0])  # type: ignore[assignment]
        _step_until(envs, lambda: pool.machine.contention.contended)
        assert _affinities(envs) == [set(CORES)] * n
        assert pool.doorbells.load(spin_word) == 0
        assert pool.machine.spin_budget() == 0.0
        pool.machine.contention.load = ScriptedLoad([0.0, 0.0])  # type: ignore[assignment]
        _step_until(envs, lambda: not pool.machine.contention.contended)
        assert _affinities(envs) == [{CORES[w]} for w in range(n)]
        assert pool.doorbells.load(spin_word) == 1


@linux
def test_workers_pinned_or_not_by_request_stay_so_on_a_busy_machine():
    n = len(CORES)
    for pin in (True, False):
        with fastvec.AsyncVectorEnv([lambda: gym.make("CartPole-v1")] * n, num_workers=n,
                                    pin_workers=pin) as envs:
            envs._pool.machine.contention.load = ScriptedLoad([])  # type: ignore[assignment]
            envs.reset(seed=0)
            before = _affinities(envs)
            envs._pool.machine.contention.load = ScriptedLoad([2.0])  # type: ignore[assignment]
            _step_until(envs, lambda: envs._pool.machine.contention.contended)
            assert _affinities(envs) == before
            assert before == ([{CORES[w]} for w in range(n)] if pin else [set(CORES)] * n)


def test_more_workers_than_cores_warns_and_shares_the_bell():
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert n is not None
    with pytest.warns(OversubscribedWarning, match=rf"num_workers={n + 1}.*{n} usable core"):
        envs = fastvec.AsyncVectorEnv([lambda: gym.make("CartPole-v1")] * (n + 1),
                                      num_workers=n + 1)
    with envs:
        pool = envs._pool
        pool.machine.contention.load = ScriptedLoad([])  # type: ignore[assignment]  # no opinion
        assert not pool.machine.contention.contended  # judged by the load like any pool
        assert pool.doorbells.load(pool.plan.parent_line + S.BROADCAST) == 1
        assert _affinities(envs) == [set(CORES)] * (n + 1)  # never pinned
        envs.reset(seed=0)
        envs.step(np.zeros(n + 1, np.int64))


@pytest.mark.parametrize("batch_size", [None, 2])
def test_more_workers_than_cores_share_one_bell(batch_size):
    """With more workers than cores every worker sleeps on the shared bell, rung once per
    command for all: synchronous steps and partial sends to a few workers reach exactly the
    envs they name (checked against the envs stepped alone)."""
    n = len(CORES) + 2
    fns = [lambda: gym.make("CartPole-v1")] * n
    reference = gym.vector.SyncVectorEnv(fns)
    with fastvec.AsyncVectorEnv(fns, num_workers=n, batch_size=batch_size) as envs:
        assert envs._pool.doorbells.load(envs._pool.plan.parent_line + S.BROADCAST) == 1
        obs, _ = envs.reset(seed=3)
        expected, _ = reference.reset(seed=3)
        np.testing.assert_array_equal(obs, expected)
        rng = np.random.default_rng(0)
        for _ in range(30):
            actions = rng.integers(0, 2, n)
            expected, *_ = reference.step(actions)
            if batch_size is None:
                obs, *_ = envs.step(actions)
                np.testing.assert_array_equal(obs, expected)
                continue
            seen: dict[int, np.ndarray] = {}
            envs.send(actions[:1], [0])  # one worker alone, then the rest
            envs.send(actions[1:], list(range(1, n)))
            while len(seen) < n:
                obs, *_, infos = envs.recv(timeout=10)
                seen.update(zip(infos["env_id"].tolist(), obs, strict=True))
            np.testing.assert_array_equal(np.stack([seen[i] for i in range(n)]), expected)
    reference.close()


@linux
def test_the_callers_computing_counts_as_load_but_its_waiting_does_not():
    """A trainer that computes between steps competes with the workers for the cores (its
    time counts); the parent's time inside the pool's waits is the pool's own (it does not)."""
    waited = {"cpu": 0.0}
    load = MachineLoad(CORES, list, lambda: waited["cpu"])
    load.sample(time.monotonic())
    start, cpu = time.monotonic(), time.thread_time()
    while time.monotonic() < start + 0.5:  # "the policy"
        pass
    computing = load.sample(time.monotonic())
    assert computing is not None and computing > 0.3
    start, cpu = time.monotonic(), time.thread_time()
    while time.monotonic() < start + 0.5:  # "spinning inside a wait"
        pass
    waited["cpu"] += time.thread_time() - cpu
    waiting = load.sample(time.monotonic())
    assert waiting is not None and waiting < computing - 0.2


def _spin(seconds: float) -> None:
    """Compute for ``seconds`` of this thread's CPU time (however busy the machine is)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_a_synchronous_callers_computing_is_the_pools_own_but_not_while_envs_are_in_flight():
    """Between two synchronous steps the workers are idle: the caller's computing there takes
    no core from them (it counts as the pool's). While envs are in flight (partial batches,
    or between step_async and step_wait) it competes with the workers (it is the caller's).
    The pool's calls themselves (writing actions, waiting, reading results) are its own."""
    fns = [lambda: gym.make("CartPole-v1")] * 2
    with fastvec.AsyncVectorEnv(fns, num_workers=1) as envs:
        parent = envs._pool.parent_time
        envs.reset(seed=0)
        own, caller = parent.own, parent.caller
        _spin(0.3)  # "the policy", with nothing in flight
        envs.step(np.zeros(2, np.int64))
        assert parent.own - own > 0.2
        assert parent.caller - caller < 0.1
        own, caller = parent.own, parent.caller
        envs.step_async(np.zeros(2, np.int64))
        _spin(0.3)  # computing while the step is in flight
        envs.step_wait()
        assert parent.caller - caller > 0.2
        assert parent.own - own < 0.1
    with fastvec.AsyncVectorEnv(fns, num_workers=1, batch_size=1) as envs:
        parent = envs._pool.parent_time
        envs.async_reset(seed=0)
        envs.recv(timeout=5)
        envs.recv(timeout=5)
        envs.send(np.zeros(2, np.int64), [0, 1])
        own, caller = parent.own, parent.caller
        _spin(0.3)  # "the policy", with both envs in flight
        envs.recv(timeout=5)
        assert parent.caller - caller > 0.2
        assert parent.own - own < 0.1
        own, caller = parent.own, parent.caller
        _spin(0.3)  # the other env finished too: it waits to be received, not in flight
        envs.recv(timeout=5)
        assert parent.own - own > 0.2
        assert parent.caller - caller < 0.1
