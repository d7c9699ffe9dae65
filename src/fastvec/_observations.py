"""The observation batches a synchronous reset or step hands to the caller.

With shared memory, a reset or step writes its observations into one of the segment's
observation slots (whole batch buffers, :class:`fastvec._segment.SegmentPlan`).
:class:`ObservationSlots` picks the slot each call writes. With ``copy=True`` the arrays
of a slot go to the caller as they are, so a slot is reused only once nothing refers to it.
It then reads the batch back. Without shared memory the envs' observations come by pipe, one
per env, and are concatenated into one batch the Gymnasium way.
"""

from __future__ import annotations

from collections.abc import Callable
from copy import deepcopy
from typing import Any

import numpy as np
from gymnasium import Space
from gymnasium.vector.utils import concatenate, create_empty_array

from fastvec._segment import SegmentPlan

__all__ = ["RECYCLED_SLOTS", "ObservationSlots"]

# Observation slots handed out with copy=True before falling back to copying (plus one scratch).
RECYCLED_SLOTS = 2


def slots_needed(copy: bool) -> int:
    """How many observation slots the segment holds: the recycled ones and the scratch slot
    with ``copy=True``, else one that every call overwrites."""
    return RECYCLED_SLOTS + 1 if copy else 1


def scratch_bytes(plan: SegmentPlan) -> int:
    """The bytes of copy=True's scratch slot, which ends the segment and is allocated only
    when a step first needs it (0 without one)."""
    slots = plan.observation_slots
    return plan.nbytes - slots[RECYCLED_SLOTS].offset if len(slots) > 1 else 0


class ObservationSlots:
    """Which slot a reset or step writes, and the observations read from it afterwards.

    ``allocate_scratch`` maps the scratch slot's pages. The pool calls it the first time
    the caller holds every recycled slot.
    """

    def __init__(self, plan: SegmentPlan, space: Space[Any], num_envs: int, copy: bool,
                 allocate_scratch: Callable[[], None]) -> None:
        self._slots = plan.observation_slots
        self._space = space
        self._allocate_scratch = allocate_scratch
        self.current = 0  # the slot the last synchronous reset/step wrote
        self._copy_out = not copy  # whether reading that slot must copy (for copy=True)
        # without shared memory: the batch Gymnasium's AsyncVectorEnv keeps, and each env's
        # last observation that came by pipe
        self.batch: Any = None
        self._pipe_obs: list[Any] = []
        if not self._slots:
            self.batch = create_empty_array(space, n=num_envs, fn=np.zeros)
            self._pipe_obs = [None] * num_envs

    def choose(self) -> int:
        """The slot the next call writes. If the caller holds every recycled slot (copy=True),
        that is the scratch slot, and reading it copies."""
        if len(self._slots) <= 1:
            return 0
        for slot in range(RECYCLED_SLOTS):
            if not self._slots[slot].in_use():
                self._copy_out = False
                return slot
        self._allocate_scratch()
        self._copy_out = True
        return RECYCLED_SLOTS

    def begin(self) -> int:
        """Choose the slot of a synchronous reset or step, which :meth:`read` then reads."""
        self.current = self.choose()
        return self.current

    def store_pipe(self, pipe_obs: list[tuple[int, Any]]) -> None:
        """Keep the observations that came by pipe, as ``(env id, observation)`` pairs."""
        for i, obs in pipe_obs:
            self._pipe_obs[i] = obs

    def read(self, copy: bool) -> Any:
        """The observations of the last synchronous reset or step, as the caller gets them:
        with ``copy`` (the vector env's ``copy`` now, which the caller may have changed
        since construction) they never change afterwards."""
        if self._slots:
            return self._slots[self.current].read_batch(copy=self._copy_out and copy)
        if all(obs is not None for obs in self._pipe_obs):
            self.batch = concatenate(self._space, self._pipe_obs, self.batch)
        return deepcopy(self.batch) if copy else self.batch
