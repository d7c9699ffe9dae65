"""The parent's own group: one group of envs that the calling process steps itself.

With ``AsyncVectorEnv(parent_group=True)`` the last group of envs is not given to a worker
process: the parent builds those envs and, whenever it would otherwise wait for the workers,
serves that group's entries of the command queue in-process, with the same
:class:`~fastvec.worker.Worker` code the worker processes run. On a machine whose cores are
shared with other work this saves one process that must be scheduled for every step, and
the hand-off to it; the price is isolation (an env that crashes the interpreter takes the
caller with it, and an env that hangs cannot be interrupted).

Everything still goes through the segment and the queue exactly as for a worker process:
the group's results land in the same rows, its replies are pickled the same way (so an
info the env keeps mutating is a snapshot, as from a worker), and its errors are rebuilt
the same way. Only the pipe is replaced, by :func:`local_pipes`.
"""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.reduction import ForkingPickler
from multiprocessing.synchronize import Semaphore
from typing import Any

from gymnasium import Env
from gymnasium.vector import AutoresetMode

from fastvec import _messages as M
from fastvec import _segment as S
from fastvec._worker_main import build_envs
from fastvec.worker import Worker

__all__ = ["LocalGroup", "LocalPipe", "local_pipes"]


class LocalPipe:
    """One end of an in-process pipe: what one end sends, the other end receives, in order.

    It has the part of :class:`multiprocessing.connection.Connection`'s interface that the
    worker and the pool use. Nothing blocks: both ends live on the parent's thread, which
    only reads what has been sent (:meth:`recv` on an empty pipe is a bug and raises
    ``EOFError``, as a closed pipe does).
    """

    def __init__(self, inbox: deque[bytes], outbox: deque[bytes]) -> None:
        self._inbox = inbox
        self._outbox = outbox
        self.closed = False

    def send_bytes(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            raise OSError("the pipe is closed")
        self._outbox.append(bytes(data))

    def send(self, obj: Any) -> None:
        self.send_bytes(ForkingPickler.dumps(obj))

    def recv(self) -> Any:
        if not self._inbox:
            raise EOFError("nothing was sent")
        return ForkingPickler.loads(self._inbox.popleft())

    def poll(self, timeout: float | None = 0.0) -> bool:
        return bool(self._inbox)

    def close(self) -> None:
        self.closed = True
        self._inbox.clear()


def local_pipes() -> tuple[LocalPipe, LocalPipe]:
    """Two connected ends (the parent's, the worker's), like ``multiprocessing.Pipe()``."""
    to_parent: deque[bytes] = deque()
    to_worker: deque[bytes] = deque()
    return LocalPipe(to_parent, to_worker), LocalPipe(to_worker, to_parent)


class LocalGroup:
    """The group of envs the parent steps: a :class:`Worker` over the parent's own mapping
    of the segment, served when the parent calls :meth:`serve`.

    ``index`` is the group's worker line (the last one); ``buffer`` the segment the pool
    mapped. The worker gets a plan of its own (bound to the same buffer), so that releasing
    it never unbinds the pool's.
    """

    def __init__(self, index: int, start: int, plan: S.SegmentPlan, buffer: memoryview,
                 autoreset_mode: AutoresetMode, semaphore: Semaphore | None) -> None:
        self.pipe, theirs = local_pipes()
        self.worker: Worker | None = Worker(index, start, theirs, copy.copy(plan), buffer,
                                            autoreset_mode, semaphore)
        self.index = index
        # the last queue entry served (the worker's CMD_SEQ when it was built)
        self.served = 0

    def build(self, env_fns: Sequence[Callable[[], Env[Any, Any]]]) -> M.InitError | None:
        """Build the group's envs; an env function that raises is returned as the
        :class:`InitError` a worker process would send (the envs built so far are closed)."""
        worker = self.worker
        assert worker is not None
        seq = build_envs(worker, list(env_fns), None)
        message = self.pipe.recv()  # Ready, or the InitError
        if seq is None or isinstance(message, M.InitError):
            worker.close_envs()
            return message if isinstance(message, M.InitError) else None
        self.served = seq
        return None

    def serve(self, published: int) -> bool:
        """Serve every queue entry up to ``published`` (the pool's last for this group);
        return whether there was any."""
        worker = self.worker
        if worker is None or self.served == published:
            return False
        while self.served != published:
            self.served = seq = (self.served + 1) & 0xFFFFFFFF
            if worker.serve(seq):  # close: the envs are closed, the pipe holds the reply
                break
        return True

    def release(self) -> None:
        """Close the envs (if ``close`` did not) and drop every view into the segment."""
        worker, self.worker = self.worker, None
        if worker is None:
            return
        if worker.envs:
            worker.close_envs()  # their errors have nobody to go to (garbage collection)
        worker.detach()
