"""Exceptions raised by fastvec beyond Gymnasium's own."""

from __future__ import annotations

from gymnasium.error import AlreadyPendingCallError, ClosedEnvironmentError, NoAsyncCallError

__all__ = [
    "AlreadyPendingCallError",
    "ClosedEnvironmentError",
    "NoAsyncCallError",
    "RemoteTraceback",
    "WorkerDiedError",
]


class RemoteTraceback(Exception):
    """The traceback text of an exception raised in a worker, chained as ``__cause__``."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f"\n\nRemote traceback (from the worker process):\n{self.text}"


class WorkerDiedError(RuntimeError):
    """A worker process ended while the vector env needed it.

    Attributes
    ----------
    worker : int
        The worker's index.
    env_indices : tuple[int, ...]
        The sub-environments the worker ran.
    pid : int | None
        The worker's process id.
    exitcode : int | None
        Its exit code; negative for a signal, as ``multiprocessing`` reports it.
    """

    def __init__(self, message: str, worker: int = -1, env_indices: tuple[int, ...] = (),
                 pid: int | None = None, exitcode: int | None = None) -> None:
        super().__init__(message)
        self.worker = worker
        self.env_indices = env_indices
        self.pid = pid
        self.exitcode = exitcode
