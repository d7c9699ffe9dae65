# cython: language_level=3
"""Copy observations and actions between Python objects and the shared segment.

These kernels carry no policy. A write either takes the fast path (every leaf is a
C-contiguous buffer of exactly the leaf's dtype and shape, every integer in range) and
copies it, or copies nothing and returns ``False`` so that :mod:`fastvec.layout` can
validate, explain and convert the value in Python. A write checks every leaf before it
copies any, so a value that fails leaves the segment untouched.
"""

cimport cython
from libc.stdint cimport int64_t, int32_t, int16_t, int8_t, INT64_MIN, INT64_MAX
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy, memset, strcmp
from cpython.buffer cimport PyBUF_WRITABLE, PyBUF_C_CONTIGUOUS, PyBUF_FORMAT, PyBUF_SIMPLE
from cpython.dict cimport PyDict_GetItem, PyDict_Size, PyDict_CheckExact
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_CheckExact

cdef extern from "Python.h":
    object PyNumber_Index(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    Py_UCS4 PyUnicode_READ_CHAR(object o, Py_ssize_t index)


cdef class Segment:
    """A writable buffer (the shared-memory segment) pinned for direct writes.

    Call :meth:`release` before closing the ``SharedMemory`` that owns the buffer.
    """

    def __cinit__(self, object buffer):
        self.acquired = False
        self.base = NULL
        self.size = 0
        PyObject_GetBuffer(buffer, &self.buffer, PyBUF_WRITABLE | PyBUF_SIMPLE)
        self.acquired = True
        self.base = <char *> self.buffer.buf
        self.size = self.buffer.len

    def release(self):
        """Drop the pinned buffer; idempotent."""
        if self.acquired:
            self.acquired = False
            self.base = NULL
            self.size = 0
            PyBuffer_Release(&self.buffer)

    @property
    def released(self):
        return not self.acquired

    def __dealloc__(self):
        if self.acquired:
            PyBuffer_Release(&self.buffer)


cdef Item *items_push(ItemList *items, char *dst, Py_ssize_t nbytes) except NULL:
    """A new zeroed item that copies ``nbytes`` to ``dst``."""
    cdef Item *grown
    cdef Item *item
    cdef Py_ssize_t capacity
    if items.count == items.capacity:
        capacity = 16 if items.capacity == 0 else items.capacity * 2
        grown = <Item *> realloc(items.items, capacity * sizeof(Item))
        if grown == NULL:
            raise MemoryError()
        items.items = grown
        items.capacity = capacity
    item = &items.items[items.count]
    memset(item, 0, sizeof(Item))
    items.count += 1
    item.dst = dst
    item.nbytes = nbytes
    return item


cdef void items_free(ItemList *items) noexcept:
    cdef Py_ssize_t i
    for i in range(items.count):
        if items.items[i].has_buffer:
            PyBuffer_Release(&items.items[i].buffer)
        if items.items[i].codes != NULL:
            free(items.items[i].codes)
    free(items.items)
    items.items = NULL
    items.count = 0
    items.capacity = 0


cdef int items_copy(Segment segment, ItemList *items) except -1:
    cdef Py_ssize_t i
    cdef Item *item
    cdef char *end
    if not segment.acquired:
        raise ValueError("the segment was released")
    end = segment.base + segment.size
    for i in range(items.count):
        item = &items.items[i]
        if item.dst < segment.base or item.dst + item.nbytes > end:
            raise ValueError("a leaf lies outside the segment")
    with nogil:
        for i in range(items.count):
            item = &items.items[i]
            if item.is_scalar:
                memcpy(item.dst, &item.scalar, item.nbytes)
            elif item.src != NULL:
                memcpy(item.dst, item.src, item.nbytes)
            elif item.codes != NULL:
                memcpy(item.dst, item.codes, item.nbytes)
            else:
                memcpy(item.dst, item.buffer.buf, item.nbytes)
    return 0


cdef void store_integer(Item *item, int64_t number) noexcept:
    """Store ``number`` in ``item.scalar`` as the leaf's integer width (``item.nbytes``).

    The caller has checked that it fits that width, so the bytes are the leaf dtype's own on
    any byte order (a wider store would keep the wrong half on big-endian machines).
    """
    if item.nbytes == 1:
        (<int8_t *> &item.scalar)[0] = <int8_t> number
    elif item.nbytes == 2:
        (<int16_t *> &item.scalar)[0] = <int16_t> number
    elif item.nbytes == 4:
        (<int32_t *> &item.scalar)[0] = <int32_t> number
    else:
        item.scalar = number


cdef int gather_buffer(object value, Item *item, bytes fmt, Py_ssize_t lead,
                       Py_ssize_t *shape, int ndim, Py_ssize_t nbytes) except -1:
    """Pin ``value``'s buffer into ``item`` if it has exactly the format and shape; 1 or 0."""
    cdef int k, off
    try:
        PyObject_GetBuffer(value, &item.buffer, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT)
    except Exception:
        return 0
    item.has_buffer = 1
    off = 1 if lead >= 0 else 0
    if item.buffer.len != nbytes or item.buffer.ndim != ndim + off:
        return 0
    if item.buffer.format == NULL or strcmp(item.buffer.format, fmt) != 0:
        return 0
    if off and item.buffer.shape[0] != lead:
        return 0
    for k in range(ndim):
        if item.buffer.shape[k + off] != shape[k]:
            return 0
    return 1


cdef class Node:
    """One node of a compiled space: a leaf over the segment or a container of nodes."""

    def __cinit__(self):
        self.cshape = NULL
        self.ndim = 0

    def __init__(self, int kind, Py_ssize_t offset=0, Py_ssize_t stride=0, object dtype=None,
                 tuple shape=(), list children=None, tuple keys=None,
                 object low=None, object high=None, dict charmap=None,
                 tuple characters=None, int max_length=0, int min_length=0):
        cdef int k
        self.kind = kind
        self.offset = offset
        self.stride = stride
        self.dtype = dtype
        self.shape = shape
        self.ndim = len(shape)
        if self.ndim:
            self.cshape = <Py_ssize_t *> malloc(self.ndim * sizeof(Py_ssize_t))
            if self.cshape == NULL:
                raise MemoryError()
            for k in range(self.ndim):
                self.cshape[k] = shape[k]
        self.format = dtype.char.encode() if dtype is not None else b""
        self.children = children if children is not None else []
        self.keys = keys if keys is not None else ()
        self.low = INT64_MIN if low is None else low
        self.high = INT64_MAX if high is None else high
        self.charmap = charmap
        self.characters = characters
        self.max_length = max_length
        self.min_length = min_length
        self.batch_view = None

    def __dealloc__(self):
        if self.cshape != NULL:
            free(self.cshape)

    cdef int gather_row(self, Segment segment, object value, Py_ssize_t env, ItemList *items) except -1:
        cdef Item *item
        cdef Node child
        cdef Py_ssize_t i, length
        cdef PyObject *entry
        cdef int64_t number
        cdef object code
        if self.kind == KIND_ARRAY:
            item = items_push(items, segment.base + self.offset + env * self.stride, self.stride)
            return gather_buffer(value, item, self.format, -1, self.cshape, self.ndim, self.stride)
        if self.kind == KIND_DISCRETE:
            try:
                number = PyNumber_Index(value)
            except (TypeError, OverflowError):
                return 0
            if number < self.low or number > self.high:
                return 0
            item = items_push(items, segment.base + self.offset + env * self.stride, self.stride)
            item.is_scalar = 1
            store_integer(item, number)
            return 1
        if self.kind == KIND_TUPLE or self.kind == KIND_DICT:
            return self.gather_children(segment, value, env, NULL, items, False)
        if self.kind == KIND_TEXT:
            if not PyUnicode_CheckExact(value):
                return 0
            length = PyUnicode_GET_LENGTH(value)
            if length < self.min_length or length > self.max_length:
                return 0
            item = items_push(items, segment.base + self.offset + env * self.stride, self.stride)
            item.codes = <int32_t *> malloc(self.stride)
            if item.codes == NULL:
                raise MemoryError()
            for i in range(self.max_length):
                item.codes[i] = len(self.characters)
            for i in range(length):
                code = self.charmap.get(value[i])
                if code is None:
                    return 0
                item.codes[i] = <int32_t> code
            return 1
        if self.kind == KIND_ONEOF:
            if not isinstance(value, tuple) or len(<tuple> value) != 2:
                return 0
            try:
                number = PyNumber_Index((<tuple> value)[0])
            except (TypeError, OverflowError):
                return 0
            if number < 0 or number >= len(self.children):
                return 0
            item = items_push(items, segment.base + self.offset + env * self.stride, sizeof(int64_t))
            item.is_scalar = 1
            item.scalar = number
            child = <Node> self.children[number]
            return child.gather_row(segment, (<tuple> value)[1], env, items)
        return 0

    cdef int gather_batch(self, Segment segment, object value, Py_ssize_t n,
                          const Py_ssize_t *rows, ItemList *items) except -1:
        """A batch of ``n`` envs: rows ``0 .. n-1``, or with ``rows`` row ``k`` of the value
        into env ``rows[k]``'s row."""
        cdef Item *item
        cdef char *src
        cdef Py_ssize_t i
        if self.kind == KIND_ARRAY or self.kind == KIND_DISCRETE:
            # contiguous: one copy; else this item only pins the buffer, one item per row
            item = items_push(items, segment.base + self.offset,
                              n * self.stride if rows == NULL else 0)
            if not gather_buffer(value, item, self.format, n, self.cshape, self.ndim,
                                 n * self.stride):
                return 0
            if rows != NULL:
                src = <char *> item.buffer.buf  # read before a push may move the items
                for i in range(n):
                    item = items_push(items, segment.base + self.offset + rows[i] * self.stride,
                                      self.stride)
                    item.src = src + i * self.stride
            return 1
        if self.kind == KIND_TUPLE or self.kind == KIND_DICT:
            return self.gather_children(segment, value, n, rows, items, True)
        # Text and OneOf batch as a tuple of per-env samples, as gymnasium's batch_space does.
        if not isinstance(value, tuple) or len(<tuple> value) != n:
            return 0
        for i in range(n):
            if not self.gather_row(segment, (<tuple> value)[i], i if rows == NULL else rows[i],
                                   items):
                return 0
        return 1

    cdef int gather_children(self, Segment segment, object value, Py_ssize_t at,
                             const Py_ssize_t *rows, ItemList *items, bint batch) except -1:
        """A Tuple or Dict node: gather each child's part, as a row of env ``at`` or as a
        batch of ``at`` envs; 0 if ``value`` is not exactly a tuple or dict of its children."""
        cdef Node child
        cdef Py_ssize_t i
        cdef PyObject *entry
        cdef object part
        cdef int ok
        if self.kind == KIND_TUPLE:
            if not isinstance(value, tuple) or len(<tuple> value) != len(self.children):
                return 0
        elif not PyDict_CheckExact(value) or PyDict_Size(value) != len(self.keys):
            return 0
        for i in range(len(self.children)):
            if self.kind == KIND_TUPLE:
                part = (<tuple> value)[i]
            else:
                entry = PyDict_GetItem(value, self.keys[i])
                if entry == NULL:
                    return 0
                part = <object> entry
            child = <Node> self.children[i]
            ok = (child.gather_batch(segment, part, at, rows, items) if batch
                  else child.gather_row(segment, part, at, items))
            if not ok:
                return 0
        return 1

    cdef object read_row(self, Py_ssize_t env, bint copy):
        cdef Node child
        cdef Py_ssize_t i
        cdef object index
        if self.kind == KIND_ARRAY:
            return self.batch_view[env].copy() if copy else self.batch_view[env]
        if self.kind == KIND_DISCRETE:
            return self.batch_view[env]
        if self.kind == KIND_TUPLE:
            return tuple([(<Node> child).read_row(env, copy) for child in self.children])
        if self.kind == KIND_DICT:
            return {self.keys[i]: (<Node> self.children[i]).read_row(env, copy)
                    for i in range(len(self.keys))}
        if self.kind == KIND_TEXT:
            return self.decode_text(env)
        if self.kind == KIND_ONEOF:
            index = self.batch_view[env]
            child = <Node> self.children[index]
            return (index, child.read_row(env, copy))
        raise ValueError(f"unknown node kind {self.kind}")

    @cython.boundscheck(False)
    @cython.wraparound(False)
    cdef str decode_text(self, Py_ssize_t env):
        cdef const int32_t[:, ::1] codes = self.batch_view
        cdef Py_ssize_t i
        cdef int32_t code
        cdef Py_ssize_t pad = len(self.characters)
        cdef list chars = []
        for i in range(codes.shape[1]):
            code = codes[env, i]
            if 0 <= code < pad:
                chars.append(self.characters[code])
        return "".join(chars)

    cdef object read_batch(self, bint copy):
        cdef Py_ssize_t i, n
        if self.kind == KIND_ARRAY or self.kind == KIND_DISCRETE:
            return self.batch_view.copy() if copy else self.batch_view
        if self.kind == KIND_TUPLE:
            return tuple([(<Node> child).read_batch(copy) for child in self.children])
        if self.kind == KIND_DICT:
            return {self.keys[i]: (<Node> self.children[i]).read_batch(copy)
                    for i in range(len(self.keys))}
        n = self.batch_view.shape[0]
        return tuple([self.read_row(i, copy) for i in range(n)])


cdef bint write(Segment segment, Node node, object value, Py_ssize_t at, bint batch,
                const Py_ssize_t *rows=NULL) except -1:
    """Gather every leaf of ``value`` (a row of env ``at``, or a batch of ``at`` envs into
    rows ``0 .. at-1`` or ``rows``), then copy them all; ``False`` with nothing written if
    any needs converting."""
    cdef ItemList items
    cdef int ok
    items.items = NULL
    items.count = 0
    items.capacity = 0
    try:
        ok = (node.gather_batch(segment, value, at, rows, &items) if batch
              else node.gather_row(segment, value, at, &items))
        if ok:
            items_copy(segment, &items)
        return ok == 1
    finally:
        items_free(&items)


def write_row(Segment segment, Node node, object value, Py_ssize_t env):
    """Copy one env's sample into its row; ``False`` (nothing written) if it needs converting."""
    return write(segment, node, value, env, False)


def write_rows(Segment segment, Node node, object value, list env_ids):
    """Copy a batch of ``len(env_ids)`` samples, row ``k`` into env ``env_ids[k]``'s row (ids
    the caller checked: in range, no repeats); ``False`` (nothing written) if it needs
    converting."""
    cdef Py_ssize_t n = len(env_ids), k
    cdef Py_ssize_t *rows = <Py_ssize_t *> malloc(max(n, 1) * sizeof(Py_ssize_t))
    if rows == NULL:
        raise MemoryError()
    try:
        for k in range(n):
            rows[k] = env_ids[k]
        return write(segment, node, value, n, True, rows)
    finally:
        free(rows)


def write_batch(Segment segment, Node node, object value, Py_ssize_t n):
    """Copy a whole batch (leading dimension ``n``); ``False`` (nothing written) if it needs converting."""
    return write(segment, node, value, n, True)


def read_row(Node node, Py_ssize_t env, bint copy=True):
    """One env's sample (copied unless ``copy`` is false)."""
    return node.read_row(env, copy)


def read_batch(Node node, bint copy=True):
    """The whole batch: fresh arrays if ``copy``, else views over the segment."""
    return node.read_batch(copy)


KIND = {
    "array": KIND_ARRAY,
    "discrete": KIND_DISCRETE,
    "text": KIND_TEXT,
    "tuple": KIND_TUPLE,
    "dict": KIND_DICT,
    "oneof": KIND_ONEOF,
}
