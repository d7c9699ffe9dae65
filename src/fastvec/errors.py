"""Exceptions raised by fastvec beyond Gymnasium's own."""

from __future__ import annotations

from concurrent.futures.process import BrokenProcessPool

from gymnasium.error import AlreadyPendingCallError, ClosedEnvironmentError, NoAsyncCallError

__all__ = [
    "AlreadyPendingCallError",
    "AutotuneError",
    "ClosedEnvironmentError",
    "InvalidActionsError",
    "NoAsyncCallError",
    "OversubscribedWarning",
    "RemoteTraceback",
    "TrainerThreadsWarning",
    "WorkerDiedError",
    "WorkerStartTimeoutError",
]


class RemoteTraceback(Exception):
    """The traceback text of an exception raised in a worker, chained as ``__cause__``."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f"\n\nRemote traceback (from the worker process):\n{self.text}"


class AutotuneError(RuntimeError):
    """An env raised while :func:`fastvec.autotune` built or timed a vector env: the message
    names the setting, the env's exception is the ``__cause__``. Every vector env the search
    built is closed when it is raised."""


class OversubscribedWarning(RuntimeWarning):
    """More worker processes than usable cores: every step then waits for workers to be
    scheduled in turn, and fewer workers (the default, one per usable core) step faster."""


class TrainerThreadsWarning(OversubscribedWarning):
    """PyTorch's intra-op threads in the process that builds the vector env, with its worker
    processes, are more than the usable cores: they take turns on the cores, which slows
    both the envs and the policy; ``torch.set_num_threads`` (what the message says) cures it."""


class _AboutAWorker:
    """The facts a worker's error carries.

    Attributes
    ----------
    worker : int
        The worker's index.
    env_indices : tuple[int, ...]
        The sub-environments the worker runs.
    pid : int | None
        The worker's process id.
    """

    worker: int
    env_indices: tuple[int, ...]
    pid: int | None

    def _about(self, worker: int, env_indices: tuple[int, ...], pid: int | None) -> None:
        self.worker, self.env_indices, self.pid = worker, env_indices, pid


class WorkerDiedError(_AboutAWorker, BrokenProcessPool, EOFError, BrokenPipeError):
    """A worker process ended while the vector env needed it.

    Raised by the call that was waiting on the worker, or by the next call if the worker died
    in between. It is a :class:`concurrent.futures.process.BrokenProcessPool` (so a
    ``RuntimeError`` and a ``concurrent.futures.BrokenExecutor``), and also an ``EOFError`` and
    a ``BrokenPipeError``: what ``gymnasium.vector.AsyncVectorEnv`` raises when a worker dies
    during a call and before one, so handlers written for Gymnasium catch it too.

    Attributes
    ----------
    worker, env_indices, pid
        Which worker, which envs, which process (see ``_AboutAWorker``).
    exitcode : int | None
        Its exit code; negative for a signal, as ``multiprocessing`` reports it (``None`` if
        the worker could not be reaped, which should not happen).
    restarted : bool
        ``True`` when ``restart_workers=True`` replaced the worker: the vector env is still
        usable. ``False``: the vector env is broken; close it.
    """

    def __init__(self, message: str, worker: int = -1, env_indices: tuple[int, ...] = (),
                 pid: int | None = None, exitcode: int | None = None,
                 restarted: bool = False) -> None:
        super().__init__(message)
        self._about(worker, env_indices, pid)
        self.exitcode = exitcode
        self.restarted = restarted


class InvalidActionsError(ValueError):
    """An action batch that does not fit the batched action space, refused before any
    worker sees it (the vector env stays usable).

    It is a ``ValueError``; when Gymnasium's ``AsyncVectorEnv`` raises another type for the
    same batch (a ``TypeError`` for a batch that cannot be iterated, a ``KeyError`` for a
    missing Dict key...), what fastvec raises is an instance of that type too, from
    :func:`invalid_actions`, so handlers written for Gymnasium catch it.
    """

    __str__ = ValueError.__str__  # not KeyError's quoting when mixed with it


_MIXED: dict[type[BaseException], type[InvalidActionsError]] = {}


def invalid_actions(message: str, gymnasium_type: type[BaseException] | None
                    ) -> InvalidActionsError:
    """An :class:`InvalidActionsError` that is also a ``gymnasium_type`` (when given)."""
    if gymnasium_type is None or issubclass(InvalidActionsError, gymnasium_type):
        return InvalidActionsError(message)
    mixed = _MIXED.get(gymnasium_type)
    try:
        if mixed is None:
            mixed = type(f"InvalidActions{gymnasium_type.__name__}",
                         (InvalidActionsError, gymnasium_type),
                         {"__module__": __name__, "__reduce__": _reduce_mixed})
            _MIXED[gymnasium_type] = mixed
        return mixed(message)
    except TypeError:  # a layout or constructor that cannot be mixed with ValueError's
        return InvalidActionsError(message)


def _reduce_mixed(self: InvalidActionsError) -> tuple[object, tuple[str, type[BaseException]]]:
    # made anew on unpickling, in any process: the mixed class exists only where it was made
    base = next(b for b in type(self).__bases__ if b is not InvalidActionsError)
    return (invalid_actions, (str(self), base))


class WorkerStartTimeoutError(_AboutAWorker, TimeoutError):
    """A worker made no progress in starting for ``start_timeout`` seconds.

    Raised by the vector env's constructor; the message says what the worker was doing
    (starting up, building env *i*, resetting env *i*, answering the space check). Every
    worker process, what their envs started and the segment are gone when it is raised.
    (A replacement started by ``restart_workers=True`` that is as slow raises
    :class:`WorkerDiedError` instead: the vector env is then broken.)

    Attributes
    ----------
    worker, env_indices, pid
        Which worker, which envs, which process (see ``_AboutAWorker``).
    phase : str
        What it was doing, as in the message.
    """

    def __init__(self, message: str, worker: int = -1, env_indices: tuple[int, ...] = (),
                 pid: int | None = None, phase: str = "") -> None:
        super().__init__(message)
        self._about(worker, env_indices, pid)
        self.phase = phase
