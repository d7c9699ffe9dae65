"""The wire protocol between the parent and a worker; both sides import it.

A command is an entry in the worker's queue, announced by the doorbell in its control line
(:class:`Command` in the entry's command word, with the env ids it is for).
:attr:`Command.STEP` needs nothing more: the actions are in the segment. For
:attr:`Command.REQUEST` the parent sends one request record through the worker's pipe. Every
request is answered in one shape, :class:`Reply`, sent through the pipe only when it holds
something (``INFO_PENDING`` tells the parent of a synchronous command, an env's
``HAS_REPLY`` mark of a partial one); a plain step answers with nothing at all.

A worker starts by sending :class:`Ready` or :class:`InitError` (the handshake); a worker that
replaces a dead one sends the :class:`Reply` of its initial reset after :class:`Ready`.
:func:`picklable_reply` pickles a reply for the pipe, turning what does not pickle into an
error of its env.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.reduction import ForkingPickler
from typing import Any, NamedTuple

from gymnasium import Space

from fastvec._remote_errors import EnvError, capture

__all__ = [
    "Call",
    "CheckSpaces",
    "Close",
    "Command",
    "InitError",
    "Ready",
    "Reply",
    "Request",
    "Reset",
    "SetAttr",
    "Step",
    "as_dict",
    "picklable_reply",
]


class Command(enum.IntEnum):
    """The doorbell's command word."""

    STEP = 1  # step every env of the group with its action in the segment
    REQUEST = 2  # read one request record from the pipe


@dataclass(frozen=True)
class Reset:
    """Reset the group's envs (those in ``mask``) with one seed each."""

    seeds: list[int | None]
    options: dict[str, Any] | None
    mask: list[bool] | None


@dataclass(frozen=True)
class Step:
    """Step the group's envs with these actions (an action space with no layout)."""

    actions: list[Any]


@dataclass(frozen=True)
class Call:
    """Call a method of (or read an attribute of) every env of the group, or of those in
    ``env_ids`` (batch indices, ascending); a callable ``name`` is called as
    ``name(env, *args, **kwargs)``."""

    name: str | Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    env_ids: list[int] | None = None


@dataclass(frozen=True)
class SetAttr:
    """Set an attribute on every env of the group (or those in ``env_ids``), one value each."""

    name: str
    values: list[Any]
    env_ids: list[int] | None = None


@dataclass(frozen=True)
class CheckSpaces:
    """Compare each env's spaces with the vector env's (at construction)."""

    observation_mode: str | tuple[Space[Any], Space[Any]]
    observation_space: Space[Any]
    action_space: Space[Any]


@dataclass(frozen=True)
class Close:
    """Close the group's envs, answer, and exit."""


Request = Reset | Step | Call | SetAttr | CheckSpaces | Close


@dataclass
class Reply:
    """What a command returns beyond the segment, by env index in the batch.

    ``results``: one per env of the group for call, set_attr, check_spaces and close
    (``None`` for reset and step); ``infos`` and ``observations`` (those that travel by pipe):
    ``(index, value)`` for the envs that have one; ``errors``: the envs that raised.
    """

    results: list[Any] | None = None
    infos: list[tuple[int, Mapping[str, Any]]] = field(default_factory=list)
    errors: list[EnvError] = field(default_factory=list)
    observations: list[tuple[int, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.results is not None or self.infos or self.errors
                    or self.observations)


def as_dict(info: Mapping[str, Any]) -> dict[str, Any]:
    """An env's info as the dict Gymnasium's info batching takes (a copy only if it is
    another kind of mapping)."""
    return info if isinstance(info, dict) else dict(info)


class Ready(NamedTuple):
    """The worker built its envs and serves commands."""


class InitError(NamedTuple):
    """The worker could not start: attaching the segment or building env ``error.env``
    raised."""

    error: EnvError


# -- a reply on the wire: what does not pickle is an error of its env -----------------------
def picklable_reply(reply: Reply, start: int,
                    learn: Callable[[list[tuple[int, Mapping[str, Any]]]], None] | None = None
                    ) -> bytes:
    """Pickle ``reply`` (of the group starting at env ``start``) for the parent; what does
    not pickle becomes an error of its env. ``learn`` is given the infos sent."""
    try:
        data = bytes(ForkingPickler.dumps(reply))
    except Exception:
        pass
    else:
        if learn is not None and reply.infos:
            learn(reply.infos)
        return data
    errors = list(reply.errors)
    infos = _keep_picklable(reply.infos, errors, "info")
    observations = _keep_picklable(reply.observations, errors, "observation")
    results = reply.results
    if results is not None:
        kept = dict(_keep_picklable(list(enumerate(results, start)), errors, "result"))
        results = [kept.get(start + j) for j in range(len(results))]
    errors.sort(key=lambda error: error.env)
    data = bytes(ForkingPickler.dumps(Reply(results, infos, errors, observations)))
    if learn is not None and infos:
        learn(infos)
    return data


def _keep_picklable(entries: list[tuple[int, Any]], errors: list[EnvError], what: str
                    ) -> list[tuple[int, Any]]:
    kept = []
    for index, value in entries:
        try:
            ForkingPickler.dumps(value)
        except Exception as exc:
            errors.append(_unpicklable(what, index, exc))
        else:
            kept.append((index, value))
    return kept


def _unpicklable(what: str, index: int, exc: Exception) -> EnvError:
    try:
        raise TypeError(f"the {what} of env {index} cannot be pickled: {exc}") from exc
    except TypeError as error:
        return EnvError(index, capture(error))
