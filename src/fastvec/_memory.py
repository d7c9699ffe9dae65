"""Where a vector env's segment lives: POSIX shared memory, or a memfd when /dev/shm is small.

The parent calls :func:`create` and hands each worker the picklable
:attr:`SharedSegment.handle`; the worker maps it with :func:`attach`. A container's
``/dev/shm`` is often 64 MB (Docker's default) and a tmpfs allocates pages only when they are
first written, so a segment larger than the free space would be created without complaint
and a worker would die of SIGBUS later. :func:`create` therefore checks the free space and
preallocates the POSIX segment; when it does not fit, the segment is an anonymous memory file
(``memfd``, Linux) that ``/dev/shm`` does not limit, or, where there is none, a temporary
file mapped shared. Every backend is mode 0600 and freed at close; at the parent's death the
POSIX name is unlinked by multiprocessing's resource tracker and a memfd has no name to
leave behind, but the temporary file (only where there is no memfd) is left in the temporary
directory.
"""

from __future__ import annotations

import _posixshmem
import errno
import math
import mmap
import os
import secrets
import tempfile
from multiprocessing import shared_memory
from typing import NamedTuple

from gymnasium import logger

__all__ = ["Handle", "SharedSegment", "attach", "create", "shm_free_bytes"]

SHM_DIR = "/dev/shm"
PREFIX = "fastvec_"
SHM, MEMFD, FILE = "shm", "memfd", "file"
# fallocate errors that mean "this file system does not preallocate": stay lazily allocated
_NO_PREALLOCATION = frozenset({errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS})
_MIB = 1 << 20


class Handle(NamedTuple):
    """What a worker needs to map the parent's segment; travels pickled to the worker."""

    kind: str  # SHM, MEMFD or FILE
    name: str  # fastvec_<random>: the POSIX name, the memfd's label or the file's name
    path: str  # what the worker opens: the shm_open name, /proc/<pid>/fd/<fd>, the file


class SharedSegment:
    """One process's mapping of a segment: ``buf`` to read and write, ``handle`` to share."""

    def __init__(self, handle: Handle, mapping: mmap.mmap, fd: int = -1) -> None:
        self.handle = handle
        self._mmap: mmap.mmap | None = mapping
        self.buf: memoryview | None = memoryview(mapping)
        self._fd = fd  # kept open by a memfd's creator: workers (and restarts) open it by path

    @property
    def name(self) -> str:
        return self.handle.name

    def close(self) -> None:
        """Unmap, or leave the mapping to views the caller still holds (idempotent).

        Views into ``buf`` (``copy=False`` observations) keep the memory alive; it is unmapped
        when the last of them goes.
        """
        buf, self.buf = self.buf, None
        mapping, self._mmap = self._mmap, None
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
        if buf is None or mapping is None:
            return
        try:
            buf.release()
            mapping.close()
        except BufferError:
            pass

    def unlink(self) -> None:
        """Remove the segment's name, if it has one this process created (idempotent)."""

    def allocate_tail(self) -> None:
        """Allocate the tail that :func:`create` left lazy, before it is first written.

        Only a preallocated /dev/shm segment has one; a memfd has no limit to hit.
        """


class _PosixSegment(SharedSegment):
    """The parent's POSIX segment, made through ``SharedMemory`` so the tracker knows it."""

    def __init__(self, shm: shared_memory.SharedMemory, size: int, lazy_tail: int) -> None:
        self.handle = Handle(SHM, shm.name, "/" + shm.name)
        self._shm = shm
        self.buf = shm.buf
        self._size = size
        self._lazy_tail = lazy_tail

    def close(self) -> None:
        self.buf = None
        shm = self._shm
        try:
            shm.close()  # a no-op once closed
        except BufferError:
            # The caller still holds views: they keep the mapping alive and free it when they
            # go, without the SharedMemory object complaining later.
            shm._buf = None  # type: ignore[attr-defined]
            shm._mmap = None  # type: ignore[attr-defined]
            if shm._fd >= 0:  # type: ignore[attr-defined]
                os.close(shm._fd)  # type: ignore[attr-defined]
                shm._fd = -1  # type: ignore[attr-defined]

    def unlink(self) -> None:
        try:
            self._shm.unlink()  # also tells the resource tracker it is gone
        except FileNotFoundError:
            pass

    def allocate_tail(self) -> None:
        tail = self._lazy_tail
        if not tail:
            return
        fd: int = self._shm._fd  # type: ignore[attr-defined]
        if not _preallocate(fd, self._size - tail, tail):
            raise OSError(
                errno.ENOSPC,
                f"{SHM_DIR} filled up since this vector env was made: no room left for the "
                f"last {tail:,} bytes of its segment; free some, or give the container more "
                f"(`docker run --shm-size={_docker_size(self._size)} ...`)",
            )
        self._lazy_tail = 0


class _FileSegment(SharedSegment):
    """A temporary file mapped shared, for systems without memfd; removed by unlink."""

    def unlink(self) -> None:
        try:
            os.unlink(self.handle.path)
        except FileNotFoundError:
            pass


def shm_free_bytes() -> int | None:
    """Bytes still free in /dev/shm, or ``None`` where there is no /dev/shm to fill."""
    try:
        stat = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def memfd_usable() -> bool:
    """A memfd can be made here and opened by another process through /proc."""
    return hasattr(os, "memfd_create") and os.path.isdir(f"/proc/{os.getpid()}/fd")


def create(size: int, lazy_tail: int = 0) -> SharedSegment:
    """A new zeroed segment of ``size`` bytes, in /dev/shm when it fits there.

    When it does not, one warning says what is needed and how to give the container more,
    and the segment is a memfd (or a temporary file). In /dev/shm the last ``lazy_tail``
    bytes (a region that may never be written) are allocated only by
    :meth:`SharedSegment.allocate_tail`.
    """
    free = shm_free_bytes()
    if free is None or size <= free:
        segment = _create_posix(size, lazy_tail)
        if segment is not None:
            return segment
        free = shm_free_bytes() or 0  # filled by someone else since we looked
    if memfd_usable():
        _warn_small_shm(size, free, "an anonymous memory file (memfd)")
        return _create_memfd(size)
    _warn_small_shm(size, free, f"a temporary file in {tempfile.gettempdir()}")
    return _create_file(size)


def attach(handle: Handle) -> SharedSegment:
    """Map the parent's segment in a worker.

    Never through multiprocessing's resource tracker: before Python 3.13 attaching a
    ``SharedMemory`` registers with it, and a forked child can deadlock on the tracker's
    lock if another parent thread held it at fork time.
    """
    if handle.kind == SHM:
        fd = _posixshmem.shm_open(handle.path, os.O_RDWR, mode=0o600)
    else:
        fd = os.open(handle.path, os.O_RDWR | os.O_CLOEXEC)
    try:
        mapping = mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)  # the mapping keeps the memory; a worker needs no descriptor
    return SharedSegment(handle, mapping)


def _new_name() -> str:
    return f"{PREFIX}{secrets.token_hex(12)}"


def _preallocate(fd: int, offset: int, length: int) -> bool:
    """Allocate these pages now, so a later write cannot SIGBUS; False if there is no room."""
    if not hasattr(os, "posix_fallocate"):  # macOS: POSIX shm is not a size-limited tmpfs
        return True
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            return False
        if exc.errno not in _NO_PREALLOCATION:
            raise
    return True


def _create_posix(size: int, lazy_tail: int) -> SharedSegment | None:
    shm = shared_memory.SharedMemory(name=_new_name(), create=True, size=size)
    segment = _PosixSegment(shm, size, lazy_tail)
    try:
        fits = _preallocate(shm._fd, 0, size - lazy_tail)  # type: ignore[attr-defined]
    except BaseException:
        segment.close()
        segment.unlink()
        raise
    if fits:
        return segment
    segment.close()
    segment.unlink()
    return None


def _create_memfd(size: int) -> SharedSegment:
    name = _new_name()
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, size)
        # no preallocation: the kernel's own memfd mount has no size limit to hit later
        mapping = mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return SharedSegment(Handle(MEMFD, name, f"/proc/{os.getpid()}/fd/{fd}"), mapping, fd)


def _create_file(size: int) -> SharedSegment:
    name = _new_name()
    path = os.path.join(tempfile.gettempdir(), name)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        if not _preallocate(fd, 0, size):  # all of it: this rare path stays simple
            raise OSError(errno.ENOSPC, f"no room for a {size}-byte segment", path)
        mapping = mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)  # workers open it by path
    return _FileSegment(Handle(FILE, name, path), mapping)


def _warn_small_shm(size: int, free: int, instead: str) -> None:
    try:
        stat = os.statvfs(SHM_DIR)
        used = (stat.f_blocks - stat.f_bfree) * stat.f_frsize
    except OSError:
        used = 0
    logger.warn(
        f"fastvec: this vector env's shared memory needs {size:,} bytes "
        f"({size / _MIB:.1f} MiB) but {SHM_DIR} has only {free:,} bytes "
        f"({free / _MIB:.1f} MiB) free, so the segment is {instead} instead, which "
        f"{SHM_DIR}'s size does not limit. To keep it in {SHM_DIR}, give it more room: "
        f"`docker run --shm-size={_docker_size(used + size)} ...` (Docker's default is 64m)."
    )


def _docker_size(needed: int) -> str:
    """A ``--shm-size`` with a quarter of headroom over ``needed``, in whole 64 MiB steps."""
    mib = 64 * math.ceil(needed * 1.25 / (64 * _MIB))
    return f"{mib // 1024}g" if mib % 1024 == 0 else f"{mib}m"
