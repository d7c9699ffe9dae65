# cython: language_level=3
# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Cross-process doorbells: 32-bit words in shared memory that processes can
load, store, add to, sleep on (futex) and wake; and a process's end with its
parent (:func:`kill_group_on_parent_death`).

These kernels carry no policy: they do not know which word means what, who
waits on whom, or what a timeout should mean to the caller.  Offsets are byte
offsets into the wrapped buffer and must be 4-byte aligned.
"""

cimport cython
from cpython.buffer cimport (PyObject_GetBuffer, PyBuffer_Release,
                             PyBUF_WRITABLE, PyBUF_C_CONTIGUOUS)
from cpython.exc cimport PyErr_CheckSignals, PyErr_SetFromErrno
from libc.stdint cimport uint32_t, int32_t, int64_t, uintptr_t, INT32_MAX

HAVE_FUTEX = bool(FV_HAVE_FUTEX)
"""True when waits sleep in the kernel (Linux futex); False means polling."""

# Largest timeout (s) converted to a finite deadline; anything above waits forever.
cdef double _MAX_SECONDS = 9.0e9


cdef inline int64_t _seconds_to_ns(double seconds) noexcept nogil:
    """Seconds -> ns; negative -> -1 (forever); huge -> -1; NaN handled by caller."""
    if seconds < 0.0 or seconds > _MAX_SECONDS:
        return -1
    return <int64_t>(seconds * 1e9)


@cython.final
@cython.auto_pickle(False)
cdef class Doorbells:
    """Atomic 32-bit doorbell words over a writable, C-contiguous buffer.

    ``Doorbells(shm.buf)`` holds a buffer export until :meth:`release` is
    called (or the object is collected); ``SharedMemory.close()`` fails while
    the export is held.
    """

    def __cinit__(self, buffer):
        # Sentinels first: __dealloc__ must be safe if anything below fails.
        self._acquired = False
        self._base = NULL
        self._nbytes = 0
        self._span = 0
        self._waiters = 0
        PyObject_GetBuffer(buffer, &self._view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS)
        self._acquired = True
        if (<uintptr_t>self._view.buf) & 3u:
            PyBuffer_Release(&self._view)
            self._acquired = False
            raise ValueError("Doorbells buffer must be 4-byte aligned")
        self._base = <char *>self._view.buf
        self._nbytes = self._view.len
        self._span = self._nbytes & ~(<Py_ssize_t>3)

    def __dealloc__(self):
        if self._acquired:
            self._acquired = False
            PyBuffer_Release(&self._view)

    cdef uint32_t *_word(self, Py_ssize_t offset) except NULL:
        # For an aligned offset, one unsigned compare against the rounded-down
        # size rejects negative, too-large and (after release, _span == 0)
        # every offset.
        if (offset & 3) or (<size_t>offset >= <size_t>self._span):
            if self._base == NULL:
                raise ValueError("Doorbells has been released")
            if offset & 3:
                raise ValueError(f"offset {offset} is not 4-byte aligned")
            raise ValueError(
                f"offset {offset} out of range for a {self._nbytes}-byte buffer")
        return <uint32_t *>(self._base + offset)

    @property
    def nbytes(self):
        """Size of the wrapped buffer in bytes (0 after release)."""
        return self._nbytes

    @property
    def released(self):
        """True once :meth:`release` has been called."""
        return self._base == NULL

    cpdef uint32_t load(self, Py_ssize_t offset) except? 0xFFFFFFFF:
        """Atomically read the word at byte ``offset`` (acquire)."""
        return fv_load_acquire(self._word(offset))

    cpdef void store(self, Py_ssize_t offset, uint32_t value) except *:
        """Atomically write ``value`` at byte ``offset`` (release). Does not wake."""
        fv_store_release(self._word(offset), value)

    cpdef uint32_t add(self, Py_ssize_t offset, int32_t delta) except? 0xFFFFFFFF:
        """Atomically add ``delta`` (mod 2**32, sequentially consistent); return the new
        value."""
        return fv_add_fetch(self._word(offset), delta)

    cpdef uint32_t store_then_load(self, Py_ssize_t offset, uint32_t value,
                                   Py_ssize_t other) except? 0xFFFFFFFF:
        """Write ``value`` at ``offset``, then read the word at ``other``, both sequentially
        consistent: the publishing half of a handshake in which the other side writes
        ``other`` with :meth:`add` and then reads ``offset`` (one of the two sees the other's
        write, which acquire and release alone do not promise). Does not wake."""
        cdef uint32_t *w = self._word(offset)
        return fv_store_then_load(w, value, self._word(other))

    cpdef int wake(self, Py_ssize_t offset, int count=INT32_MAX) except -1:
        """Wake up to ``count`` waiters on the word (default: all).

        Returns the number woken (always 0 without futex support).
        """
        cdef uint32_t *w = self._word(offset)
        cdef int n
        if count < 0:
            raise ValueError("count must be >= 0")
        n = fv_wake(w, count)
        if n < 0:
            PyErr_SetFromErrno(OSError)
            return -1
        return n

    cpdef uint32_t count_and_wake(self, Py_ssize_t counter, Py_ssize_t waiting,
                                  Py_ssize_t target) except? 0xFFFFFFFF:
        """Add 1 to the word at ``counter`` and wake its waiters if the word at ``waiting``
        is set and the count has reached the word at ``target`` (mod 2**32, which holds while
        count and target are within 2**31 of each other); return the new count."""
        cdef uint32_t *w = self._word(counter)
        cdef uint32_t *flag = self._word(waiting)
        cdef uint32_t *goal = self._word(target)
        cdef uint32_t count = fv_add_fetch(w, 1)
        # sequentially consistent: the parent sets the flag, then reads the count (a
        # handshake; see store_then_load)
        if fv_load_seq_cst(flag) and ((count - fv_load_seq_cst(goal)) & 0x80000000u) == 0:
            if fv_wake(w, INT32_MAX) < 0:
                PyErr_SetFromErrno(OSError)
        return count

    cpdef int wait_while_equal(self, Py_ssize_t offset, uint32_t expected,
                               double timeout=-1.0, double spin=20e-6,
                               bint yield_cpu=False) except -1:
        """Block while the word equals ``expected``; the GIL is released.

        ``timeout`` in seconds (< 0: forever), ``spin`` seconds of busy-wait
        before sleeping; with ``yield_cpu`` the busy-wait calls sched_yield()
        between checks, handing the core to any runnable process.
        Returns 1 if the word changed, 0 on timeout.
        Signals are handled while waiting (e.g. KeyboardInterrupt propagates).
        """
        cdef uint32_t *w = self._word(offset)
        cdef int64_t timeout_ns, spin_ns, deadline = -1
        cdef int rc
        if fv_load_acquire(w) != expected:
            return 1
        if timeout != timeout or spin != spin:
            raise ValueError("timeout and spin must not be NaN")
        timeout_ns = _seconds_to_ns(timeout)
        spin_ns = _seconds_to_ns(spin) if spin > 0.0 else 0
        if spin_ns < 0:
            spin_ns = 0
        if timeout_ns == 0:
            return 0
        if timeout_ns > 0:
            deadline = fv_monotonic_ns() + timeout_ns
        # While the GIL is released another thread must not unmap the buffer.
        self._waiters += 1
        try:
            while True:
                with nogil:
                    rc = fv_wait_while_equal(w, expected, timeout_ns, spin_ns, yield_cpu)
                if rc != -1:
                    return rc
                # EINTR: run Python signal handlers (may raise), then resume.
                PyErr_CheckSignals()
                spin_ns = 0
                if deadline >= 0:
                    timeout_ns = deadline - fv_monotonic_ns()
                    if timeout_ns <= 0:
                        return 1 if fv_load_acquire(w) != expected else 0
        finally:
            self._waiters -= 1

    cpdef void release(self) except *:
        """Release the buffer export (idempotent). Later calls raise ValueError."""
        if self._waiters:
            raise BufferError("cannot release Doorbells while a wait is in progress")
        self._base = NULL
        self._nbytes = 0
        self._span = 0
        if self._acquired:
            self._acquired = False
            PyBuffer_Release(&self._view)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.release()
        return False

    def __repr__(self):
        if self._base == NULL:
            return "<fastvec._sync.Doorbells (released)>"
        return f"<fastvec._sync.Doorbells nbytes={self._nbytes}>"


def kill_group_on_parent_death(int signum):
    """Have the kernel kill this process's group (or, if it leads none, this process)
    with SIGKILL when the parent process ends; ``signum`` carries the news.

    The handler is plain C, so it acts even while Python code is stuck in a C call. It
    ignores the signal when only the parent *thread* that forked this process ended.
    Raises OSError (ENOSYS where the kernel offers no parent-death signal).
    """
    if fv_kill_group_on_parent_death(signum) != 0:
        PyErr_SetFromErrno(OSError)


def unlink_on_parent_death(str path):
    """Have the parent-death handler (:func:`kill_group_on_parent_death`) unlink ``path``
    before it kills the group: a segment whose creator was killed is then not left behind.
    Raises OSError (ENOSYS where there is no parent-death signal)."""
    cdef bytes encoded = path.encode()
    if fv_unlink_on_parent_death(encoded) != 0:
        PyErr_SetFromErrno(OSError)
