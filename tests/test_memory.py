"""The segment's storage (``fastvec._memory``): /dev/shm when the segment fits, a memfd (or a
temporary file) when it does not, with one warning; never a SIGBUS later.

1. The module: each backend is created mode 0600, attached through its handle (in this
   process and in a child of every start method), shared, closed with views still held, and
   freed (the autouse fixtures check no segment, memfd or file is left).
2. The fallback end to end: fastvec on a memfd or a file matches Gymnasium's SyncVectorEnv
   under fork, forkserver and spawn, and ``restart_workers`` reattaches a replacement.
3. A parent killed by SIGKILL leaves no memfd mapped anywhere.
4. A real 64 MB /dev/shm (a tmpfs in a private mount namespace) with a segment that is larger.

``gymnasium.logger.warn`` reports through ``warnings.warn``, which ``filterwarnings = error``
turns into a failure, so every construction on the fallback expects the warning.
"""

from __future__ import annotations

import errno
import functools
import gc
import json
import multiprocessing
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from gymnasium import spaces
from gymnasium.utils.env_checker import data_equivalence
from gymnasium.vector import SyncVectorEnv
from gymnasium.vector.utils import batch_space

import crash_envs
import envs as test_envs
import fastvec
from conftest import SHM_DIR, fastvec_memfds
from fastvec import _memory

CONTEXTS = ["fork", "forkserver", "spawn"]
SIZE = 1 << 16
TESTS_DIR = Path(__file__).parent
FALLBACK_WARNING = r"shared memory needs [\d,]+ bytes .* but /dev/shm has only [\d,]+ bytes"


@pytest.fixture
def small_shm(monkeypatch: pytest.MonkeyPatch) -> int:
    """Make /dev/shm look full to this process: 64 bytes free, less than any segment."""
    monkeypatch.setattr(_memory, "shm_free_bytes", lambda: 64)
    return 64


@pytest.fixture(params=[_memory.MEMFD, _memory.FILE])
def fallback(request: pytest.FixtureRequest, small_shm: int,
             monkeypatch: pytest.MonkeyPatch) -> str:
    """The fallback backend under test; ``file`` is what a system without memfd gets."""
    if request.param == _memory.FILE:
        monkeypatch.setattr(_memory, "memfd_usable", lambda: False)
    elif not _memory.memfd_usable():
        pytest.skip("no memfd_create or /proc on this system")
    return str(request.param)


def _create_on_fallback(size: int = SIZE) -> _memory.SharedSegment:
    with pytest.warns(UserWarning, match=FALLBACK_WARNING):
        return _memory.create(size)


def _write_through_handle(handle: _memory.Handle, offset: int, value: bytes) -> None:
    segment = _memory.attach(handle)
    assert segment.buf is not None
    segment.buf[offset:offset + len(value)] = value
    segment.close()


# -- 1. the module ---------------------------------------------------------------------------
def test_a_segment_that_fits_lives_in_dev_shm_preallocated():
    segment = _memory.create(SIZE)
    try:
        assert segment.handle.kind == _memory.SHM
        path = os.path.join(SHM_DIR, segment.name)
        info = os.stat(path)
        assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_size == SIZE
        assert info.st_blocks * 512 >= SIZE  # every page is allocated: no SIGBUS later
        assert segment.buf is not None and bytes(segment.buf[:8]) == bytes(8)
        _write_through_handle(segment.handle, 8, b"attached")
        assert bytes(segment.buf[8:16]) == b"attached"
    finally:
        segment.close()
        segment.unlink()
    assert not os.path.exists(path)
    segment.close()
    segment.unlink()  # both idempotent


def test_fallback_backends_are_private_shared_and_freed(fallback):
    segment = _create_on_fallback()
    try:
        assert segment.handle.kind == fallback
        assert not os.path.exists(os.path.join(SHM_DIR, segment.name))
        info = os.stat(segment.handle.path)
        assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_size == SIZE
        if fallback == _memory.MEMFD:
            assert segment.handle.path == f"/proc/{os.getpid()}/fd/{segment._fd}"
            assert segment.name in fastvec_memfds()
        assert segment.buf is not None
        _write_through_handle(segment.handle, 100, b"shared")
        assert bytes(segment.buf[100:106]) == b"shared"
    finally:
        segment.close()
        segment.unlink()
    assert segment.name not in fastvec_memfds()
    assert not os.path.exists(segment.handle.path)


def _child_writes(handle: _memory.Handle, value: bytes) -> None:
    _write_through_handle(handle, 0, value)


@pytest.mark.parametrize("context", CONTEXTS)
def test_children_of_every_start_method_attach_to_the_fallback(fallback, context):
    segment = _create_on_fallback()
    try:
        child = multiprocessing.get_context(context).Process(
            target=_child_writes, args=(segment.handle, context.encode()))
        child.start()
        child.join(60)
        assert child.exitcode == 0
        assert segment.buf is not None
        assert bytes(segment.buf[:len(context)]) == context.encode()
    finally:
        segment.close()
        segment.unlink()


@pytest.mark.parametrize("backend", [_memory.SHM, _memory.MEMFD, _memory.FILE])
def test_close_with_views_still_held_keeps_them_valid(backend, monkeypatch):
    if backend != _memory.SHM:
        monkeypatch.setattr(_memory, "shm_free_bytes", lambda: 0)
    if backend == _memory.FILE:
        monkeypatch.setattr(_memory, "memfd_usable", lambda: False)
    segment = _memory.create(SIZE) if backend == _memory.SHM else _create_on_fallback()
    assert segment.buf is not None
    view = np.frombuffer(segment.buf, np.uint8)
    view[:4] = 7
    segment.close()  # no BufferError: the view keeps the mapping
    segment.unlink()
    assert segment.buf is None and (view[:4] == 7).all()
    del view  # the last view unmaps it (and closes the descriptor mmap keeps)
    gc.collect()
    assert segment.name not in fastvec_memfds()


def test_no_room_for_preallocation_falls_back_and_frees_the_shm_segment(monkeypatch):
    def no_room(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    before = set(os.listdir(SHM_DIR))
    with pytest.warns(UserWarning, match=FALLBACK_WARNING):
        segment = _memory.create(SIZE)
    try:
        assert segment.handle.kind in (_memory.MEMFD, _memory.FILE)
        assert not {n for n in os.listdir(SHM_DIR) if n.startswith("fastvec_")} - before
    finally:
        segment.close()
        segment.unlink()


def test_the_warning_says_what_is_needed_what_is_free_and_the_fix(monkeypatch):
    monkeypatch.setattr(_memory, "shm_free_bytes", lambda: 64 * 10**6)
    with pytest.warns(UserWarning) as record:
        segment = _memory.create(150 * 10**6)
    segment.close()
    segment.unlink()
    [warning] = record
    text = str(warning.message)
    assert "needs 150,000,000 bytes (143.1 MiB)" in text
    assert "/dev/shm has only 64,000,000 bytes (61.0 MiB) free" in text
    assert "docker run --shm-size=" in text
    suggested = text.split("--shm-size=")[1].split()[0]
    assert suggested.endswith(("m", "g"))
    mib = int(suggested[:-1]) * (1024 if suggested.endswith("g") else 1)
    assert mib * (1 << 20) >= 150 * 10**6


@pytest.mark.parametrize(("needed", "size"), [(1, "64m"), (100 << 20, "128m"),
                                              (800 << 20, "1g"), (900 << 20, "1152m")])
def test_suggested_shm_size(needed, size):
    assert _memory._docker_size(needed) == size


def test_a_lazy_tail_is_allocated_only_when_asked_for(monkeypatch):
    page = os.sysconf("SC_PAGE_SIZE")
    segment = _memory.create(SIZE, lazy_tail=SIZE // 2)
    path = os.path.join(SHM_DIR, segment.name)
    try:
        assert os.stat(path).st_blocks * 512 == SIZE // 2
        segment.allocate_tail()
        segment.allocate_tail()  # once is enough
        assert os.stat(path).st_blocks * 512 >= SIZE
        # a tail /dev/shm has no room for any more is an error, not a SIGBUS later
        other = _memory.create(SIZE, lazy_tail=page)

        def no_room(fd: int, offset: int, length: int) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "posix_fallocate", no_room)
        with pytest.raises(OSError, match=f"no room left for the last {page:,} bytes"):
            other.allocate_tail()
        other.close()
        other.unlink()
    finally:
        segment.close()
        segment.unlink()


def test_copy_true_allocates_its_scratch_slot_only_when_a_step_needs_it():
    fns = [functools.partial(test_envs.SpaceEnv, spaces.Box(0, 255, (64, 64), np.uint8),
                             index=i) for i in range(4)]
    with fastvec.AsyncVectorEnv(fns, num_workers=2) as envs:
        plan = envs._plan
        scratch = plan.observation_slots[-1]
        assert scratch.offset + scratch.nbytes == plan.nbytes  # the scratch slot ends it
        path = os.path.join(SHM_DIR, envs._pool.resources.shm.name)
        allocated = os.stat(path).st_blocks * 512
        eager = plan.nbytes - scratch.nbytes
        assert eager <= allocated < eager + os.sysconf("SC_PAGE_SIZE")  # whole pages
        held = [envs.reset(seed=0)[0], envs.step(np.zeros(4, np.int64))[0]]
        assert os.stat(path).st_blocks * 512 == allocated  # two recycled slots so far
        third = envs.step(np.zeros(4, np.int64))[0]  # both held: the scratch slot, copied
        assert os.stat(path).st_blocks * 512 >= plan.nbytes
        assert not np.shares_memory(third, held[0]) and not np.shares_memory(third, held[1])
        del held, third


# -- 2. the fallback end to end --------------------------------------------------------------
SPACE = spaces.Dict({"frame": spaces.Box(0, 255, (6, 4, 3), np.uint8),
                     "pos": spaces.Box(-1, 1, (2,), np.float32), "n": spaces.Discrete(5)})


def _fns(n: int) -> list:
    return [functools.partial(test_envs.SpaceEnv, SPACE, spaces.Discrete(3), index=i)
            for i in range(n)]


@pytest.mark.parametrize("copy", [True, False])
@pytest.mark.parametrize(("backend", "context"), [
    *[(_memory.MEMFD, context) for context in CONTEXTS], (_memory.FILE, "spawn")])
def test_vector_env_on_the_fallback_matches_gymnasium(backend, context, copy, monkeypatch):
    monkeypatch.setattr(_memory, "shm_free_bytes", lambda: 0)
    if backend == _memory.FILE:
        monkeypatch.setattr(_memory, "memfd_usable", lambda: False)
    n, steps = 4, 40
    reference = SyncVectorEnv(_fns(n))
    with pytest.warns(UserWarning, match=FALLBACK_WARNING):
        subject = fastvec.AsyncVectorEnv(_fns(n), num_workers=2, context=context, copy=copy)
    try:
        assert subject._pool.resources.shm is not None
        assert subject._pool.resources.shm.handle.kind == backend
        actions = batch_space(spaces.Discrete(3), n)
        actions.seed(0)
        assert data_equivalence(reference.reset(seed=0), subject.reset(seed=0), exact=True)
        for t in range(steps):
            batch = actions.sample()
            assert data_equivalence(reference.step(batch), subject.step(batch), exact=True), t
    finally:
        subject.close()
        reference.close()


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_restart_workers_reattach_to_the_fallback(fallback, context):
    with pytest.warns(UserWarning, match=FALLBACK_WARNING):
        envs = fastvec.AsyncVectorEnv(crash_envs.crash_fns(4), num_workers=2, context=context,
                                      restart_workers=True)
    try:
        actions = np.ones(4, dtype=np.int64)
        envs.reset(seed=0)
        envs.step(actions)
        victim = envs._pool.resources.processes[1]
        os.kill(victim.pid, 9)
        victim.join(5)
        with pytest.warns(UserWarning, match="restarted it as pid"):
            obs, rewards, _, truncations, _ = envs.step(actions)
        assert truncations[2:].all() and not truncations[:2].any()
        assert (obs[2:, 1:] == [0, 1]).all() and (obs[:2, 1] == 2).all()
        obs, rewards, *_ = envs.step(actions)  # the replacement writes into the segment
        assert (obs[:, 0] == np.arange(4)).all() and (rewards[:2] == 1.5).all()
    finally:
        envs.close()


# -- 3. parent death ------------------------------------------------------------------------
PARENT_DEATH_SCRIPT = textwrap.dedent("""
    import json, sys, time, warnings
    sys.path.insert(0, {tests!r})
    import numpy as np
    import crash_envs, fastvec
    from fastvec import _memory

    if __name__ == "__main__":
        _memory.shm_free_bytes = lambda: 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            envs = fastvec.AsyncVectorEnv(crash_envs.crash_fns(4), num_workers=2,
                                          context={context!r})
        envs.reset(seed=0)
        envs.step(np.ones(4, dtype=np.int64))
        print(json.dumps({{"name": envs._pool.resources.shm.name,
                          "pids": [p.pid for p in envs._pool.resources.processes]}}), flush=True)
        time.sleep(60)
""")


def _mapping_pids(label: str) -> list[int]:
    """Processes that still map the memfd ``label``."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as maps:
                if f"/memfd:{label}" in maps.read():
                    pids.append(int(pid))
        except OSError:  # gone, or not ours to read
            pass
    return pids


@pytest.mark.timeout(60)
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_a_killed_parent_leaves_no_memfd_behind(context):
    if not _memory.memfd_usable():
        pytest.skip("no memfd_create or /proc on this system")
    script = PARENT_DEATH_SCRIPT.format(tests=str(TESTS_DIR), context=context)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert parent.stdout is not None
        report = json.loads(parent.stdout.readline())
        assert sorted(_mapping_pids(report["name"])) == sorted([parent.pid, *report["pids"]])
    finally:
        parent.kill()
        parent.communicate(timeout=30)
    deadline = time.monotonic() + 5.0
    while _mapping_pids(report["name"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _mapping_pids(report["name"]) == []  # the workers went with it, and the memfd


# -- 4. a real 64 MB /dev/shm ----------------------------------------------------------------
SMALL_SHM_SCRIPT = textwrap.dedent("""
    import json, os, sys, warnings
    import numpy as np, psutil
    import gymnasium as gym
    from gymnasium import spaces
    import fastvec

    SHAPE = (210, 160, 3)

    class FrameEnv(gym.Env):
        # an Atari-sized frame filled with (index + t) % 251: cheap to make, easy to check
        observation_space = spaces.Box(0, 255, SHAPE, np.uint8)
        action_space = spaces.Discrete(2)

        def __init__(self, index):
            self.index, self.t = index, 0

        def _obs(self):
            return np.full(SHAPE, (self.index + self.t) % 251, np.uint8)

        def reset(self, *, seed=None, options=None):
            self.t = 0
            return self._obs(), {}

        def step(self, action):
            self.t += 1
            return self._obs(), float(action), False, False, {}

    def fastvec_memfds():
        found = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:fastvec_"):
                    found.append(fd)
            except FileNotFoundError:  # the descriptor listdir itself used
                pass
        return found

    if __name__ == "__main__":
        num_envs, copy = int(sys.argv[1]), sys.argv[2] == "copy"
        free = os.statvfs("/dev/shm").f_bavail * os.statvfs("/dev/shm").f_frsize
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            envs = fastvec.AsyncVectorEnv([lambda i=i: FrameEnv(i) for i in range(num_envs)],
                                          num_workers=2, copy=copy)
        expected = np.arange(num_envs) % 251
        obs, _ = envs.reset(seed=0)
        assert (obs[:, 0, 0, 0] == expected).all() and (obs[:, -1, -1, -1] == expected).all()
        for t in range(1, 4):
            obs, rewards, *_ = envs.step(np.ones(num_envs, dtype=np.int64))
            assert (obs[:, 0, 0, 0] == (expected + t) % 251).all()
            assert (obs[:, -1, -1, -1] == (expected + t) % 251).all()
            assert (rewards == 1.0).all()
        report = {"kind": envs._pool.resources.shm.handle.kind, "nbytes": envs._plan.nbytes,
                  "free": free, "warnings": [str(w.message) for w in caught],
                  "workers_alive": all(p.is_alive() for p in envs._pool.resources.processes)}
        del obs
        envs.close()
        report["left_in_shm"] = [n for n in os.listdir("/dev/shm") if n.startswith("fastvec_")]
        report["memfds_open"] = fastvec_memfds()
        report["children"] = [c.pid for c in psutil.Process().children()
                              if c.status() != psutil.STATUS_ZOMBIE
                              and "resource_tracker" not in " ".join(c.cmdline())]
        print(json.dumps(report))
""")


def _in_small_shm(command: str) -> list[str]:
    return ["unshare", "-m", "sh", "-c",
            f"mount -t tmpfs -o size=64m,mode=1777 tmpfs /dev/shm && exec {command}"]


@pytest.fixture(scope="module")
def small_shm_namespace() -> None:
    """Skip unless this process may mount a tmpfs over /dev/shm in a mount namespace."""
    try:
        probe = subprocess.run(_in_small_shm("true"), capture_output=True, text=True,
                               timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot run `unshare -m`: {exc}")
    if probe.returncode != 0:
        pytest.skip(f"a private mount namespace with a 64 MB /dev/shm is not permitted here: "
                    f"{probe.stderr.strip()}")


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("copy", "kind"), [("copy", _memory.MEMFD), ("nocopy", _memory.SHM)])
def test_a_64_mb_dev_shm_with_512_atari_frames(small_shm_namespace, tmp_path, copy, kind):
    script = tmp_path / "small_shm.py"
    script.write_text(SMALL_SHM_SCRIPT)
    result = subprocess.run(_in_small_shm(f"{sys.executable} -W error {script} 512 {copy}"),
                            capture_output=True, text=True, timeout=170, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["kind"] == kind, report
    assert report["workers_alive"]
    assert report["left_in_shm"] == [] and report["memfds_open"] == []
    assert report["children"] == []
    if kind == _memory.MEMFD:  # copy=True: three 51.6 MB observation slots
        assert report["nbytes"] > report["free"]
        [warning] = report["warnings"]
        assert f"needs {report['nbytes']:,} bytes" in warning
        assert f"has only {report['free']:,} bytes" in warning
        assert "--shm-size=192m" in warning  # 147.7 MiB and a quarter more
    else:  # copy=False: one slot fits, preallocated
        assert report["nbytes"] <= report["free"] and report["warnings"] == []
    assert result.stderr == ""
