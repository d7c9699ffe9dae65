"""An exception's round trip from a worker to the parent.

In the worker, :func:`capture` turns an exception into an :class:`ErrorPayload` (the pickled
exception when it pickles, its type and text otherwise, and the traceback text) and
:func:`explain` turns an error raised while *storing* what an env returned into one that names
the env and the part Gymnasium cannot batch. In the parent, :func:`rebuild` makes the
exception again, with the remote traceback chained as ``__cause__``, and :func:`raise_logged`
logs every error the Gymnasium way and raises the last one.

Errors are classified by their type and by the stage the worker was in, never by inspecting
traceback frames: the layout raises :class:`fastvec.layout.LeafError` for a value that does
not fit its space.
"""

from __future__ import annotations

import pickle
import traceback
from collections.abc import Sequence
from typing import Any, NamedTuple, NoReturn

import numpy as np
from gymnasium import logger

from fastvec.errors import RemoteTraceback
from fastvec.layout import LeafError, describe

__all__ = [
    "NOT_RETURNED",
    "EnvError",
    "ErrorPayload",
    "NotADictError",
    "capture",
    "env_error",
    "raise_logged",
    "rebuild",
]


class ErrorPayload(NamedTuple):
    """An exception as it travels from a worker to the parent."""

    blob: bytes | None  # the pickled exception, if it pickles and unpickles
    type_blob: bytes | None  # the pickled type, to rebuild ``type(message)`` otherwise
    type_name: str
    message: str
    trace: str


class EnvError(NamedTuple):
    """The error of one env: its index in the batch and the payload."""

    env: int
    payload: ErrorPayload


class NotADictError(TypeError):
    """Raised by a worker for an info that is not a mapping; explained by :func:`env_error`."""


# The env's step or reset had not returned when the error was raised (it is the env's own).
NOT_RETURNED: Any = object()
_REWARD_PROBE = np.zeros(1, np.float64)
_FLAG_PROBE = np.zeros(1, np.bool_)


def capture(exc: BaseException) -> ErrorPayload:
    """Describe ``exc`` (being handled) for the parent."""
    trace = traceback.format_exc()
    blob: bytes | None
    try:
        blob = pickle.dumps(exc)
        pickle.loads(blob)
    except Exception:
        blob = None
    type_blob: bytes | None
    try:
        type_blob = pickle.dumps(type(exc))
    except Exception:
        type_blob = None
    try:
        message = str(exc)
    except Exception:  # a broken __str__ must not take the worker down
        message = f"<{type(exc).__name__}: str() failed>"
    return ErrorPayload(blob, type_blob, type(exc).__qualname__, message, trace)


def env_error(exc: BaseException, index: int, result: Any = NOT_RETURNED,
              step: bool = True) -> EnvError:
    """The error of env ``index`` for ``exc``.

    ``result`` is what the env's step (``step=True``) or reset returned when ``exc`` was
    raised while storing it, or :data:`NOT_RETURNED` when ``exc`` came from the env's own
    code, which is reported as it is.
    """
    explained = explain(exc, index, result, step)
    if explained is exc:
        return EnvError(index, capture(exc))
    try:
        raise explained from exc
    except Exception as error:
        return EnvError(index, capture(error))
    finally:
        # the raise made a cycle (this frame <-> explained's traceback) that would keep
        # ``exc`` and so the step loop's frame, with its views into the segment, alive
        explained = exc = None  # type: ignore[assignment]


def explain(exc: BaseException, index: int, result: Any, step: bool) -> BaseException:
    """The error to report for env ``index`` (the error path only, so the step stays fast).

    An error raised while storing what the env returned becomes a ValueError or TypeError
    naming the env and the part of the result that Gymnasium cannot batch.
    """
    if isinstance(exc, NotADictError):
        return _returned(index, "an info that is not a dict", exc.args[0], None)
    if result is NOT_RETURNED:
        return exc
    if not step:
        try:
            _, _ = result
        except Exception as error:
            return _returned(index, "a reset result that is not (obs, info)", result, error)
        return _unfit_observation(index, exc)
    if isinstance(exc, LeafError):
        return _unfit_observation(index, exc)
    try:
        _, reward, terminated, truncated, _ = result
    except Exception as error:
        return _returned(index, "a step result that is not (obs, reward, terminated, "
                         "truncated, info)", result, error)
    try:
        _REWARD_PROBE[0] = reward
    except Exception as error:
        return _returned(index, "a reward that is not a real number", reward, error)
    for name, flag in (("terminated", terminated), ("truncated", truncated)):
        try:
            _FLAG_PROBE[0] = flag
            bool(flag)
        except Exception as error:
            return _returned(index, f"a `{name}` flag that is not a bool", flag, error)
    # the rest of the result is fine: what failed is storing the observation (a LeafError,
    # or a cast's overflow warning that the user's filters turn into an error)
    return _unfit_observation(index, exc)


def _unfit_observation(index: int, exc: BaseException) -> Exception:
    return _returned(index, "an observation that does not fit the observation space",
                     NOT_RETURNED, exc)


def _returned(index: int, what: str, value: Any, cause: BaseException | None) -> Exception:
    """``env <index> returned <what>: <value> (<cause>)``, a TypeError if ``cause`` is one."""
    kind = TypeError if isinstance(cause, TypeError) else ValueError
    if value is NOT_RETURNED:  # the cause already describes the value
        return kind(f"env {index} returned {what}: {cause}")
    reason = "" if cause is None else f" ({cause})"
    return kind(f"env {index} returned {what}: {describe(value)}{reason}")


def rebuild(payload: ErrorPayload) -> BaseException:
    """The exception again, with the remote traceback chained as ``__cause__``.

    An exception that did not pickle arrives as its type made from its message when the type
    pickles, else as a ``RuntimeError`` naming the type.
    """
    exception: BaseException | None = None
    if payload.blob is not None:
        try:
            exception = pickle.loads(payload.blob)
        except Exception:
            exception = None
    if exception is None and payload.type_blob is not None:
        try:
            exception = pickle.loads(payload.type_blob)(payload.message)
        except Exception:
            exception = None
    if exception is None:
        exception = RuntimeError(f"{payload.type_name}: {payload.message}")
    exception.__cause__ = RemoteTraceback(payload.trace)
    return exception


def raise_logged(errors: Sequence[EnvError]) -> NoReturn:
    """Log every env error as Gymnasium's AsyncVectorEnv does and raise the last one."""
    exception: BaseException | None = None
    for index, payload in errors:
        logger.error(f"Received the following error from Worker-{index}")
        logger.error("%s", payload.trace)  # a trace may hold "%": never format it
        exception = rebuild(payload)
    logger.error("Raising the last exception back to the main process.")
    assert exception is not None, "raise_logged needs at least one error"
    raise exception
