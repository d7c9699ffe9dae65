"""Reliability: a worker that dies, ``restart_workers``, and a parent that dies.

1. A worker that dies at any moment (SIGKILL, a segfault in C code, ``os._exit``, ``abort``;
   while building its envs, in reset/step/call/close, after signalling a step done but before
   sending its reply, while idle) makes the waiting call, or the next one, raise
   :class:`fastvec.errors.WorkerDiedError` within a second, naming the worker, its envs, its
   pid and its exit code or signal. Afterwards ``close()`` returns within 2 s, every child is
   reaped, the segment is unlinked (the autouse fixtures check) and nothing is printed.
2. ``restart_workers=True`` replaces the dead worker: a step completes with the group's envs
   truncated and ``infos["worker_restarted"]``; other calls raise with ``restarted=True`` and
   the vector env goes on.
3. A parent that is SIGKILLed (or ``os._exit``\\ s) takes its workers with it within 2 s and
   leaves no segment; a parent that forgets ``close()`` exits silently.

Crash envs (``crash_envs.py``) crash only inside workers, never in the test process.
``gymnasium.logger.warn`` reports through ``warnings.warn`` and ``filterwarnings = error``
turns any unexpected warning into a failure, so every expected one is caught explicitly.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import pickle
import random
import select
import signal
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import BrokenExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
import psutil
import pytest
from gymnasium.vector import AutoresetMode

import crash_envs
import fastvec
from fastvec import _segment as P
from fastvec.errors import WorkerDiedError

N = 4  # with two workers: worker 1 runs envs 2 and 3
VICTIM = 1
VICTIM_ENVS = (2, 3)
ACTIONS = np.ones(N, dtype=np.int64)  # CrashEnv pays action + 0.5
DETECT_LIMIT = 1.0
CLOSE_LIMIT = 2.0
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

EXIT_CODES = {
    "exit": crash_envs.EXIT_CODE,
    "segv": -signal.SIGSEGV,
    "kill": -signal.SIGKILL,
    "abort": -signal.SIGABRT,
}
DEATH_TEXT = {
    "exit": f"exited with code {crash_envs.EXIT_CODE}",
    "segv": "was killed by signal SIGSEGV",
    "kill": "was killed by signal SIGKILL",
    "abort": "was killed by signal SIGABRT",
}


# -- helpers ---------------------------------------------------------------------------------
def make(fns: list | None = None, **kwargs: Any) -> fastvec.AsyncVectorEnv:
    kwargs.setdefault("num_workers", 2)
    return fastvec.AsyncVectorEnv(fns if fns is not None else crash_envs.crash_fns(N), **kwargs)


def worker_pids(envs: fastvec.AsyncVectorEnv) -> list[int]:
    return [process.pid for process in envs._pool.resources.processes]


def is_gone(pid: int) -> bool:
    """Exited (a zombie counts: it runs nothing and holds no resource but its pid)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids: list[int], limit: float) -> float:
    """Seconds until every pid is gone; fails past ``limit``."""
    start = time.monotonic()
    while not all(is_gone(pid) for pid in pids):
        elapsed = time.monotonic() - start
        assert elapsed < limit, f"processes {[p for p in pids if not is_gone(p)]} still run"
        time.sleep(0.005)
    return time.monotonic() - start


def kill(pid: int) -> None:
    """SIGKILL a worker and wait until it is dead (our child: it stays a zombie until reaped)."""
    os.kill(pid, signal.SIGKILL)
    wait_gone([pid], 2.0)


def assert_death(error: BaseException, worker: int, pid: int | None, how: str,
                 env_indices: tuple[int, ...] = VICTIM_ENVS, restarted: bool = False) -> None:
    assert isinstance(error, WorkerDiedError), repr(error)
    assert error.worker == worker
    assert error.env_indices == env_indices
    assert error.exitcode == EXIT_CODES[how]
    assert error.restarted is restarted
    text = str(error)
    assert f"worker {worker} " in text
    assert f"envs {env_indices[0]}..{env_indices[-1]}" in text
    assert DEATH_TEXT[how] in text
    if pid is not None:
        assert error.pid == pid
        assert f"pid {pid}" in text


def close_quickly(envs: fastvec.AsyncVectorEnv) -> None:
    """``close()`` returns within 2 s, without raising, and releases every process."""
    pids = [p.pid for p in envs._pool.resources.processes]
    start = time.monotonic()
    envs.close()
    assert time.monotonic() - start < CLOSE_LIMIT
    assert envs.closed
    assert envs._pool.resources.processes == [] and envs._pool.resources.shm is None
    assert all(is_gone(pid) for pid in pids)


@contextlib.contextmanager
def within(limit: float):
    start = time.monotonic()
    yield
    elapsed = time.monotonic() - start
    assert elapsed < limit, f"took {elapsed:.3f} s (limit {limit} s)"


def run_op(envs: fastvec.AsyncVectorEnv, op: str) -> Any:
    if op == "step":
        return envs.step(ACTIONS)
    if op == "reset":
        return envs.reset(seed=1)
    if op == "call":
        return envs.call("crash")
    if op == "get_attr":
        return envs.get_attr("value")
    if op == "set_attr":
        return envs.set_attr("value", 5)
    raise AssertionError(op)


# -- 1. a worker dies: WorkerDiedError, fast, and a clean close ------------------------------
def test_worker_died_error_is_what_handlers_already_catch():
    # Gymnasium's AsyncVectorEnv raises EOFError (death during a call) or BrokenPipeError
    # (death before it); process pools raise BrokenProcessPool; all are caught by ours
    for base in (RuntimeError, BrokenProcessPool, BrokenExecutor, EOFError, BrokenPipeError,
                 ConnectionError):
        assert issubclass(WorkerDiedError, base)
    error = WorkerDiedError("worker 1 died", worker=1, env_indices=(2, 3), pid=42, exitcode=-9)
    assert str(error) == "worker 1 died" and error.errno is None
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), str(copy), copy.worker, copy.env_indices, copy.pid, copy.exitcode,
            copy.restarted) == (WorkerDiedError, "worker 1 died", 1, (2, 3), 42, -9, False)


DEATHS = [
    # (where the env dies, how, the call that sees it)
    ("step", "exit", "step"),
    ("step", "segv", "step"),
    ("step", "kill", "step"),
    ("step", "abort", "step"),
    ("reset", "exit", "reset"),
    ("reset", "segv", "reset"),
    ("call", "exit", "call"),
    ("call", "segv", "call"),
    # dies after it decremented `pending`, before its reply went out
    ("reply", "exit", "step"),
    ("reply", "kill", "step"),
]


@pytest.mark.parametrize(("where", "how", "op"), DEATHS)
def test_death_inside_a_call_raises_within_a_second(where, how, op, capfd):
    envs = make(crash_envs.crash_fns(N, crashing=(2,), where=where, how=how))
    try:
        pid = worker_pids(envs)[VICTIM]
        if op != "reset":
            envs.reset(seed=0)
        with within(DETECT_LIMIT), pytest.raises(WorkerDiedError) as excinfo:
            run_op(envs, op)
        assert_death(excinfo.value, VICTIM, pid, how)
        # the vector env is broken: every later call says so at once
        for later in ("step", "reset", "call"):
            with within(0.1), pytest.raises(WorkerDiedError):
                run_op(envs, later)
    finally:
        close_quickly(envs)
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("op", ["step", "reset", "call", "get_attr", "set_attr"])
def test_death_between_calls_is_raised_by_the_next_call(op, capfd):
    envs = make()
    try:
        envs.reset(seed=0)
        pid = worker_pids(envs)[VICTIM]
        kill(pid)
        with within(DETECT_LIMIT), pytest.raises(WorkerDiedError) as excinfo:
            run_op(envs, op)
        assert_death(excinfo.value, VICTIM, pid, "kill")
    finally:
        close_quickly(envs)
    assert capfd.readouterr().err == ""


def test_death_between_calls_is_raised_by_the_wait_of_an_async_call():
    envs = make()
    try:
        envs.reset(seed=0)
        pid = worker_pids(envs)[VICTIM]
        kill(pid)
        envs.step_async(ACTIONS)  # rings the doorbell; nothing to notice yet
        with within(DETECT_LIMIT), pytest.raises(WorkerDiedError) as excinfo:
            envs.step_wait()
        assert_death(excinfo.value, VICTIM, pid, "kill")
        kill(worker_pids(envs)[0])
    finally:
        close_quickly(envs)


def test_death_after_a_step_wait_timeout_is_raised_by_the_next_wait():
    envs = make(crash_envs.crash_fns(N, delay=0.4))
    try:
        envs.reset(seed=0)
        envs.step_async(ACTIONS)
        with pytest.raises(multiprocessing.TimeoutError):
            envs.step_wait(timeout=0.05)
        pid = worker_pids(envs)[VICTIM]
        os.kill(pid, signal.SIGKILL)
        with within(DETECT_LIMIT), pytest.raises(WorkerDiedError) as excinfo:
            envs.step_wait()
        assert_death(excinfo.value, VICTIM, pid, "kill")
    finally:
        close_quickly(envs)


@pytest.mark.parametrize("context", ["fork", "forkserver", "spawn"])
def test_death_while_building_the_envs(context, capfd):
    fns = crash_envs.crash_fns(N, crashing=(3,), where="init", how="exit")
    with pytest.raises(WorkerDiedError) as excinfo:
        make(fns, context=context)
    assert_death(excinfo.value, VICTIM, None, "exit")
    assert f"pid {excinfo.value.pid}" in str(excinfo.value)
    del excinfo
    assert capfd.readouterr().err == ""


def test_an_env_function_that_raises_is_an_env_error_not_a_death():
    fns = crash_envs.crash_fns(N, crashing=(3,), where="init", how="raise")
    with pytest.warns(UserWarning) as record, pytest.raises(crash_envs.CrashError):
        make(fns)
    assert any("Received the following error from Worker-3" in str(w.message) for w in record)


@pytest.mark.parametrize("how", ["exit", "segv", "kill"])
def test_death_in_env_close_does_not_make_close_raise(how, capfd):
    envs = make(crash_envs.crash_fns(N, crashing=(2,), where="close", how=how))
    envs.reset(seed=0)
    envs.step(ACTIONS)
    close_quickly(envs)
    assert capfd.readouterr().err == ""


def test_close_after_a_death_with_a_step_pending():
    envs = make(crash_envs.crash_fns(N, delay=0.3))
    envs.reset(seed=0)
    envs.step_async(ACTIONS)
    os.kill(worker_pids(envs)[VICTIM], signal.SIGKILL)
    # Gymnasium's warning for closing with a call pending; the death itself is not reported
    with pytest.warns(UserWarning, match="Calling `close` while waiting for a pending call"):
        close_quickly(envs)


def test_every_worker_dead():
    envs = make()
    envs.reset(seed=0)
    for pid in worker_pids(envs):
        kill(pid)
    with within(DETECT_LIMIT), pytest.raises(WorkerDiedError) as excinfo:
        envs.step(ACTIONS)
    assert excinfo.value.worker in (0, 1)
    close_quickly(envs)


def test_a_message_that_cannot_be_pickled_leaves_no_worker_waiting():
    envs = make()
    try:
        envs.reset(seed=0)
        with pytest.raises(TypeError, match="pickle"):
            envs.call("crash", threading.Lock())
        envs.call_async("pid")  # every worker serves the next call
        assert envs.call_wait(timeout=5) == tuple(np.repeat(worker_pids(envs), 2))
    finally:
        close_quickly(envs)


def _kill_at_random_moments(kills: int, seed: int) -> list[float]:
    """Kill a random worker at a random moment of a stepping loop, ``kills`` times (a new
    vector env each time); return the latency from each kill to its WorkerDiedError."""
    rng = random.Random(seed)
    latencies = []
    for k in range(kills):
        num_workers = rng.choice([2, 3, 4])
        delay = rng.choice([0.0, 0.0005, 0.003])
        envs = make(crash_envs.crash_fns(N, delay=delay), num_workers=num_workers)
        try:
            envs.reset(seed=k)
            victim = rng.randrange(num_workers)
            pid = worker_pids(envs)[victim]
            killed_at: list[float] = []

            def shoot(pid: int = pid, killed_at: list = killed_at) -> None:
                killed_at.append(time.monotonic())
                os.kill(pid, signal.SIGKILL)

            timer = threading.Timer(rng.uniform(0.0, 0.03), shoot)
            timer.start()
            try:
                deadline = time.monotonic() + 5.0
                with pytest.raises(WorkerDiedError) as excinfo:
                    while time.monotonic() < deadline:
                        envs.step(ACTIONS)
                raised_at = time.monotonic()
            finally:
                timer.join()
            error = excinfo.value
            assert (error.worker, error.pid, error.exitcode) == (victim, pid, -signal.SIGKILL)
            assert f"pid {pid}" in str(error) and "SIGKILL" in str(error)
            latencies.append(raised_at - killed_at[0])
        finally:
            close_quickly(envs)
    assert max(latencies) < DETECT_LIMIT, latencies
    print(f"\n{kills} kills: {len(latencies)} WorkerDiedErrors, detection latency "
          f"max {max(latencies) * 1e3:.1f} ms, mean {np.mean(latencies) * 1e3:.1f} ms")
    return latencies


def test_kill_a_random_worker_at_random_moments_smoke():
    assert len(_kill_at_random_moments(10, seed=1)) == 10


@pytest.mark.stress
@pytest.mark.timeout(600)
def test_kill_a_random_worker_at_random_moments_100_times():
    assert len(_kill_at_random_moments(100, seed=2)) == 100


# -- 2. restart_workers=True -----------------------------------------------------------------
def restart_warning(worker: int, pid: int | None = None, envs_text: str = "envs 2..3"):
    pid_text = str(pid) if pid is not None else r"\d+"
    return pytest.warns(
        UserWarning,
        match=(rf"fastvec worker {worker} \(pid {pid_text}, {envs_text}\) was killed by signal "
               rf"SIGKILL during `step`; restarted it as pid \d+\. Its envs are fresh"),
    )


def check_restarted_step(result: tuple, group: list[int], t: int | None = None,
                         autoresetting: list[int] | tuple = ()) -> None:
    """The step in which the worker of the envs ``group`` was replaced. The others stepped
    (to step ``t`` if given), except ``autoresetting`` ones (replaced in the step before, in
    NextStep mode), which reset."""
    obs, rewards, terminations, truncations, infos = result
    others = [i for i in range(len(rewards)) if i not in group]
    stepped = [i for i in others if i not in autoresetting]
    assert truncations[group].all() and not truncations[others].any()
    assert not terminations.any()
    assert (rewards[group] == 0).all() and (rewards[stepped] == 1.5).all()
    assert (rewards[list(autoresetting)] == 0).all()
    mask = np.zeros(len(rewards), dtype=bool)
    mask[group] = True
    assert set(infos) == {"worker_restarted", "_worker_restarted"}
    assert (infos["_worker_restarted"] == mask).all()
    assert (infos["worker_restarted"] == mask).all()
    # the fresh envs' reset observation: [index, t=0, resets=1]; the others stepped on
    assert (obs[group, 1:] == [0, 1]).all() and (obs[group, 0] == group).all()
    if t is not None:
        assert (obs[stepped, 1] == t).all()


@pytest.mark.parametrize("mode", list(AutoresetMode))
@pytest.mark.parametrize("shared_memory", [True, False])
def test_restart_during_a_step(mode, shared_memory, capfd):
    n = 6
    envs = make(crash_envs.crash_fns(n), num_workers=3, restart_workers=True,
                autoreset_mode=mode, shared_memory=shared_memory)
    actions = np.ones(n, dtype=np.int64)
    try:
        envs.reset(seed=0)
        for t in range(1, 4):
            obs, *_ = envs.step(actions)
            assert (obs[:, 1] == t).all()
        before = worker_pids(envs)
        kill(before[1])
        with within(DETECT_LIMIT), restart_warning(1, before[1]):
            result = envs.step(actions)
        check_restarted_step(result, [2, 3], t=4)
        after = worker_pids(envs)
        assert after[1] != before[1] and after[0::2] == before[0::2]
        assert envs.call("pid") == tuple(np.repeat(after, 2))

        obs, rewards, terminations, truncations, infos = envs.step(actions)
        assert infos == {} and not truncations.any() and not terminations.any()
        assert (obs[[0, 1, 4, 5], 1] == 5).all()
        if mode is AutoresetMode.NEXT_STEP:  # the autoreset step that follows a truncation
            assert (obs[2:4, 1:] == [0, 2]).all() and (rewards[2:4] == 0).all()
        else:  # already reset: they step
            assert (obs[2:4, 1:] == [1, 1]).all() and (rewards[2:4] == 1.5).all()
        for _ in range(3):
            envs.step(actions)
    finally:
        close_quickly(envs)
    assert capfd.readouterr().err == ""


def test_restart_of_a_worker_killed_in_the_middle_of_a_step():
    envs = make(crash_envs.crash_fns(N, delay=0.1), restart_workers=True)
    try:
        envs.reset(seed=0)
        envs.step(ACTIONS)
        pid = worker_pids(envs)[VICTIM]
        envs.step_async(ACTIONS)
        time.sleep(0.05)  # inside its first env's step
        os.kill(pid, signal.SIGKILL)
        with within(DETECT_LIMIT), restart_warning(VICTIM, pid):
            result = envs.step_wait()
        check_restarted_step(result, list(VICTIM_ENVS), t=2)
    finally:
        close_quickly(envs)


def test_restart_of_a_worker_that_died_before_sending_its_reply():
    fns = crash_envs.crash_fns(N, crashing=(2,), where="reply", how="kill", crash_at=2)
    envs = make(fns, restart_workers=True)
    try:
        envs.reset(seed=0)
        envs.step(ACTIONS)
        with within(DETECT_LIMIT), restart_warning(VICTIM):
            result = envs.step(ACTIONS)
        check_restarted_step(result, list(VICTIM_ENVS), t=2)
        envs.step(ACTIONS)
    finally:
        close_quickly(envs)


def test_restart_five_times_in_a_row(capfd):
    n = 6
    envs = make(crash_envs.crash_fns(n), num_workers=3, restart_workers=True)
    actions = np.ones(n, dtype=np.int64)
    groups = [[0, 1], [2, 3], [4, 5]]
    try:
        envs.reset(seed=0)
        seen = set()
        previous: list[int] = []
        for w in [1, 0, 2, 2, 1]:
            pid = worker_pids(envs)[w]
            seen.add(pid)
            kill(pid)
            with restart_warning(w, pid, f"envs {groups[w][0]}..{groups[w][1]}"):
                result = envs.step(actions)
            check_restarted_step(result, groups[w], autoresetting=previous)
            previous = groups[w]
        # two at once
        pids = worker_pids(envs)
        kill(pids[0])
        kill(pids[2])
        with restart_warning(0, pids[0], "envs 0..1"), restart_warning(2, pids[2], "envs 4..5"):
            result = envs.step(actions)
        check_restarted_step(result, [0, 1, 4, 5], autoresetting=previous)
        for _ in range(5):
            *_, truncations, infos = envs.step(actions)
            assert infos == {} and not truncations.any()
        assert not seen & set(worker_pids(envs))
    finally:
        close_quickly(envs)
    assert capfd.readouterr().err == ""


def test_restart_keeps_a_rollout_loop_going():
    """Workers killed at random moments of a rollout: the loop never sees an error, exactly
    the killed groups come back truncated, and everything is freed at the end."""
    n, steps = 6, 120
    envs = make(crash_envs.crash_fns(n, delay=0.001), num_workers=3, restart_workers=True)
    actions = np.ones(n, dtype=np.int64)
    rng = random.Random(3)
    restarts = 0
    autoresetting = np.zeros(n, dtype=bool)  # replaced in the step before: NextStep resets
    try:
        envs.reset(seed=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for t in range(steps):
                if t % 20 == 10:
                    pid = worker_pids(envs)[rng.randrange(3)]
                    threading.Timer(rng.uniform(0, 0.004), os.kill,
                                    (pid, signal.SIGKILL)).start()
                _, rewards, terminations, truncations, infos = envs.step(actions)
                restarted = infos.get("_worker_restarted", np.zeros(n, dtype=bool))
                assert (truncations == restarted).all() and not terminations.any()
                stepped = ~restarted & ~autoresetting
                assert (rewards[stepped] == 1.5).all() and (rewards[~stepped] == 0).all()
                autoresetting = restarted
                restarts += int(restarted.sum()) // 2
        messages = [str(w.message) for w in caught]
        assert restarts == len(messages) == steps // 20, messages
        assert all("restarted it as pid" in m for m in messages)
    finally:
        close_quickly(envs)


@pytest.mark.parametrize("op", ["reset", "call", "get_attr", "set_attr"])
def test_restart_during_other_calls_raises_and_the_env_goes_on(op, capfd):
    envs = make(restart_workers=True)
    try:
        envs.reset(seed=0)
        envs.step(ACTIONS)
        pid = worker_pids(envs)[VICTIM]
        kill(pid)
        with within(DETECT_LIMIT), pytest.raises(WorkerDiedError) as excinfo:
            run_op(envs, op)
        assert_death(excinfo.value, VICTIM, pid, "kill", restarted=True)
        assert f"during `{op if op != 'get_attr' else 'call'}`" in str(excinfo.value)
        assert "restarted it as pid" in str(excinfo.value)
        new_pids = worker_pids(envs)
        assert new_pids[VICTIM] != pid
        # usable: the call works again, and so does everything else
        run_op(envs, "set_attr" if op == "set_attr" else "get_attr")
        assert envs.call("pid") == tuple(np.repeat(new_pids, 2))
        obs, _ = envs.reset(seed=3)
        assert (obs[:, 1] == 0).all()
        obs, rewards, _, truncations, infos = envs.step(ACTIONS)
        assert (obs[:, 1] == 1).all() and (rewards == 1.5).all()
        assert infos == {} and not truncations.any()
    finally:
        close_quickly(envs)
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("how", ["raise", "exit"])
def test_a_replacement_that_cannot_start_breaks_the_env(how, tmp_path):
    arm = tmp_path / "arm"
    fns = crash_envs.crash_fns(N, crashing=(2,), where="init", how=how, arm_file=str(arm))
    envs = make(fns, restart_workers=True)
    try:
        envs.reset(seed=0)
        arm.touch()  # from now on, a new env 2 fails to build
        pid = worker_pids(envs)[VICTIM]
        kill(pid)
        with within(DETECT_LIMIT), pytest.raises(WorkerDiedError) as excinfo:
            envs.step(ACTIONS)
        error = excinfo.value
        assert not error.restarted and error.worker == VICTIM
        if how == "raise":
            assert (error.pid, error.exitcode) == (pid, -signal.SIGKILL)
            assert "its replacement could not be started: env 2 raised CrashError" in str(error)
            assert isinstance(error.__cause__, crash_envs.CrashError)
        else:  # the replacement died too: that is the death reported
            assert error.pid != pid and error.exitcode == crash_envs.EXIT_CODE
        with pytest.raises(WorkerDiedError):
            envs.step(ACTIONS)
    finally:
        close_quickly(envs)


def test_restart_gives_back_the_concurrency_permit_the_dead_worker_held():
    envs = make(crash_envs.crash_fns(N, delay=0.25), max_concurrency=1, restart_workers=True)
    try:
        envs.reset(seed=0)
        envs.step_async(ACTIONS)
        lines = [envs._plan.worker_line(w) + P.PERMIT for w in range(2)]
        deadline = time.monotonic() + 2.0
        holder = None
        while holder is None and time.monotonic() < deadline:
            holder = next((w for w in range(2) if envs._pool.doorbells.load(lines[w])), None)
        assert holder is not None
        pid = worker_pids(envs)[holder]
        os.kill(pid, signal.SIGKILL)
        group = [2 * holder, 2 * holder + 1]
        # without the permit back, the survivor would wait on the semaphore forever
        with restart_warning(holder, pid, f"envs {group[0]}..{group[1]}"):
            _, _, _, truncations, _ = envs.step_wait(timeout=5.0)
        assert list(np.flatnonzero(truncations)) == group
        envs.step_async(ACTIONS)
        *_, truncations, _ = envs.step_wait(timeout=5.0)
        assert not truncations.any()
    finally:
        close_quickly(envs)


def test_no_restart_while_closing(capfd):
    envs = make(crash_envs.crash_fns(N, crashing=(2,), where="close"), restart_workers=True)
    envs.reset(seed=0)
    close_quickly(envs)  # a warning would be an error here
    assert capfd.readouterr().err == ""


def test_restart_under_spawn():
    envs = make(restart_workers=True, context="spawn")
    try:
        envs.reset(seed=0)
        pid = worker_pids(envs)[VICTIM]
        kill(pid)
        with restart_warning(VICTIM, pid):
            result = envs.step(ACTIONS)
        check_restarted_step(result, list(VICTIM_ENVS), t=1)
        envs.step(ACTIONS)
    finally:
        close_quickly(envs)


# -- 3. the parent dies, or forgets close() --------------------------------------------------
@pytest.mark.parametrize("context", ["fork", "forkserver", "spawn"])
def test_workers_made_on_a_thread_outlive_the_thread(context):
    # Linux's parent-death signal fires when the *thread* that forked a worker ends
    holder = {}
    thread = threading.Thread(target=lambda: holder.setdefault("envs", make(context=context)))
    thread.start()
    thread.join()
    envs = holder.pop("envs")
    try:
        time.sleep(0.3)
        envs.reset(seed=0)
        obs, *_ = envs.step(ACTIONS)
        assert (obs[:, 1] == 1).all()
    finally:
        close_quickly(envs)


SCRIPT_HEAD = """
import json, os, signal, sys, threading, time
sys.path.insert(0, {tests!r})
import numpy as np
import crash_envs, fastvec

CONTEXT = {context!r}


def build():
    return fastvec.AsyncVectorEnv(crash_envs.crash_fns(4), num_workers=2, context=CONTEXT)

def report(envs):
    print(json.dumps({{"pids": [p.pid for p in envs._pool.resources.processes],
                      "segment": envs._pool.resources.shm.name}}), flush=True)
"""

PARENT_BODIES = {
    # made on the main thread; the parent hangs until it is killed
    "main": """
envs = build()
envs.reset(seed=0)
envs.step(np.ones(4, dtype=np.int64))
report(envs)
time.sleep(60)
""",
    # made on a thread that has ended: no parent-death signal, the workers' poll notices
    "thread": """
holder = {}
thread = threading.Thread(target=lambda: holder.setdefault("envs", build()))
thread.start(); thread.join()
envs = holder["envs"]
envs.reset(seed=0)
report(envs)
time.sleep(60)
""",
    # killed in the middle of a step
    "stepping": """
envs = fastvec.AsyncVectorEnv(crash_envs.crash_fns(4, delay=10.0), num_workers=2,
                              context=CONTEXT)
envs.reset(seed=0)
report(envs)
envs.step(np.ones(4, dtype=np.int64))
""",
    # ends itself without any cleanup
    "os_exit": """
envs = build()
envs.reset(seed=0)
report(envs)
os._exit(0)
""",
}

TRACKER_WARNING = ("resource_tracker: There appear to be 1 leaked shared_memory objects to "
                   "clean up at shutdown")


def start_script(body: str, context: str) -> subprocess.Popen:
    script = SCRIPT_HEAD.format(tests=TESTS_DIR, context=context) + body
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def read_report(proc: subprocess.Popen, limit: float = 30.0) -> dict:
    ready, _, _ = select.select([proc.stdout], [], [], limit)
    assert ready, "the script did not report"
    line = proc.stdout.readline()
    assert line, proc.communicate()[1]
    return json.loads(line)


def segment_gone(name: str, limit: float) -> float:
    start = time.monotonic()
    while os.path.exists(os.path.join("/dev/shm", name)):
        elapsed = time.monotonic() - start
        assert elapsed < limit, f"segment {name} still exists"
        time.sleep(0.005)
    return time.monotonic() - start


@contextlib.contextmanager
def script_cleanup(proc: subprocess.Popen, report: dict | None = None):
    try:
        yield
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()
        for pid in (report or {}).get("pids", []):
            with contextlib.suppress(psutil.Error):
                if not is_gone(pid):
                    psutil.Process(pid).kill()
        if report:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join("/dev/shm", report["segment"]))


@pytest.mark.parametrize(("body", "context"), [
    ("main", "fork"), ("main", "forkserver"), ("main", "spawn"),
    ("thread", "fork"), ("thread", "spawn"),
    ("stepping", "fork"),
    ("os_exit", "fork"),
])
def test_a_dead_parent_takes_its_workers_and_its_segment(body, context):
    proc = start_script(PARENT_BODIES[body], context)
    report: dict = {}
    with script_cleanup(proc, report):
        report.update(read_report(proc))
        if body == "stepping":
            time.sleep(0.2)  # the workers are inside env.step
        if body != "os_exit":
            proc.kill()
        proc.wait(10)
        workers_gone = wait_gone(report["pids"], 2.0)
        # multiprocessing's resource tracker unlinks it once the last worker is gone
        unlinked = segment_gone(report["segment"], 2.0)
        stderr = proc.stderr.read()
        # the tracker's "leaked" warning is its way of saying it cleaned up, and its "No such
        # file" that a worker unlinked the segment first (they race); nothing else
        lines = [line for line in stderr.splitlines()
                 if TRACKER_WARNING not in line and "warnings.warn(" not in line
                 and not ("resource_tracker: '/fastvec_" in line
                          and "No such file or directory" in line)]
        assert lines == [], stderr
        print(f"\n{body}/{context}: workers gone after {workers_gone * 1e3:.0f} ms, segment "
              f"unlinked after {unlinked * 1e3:.0f} ms")


FORGETFUL_BODIES = {
    "end": ("", 0),
    "sys_exit": ("sys.exit(3)", 3),
    "pending_step": ("envs.step_async(np.ones(4, dtype=np.int64))", 0),
    "dropped": ("del envs", 0),
}


@pytest.mark.parametrize(("ending", "context"), [
    *((ending, "fork") for ending in FORGETFUL_BODIES),
    ("end", "spawn"), ("pending_step", "spawn"),
    ("end", "forkserver"),
])
def test_a_parent_that_forgets_close_exits_silently(ending, context):
    line, code = FORGETFUL_BODIES[ending]
    body = f"""
envs = build()
envs.reset(seed=0)
envs.step(np.ones(4, dtype=np.int64))
report(envs)
{line}
"""
    proc = start_script(body, context)
    report: dict = {}
    with script_cleanup(proc, report):
        report.update(read_report(proc))
        assert proc.wait(10) == code
        assert proc.stderr.read() == ""
        # closed by the interpreter's exit, not by the resource tracker afterwards
        assert not os.path.exists(os.path.join("/dev/shm", report["segment"]))
        wait_gone(report["pids"], 0.5)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal")
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_a_killed_parent_without_its_resource_tracker_leaves_no_segment(context):
    """A parent killed together with multiprocessing's resource tracker (a Ray actor whose
    processes are all killed, say) cannot unlink its segment: its workers do, as they go."""
    proc = start_script(PARENT_BODIES["main"], context)
    report: dict = {}
    with script_cleanup(proc, report):
        report.update(read_report(proc))
        trackers = [child for child in psutil.Process(proc.pid).children()
                    if "resource_tracker" in " ".join(child.cmdline())]
        for tracker in trackers:
            tracker.kill()
        psutil.wait_procs(trackers, timeout=5)
        proc.kill()
        proc.wait(10)
        wait_gone(report["pids"], 2.0)
        segment_gone(report["segment"], 2.0)
