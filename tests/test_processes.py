"""Processes: envs built from several threads, start-up deadlines, and the processes envs start.

1. Threads that each build, step and close their own vector env at the same time never hang
   (a forked worker once inherited the resource tracker's lock held by another thread).
2. No start waits without a deadline: a worker whose start makes no progress for
   ``start_timeout`` seconds is an error naming the worker, its envs, what it was doing and
   the option, and leaves nothing behind; a replacement (``restart_workers=True``) too.
3. Nothing an env starts (``SimulatorEnv`` starts ``sleep 100`` and never ends it) outlives
   its worker: after ``close()``, a worker's death, garbage collection of an unclosed env,
   and the death of the parent (also one that made the env on a thread, also while the
   workers are still starting).
"""

from __future__ import annotations

import functools
import gc
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from typing import Any

import numpy as np
import psutil
import pytest

import envs as test_envs
import fastvec
from fastvec.errors import WorkerDiedError, WorkerStartTimeoutError

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
N = 4  # with two workers: worker 1 runs envs 2 and 3
GONE_LIMIT = 2.0


def simulator_fns(n: int = N, **kwargs: Any) -> list:
    return [functools.partial(test_envs.SimulatorEnv, i, **kwargs) for i in range(n)]


def make(fns: list | None = None, **kwargs: Any) -> fastvec.AsyncVectorEnv:
    kwargs.setdefault("num_workers", 2)
    return fastvec.AsyncVectorEnv(fns if fns is not None else simulator_fns(), **kwargs)


def is_gone(pid: int) -> bool:
    """Exited (a zombie counts: it runs nothing)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids: list[int], limit: float = GONE_LIMIT) -> None:
    deadline = time.monotonic() + limit
    while not all(is_gone(pid) for pid in pids):
        assert time.monotonic() < deadline, (
            f"processes {[pid for pid in pids if not is_gone(pid)]} still run")
        time.sleep(0.01)


def kill_all(pids: list[int]) -> None:
    """Clean-up after a failure: these are not our children, so the leak check misses them."""
    for pid in pids:
        try:
            psutil.Process(pid).kill()
        except psutil.Error:
            pass


def read_pid_files(pid_dir: str, count: int, limit: float = 60.0) -> list[dict]:
    deadline = time.monotonic() + limit
    while len(os.listdir(pid_dir)) < count or any(
            name.endswith(".tmp") for name in os.listdir(pid_dir)):
        assert time.monotonic() < deadline, f"only {os.listdir(pid_dir)} in {pid_dir}"
        time.sleep(0.01)
    entries = []
    for name in sorted(os.listdir(pid_dir)):
        with open(os.path.join(pid_dir, name)) as file:
            entries.append(json.load(file))
    return entries


# -- 1. threads --------------------------------------------------------------------------------
def build_step_close(context: str, rounds: int, failures: list) -> None:
    try:
        for _ in range(rounds):
            # a generous deadline: a hang shows as an error naming the stuck phase
            envs = fastvec.AsyncVectorEnv(
                [functools.partial(test_envs.SpaceEnv, test_envs.spaces.Box(0, 1, (3,)),
                                   index=i) for i in range(N)],
                num_workers=2, context=context, start_timeout=60)
            try:
                envs.reset(seed=0)
                for _ in range(3):
                    envs.step(envs.action_space.sample())
            finally:
                envs.close()
    except BaseException:
        failures.append(traceback.format_exc())


def run_threads(threads: int, rounds: int, context: str, limit: float) -> None:
    failures: list[str] = []
    workers = [threading.Thread(target=build_step_close, args=(context, rounds, failures),
                                daemon=True) for _ in range(threads)]
    for thread in workers:
        thread.start()
    deadline = time.monotonic() + limit
    for thread in workers:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [thread.name for thread in workers if thread.is_alive()]
    assert not stuck, f"threads {stuck} did not finish within {limit} s"
    assert not failures, "\n".join(failures)


def test_threads_build_their_envs_at_once_smoke():
    run_threads(2, 3, "fork", limit=60.0)


def test_threads_build_their_envs_at_once_beside_filelocks_fork_hook():
    """filelock 3.32 (imported by Ray and Tianshou) installs a fork hook that raises
    ``RuntimeError`` when a thread forks while another thread's fork runs it: fastvec starts
    its workers one at a time, so threads building envs at once still work. In a fresh
    interpreter, since the hook stays for good once installed."""
    pytest.importorskip("filelock")
    code = (
        "import os, sys, tempfile, filelock, test_processes\n"
        "with filelock.FileLock(os.path.join(tempfile.mkdtemp(), 'x.lock')):\n"
        "    pass\n"
        "test_processes.run_threads(3, 4, 'fork', limit=60.0)\n"
        "print('ok')\n"
    )
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, "-c", code], cwd=tests_dir, capture_output=True,
                          text=True, timeout=90, env={**os.environ, "PYTHONPATH": tests_dir})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.stress
@pytest.mark.timeout(600)
@pytest.mark.parametrize(("threads", "context"), [(2, "fork"), (3, "fork"), (4, "fork"),
                                                  (2, "forkserver")])
def test_threads_build_their_envs_at_once(threads, context):
    run_threads(threads, 30, context, limit=500.0)


# -- 2. start-up deadlines ---------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, -1.0, "10", float("nan"), True])
def test_start_timeout_must_be_positive_or_none(value):
    with pytest.raises(ValueError, match="start_timeout"):
        make(start_timeout=value)


def test_an_env_that_hangs_while_built_is_a_start_timeout(tmp_path):
    fns = simulator_fns(pid_dir=str(tmp_path), hang_in="init", hanging=(3,))
    start = time.monotonic()
    with pytest.raises(WorkerStartTimeoutError) as info:
        make(fns, start_timeout=3)
    elapsed = time.monotonic() - start
    entries = read_pid_files(str(tmp_path), N, limit=0)
    error = info.value
    text = str(error)
    assert isinstance(error, TimeoutError)
    assert 3 <= elapsed < 3 + GONE_LIMIT + 2, elapsed
    assert (error.worker, error.env_indices) == (1, (2, 3))
    assert error.pid == entries[3]["worker"]
    assert error.phase.startswith("building env 3")
    for part in ("fastvec worker 1 ", f"pid {error.pid}", "envs 2..3", "building env 3",
                 "3 s", "`start_timeout=`"):
        assert part in text, text
    # every worker and what its envs started are gone (the fixtures check the segment);
    # SIGKILLed processes take a moment to be reaped by init
    wait_gone([pid for entry in entries for pid in entry.values()])


def test_none_waits_for_a_slow_start():
    fns = simulator_fns(hang_in="init", hanging=(1,), hang=1.5)
    with make(fns, start_timeout=None) as envs:
        envs.reset(seed=0)


def test_a_slow_start_that_progresses_is_not_a_timeout():
    # every env takes 1.2 s to build: 2.4 s per worker, yet no single step exceeds 2 s
    fns = simulator_fns(hang_in="init", hanging=tuple(range(N)), hang=1.2)
    with make(fns, start_timeout=2) as envs:
        envs.reset(seed=0)


@pytest.mark.parametrize(("hang_in", "phase"), [("init", "building env 2"),
                                                ("reset", "resetting env 2")])
def test_a_replacement_that_hangs_breaks_the_env(hang_in, phase, tmp_path):
    arm = tmp_path / "arm"
    fns = simulator_fns(hang_in=hang_in, hanging=(2,), arm_file=str(arm))
    envs = make(fns, restart_workers=True, start_timeout=3)
    try:
        envs.reset(seed=0)
        arm.touch()  # only the replacement's envs hang
        victim = envs._pool.resources.processes[1].pid
        os.kill(victim, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerDiedError) as info:
            # the replacement is bounded by start_timeout, not by this timeout
            envs.step(np.ones(N, dtype=np.int64))
        assert time.monotonic() - start < 3 + 1 + 2
        text = str(info.value)
        assert f"pid {victim}" in text and "replacement" in text, text
        assert phase in text and "`start_timeout=`" in text, text
        assert not info.value.restarted
        with pytest.raises(WorkerDiedError):  # broken for good
            envs.step(np.ones(N, dtype=np.int64))
    finally:
        start = time.monotonic()
        envs.close()
        assert time.monotonic() - start < GONE_LIMIT + 1


# -- 3. the processes envs start ---------------------------------------------------------------
@pytest.mark.parametrize("context", ["fork", "forkserver", "spawn"])
@pytest.mark.parametrize("terminate", [False, True])
def test_close_ends_what_the_envs_started(context, terminate):
    envs = make(context=context)
    children = list(envs.get_attr("child_pid"))
    workers = [process.pid for process in envs._pool.resources.processes]
    try:
        assert not any(is_gone(pid) for pid in children)
        for w, pid in enumerate(workers):  # each worker leads a group its envs' processes join
            assert os.getpgid(pid) == pid
            assert [os.getpgid(child) for child in children[2 * w:2 * w + 2]] == [pid, pid]
        envs.close(terminate=terminate)
        wait_gone(children)
    finally:
        kill_all(children)


def _ignored_signals(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("SigIgn:"))
    return int(line.split()[1], 16)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_and_what_envs_start_ignore_terminal_stops():
    # a background group is stopped by a terminal it writes to (`stty tostop`) or whose
    # settings it changes: the workers and the processes their envs start ignore those stops
    with make() as envs:
        pids = [process.pid for process in envs._pool.resources.processes]
        pids += list(envs.get_attr("child_pid"))
        for pid in pids:
            mask = _ignored_signals(pid)
            for stop in (signal.SIGTTOU, signal.SIGTTIN):
                assert mask & (1 << (stop - 1)), (pid, stop)


def test_a_reaped_worker_pid_taken_by_another_process_is_never_signalled(monkeypatch):
    # once reaped, a worker's pid may name another process (and group): no kill may reach it
    from fastvec import _processes

    process = multiprocessing.get_context("fork").Process(target=time.sleep, args=(10,))
    process.start()
    try:
        started = _processes.process_start_time(process.pid)
        assert started is not None
        killed: list[int] = []
        monkeypatch.setattr(os, "killpg", lambda pid, sig: killed.append(pid))
        _processes.kill_process_group(process.pid, started)  # our unreaped child: its group goes
        assert killed == [process.pid]
        monkeypatch.setattr(os, "waitid", _not_our_child)
        _processes.kill_process_group(process.pid, started)  # a forkserver child, the same
        assert killed == [process.pid] * 2
        _processes.kill_process_group(process.pid, "1")  # the pid now names another process: spared
        assert killed == [process.pid] * 2
    finally:
        monkeypatch.undo()
        process.kill()
        process.join()
        process.close()


def _not_our_child(*args: Any) -> None:
    raise ChildProcessError("not our child")


@pytest.mark.parametrize("restart", [False, True])
def test_a_dead_worker_takes_what_its_envs_started(restart, capfd):
    envs = make(restart_workers=restart)
    children = list(envs.get_attr("child_pid"))
    new_children: list[int] = []
    try:
        envs.reset(seed=0)
        os.kill(envs._pool.resources.processes[1].pid, signal.SIGKILL)
        if restart:
            with pytest.warns(UserWarning, match="restarted it"):
                *_, infos = envs.step(np.ones(N, dtype=np.int64))
            assert infos["_worker_restarted"].tolist() == [False, False, True, True]
            new_children = list(envs.get_attr("child_pid"))[2:]
        else:
            with pytest.raises(WorkerDiedError):
                envs.step(np.ones(N, dtype=np.int64))
        # ended once the death is seen, before any close
        wait_gone(children[2:])
        assert not any(is_gone(pid) for pid in children[:2] + new_children)
        envs.close()
        wait_gone(children + new_children)
    finally:
        kill_all(children + new_children)


def test_an_env_collected_unclosed_ends_what_its_envs_started():
    envs = make()
    children = list(envs.get_attr("child_pid"))
    try:
        del envs
        gc.collect()
        wait_gone(children)
    finally:
        kill_all(children)


PARENT_SCRIPT = """
import functools, json, sys, threading, time
sys.path.insert(0, {tests!r})
import fastvec, envs

where, context, pid_dir = sys.argv[1], sys.argv[2], sys.argv[3]
starting = where.endswith("starting")
# while starting, env 3 (worker 1) hangs in __init__ after starting its process
fns = [functools.partial(envs.SimulatorEnv, i, pid_dir=pid_dir,
                         hang_in="init" if starting else None, hanging=(3,))
       for i in range(4)]

def build():
    vector_env = fastvec.AsyncVectorEnv(fns, num_workers=2, context=context)
    vector_env.reset(seed=0)
    return vector_env

if where.startswith("thread"):
    holder = []
    thread = threading.Thread(target=lambda: holder.append(build()), daemon=True)
    thread.start()
    if not starting:
        thread.join()  # the thread that made the env has ended
else:
    vector_env = build()  # while starting: never returns
print("built", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize(("where", "context"), [
    ("main", "fork"), ("main", "spawn"), ("thread", "fork"), ("thread", "spawn"),
    ("main-starting", "fork"), ("thread-starting", "fork"), ("thread-starting", "spawn"),
])
def test_a_dead_parent_takes_what_the_envs_started(where, context, tmp_path):
    script = PARENT_SCRIPT.format(tests=TESTS_DIR)
    proc = subprocess.Popen([sys.executable, "-c", script, where, context, str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        entries = read_pid_files(str(tmp_path), N)
        pids = [pid for entry in entries for pid in entry.values()]
        assert proc.poll() is None, proc.communicate()
        if where.endswith("starting"):
            time.sleep(0.2)  # env 3 is inside its __init__; the parent inside the constructor
        proc.kill()
        proc.wait(10)
        wait_gone(pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        kill_all(pids)  # survivors hold the pipes open: communicate would wait for them
        _, stderr = proc.communicate(timeout=10)
    assert "Traceback" not in stderr, stderr
