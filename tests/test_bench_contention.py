"""``python -m fastvec.bench --contention N``: busy processes start; none outlives the run."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from fastvec.bench.contention import BUSY_MARKER, BusyProcesses

TINY = ("--seconds", "0.1", "--warmup", "0", "--repeats", "1")


def _alive(pid: int) -> bool:
    """Running (a zombie has exited: only its parent has not reaped it yet)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _gone_soon(pids, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _busy_children(pid: int) -> list[psutil.Process]:
    out = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if any(BUSY_MARKER in part for part in child.cmdline()):
                out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out


def _wait_for_busy(pid: int, count: int, timeout: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _busy_children(pid)
        if len(found) == count:
            return [p.pid for p in found]
        time.sleep(0.02)
    raise AssertionError(f"{count} busy processes did not appear")


def test_busy_processes_spin_while_open_and_are_gone_after():
    with BusyProcesses(2) as busy:
        assert len(busy.pids) == 2
        assert sorted(p.pid for p in _busy_children(os.getpid())) == sorted(busy.pids)
        procs = [psutil.Process(pid) for pid in busy.pids]
        deadline = time.monotonic() + 30.0
        while min(p.cpu_times().user for p in procs) < 0.05:  # they really burn CPU
            assert time.monotonic() < deadline, "a busy process is not spinning"
            time.sleep(0.02)
        assert all(p.status() in (psutil.STATUS_RUNNING, psutil.STATUS_SLEEPING) for p in procs)
    assert busy.ran == 2
    assert not any(_alive(pid) for pid in busy.pids)  # killed and reaped on exit
    assert _busy_children(os.getpid()) == []


def test_busy_processes_are_stopped_when_the_block_raises():
    with pytest.raises(RuntimeError, match="boom"):
        with BusyProcesses(1) as busy:
            pids = busy.pids
            assert _alive(pids[0])
            raise RuntimeError("boom")
    assert not _alive(pids[0])


def test_zero_busy_processes_start_nothing():
    with BusyProcesses(0) as busy:
        assert busy.pids == []
    assert busy.ran == 0
    with pytest.raises(ValueError):
        BusyProcesses(-1)


def test_cli_reports_the_busy_processes_and_leaves_none_behind(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fastvec.bench", "--workload", "cartpole", "--num-envs", "2",
         "--backends", "gym-sync", *TINY, "--contention", "2", "--json", str(out), "--quiet"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    first = proc.stdout.splitlines()[0]
    assert first.startswith("contention: 2 busy-looping processes"), proc.stdout
    data = json.loads(out.read_text())
    assert data["settings"]["contention"] == 2
    assert data["contention"]["processes"] == 2 and data["contention"]["ran"] == 2
    assert len(data["contention"]["pids"]) == 2
    assert not any(_alive(pid) for pid in data["contention"]["pids"])


def test_no_contention_no_header(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fastvec.bench", "--workload", "cartpole", "--num-envs", "2",
         "--backends", "gym-sync", *TINY, "--quiet"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "contention" not in proc.stdout
    assert proc.stdout.startswith("workload")


def _long_run(*extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fastvec.bench", "--workload", "cartpole", "--num-envs", "2",
         "--backends", "gym-sync", "--seconds", "60", "--repeats", "1", "--quiet",
         "--contention", "2", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_ctrl_c_stops_the_busy_processes():
    bench = _long_run()
    try:
        pids = _wait_for_busy(bench.pid, 2)
        bench.send_signal(signal.SIGINT)  # to the bench only, not its process group
        _, err = bench.communicate(timeout=60)
        assert bench.returncode == 130, err
        assert "interrupted" in err
        assert not any(_alive(pid) for pid in pids)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.communicate()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's parent-death signal")
def test_busy_processes_die_with_a_killed_bench():
    bench = _long_run()
    try:
        pids = _wait_for_busy(bench.pid, 2)
        bench.kill()  # no cleanup runs in the bench
        bench.communicate(timeout=30)
        assert _gone_soon(pids), [p for p in pids if _alive(p)]
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.communicate()
