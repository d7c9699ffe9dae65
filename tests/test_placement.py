"""Which cores workers run on, and the cores left to a parent that computes while envs are in
flight: the caller's clock, the share with its hysteresis, the placement's rules, and a live
pool that moves its workers off the parent's core and back."""

from __future__ import annotations

import os
import signal
import sys
import time

import gymnasium as gym
import numpy as np
import pytest

import fastvec
from fastvec._load import CallerShare, Contention, ParentTime
from fastvec._placement import Placement

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sets affinities")
CORES = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
two_cores = pytest.mark.skipif(len(CORES) < 2, reason="leaving a core to the parent needs two")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# -- the parent's time -----------------------------------------------------------------------

def test_the_parent_time_splits_into_the_pools_own_and_the_callers():
    fake = FakeClock()
    parent = ParentTime(fake)
    fake.now = 1.0  # before any call: nothing in flight, the pool's own
    parent.enter()
    fake.now = 1.5
    parent.enter()  # a call inside a call counts once
    fake.now = 2.0
    parent.leave(True)  # inside the call: own
    assert (parent.own, parent.caller) == (2.0, 0.0)
    parent.leave(False)  # not inside: nothing changes
    fake.now = 2.25  # envs in flight: the caller's
    parent.enter()
    assert (parent.own, parent.caller) == (2.0, 0.25)
    fake.now = 2.5
    parent.leave(False)
    fake.now = 4.0  # nothing in flight: own again
    parent.enter()
    assert (parent.own, parent.caller) == (3.75, 0.25)


def test_a_call_from_another_thread_counts_nothing_for_the_time_between():
    """Two threads' CPU clocks cannot be compared: the interval between calls made on
    different threads is dropped, and the next thread goes on from its own clock."""
    clocks = {"a": 0.0, "b": 500.0}
    current = {"thread": "a"}
    parent = ParentTime(lambda: clocks[current["thread"]],
                        lambda: hash(current["thread"]))
    parent.enter()
    clocks["a"] = 1.0
    parent.leave(True)  # thread a: 1 s inside the call
    current["thread"] = "b"  # another thread makes the next call, its clock far ahead
    parent.enter()
    assert (parent.own, parent.caller) == (1.0, 0.0)
    clocks["b"] = 500.5
    parent.leave(True)  # its own call counts from its own clock
    assert (parent.own, parent.caller) == (1.5, 0.0)
    clocks["b"] = 500.75
    parent.enter()  # the same thread again: its computing in between is the caller's
    assert parent.caller == 0.25


def test_the_clock_is_read_at_each_leave_and_where_the_callers_computing_ends():
    reads = []

    def clock() -> float:
        reads.append(None)
        return float(len(reads))

    parent = ParentTime(clock)
    reads.clear()
    parent.enter()  # nothing in flight: the pool's own time goes on, no read
    assert not reads
    parent.leave(True)
    assert len(reads) == 1
    parent.enter()  # the caller's computing ends: one read
    assert len(reads) == 2
    assert parent.caller == 1.0
    parent.leave(False)
    assert len(reads) == 3


def test_threads_taking_turns_keep_their_waits_as_the_pools_own():
    """A caller stepping from two threads in turn (a thread pool): each thread's time
    inside the calls counts, up to the switch."""
    clocks = {"a": 0.0, "b": 100.0}
    current = ["a"]
    parent = ParentTime(lambda: clocks[current[0]], lambda: hash(current[0]))
    for i in range(6):
        current[0] = "ab"[i % 2]
        parent.enter()
        clocks[current[0]] += 0.01  # ring
        parent.leave(True)
        parent.enter()
        clocks[current[0]] += 1.0  # the wait
        parent.leave(False)
    assert parent.own == pytest.approx(6.06)
    assert parent.caller == 0.0


def test_the_callers_computing_read_outside_a_call_is_not_own_after_a_switch():
    clocks = {"a": 0.0, "b": 100.0}
    current = ["a"]
    parent = ParentTime(lambda: clocks[current[0]], lambda: hash(current[0]))
    parent.enter()
    clocks["a"] = 1.0
    parent.leave(True)
    clocks["a"] = 3.0  # the caller computes
    assert parent.own == 1.0  # read while it does
    clocks["a"] = 6.0
    current[0] = "b"
    parent.enter()
    assert parent.own == 1.0


def test_a_thread_id_reused_with_a_fresh_clock_counts_as_another_thread():
    """Linux reuses a joined thread's id, and the new thread's CPU clock starts near 0: its
    time still counts, from its own clock."""
    clock = {"now": 0.0}
    parent = ParentTime(lambda: clock["now"], lambda: 1)  # every thread gets id 1
    for _ in range(10):
        parent.enter()
        clock["now"] += 0.5
        parent.leave(True)
        clock["now"] += 0.5
        parent.enter()
        parent.leave(False)
    own, caller = parent.own, parent.caller
    assert (own, caller) == (5.0, 5.0)
    clock["now"] = 0.01  # the next thread with the same id
    parent.enter()
    for _ in range(4):
        clock["now"] += 0.5
        parent.leave(True)
        clock["now"] += 0.5
        parent.enter()
    # seen at the first read: its first call (0.5 s, to that read) counts for nobody
    assert parent.own - own == pytest.approx(1.5)
    assert parent.caller - caller == pytest.approx(2.0)


def test_own_read_from_another_thread_moves_nothing():
    clocks = {"a": 0.0, "c": 50.0}
    current = ["a"]
    parent = ParentTime(lambda: clocks[current[0]], lambda: hash(current[0]))
    parent.enter()
    clocks["a"] = 1.0
    parent.leave(True)
    clocks["a"] = 9.0  # the caller computes on thread a
    current[0] = "c"  # another thread reads own
    assert parent.own == 1.0
    current[0] = "a"
    parent.enter()
    assert parent.caller == 8.0


def test_a_synchronous_step_reads_the_parents_clock_three_times():
    with fastvec.AsyncVectorEnv([lambda: gym.make("CartPole-v1")] * 2) as envs:
        envs.reset(seed=0)
        parent = envs._pool.parent_time
        reads = []
        clock = parent.clock

        def counted() -> float:
            reads.append(None)
            return clock()

        parent.clock = counted
        actions = np.zeros(2, np.int64)
        start = time.monotonic()
        for _ in range(200):
            envs.step(actions)
        samples = 2 + int((time.monotonic() - start) / Contention.INTERVAL)  # own, sampled
        assert 600 <= len(reads) <= 600 + samples


def test_the_parent_time_is_the_calling_threads_cpu_time_by_default():
    parent = ParentTime()
    parent.enter()
    parent.leave(True)
    start = time.thread_time()
    while time.thread_time() - start < 0.05:
        pass
    time.sleep(0.05)  # not computing: no CPU time
    parent.enter()
    assert 0.05 <= parent.caller < 0.09


# -- the share -------------------------------------------------------------------------------

def test_a_core_is_left_at_once_and_given_back_after_two_low_samples():
    share = CallerShare(None, limit=1)
    assert not share.update(CallerShare.RESERVE - 0.01)  # not enough
    assert share.reserved == 0
    assert share.update(CallerShare.RESERVE)  # enough: at once
    assert share.reserved == 1
    assert not share.update(1.0 - CallerShare.MARGIN)  # not low enough
    assert not share.update(0.0)  # one low sample
    assert not share.update(0.5)  # the count starts over
    assert not share.update(0.1)
    assert share.reserved == 1
    assert share.update(0.1)  # the second low sample in a row
    assert share.reserved == 0


def test_the_share_never_leaves_more_than_its_limit():
    share = CallerShare(None, limit=2)
    assert share.update(5.0)
    assert share.reserved == 2
    assert not share.update(5.0)
    assert not share.update(1.1)  # under 2 - MARGIN: low
    assert share.update(1.1)
    assert share.reserved == 1  # what the sample rounds to, not nothing
    one_core = CallerShare(None, limit=0)  # one usable core: nothing to leave
    assert not one_core.update(1.0)
    assert one_core.reserved == 0


def test_the_share_samples_the_callers_time_once_per_interval():
    fake = FakeClock()
    parent = ParentTime(fake)
    share = CallerShare(parent, limit=1)
    assert not share.check(10.0)  # the first sample: nothing to compare with
    assert share.share is None
    parent.enter()
    parent.leave(True)
    fake.now = 0.2  # 0.2 CPU seconds over the next 0.25 s: 0.8 cores' worth
    parent.enter()
    assert not share.check(10.0 + CallerShare.INTERVAL / 2)  # too soon: not sampled
    assert share.check(10.0 + CallerShare.INTERVAL)
    assert share.share == pytest.approx(0.8)
    assert share.reserved == 1
    assert not CallerShare(None, 1).check(10.0)  # no clock (not Linux): no opinion


# -- the placement ---------------------------------------------------------------------------

def test_placement_by_request_ignores_the_machine():
    for pin, expected in ((True, [{4}, {6}, {4}]), (False, [None, None, None])):
        placement = Placement([6, 4], 3, pin)
        placement.contended, placement.reserved = True, 1
        assert not placement.automatic
        assert [placement.cores_of(w) for w in range(3)] == expected


def test_automatic_placement_follows_the_machine():
    placement = Placement([0, 1, 2, 3], 4, None)
    assert placement.automatic
    assert [placement.cores_of(w) for w in range(4)] == [{0}, {1}, {2}, {3}]  # calm
    placement.contended = True
    assert [placement.cores_of(w) for w in range(4)] == [None] * 4  # anywhere
    placement.reserved = 1  # the parent computes: the last core is left to it
    assert [placement.cores_of(w) for w in range(4)] == [{0, 1, 2}] * 4
    placement.contended = False  # (calm but reserved: still off that core)
    assert placement.cores_of(0) == {0, 1, 2}
    placement.reserved = 9  # never every core
    assert placement.cores_of(0) == {0}


def test_automatic_placement_pins_only_one_worker_per_core():
    """With any other count of workers the scheduler places them, as with pin_workers=False:
    neither calm, contention nor a computing parent moves them."""
    for workers in (1, 3):
        placement = Placement([0, 1], workers, None)
        assert not placement.automatic
        for contended, reserved in ((False, 0), (True, 0), (False, 1)):
            placement.contended, placement.reserved = contended, reserved
            assert [placement.cores_of(w) for w in range(workers)] == [None] * workers
    assert Placement([], 2, None).cores_of(0) is None  # no affinity here (not Linux)
    assert not Placement([], 2, None).automatic


# -- a live pool -----------------------------------------------------------------------------

class ScriptedShare(CallerShare):
    """A share whose samples are scripted (each ``check`` takes the next, none when empty)."""

    def __init__(self, script: list[float], limit: int) -> None:
        super().__init__(None, limit)
        self.script = script

    def check(self, now: float) -> bool:
        return self.update(self.script.pop(0)) if self.script else False


def _affinities(envs: fastvec.AsyncVectorEnv) -> list[set[int]]:
    return [os.sched_getaffinity(p.pid) for p in envs._pool.resources.processes]


def _cycle(envs: fastvec.AsyncVectorEnv, cycles: int, compute: float = 0.0) -> None:
    """Send every env, then ``cycles`` times: receive a batch, compute ``compute`` CPU
    seconds (the policy), send it back; finally receive every env."""
    envs.async_reset(seed=0)
    for _ in range(cycles):
        *_, infos = envs.recv(timeout=10)
        start = time.thread_time()
        while time.thread_time() - start < compute:
            pass
        envs.send(np.zeros(len(infos["env_id"]), np.int64), infos["env_id"])
    while envs._partial.outstanding:
        envs.recv(timeout=10)


def _scripted(envs: fastvec.AsyncVectorEnv, script: list[float]) -> None:
    pool = envs._pool
    pool.machine.contention.check = lambda now: False  # type: ignore[method-assign]  # calm
    pool.machine.caller_share = ScriptedShare(script, len(CORES) - 1)


@linux
@two_cores
def test_workers_leave_the_last_core_to_a_computing_parent_and_come_back():
    n = len(CORES)
    fns = [lambda: gym.make("CartPole-v1")] * (2 * n)
    with fastvec.AsyncVectorEnv(fns, num_workers=n, batch_size=n) as envs:
        _scripted(envs, [])
        _cycle(envs, 2)
        assert _affinities(envs) == [{c} for c in CORES]  # calm: pinned one per core
        envs._pool.machine.caller_share.script = [1.0]
        _cycle(envs, 2)
        assert _affinities(envs) == [set(CORES[:-1])] * n
        envs._pool.machine.caller_share.script = [0.0, 0.0]
        _cycle(envs, 3)
        assert _affinities(envs) == [{c} for c in CORES]


@linux
@two_cores
def test_workers_placed_by_request_stay_put_when_the_parent_computes():
    n = len(CORES)
    for pin in (True, False):
        fns = [lambda: gym.make("CartPole-v1")] * (2 * n)
        with fastvec.AsyncVectorEnv(fns, num_workers=n, batch_size=n, pin_workers=pin) as envs:
            _scripted(envs, [])
            _cycle(envs, 1)
            before = _affinities(envs)
            envs._pool.machine.caller_share.script = [1.0]
            _cycle(envs, 2)
            assert envs._pool.machine.caller_share.reserved == 1
            assert _affinities(envs) == before
            assert before == ([{c} for c in CORES] if pin else [set(CORES)] * n)


@linux
@two_cores
def test_a_worker_replaced_while_a_core_is_left_to_the_parent_starts_off_it():
    n = len(CORES)
    fns = [lambda: gym.make("CartPole-v1")] * (2 * n)
    with fastvec.AsyncVectorEnv(fns, num_workers=n, batch_size=n,
                                restart_workers=True) as envs:
        _scripted(envs, [1.0])
        _cycle(envs, 2)
        assert _affinities(envs) == [set(CORES[:-1])] * n
        # the last worker: pinned one per core it would have had the last core, the one
        # left to the parent (the first worker's own core is among the workers' cores)
        old = envs._pool.resources.processes[-1].pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        with pytest.warns(UserWarning, match="restarted it"):
            _cycle(envs, 4)
        assert envs._pool.resources.processes[-1].pid != old
        assert _affinities(envs) == [set(CORES[:-1])] * n


@linux
@two_cores
@pytest.mark.timeout(60)
def test_a_parent_computing_while_envs_step_is_measured_and_gets_a_core():
    """No script: a parent that computes 5 ms of CPU per batch while the other envs step is
    seen computing (its share reaches the threshold), and the workers leave it the last
    core; once it stops computing they are given every core again."""
    n = len(CORES)
    fns = [lambda: gym.make("CartPole-v1")] * (2 * n)
    with fastvec.AsyncVectorEnv(fns, num_workers=n, batch_size=n) as envs:
        pool = envs._pool
        pool.machine.contention.check = lambda now: False  # type: ignore[method-assign]  # calm
        deadline = time.monotonic() + 20
        while pool.machine.caller_share.reserved == 0:
            assert time.monotonic() < deadline, f"share seen: {pool.machine.caller_share.share}"
            _cycle(envs, 40, compute=0.005)
        assert pool.machine.caller_share.share is not None
        assert pool.machine.caller_share.share >= CallerShare.RESERVE
        assert _affinities(envs) == [set(CORES[:-1])] * n
        deadline = time.monotonic() + 20
        while pool.machine.caller_share.reserved:
            assert time.monotonic() < deadline, f"share seen: {pool.machine.caller_share.share}"
            _cycle(envs, 40)
            time.sleep(CallerShare.INTERVAL)  # idle, not computing: no share
        assert _affinities(envs) == [{c} for c in CORES]


@linux
@two_cores
@pytest.mark.parametrize("kwargs", [{"pin_workers": False}, {"pin_workers": True},
                                    {"num_workers": 1}])
def test_where_the_placement_is_fixed_the_parents_computing_is_not_sampled(kwargs):
    """Pinning chosen by the caller, or another worker count than one per core: nothing
    follows the caller's share, so it is not measured (no share, nothing reserved)."""
    fns = [lambda: gym.make("CartPole-v1")] * (2 * len(CORES))
    with fastvec.AsyncVectorEnv(fns, batch_size=len(CORES), **kwargs) as envs:
        share = envs._pool.machine.caller_share
        deadline = time.monotonic() + 3 * CallerShare.INTERVAL
        while time.monotonic() < deadline:
            _cycle(envs, 10, compute=0.005)
        assert share.share is None and share.reserved == 0
