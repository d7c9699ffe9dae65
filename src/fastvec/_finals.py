"""SAME_STEP's episode ends in the segment: the final observation and info without the pipe.

In SAME_STEP mode a step that ends an episode resets the env at once, and its info carries
the episode's last observation and info: ``{"final_info": ..., "final_obs": ...}`` plus the
reset's info. Pickled through the pipe, that is one message per episode end, which for a
cheap env costs more than its step (8 CartPole envs: 214 µs a batch against
``SyncVectorEnv``'s 130). Instead, for a Box observation space the segment holds one more
observation per env, its *final row* (``SegmentPlan.final_observations``), and:

- the worker writes the final observation into the env's final row and the final info, if
  any, into the env's info row (``_info_rows.py``), and sets the env's ``HAS_REPLY`` mark to
  ``REPLY_FINAL`` instead of sending a reply; a synchronous entry also or-s ``REPLY_FINAL``
  into its worker's ``INFO_PENDING`` word, so that the parent reads the marks of that group
  only, and clears them;
- the parent rebuilds the same info: ``{"final_info": <the info row's info, or {}>,
  "final_obs": <a copy of the final row>}``.

It does so only when the rebuilt info is what the pipe would have carried: the final
observation is an array of exactly the space's dtype and shape, the final info is a dict
that is empty or fits the env's info row, and the reset's info is an empty dict. Anything
else goes by pipe, as before.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fastvec._info_rows import InfoRows
from fastvec.layout import Layout

__all__ = ["FinalRows"]


class FinalRows:
    """One side's access to the envs' final rows (``layout``; None: there are none) and, for
    their final infos, to the info rows."""

    def __init__(self, layout: Layout | None, rows: InfoRows) -> None:
        self.layout = layout
        self.rows = rows
        self.enabled = layout is not None
        self._dtype: np.dtype[Any] | None = None
        self._shape: tuple[int, ...] = ()
        if layout is not None:
            self._dtype = layout.leaves[0].dtype
            self._shape = layout.leaves[0].shape

    # -- a worker --------------------------------------------------------------------------
    def put(self, env: int, final_obs: Any, final_info: Any, reset_info: Any) -> bool:
        """Write env ``env``'s episode end into its rows, if the parent can rebuild its info
        exactly from them (True: nothing goes by pipe), else write nothing (False)."""
        layout = self.layout
        if (layout is None or type(reset_info) is not dict or reset_info
                or type(final_info) is not dict or type(final_obs) is not np.ndarray
                or final_obs.dtype != self._dtype or final_obs.shape != self._shape):
            return False
        rows = self.rows
        if final_info:
            if not rows.learned or not rows.write(env, final_info):
                return False
        elif rows.learned:
            rows.clear(env)
        layout.write_row(final_obs, env)
        return True

    # -- the parent ------------------------------------------------------------------------
    def info(self, env: int) -> dict[str, Any]:
        """The info of env ``env``'s step that ended its episode, from its rows."""
        assert self.layout is not None, "an env's episode end is in the segment without rows"
        final_info = self.rows.read(env)
        # an array, as the env returned it (a row of shape () reads as a NumPy scalar)
        final_obs = np.asarray(self.layout.read_row(env, copy=True))
        return {"final_info": {} if final_info is None else final_info, "final_obs": final_obs}
