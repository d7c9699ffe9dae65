# cython: language_level=3
"""C-level declarations for fastvec._sync (cross-process doorbells)."""

from libc.stdint cimport uint32_t, int32_t, int64_t
from cpython.buffer cimport Py_buffer


cdef extern from "fv_sync.h" nogil:
    enum: FV_HAVE_FUTEX
    uint32_t fv_load_acquire(const uint32_t *w)
    void fv_store_release(uint32_t *w, uint32_t v)
    uint32_t fv_add_fetch(uint32_t *w, int32_t delta)
    uint32_t fv_load_seq_cst(const uint32_t *w)
    uint32_t fv_store_then_load(uint32_t *w, uint32_t v, const uint32_t *other)
    int fv_wait_while_equal(uint32_t *w, uint32_t expected,
                            int64_t timeout_ns, int64_t spin_ns, int yield_cpu)
    int fv_wake(uint32_t *w, int n)
    int64_t fv_monotonic_ns()
    int fv_kill_group_on_parent_death(int signum)
    int fv_unlink_on_parent_death(const char *path)


cdef class Doorbells:
    cdef Py_buffer _view
    cdef bint _acquired        # _view holds a buffer that must be released
    cdef char *_base           # NULL once released
    cdef Py_ssize_t _nbytes    # buffer length in bytes (0 once released)
    cdef Py_ssize_t _span      # _nbytes rounded down to 4 (0 once released)
    cdef Py_ssize_t _waiters   # waits in progress with the GIL released

    cdef uint32_t *_word(self, Py_ssize_t offset) except NULL
    cpdef uint32_t load(self, Py_ssize_t offset) except? 0xFFFFFFFF
    cpdef void store(self, Py_ssize_t offset, uint32_t value) except *
    cpdef uint32_t add(self, Py_ssize_t offset, int32_t delta) except? 0xFFFFFFFF
    cpdef uint32_t store_then_load(self, Py_ssize_t offset, uint32_t value,
                                   Py_ssize_t other) except? 0xFFFFFFFF
    cpdef int wake(self, Py_ssize_t offset, int count=*) except -1
    cpdef uint32_t count_and_wake(self, Py_ssize_t counter, Py_ssize_t waiting,
                                  Py_ssize_t target) except? 0xFFFFFFFF
    cpdef int wait_while_equal(self, Py_ssize_t offset, uint32_t expected,
                               double timeout=*, double spin=*,
                               bint yield_cpu=*) except -1
    cpdef void release(self) except *
