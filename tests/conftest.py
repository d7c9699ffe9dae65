"""Shared fixtures: leak guards for shared-memory segments and child processes, and a
helper that binds a :class:`fastvec.layout.Layout` over a fresh segment."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import secrets
import time
import warnings
from collections.abc import Iterator
from multiprocessing import shared_memory
from typing import TYPE_CHECKING

import psutil
import pytest

from fastvec import _memory
from fastvec._kernels import Segment
from fastvec.layout import Layout

if TYPE_CHECKING:
    from fastvec.worker import Worker

# Hypothesis imports its failing-example patcher (libcst) only when a test fails, and that
# import emits a third-party DeprecationWarning which `filterwarnings = error` would turn into
# an INTERNALERROR hiding the real failure. Import it once here, quietly.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    with contextlib.suppress(ImportError):
        import hypothesis.extra._patching  # noqa: F401

SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "fastvec_"
CHILD_GRACE_SECONDS = 2.0


#: test modules that start a Ray driver in the test process: they run last
RAY_DRIVER_MODULES = ("test_ray.py", "test_rllib.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Ray's tests run last: ``ray.init`` leaves threads and at-fork state in the test
    process (gRPC's among them), and a process forked after it is not the clean fork a
    worker expects (a fork-started worker died of SIGSEGV at start once, in the first test
    module after Ray's). Stress tests are long: they run only when asked for, with
    ``-m stress``."""
    items.sort(key=lambda item: item.path.name in RAY_DRIVER_MODULES)  # stable
    if "stress" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="stress test: run it with `-m stress`")
    for item in items:
        if item.get_closest_marker("stress") is not None:
            item.add_marker(skip)


def segment_name() -> str:
    """A fresh segment name in fastvec's namespace."""
    return SEGMENT_PREFIX + secrets.token_hex(8)


def fastvec_segments() -> set[str]:
    """Names of the ``fastvec_*`` entries currently in /dev/shm."""
    try:
        return {name for name in os.listdir(SHM_DIR) if name.startswith(SEGMENT_PREFIX)}
    except FileNotFoundError:
        return set()


def fastvec_memfds() -> set[str]:
    """Labels of the ``fastvec_*`` memfds this process still has open (the fallback segment)."""
    labels = set()
    for fd in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else ():
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("/memfd:" + SEGMENT_PREFIX):
                labels.add(target.split(":", 1)[1].split(" ", 1)[0])
    return labels


# /dev/shm is shared with every other test session on the machine, so a before/after listing
# alone would blame this test for their segments: count only those created in this process.
_created_here: set[str] = set()
# paths of the temporary-file segments (the fallback without memfd) created in this process
_created_files: set[str] = set()


@pytest.fixture(autouse=True, scope="session")
def record_created_segments() -> Iterator[None]:
    original_init = shared_memory.SharedMemory.__init__
    original_create_file = _memory._create_file

    def recording_init(self, name=None, create=False, size=0, *args, **kwargs):
        original_init(self, name, create, size, *args, **kwargs)
        if create:
            _created_here.add(self.name)

    def recording_create_file(size: int) -> _memory.SharedSegment:
        segment = original_create_file(size)
        _created_files.add(segment.handle.path)
        return segment

    shared_memory.SharedMemory.__init__ = recording_init
    _memory._create_file = recording_create_file
    try:
        yield
    finally:
        shared_memory.SharedMemory.__init__ = original_init
        _memory._create_file = original_create_file


def _infrastructure_pids() -> set[int]:
    # multiprocessing's own long-lived helpers outlive every test by design.
    pids = set()
    tracker_pid = getattr(multiprocessing.resource_tracker._resource_tracker, "_pid", None)
    if tracker_pid is not None:
        pids.add(tracker_pid)
    server_pid = getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)
    if server_pid is not None:
        pids.add(server_pid)
    return pids


# A test module's local Ray cluster (tests/test_ray.py) runs for the whole module by design:
# its GCS server, raylets, their agents and Ray's idle (or still booting) worker processes.
# Never an actor: an actor's process is titled ``ray::<ClassName>``, so one left alive (and
# the fastvec workers it forked, titled as it is) is still reported.
_RAY_DAEMONS = frozenset({"gcs_server", "raylet"})
_RAY_TITLES = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")
_RAY_SCRIPTS = ("ray/_private/workers/default_worker.py", "ray/_private/log_monitor.py",
                "ray/autoscaler/_private/monitor.py", "ray/dashboard/")


def _is_ray_infrastructure(process: psutil.Process) -> bool:
    try:
        if process.name() in _RAY_DAEMONS:
            return True
        cmdline = process.cmdline()
    except psutil.Error:
        return False
    first = cmdline[0] if cmdline else ""
    if first.startswith(_RAY_TITLES):
        return True
    return not first.startswith("ray::") and any(
        script in arg for arg in cmdline[:3] for script in _RAY_SCRIPTS)


def _live_children() -> list[psutil.Process]:
    skip = _infrastructure_pids()
    live = []
    for child in psutil.Process().children(recursive=True):
        if child.pid in skip or _is_ray_infrastructure(child):
            continue
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                live.append(child)
        except psutil.NoSuchProcess:
            pass
    return live


def _describe(process: psutil.Process) -> str:
    try:
        return f"pid {process.pid} ({' '.join(process.cmdline())[:120]})"
    except psutil.Error:
        return f"pid {process.pid}"


@pytest.fixture(autouse=True)
def no_leaked_resources(record_created_segments: None) -> Iterator[None]:
    """Fail a test that leaves a segment it created (in /dev/shm, an open memfd or a temporary
    file) or a live child process.

    Leftovers are removed (segments unlinked, children killed) after being reported, so one
    failing test does not make every later test fail too; an open memfd is only reported, as
    closing a descriptor some object still owns is unsafe.
    """
    segments_before = fastvec_segments()
    memfds_before = fastvec_memfds()
    _created_here.clear()
    _created_files.clear()
    yield
    problems = []

    def leftovers() -> set[str]:
        return (fastvec_segments() - segments_before) & _created_here

    def leftover_memfds() -> set[str]:
        return fastvec_memfds() - memfds_before

    def leftover_files() -> set[str]:
        return {path for path in _created_files if os.path.exists(path)}

    leaked = leftovers()
    if leaked or leftover_memfds() or leftover_files():
        gc.collect()  # a pending finalizer may be what still holds the name
        leaked = leftovers()
    for name in sorted(leaked):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(SHM_DIR, name))
    if leaked:
        problems.append(f"leaked shared-memory segments: {sorted(leaked)}")
    if leftover_memfds():
        problems.append(f"memfd segments still open: {sorted(leftover_memfds())}")
    for path in sorted(leftover_files()):
        problems.append(f"leaked segment file: {path}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    deadline = time.monotonic() + CHILD_GRACE_SECONDS
    children = _live_children()
    while children and time.monotonic() < deadline:
        time.sleep(0.02)
        children = _live_children()
    if children:
        problems.append("live child processes: " + ", ".join(_describe(c) for c in children))
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.kill()
        psutil.wait_procs(children, timeout=CHILD_GRACE_SECONDS)

    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


@contextlib.contextmanager
def bound_layout(space, n: int,
                 **layout_options) -> Iterator[tuple[Layout, shared_memory.SharedMemory]]:
    """A :class:`Layout` for ``space`` bound over a fresh, zeroed ``fastvec_*`` segment.

    Yields ``(layout, shm)``. On exit the layout is unbound and the segment released,
    closed and unlinked, in that order. Drop every view read with ``copy=False`` before
    the block ends, or closing the segment raises ``BufferError``.
    """
    layout = Layout(space, n, **layout_options)
    shm = shared_memory.SharedMemory(create=True, size=max(layout.offset + layout.nbytes, 1),
                                     name=segment_name())
    segment = None
    try:
        segment = Segment(shm.buf)
        layout.bind(segment, shm.buf)
        yield layout, shm
    finally:
        layout.unbind()
        if segment is not None:
            segment.release()
        try:
            shm.close()
        except BufferError:
            gc.collect()  # views from a failed assertion's traceback may be the holders
            shm.close()
        finally:
            shm.unlink()


@contextlib.contextmanager
def local_worker(num_envs: int) -> Iterator[Worker]:
    """A :class:`fastvec.worker.Worker` (worker 0, one group of ``num_envs`` envs, Discrete(2)
    actions, Box(2) observations) over a local buffer the plan laid out, to drive in-process;
    detached and its pipe closed on exit."""
    from multiprocessing import Pipe

    from gymnasium import spaces
    from gymnasium.vector import AutoresetMode

    from fastvec import _segment as S
    from fastvec.worker import Worker

    plan = S.SegmentPlan(num_envs, 1, spaces.Discrete(2), spaces.Box(-1, 1, (2,)))
    buffer = memoryview(bytearray(plan.nbytes))
    plan.write_header(buffer)
    ours, theirs = Pipe()
    worker = Worker(0, 0, theirs, plan, buffer, AutoresetMode.NEXT_STEP)
    try:
        yield worker
    finally:
        worker.detach()
        ours.close()
        theirs.close()
