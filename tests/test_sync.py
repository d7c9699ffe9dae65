"""Tests for fastvec._sync: cross-process doorbells over shared memory."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Iterator
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import pytest

from fastvec._sync import HAVE_FUTEX, Doorbells

SEG_SIZE = 4096
U32_MAX = 0xFFFFFFFF

# Word offsets used by the cross-process tests.
PING = 0
PONG = 4
READY = 8

# Child exit codes.
EXIT_OK = 0
EXIT_TIMEOUT = 3
EXIT_BAD_VALUE = 4
EXIT_INTERRUPTED = 5
EXIT_NOT_INTERRUPTED = 6

JOIN_TIMEOUT = 30.0
START_METHODS = ["fork", "spawn"]


def _new_name() -> str:
    return f"fastvec_test_{secrets.token_hex(6)}"


@pytest.fixture
def shm() -> Iterator[SharedMemory]:
    seg = SharedMemory(name=_new_name(), create=True, size=SEG_SIZE)
    try:
        yield seg
    finally:
        gc.collect()  # drop any Doorbells a failed test left behind
        seg.close()
        seg.unlink()


@pytest.fixture
def bells(shm: SharedMemory) -> Iterator[Doorbells]:
    db = Doorbells(_buf(shm))
    try:
        yield db
    finally:
        db.release()


def _buf(seg: SharedMemory) -> memoryview:
    buf = seg.buf
    assert buf is not None
    return buf


def _context(method: str) -> Any:
    if method not in mp.get_all_start_methods():
        pytest.skip(f"start method {method!r} unavailable")
    return mp.get_context(method)


def _finish(proc: mp.process.BaseProcess) -> int | None:
    """Join with a timeout; kill a straggler so nothing outlives the test."""
    proc.join(JOIN_TIMEOUT)
    if proc.is_alive():
        proc.kill()
        proc.join(JOIN_TIMEOUT)
    code = proc.exitcode
    proc.close()
    return code


def _cpu_ticks(pid: int) -> int:
    """utime + stime (fields 14 and 15 of /proc/<pid>/stat), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    # comm (field 2) may contain spaces; fields after it start at field 3.
    rest = stat[stat.rindex(")") + 2 :].split()
    return int(rest[14 - 3]) + int(rest[15 - 3])


# --------------------------------------------------------------------------
# child process bodies (module level so "spawn" can import them)
# --------------------------------------------------------------------------


def _child_pingpong(name: str, rounds: int) -> None:
    seg = SharedMemory(name=name)
    db = Doorbells(_buf(seg))
    code = EXIT_OK
    try:
        db.store(READY, 1)
        db.wake(READY)
        seen = 0
        for _ in range(rounds):
            if db.wait_while_equal(PING, seen, timeout=10.0) != 1:
                code = EXIT_TIMEOUT
                break
            value = db.load(PING)
            if value != seen + 1:
                code = EXIT_BAD_VALUE
                break
            seen = value
            db.add(PONG, 1)
            db.wake(PONG)
    finally:
        db.release()
        seg.close()
    sys.exit(code)


def _child_idle_wait(name: str) -> None:
    seg = SharedMemory(name=name)
    db = Doorbells(_buf(seg))
    try:
        db.store(READY, 1)
        db.wake(READY)
        rc = db.wait_while_equal(PING, 0, timeout=60.0)
    finally:
        db.release()
        seg.close()
    sys.exit(EXIT_OK if rc == 1 else EXIT_TIMEOUT)


def _child_interrupted_wait(name: str) -> None:
    # Only undo an inherited SIG_IGN (e.g. when the suite runs as a background
    # job); the handler is Python's default, which raises KeyboardInterrupt.
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    seg = SharedMemory(name=name)
    db = Doorbells(_buf(seg))
    code = EXIT_NOT_INTERRUPTED
    try:
        db.store(READY, 1)
        db.wake(READY)
        db.wait_while_equal(PING, 0, timeout=30.0)
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    finally:
        db.release()
        seg.close()
    sys.exit(code)


def _wait_ready(db: Doorbells, proc: mp.process.BaseProcess) -> None:
    """Wait for the child's READY bell; fail fast (with its exit code) if it died."""
    deadline = time.monotonic() + JOIN_TIMEOUT
    while db.wait_while_equal(READY, 0, timeout=0.1) == 0:
        assert proc.is_alive(), f"child died before getting ready (exit code {proc.exitcode})"
        assert time.monotonic() < deadline, "child never got ready"


# --------------------------------------------------------------------------
# single-process semantics
# --------------------------------------------------------------------------


def test_have_futex_flag() -> None:
    assert isinstance(HAVE_FUTEX, bool)
    if sys.platform.startswith("linux"):
        assert HAVE_FUTEX


def test_load_store_add(bells: Doorbells, shm: SharedMemory) -> None:
    assert bells.nbytes == SEG_SIZE
    assert bells.load(0) == 0
    bells.store(0, 7)
    assert bells.load(0) == 7
    assert bells.add(0, 5) == 12
    assert bells.add(0, -2) == 10
    assert bells.load(0) == 10
    # neighbours untouched, little-endian view agrees
    assert bells.load(4) == 0
    assert int.from_bytes(_buf(shm)[0:4], sys.byteorder) == 10
    last = SEG_SIZE - 4
    bells.store(last, 123)
    assert bells.load(last) == 123


def test_store_then_load_writes_one_word_and_reads_the_other(bells: Doorbells) -> None:
    bells.store(8, 3)
    assert bells.store_then_load(4, 41, 8) == 3
    assert bells.load(4) == 41 and bells.load(8) == 3
    bells.store(8, U32_MAX)  # the "maybe error" value is a value like any other
    assert bells.store_then_load(4, U32_MAX, 8) == U32_MAX
    assert bells.store_then_load(4, 5, 4) == 5  # the same word: the value just written
    with pytest.raises(ValueError, match="aligned"):
        bells.store_then_load(4, 1, 6)
    with pytest.raises(ValueError, match="out of range"):
        bells.store_then_load(SEG_SIZE, 1, 0)
    assert bells.load(4) == 5  # a refused call writes nothing


def test_add_wraps_modulo_2_32(bells: Doorbells) -> None:
    # 0xFFFFFFFF is also the "maybe error" return value: must not be mistaken for one
    assert bells.add(0, -1) == U32_MAX
    assert bells.load(0) == U32_MAX
    assert bells.add(0, 1) == 0
    bells.store(4, U32_MAX)
    assert bells.load(4) == U32_MAX
    assert bells.add(4, 2**31 - 1) == 2**31 - 2


def test_value_range_checked(bells: Doorbells) -> None:
    with pytest.raises(OverflowError):
        bells.store(0, -1)
    with pytest.raises(OverflowError):
        bells.store(0, 2**32)
    with pytest.raises(OverflowError):
        bells.add(0, 2**31)


@pytest.mark.parametrize("offset",
                         [1, 2, 3, 6, -1, -4, SEG_SIZE, SEG_SIZE - 2, SEG_SIZE + 4, 2**40])
def test_bad_offsets(bells: Doorbells, offset: int) -> None:
    with pytest.raises(ValueError):
        bells.load(offset)
    with pytest.raises(ValueError):
        bells.store(offset, 1)
    with pytest.raises(ValueError):
        bells.add(offset, 1)
    with pytest.raises(ValueError):
        bells.wake(offset)
    with pytest.raises(ValueError):
        bells.wait_while_equal(offset, 0, timeout=0.0)


def test_short_buffer_tail() -> None:
    db = Doorbells(bytearray(10))  # words at 0 and 4; bytes 8..9 are not a word
    assert db.load(4) == 0
    with pytest.raises(ValueError):
        db.load(8)
    db.release()


def test_memoryview_slice(shm: SharedMemory) -> None:
    view = _buf(shm)[64:128]
    db = Doorbells(view)
    db.store(4, 99)
    assert int.from_bytes(_buf(shm)[68:72], sys.byteorder) == 99
    with pytest.raises(ValueError):
        db.load(64)
    db.release()
    view.release()


def test_rejects_unsuitable_buffers(shm: SharedMemory) -> None:
    with pytest.raises(BufferError):
        Doorbells(b"\0" * 16)  # read-only
    view = _buf(shm)[::2]
    with pytest.raises(BufferError):
        Doorbells(view)  # not contiguous
    view.release()
    view = _buf(shm)[1:17]
    with pytest.raises(ValueError, match="aligned"):
        Doorbells(view)  # base not 4-byte aligned
    view.release()
    with pytest.raises(TypeError):
        Doorbells(object())  # type: ignore[arg-type]


def test_release(shm: SharedMemory) -> None:
    db = Doorbells(_buf(shm))
    db.store(0, 1)
    with pytest.raises(BufferError):
        shm.close()  # the export is still held
    assert not db.released
    db.release()
    assert db.released
    assert db.nbytes == 0
    db.release()  # idempotent
    for call in (
        lambda: db.load(0),
        lambda: db.store(0, 1),
        lambda: db.add(0, 1),
        lambda: db.wake(0),
        lambda: db.wait_while_equal(0, 0, timeout=0.0),
    ):
        with pytest.raises(ValueError, match="released"):
            call()
    shm.close()  # succeeds now; the fixture's close() is then a no-op


def test_context_manager_releases(shm: SharedMemory) -> None:
    with Doorbells(_buf(shm)) as db:
        db.store(0, 3)
    assert db.released
    shm.close()


def test_dealloc_releases(shm: SharedMemory) -> None:
    db = Doorbells(_buf(shm))
    db.store(0, 1)
    del db
    gc.collect()
    shm.close()


def test_not_picklable(bells: Doorbells) -> None:
    import pickle

    with pytest.raises(TypeError):
        pickle.dumps(bells)


def test_wake_without_waiters(bells: Doorbells) -> None:
    assert bells.wake(0) == 0
    assert bells.wake(0, 1) == 0
    assert bells.wake(0, 0) == 0
    with pytest.raises(ValueError):
        bells.wake(0, -1)


# --------------------------------------------------------------------------
# waiting
# --------------------------------------------------------------------------


def test_wait_times_out(bells: Doorbells) -> None:
    t0 = time.monotonic()
    rc = bells.wait_while_equal(0, 0, timeout=0.2)
    elapsed = time.monotonic() - t0
    assert rc == 0
    assert 0.15 <= elapsed <= 0.25, elapsed


def test_wait_zero_timeout(bells: Doorbells) -> None:
    assert bells.wait_while_equal(0, 0, timeout=0.0) == 0
    assert bells.wait_while_equal(0, 0, timeout=0.0, spin=0.0) == 0


def test_wait_returns_immediately_when_different(bells: Doorbells) -> None:
    bells.store(0, 5)
    t0 = time.monotonic()
    assert bells.wait_while_equal(0, 4, timeout=5.0) == 1
    assert bells.wait_while_equal(0, 4) == 1  # timeout=-1 (forever)
    assert time.monotonic() - t0 < 0.05


def test_wait_rejects_nan(bells: Doorbells) -> None:
    with pytest.raises(ValueError):
        bells.wait_while_equal(0, 0, timeout=float("nan"))


def test_wait_releases_gil(bells: Doorbells) -> None:
    """A thread can ring the bell while the main thread sleeps on it."""

    def ring() -> None:
        time.sleep(0.05)
        bells.store(0, 1)
        bells.wake(0)

    th = threading.Thread(target=ring)
    th.start()
    try:
        t0 = time.monotonic()
        assert bells.wait_while_equal(0, 0, timeout=5.0, spin=0.0) == 1
        assert time.monotonic() - t0 < 2.0
    finally:
        th.join(5.0)
    assert not th.is_alive()


@pytest.mark.skipif(not HAVE_FUTEX, reason="a polling wait sees every change")
def test_count_and_wake_wakes_once_the_target_is_reached(bells: Doorbells) -> None:
    counter, waiting, target = 0, 4, 8
    bells.store(waiting, 1)
    bells.store(target, 3)
    woke: list[float] = []

    def wait() -> None:
        bells.wait_while_equal(counter, 0, timeout=5.0, spin=0.0)
        woke.append(time.monotonic())

    th = threading.Thread(target=wait)
    th.start()
    try:
        time.sleep(0.05)
        assert bells.count_and_wake(counter, waiting, target) == 1
        assert bells.count_and_wake(counter, waiting, target) == 2
        time.sleep(0.1)
        assert not woke  # below the target: counted, nobody woken
        rang = time.monotonic()
        assert bells.count_and_wake(counter, waiting, target) == 3
        th.join(5.0)
        assert woke and woke[0] - rang < 2.0
    finally:
        th.join(5.0)
    assert not th.is_alive()


def test_count_and_wake_counts_modulo_2_32(bells: Doorbells) -> None:
    counter, waiting, target = 0, 4, 8
    bells.store(counter, 0xFFFFFFFF)
    bells.store(target, 1)  # two past the counter, across the wrap
    assert bells.count_and_wake(counter, waiting, target) == 0  # nobody waiting: no wake
    bells.store(waiting, 1)
    assert bells.count_and_wake(counter, waiting, target) == 1
    assert bells.load(counter) == 1


def test_release_refused_during_wait(bells: Doorbells) -> None:
    results: list[int] = []
    th = threading.Thread(target=lambda: results.append(bells.wait_while_equal(0, 0, timeout=5.0)))
    th.start()
    try:
        time.sleep(0.05)
        with pytest.raises(BufferError):
            bells.release()
    finally:
        bells.store(0, 1)
        bells.wake(0)
        th.join(5.0)
    assert not th.is_alive()
    assert results == [1]
    bells.release()


# --------------------------------------------------------------------------
# cross-process
# --------------------------------------------------------------------------


@pytest.mark.parametrize("method", START_METHODS)
def test_cross_process_pingpong(method: str, shm: SharedMemory, bells: Doorbells) -> None:
    ctx = _context(method)
    rounds = 1000
    proc = ctx.Process(target=_child_pingpong, args=(shm.name, rounds))
    proc.start()
    try:
        _wait_ready(bells, proc)
        for i in range(1, rounds + 1):
            bells.store(PING, i)
            bells.wake(PING)
            assert bells.wait_while_equal(PONG, i - 1, timeout=10.0) == 1, f"round {i}"
            assert bells.load(PONG) == i
    finally:
        code = _finish(proc)
    assert code == EXIT_OK
    assert bells.load(PONG) == rounds


@pytest.mark.skipif(not HAVE_FUTEX or not os.path.exists("/proc/self/stat"),
                    reason="needs futex and /proc")
def test_idle_waiter_burns_no_cpu(shm: SharedMemory, bells: Doorbells) -> None:
    ctx = _context("fork")
    proc = ctx.Process(target=_child_idle_wait, args=(shm.name,))
    proc.start()
    try:
        _wait_ready(bells, proc)
        time.sleep(0.05)
        before = _cpu_ticks(proc.pid)
        time.sleep(0.3)
        after = _cpu_ticks(proc.pid)
        assert after - before <= 2, f"idle waiter used {after - before} clock ticks"
        bells.store(PING, 1)
        bells.wake(PING)
    finally:
        code = _finish(proc)
    assert code == EXIT_OK


@pytest.mark.parametrize("method", START_METHODS)
def test_sigint_interrupts_wait(method: str, shm: SharedMemory, bells: Doorbells) -> None:
    ctx = _context(method)
    proc = ctx.Process(target=_child_interrupted_wait, args=(shm.name,))
    proc.start()
    try:
        _wait_ready(bells, proc)
        time.sleep(0.1)  # let the child get into the (sleeping) wait
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGINT)
    finally:
        code = _finish(proc)
    assert code == EXIT_INTERRUPTED


def _change_later(name: str, offset: int, delay: float) -> None:
    shm = SharedMemory(name=name)
    try:
        time.sleep(delay)
        with Doorbells(shm.buf) as bells:
            bells.store(offset, 7)
            bells.wake(offset)
    finally:
        shm.close()


@pytest.mark.parametrize("context", ["fork"])
def test_yield_spin_sees_a_change_from_another_process(context):
    shm = SharedMemory(create=True, size=64, name=f"fastvec_test_{secrets.token_hex(6)}")
    try:
        with Doorbells(shm.buf) as bells:
            bells.store(0, 0)
            child = mp.get_context(context).Process(target=_change_later, args=(shm.name, 0, 0.02))
            child.start()
            try:
                # the whole wait is a yield-spin (spin > delay): it must still see the store
                assert bells.wait_while_equal(0, 0, timeout=5.0, spin=2.0, yield_cpu=True) == 1
                assert bells.load(0) == 7
            finally:
                child.join(5)
            assert child.exitcode == 0
            start = time.monotonic()
            assert bells.wait_while_equal(0, 7, timeout=0.2, spin=0.1, yield_cpu=True) == 0
            assert abs(time.monotonic() - start - 0.2) < 0.05
    finally:
        shm.close()
        shm.unlink()
