"""Fixtures for the microbenchmarks: layouts bound over fresh segments, always cleaned up."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from multiprocessing import shared_memory

import pytest

from fastvec._kernels import Segment
from fastvec.layout import Layout


@pytest.fixture
def bound_layout() -> Iterator[Callable[..., Layout]]:
    """A factory ``bound_layout(space, n)`` whose layouts and segments are torn down after
    the benchmark, in the order the segment needs (views, layout, pin, mapping, name)."""
    opened: list[tuple[Layout, Segment, shared_memory.SharedMemory]] = []

    def make(space, n: int) -> Layout:
        layout = Layout(space, n)
        shm = shared_memory.SharedMemory(create=True, size=max(layout.nbytes, 1),
                                         name="fastvec_" + secrets.token_hex(8))
        segment = Segment(shm.buf)
        layout.bind(segment, shm.buf)
        opened.append((layout, segment, shm))
        return layout

    yield make
    for layout, segment, shm in opened:
        layout.unbind()
        segment.release()
        try:
            shm.close()
        finally:
            shm.unlink()
