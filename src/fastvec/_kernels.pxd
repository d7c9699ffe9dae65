# cython: language_level=3
from libc.stdint cimport int64_t, int32_t
from cpython.buffer cimport Py_buffer

cdef extern from "Python.h":
    int PyObject_GetBuffer(object obj, Py_buffer *view, int flags) except -1
    void PyBuffer_Release(Py_buffer *view)


cdef enum NodeKind:
    KIND_ARRAY = 0      # Box, MultiDiscrete, MultiBinary: one fixed-shape leaf
    KIND_DISCRETE = 1   # Discrete: one integer scalar leaf (the space's dtype) with a value range
    KIND_TEXT = 2       # Text: int32 character codes, padded
    KIND_TUPLE = 3
    KIND_DICT = 4
    KIND_ONEOF = 5      # int64 index leaf + one child per subspace


cdef struct Item:
    # One pending copy of the write plan: gathered and checked first, copied after.
    char *dst
    Py_ssize_t nbytes
    int has_buffer
    Py_buffer buffer
    int64_t scalar
    int is_scalar
    int32_t *codes      # owned (malloc) for Text items, else NULL
    char *src           # a row inside another item's buffer (write_rows), else NULL


cdef struct ItemList:
    Item *items
    Py_ssize_t count
    Py_ssize_t capacity


cdef class Segment:
    cdef Py_buffer buffer
    cdef bint acquired
    cdef char *base
    cdef readonly Py_ssize_t size


cdef class Node:
    cdef readonly int kind
    cdef readonly Py_ssize_t offset
    cdef readonly Py_ssize_t stride
    cdef readonly object dtype
    cdef readonly tuple shape
    cdef Py_ssize_t *cshape
    cdef readonly int ndim
    cdef bytes format
    cdef readonly list children
    cdef readonly tuple keys
    cdef readonly int64_t low
    cdef readonly int64_t high
    cdef readonly dict charmap
    cdef readonly tuple characters
    cdef readonly int max_length
    cdef readonly int min_length
    cdef public object batch_view

    cdef int gather_row(self, Segment segment, object value, Py_ssize_t env, ItemList *items) except -1
    cdef int gather_batch(self, Segment segment, object value, Py_ssize_t n, const Py_ssize_t *rows, ItemList *items) except -1
    cdef int gather_children(self, Segment segment, object value, Py_ssize_t at, const Py_ssize_t *rows, ItemList *items, bint batch) except -1
    cdef object read_row(self, Py_ssize_t env, bint copy)
    cdef object read_batch(self, bint copy)
    cdef str decode_text(self, Py_ssize_t env)
