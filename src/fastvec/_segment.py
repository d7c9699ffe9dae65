"""The byte plan of a vector env's segment, which the parent and every worker build alike.

From the start: a header (magic, layout version, sizes and a digest of the whole geometry,
checked by a worker before any use), one control line per worker and one for the parent
(the words below), the actions (one row per env and leaf), the step results (rewards,
terminations, truncations), each worker's command queue, the per-env completion marks, the
per-env info rows (``_info_rows.py``), in SAME_STEP mode the envs' final observations
(``_finals.py``) and the observation slots (each a whole batch). Every region is 64-byte
aligned.

A worker's command queue is a ring of :data:`ENTRY` records (command, slot, first, count)
and a ring of env ids, both ``queue_capacity`` long (a power of two at least the
largest group): the parent publishes entry ``seq`` at ``seq % capacity`` and then sets the
worker's ``CMD_SEQ`` to ``seq``. An entry's envs are the ``count`` ids from position ``first``
of the id ring. Each in-flight env belongs to exactly one unfinished entry, so neither ring can
overflow. A synchronous entry covers the whole group and is finished when the parent's
``PENDING`` counter reaches 0; a partial entry (:data:`PARTIAL` in its command word) marks
each env done on its own: the worker sets the env's ``HAS_REPLY`` mark (:data:`REPLY_PIPE`:
an info, an error or a pipe observation is coming in the entry's reply; :data:`REPLY_FINAL`:
its episode ended and its final observation and info are in the segment, see
``_finals.py``), increments its ``DONE`` mark and the parent's ``COMPLETED`` counter, and
wakes the parent if its ``WAITING`` word is set.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.error import CustomSpaceError

from fastvec._info_rows import ROW as INFO_ROW
from fastvec.layout import ALIGNMENT, DynamicShapeError, Layout, Segment, align

MAGIC = 0x3143455654534146  # b"FASTVEC1" little-endian
LAYOUT_VERSION = 8
# magic, layout version, num_envs, num_workers, layout digest, total bytes
HEADER = struct.Struct("<QIIIIQ")

LINE = ALIGNMENT
# Offsets inside one worker's control line.
CMD_SEQ = 0  # the last entry published to the worker's queue (its doorbell)
# 1 while the worker sleeps (or is about to) on CMD_SEQ: the parent wakes only a sleeper, and
# a worker still spinning sees its doorbell change by itself. The worker sets it with an atomic
# add before its last look at CMD_SEQ (the futex's own compare), the parent publishes CMD_SEQ
# and then reads the flag, both sequentially consistent (Doorbells.store_then_load): one of
# the two sees the other's write, so no wake-up is lost.
SLEEPING = 4
# What the worker is doing while it starts (STATUS_*), read by the parent on a start timeout.
STATUS = 8
# What a synchronous entry's envs left besides their rows: REPLY_PIPE (a reply is in the pipe)
# or-ed with REPLY_FINAL (some env's HAS_REPLY mark is REPLY_FINAL; the parent clears those).
INFO_PENDING = 12
# The last cmd_seq the worker finished, stored after it decremented `pending`: lets the parent
# tell which workers are done when a dead worker will never decrement the counter.
DONE_SEQ = 20
# 1 while the worker holds a max_concurrency permit: a replaced worker's permit is given back.
PERMIT = 24
# The env that STATUS_BUILDING or STATUS_RESETTING is about.
STATUS_ENV = 28
# Offsets inside the parent's line: the synchronous commands' pending-worker counter, the
# partial entries' completed-env counter, whether the parent sleeps on it, and whether
# workers may spin while they wait for a command (0 on a contended machine, see _load.py).
PENDING = 0
COMPLETED = 4
WAITING = 8
SPIN = 12
# With more workers than cores every worker sleeps on one shared bell (BROADCAST is 1), which
# the parent rings once for all of them: one wake-up call instead of one per worker, each of
# which would hand the parent's core to the worker it woke before the next could be woken.
BELL = 16
BROADCAST = 20
# The completed-env count at which the sleeping parent wants to be woken: it needs that many
# more completions before a recv can return (each env done adds at least one), so the envs
# that finish before then do not wake it one by one.
TARGET = 24

# One queue entry: command (with PARTIAL or-ed in for a partial entry), observation slot,
# first id position, env count.
ENTRY = 16
E_COMMAND = 0
E_SLOT = 4
E_FIRST = 8
E_COUNT = 12
PARTIAL = 0x100
# One env's completion marks: its done counter, and what comes with its result besides its
# rows (0: nothing; a synchronous entry sets only REPLY_FINAL, which the parent clears).
MARK = 8
DONE = 0
HAS_REPLY = 4
REPLY_PIPE = 1
REPLY_FINAL = 2

# Starting up and attaching the segment (the parent clears the word before a launch).
STATUS_STARTING = 0
STATUS_READY = 1
STATUS_BUILDING = 2
STATUS_RESETTING = 3


class SegmentPlan:
    """Byte offsets of every region of one vector env's segment.

    Both processes build it from the same arguments, so they agree on every offset.
    """

    def __init__(self, num_envs: int, num_workers: int, action_space: spaces.Space[Any],
                 observation_space: spaces.Space[Any] | None, check_obs_range: bool = True,
                 observation_slots: int = 1, final_observations: bool = False) -> None:
        self._args = (num_envs, num_workers, action_space, observation_space, check_obs_range,
                      observation_slots, final_observations)
        self.num_envs = num_envs
        self.num_workers = num_workers
        control = LINE * (2 + num_workers)
        largest = -(-num_envs // num_workers)
        self.queue_capacity = 1 << (largest - 1).bit_length()
        self.queue_bytes = align(self.queue_capacity * (ENTRY + 4))
        # Actions of a space with no layout (Graph, Sequence, an unregistered custom space)
        # travel pickled through the pipes, as in Gymnasium; the segment carries the rest.
        self.actions: Layout | None
        try:
            self.actions = Layout(action_space, num_envs, control, check_range=False,
                                  path="actions")
        except (CustomSpaceError, DynamicShapeError):
            self.actions = None
        cursor = control + (self.actions.nbytes if self.actions is not None else 0)
        self.rewards = cursor
        cursor += align(8 * num_envs)
        self.terminations = cursor
        cursor += align(num_envs)
        self.truncations = cursor
        cursor += align(num_envs)
        # after the step results: placed right after the control lines they shifted the hot
        # regions and slowed the synchronous step by ~4% (CartPole, 32 envs, 2 workers)
        self.queues = cursor
        self.marks = cursor + num_workers * self.queue_bytes
        cursor = self.marks + align(MARK * num_envs)
        # each env's info row: a step's info of a few scalars (see _info_rows.py)
        self.info_rows = cursor
        cursor += INFO_ROW * num_envs
        # SAME_STEP's final observations, one row per env, for a Box space (see _finals.py)
        self.final_observations: Layout | None = None
        if final_observations and isinstance(observation_space, spaces.Box):
            self.final_observations = Layout(observation_space, num_envs, cursor,
                                             check_range=False, path="final_obs")
            cursor += self.final_observations.nbytes
        # One full observation batch per slot; observations travel through the pipe if empty.
        # The slots come last, so the last one (a rarely used scratch slot) ends the segment
        # and its pages can be allocated only once it is needed.
        self.observation_slots: list[Layout] = []
        if observation_space is not None:
            for _ in range(observation_slots):
                layout = Layout(observation_space, num_envs, cursor,
                                check_range=check_obs_range, path="obs")
                self.observation_slots.append(layout)
                cursor += layout.nbytes
        self.nbytes = cursor
        # Every offset, dtype and shape: two plans that place anything differently differ here.
        geometry: list[tuple[Any, ...]] = [(leaf.path, leaf.dtype.str, leaf.shape, leaf.offset)
                    for layout in self._layouts() for leaf in layout.leaves]
        geometry.append((self.queues, self.queue_capacity, self.marks, self.info_rows,
                         self.rewards, self.terminations, self.truncations, self.nbytes))
        self.digest = zlib.crc32(repr(geometry).encode())

    def _layouts(self) -> list[Layout]:
        return [layout for layout in (self.actions, self.final_observations,
                                      *self.observation_slots) if layout is not None]

    def bind(self, segment: Segment, buffer: memoryview) -> None:
        """Build every layout's views over ``buffer``."""
        for layout in self._layouts():
            layout.bind(segment, buffer)

    def unbind(self) -> None:
        """Drop every view into the segment."""
        for layout in self._layouts():
            layout.unbind()

    def __reduce__(self) -> tuple[type[SegmentPlan], tuple[Any, ...]]:
        # compiled nodes do not pickle: a spawned worker rebuilds the same plan from the spaces
        return (SegmentPlan, self._args)

    def worker_line(self, worker: int) -> int:
        return LINE * (1 + worker)

    @property
    def parent_line(self) -> int:
        return LINE * (1 + self.num_workers)

    def entry(self, worker: int, seq: int) -> int:
        """Offset of queue entry ``seq`` of ``worker``."""
        return self.queue(worker) + ENTRY * (seq % self.queue_capacity)

    def queue(self, worker: int) -> int:
        """Offset of ``worker``'s first queue entry (entry ``seq`` is at
        ``queue + ENTRY * (seq % queue_capacity)``)."""
        return self.queues + worker * self.queue_bytes

    def env_id(self, worker: int, position: int) -> int:
        """Offset of the word at ``position`` of ``worker``'s ring of env ids."""
        return (self.queues + worker * self.queue_bytes + ENTRY * self.queue_capacity
                + 4 * (position % self.queue_capacity))

    def mark(self, env: int) -> int:
        """Offset of env ``env``'s completion marks (``+ DONE``, ``+ HAS_REPLY``)."""
        return self.marks + MARK * env

    def write_header(self, buffer: memoryview) -> None:
        HEADER.pack_into(buffer, 0, MAGIC, LAYOUT_VERSION, self.num_envs, self.num_workers,
                         self.digest, self.nbytes)

    def check_header(self, buffer: memoryview) -> None:
        """Refuse a segment that this plan's parent did not lay out (checked before any use)."""
        if len(buffer) < max(HEADER.size, self.nbytes):
            raise RuntimeError(
                f"the shared-memory segment is too small: {len(buffer)} bytes, this vector "
                f"env's layout needs {self.nbytes}"
            )
        magic, version, num_envs, num_workers, digest, nbytes = HEADER.unpack_from(buffer, 0)
        if magic != MAGIC:
            raise RuntimeError(
                f"the shared-memory segment is not a fastvec segment (magic {magic:#x}, "
                f"expected {MAGIC:#x})"
            )
        if version != LAYOUT_VERSION:
            raise RuntimeError(
                f"the shared-memory segment has fastvec layout version {version}, this fastvec "
                f"reads version {LAYOUT_VERSION}: parent and workers must run the same fastvec"
            )
        found = (num_envs, num_workers, digest, nbytes)
        expected = (self.num_envs, self.num_workers, self.digest, self.nbytes)
        if found != expected:
            raise RuntimeError(
                "the shared-memory segment does not match this vector env's layout: "
                f"(num_envs, num_workers, layout digest, bytes) is {found}, expected {expected}"
            )

    def result_arrays(self, buffer: memoryview) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rewards, terminations and truncations over the segment.

        ``np.frombuffer`` holds a buffer export, so the segment cannot be unmapped under them.
        """
        n = self.num_envs
        return (
            np.frombuffer(buffer, np.float64, count=n, offset=self.rewards),
            np.frombuffer(buffer, np.bool_, count=n, offset=self.terminations),
            np.frombuffer(buffer, np.bool_, count=n, offset=self.truncations),
        )
