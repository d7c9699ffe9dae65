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

import psutil
import pytest

from fastvec._kernels import Segment
from fastvec.layout import Layout

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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Stress tests are long: they run only when asked for, with ``-m stress``."""
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


# /dev/shm is shared with every other test session on the machine, so a before/after listing
# alone would blame this test for their segments: count only those created in this process.
_created_here: set[str] = set()


@pytest.fixture(autouse=True, scope="session")
def record_created_segments() -> Iterator[None]:
    original_init = shared_memory.SharedMemory.__init__

    def recording_init(self, name=None, create=False, size=0, *args, **kwargs):
        original_init(self, name, create, size, *args, **kwargs)
        if create:
            _created_here.add(self.name)

    shared_memory.SharedMemory.__init__ = recording_init
    try:
        yield
    finally:
        shared_memory.SharedMemory.__init__ = original_init


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


def _live_children() -> list[psutil.Process]:
    skip = _infrastructure_pids()
    live = []
    for child in psutil.Process().children(recursive=True):
        if child.pid in skip:
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
    """Fail a test that leaves a ``fastvec_*`` segment it created or a live child process.

    Leftovers are removed (segments unlinked, children killed) after being reported, so one
    failing test does not make every later test fail too.
    """
    segments_before = fastvec_segments()
    _created_here.clear()
    yield
    problems = []

    def leftovers() -> set[str]:
        return (fastvec_segments() - segments_before) & _created_here

    leaked = leftovers()
    if leaked:
        gc.collect()  # a pending finalizer may be what still holds the name
        leaked = leftovers()
    for name in sorted(leaked):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(SHM_DIR, name))
    if leaked:
        problems.append(f"leaked shared-memory segments: {sorted(leaked)}")

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

