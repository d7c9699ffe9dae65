"""fastvec.AsyncVectorEnv: Gymnasium's AsyncVectorEnv as a thin face over a worker pool.

This module holds Gymnasium's API and semantics: argument checks, the call states
(:class:`AsyncState`, owned here only), the spaces, info batching and the wording of every
error. The observation batches handed to the caller are
:class:`fastvec._observations.ObservationSlots`; processes, doorbells and waiting are the
pool's (:mod:`fastvec._pool`). ``call``, ``get_attr``, ``set_attr`` and ``render`` come from
the base class :class:`fastvec._env_calls.EnvCalls`, whose pending call is kept here; the
partial-batch calls ``send``, ``async_reset`` and ``recv`` from
:class:`fastvec._partial_calls.PartialBatchCalls`.
"""

from __future__ import annotations

import multiprocessing
import weakref
from collections.abc import Callable, Sequence
from enum import Enum
from operator import itemgetter
from typing import Any, Literal

import gymnasium
import numpy as np
from gymnasium import Env, Space, logger
from gymnasium.error import (
    AlreadyPendingCallError,
    ClosedEnvironmentError,
    CustomSpaceError,
    NoAsyncCallError,
)
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import iterate

from fastvec import _arguments as A
from fastvec import _messages as M
from fastvec._env_calls import EnvCalls
from fastvec._observations import ObservationSlots, scratch_bytes, slots_needed
from fastvec._oversubscription import warn_if_oversubscribed
from fastvec._partial import PartialBatches
from fastvec._partial_calls import PartialBatchCalls
from fastvec._pool import WorkerPool, finalize, usable_cores
from fastvec._remote_errors import EnvError, raise_logged
from fastvec._segment import SegmentPlan
from fastvec.errors import WorkerDiedError, invalid_actions

__all__ = ["AsyncState", "AsyncVectorEnv"]


# Seconds a worker may spend on one step of its start (see ``start_timeout``): simulators and
# first-run asset downloads can legitimately take minutes per env.
DEFAULT_START_TIMEOUT = 600.0


class AsyncState(Enum):
    """What the vector env is waiting for."""

    DEFAULT = "default"
    WAITING_RESET = "reset"
    WAITING_STEP = "step"
    WAITING_CALL = "call"


class AsyncVectorEnv(EnvCalls, PartialBatchCalls, VectorEnv):
    """Steps sub-environments in worker processes, moving every per-step byte through shared memory.

    A drop-in for :class:`gymnasium.vector.AsyncVectorEnv`: the same constructor, methods,
    errors and semantics. Sub-environments are split into contiguous groups, one group per
    worker process; actions, observations, rewards and flags travel through one shared-memory
    segment (in ``/dev/shm``, or a memfd when it does not fit there; see ``fastvec._memory``)
    and workers are woken through futex doorbells, so a step pickles nothing unless an env
    returns a non-empty info or raises.

    Parameters
    ----------
    env_fns
        Functions that create the sub-environments.
    shared_memory
        Observations travel through the segment (``True``) or pickled through pipes
        (``False``: the path for Graph, Sequence and unregistered custom spaces).
    copy
        ``True``: ``reset`` and ``step`` return observations that never change afterwards.
        ``False``: they return views into the segment that the next ``step`` or ``reset``
        overwrites (copy what you keep)::

            obs, *_ = envs.step(actions)       # obs is a view
            buffer[t] = obs                    # copy it into your rollout storage
    context
        ``multiprocessing`` start method: ``"fork"``, ``"forkserver"``, ``"spawn"`` or ``None``.
    daemon
        Start the workers as daemon processes.
    worker
        Gymnasium's custom per-env worker function. Not supported: fastvec's workers step a
        group of envs through the segment, so Gymnasium's pipe protocol has no place to run;
        passing one raises ``ValueError``.
    observation_mode
        ``"same"``, ``"different"`` or a ``(batched, single)`` tuple of spaces, as in Gymnasium.
    autoreset_mode
        :class:`gymnasium.vector.AutoresetMode` (or its value).
    max_concurrency
        At most this many sub-environments run ``reset``/``step`` at once.
    num_workers
        Worker processes. Default: the usable cores, never more than the number of envs.
        More than the usable cores warns (:class:`fastvec.errors.OversubscribedWarning`), and
        so do PyTorch's intra-op threads in this process when, with the workers, they are more
        than the usable cores (:class:`fastvec.errors.TrainerThreadsWarning`: call
        ``torch.set_num_threads`` as it says).
    pin_workers
        Pin worker ``i`` to the ``i``-th usable core (Linux). Default (``None``): pin when
        there is exactly one worker per usable core, where it keeps the scheduler from
        queueing two workers on one core while another core spins, and only while other
        work leaves the machine calm (see the README's "On a busy machine"); while the
        caller computes during steps (a double-buffered policy), the workers are kept off
        the last usable core, which the scheduler can then give the caller. Processes and threads
        that an environment starts inherit the pin; pass ``False`` for such environments.
    restart_workers
        Replace a worker process that dies (a crash inside a C extension, the OOM killer, a
        ``SIGKILL``) instead of breaking the vector env. The new worker builds fresh envs for
        the dead worker's group from ``env_fns`` and resets them with seed ``None``; a
        ``gymnasium.logger`` warning names the worker, how it died and the new pid.

        - During ``step``: the step returns normally. The group's envs come back with
          ``truncated=True``, ``terminated=False``, reward ``0``, the fresh reset's
          observation and ``infos["worker_restarted"]`` (masked by
          ``infos["_worker_restarted"]``). Their last observation is lost, so there is no
          ``final_obs`` for them in ``SameStep`` mode; in ``NextStep`` mode their next step
          is an autoreset step, as after any truncation.
        - During ``reset``, ``call``, ``get_attr`` or ``set_attr``: the lost results cannot
          be made up, so the call raises :class:`~fastvec.errors.WorkerDiedError` with
          ``restarted=True`` once the new worker is up. The vector env stays usable: repeat
          the call (and ``reset`` before stepping if you need the new envs' observations).
        - During construction and ``close`` nothing is restarted.
        - If the new worker cannot start (an env function raises, or it dies too), the
          vector env breaks as it does without this option.

        Default ``False``: a dead worker makes the waiting call, or the next one, raise
        :class:`~fastvec.errors.WorkerDiedError` (naming the worker, its envs, its pid and
        exit code or signal) within a second; the vector env is broken and ``close()`` frees
        every process and the segment.
    start_timeout
        Seconds a worker may spend on one step of its start: starting up and attaching the
        segment, building one env, resetting one env (a replacement), answering the space
        check. Past it the constructor raises
        :class:`~fastvec.errors.WorkerStartTimeoutError` naming the worker, its envs and
        what it was doing, after ending every worker and freeing the segment; a replacement
        that slow breaks the vector env (:class:`~fastvec.errors.WorkerDiedError`). Default
        600 s; ``None`` waits forever.
    parent_group
        The calling process steps the last group of envs itself, in-process, whenever it
        would otherwise wait for the workers (in ``step_wait``, ``reset_wait``,
        ``call_wait``..., and in :meth:`recv`, which then steps the group's sent envs
        before it returns). ``num_workers`` counts the worker processes beside it (default:
        the usable cores less one; ``0`` steps every env in the parent). On a machine whose
        cores other work shares, this saves a process that must be scheduled every step and
        the hand-off to it (the README's "On a busy machine"). The group's envs are built
        in the calling process and lose a worker's isolation: an env that crashes the
        interpreter takes the caller with it, one that hangs cannot be interrupted (a
        timeout raises once it returns), and ``restart_workers`` has nothing to restart
        there; a ``KeyboardInterrupt`` while the parent steps them leaves the call pending
        (close the vector env then). Everything else (the segment, replies, errors,
        autoreset, ``copy``) is the same as for a worker's group. Default ``False``. It
        suits the synchronous loop: with partial batches the parent's envs step only while
        it is in ``recv``, not while it computes the next actions.
    batch_size
        How many envs :meth:`recv` returns: the first ``batch_size`` to finish. Default
        ``num_envs``: ``step`` and ``reset`` are Gymnasium's, synchronous, unchanged. With
        fewer, :meth:`step` is EnvPool's ``step(actions, env_id)`` (``send`` then ``recv``).
        Partial batches (EnvPool's shape) work with any ``batch_size``: :meth:`async_reset`,
        :meth:`send` and :meth:`recv`; with ``num_envs = 2 * batch_size`` this is double
        buffering, the policy computing one half's actions while the workers step the
        other::

            envs = AsyncVectorEnv(env_fns, batch_size=len(env_fns) // 2)
            envs.async_reset(seed=0)
            while training:
                obs, rewards, terminations, truncations, infos = envs.recv()
                envs.send(policy(obs), infos["env_id"])

        While envs are in flight (sent, not yet received) every synchronous call (``reset``,
        ``step_async``, ``call``, ``get_attr``, ``set_attr``...) raises
        ``AlreadyPendingCallError``; ``close`` waits for them (up to its ``timeout``) and
        drops their results.

    Notes
    -----
    Every worker leads a process group of its own, which the processes its envs start (a
    simulator, say) join: ``close()``, the garbage-collection or exit-time close, a
    worker's death and the death of the process that made the vector env all SIGKILL that
    group, so nothing an env started outlives its worker. A process that leaves the group
    (``setsid``, a daemon) is not followed. Ctrl-C in a terminal reaches the parent only.

    If the process that made the vector env dies, its workers and their groups are killed
    at once on Linux (the kernel's parent-death signal, whichever thread made the env, also
    while the workers are still starting), else within half a second once they serve; and
    multiprocessing's resource tracker unlinks the segment (a memfd goes
    with its last process). A vector env that is never
    closed is closed when it is garbage-collected or at interpreter exit, silently.
    """

    def __init__(
        self,
        env_fns: Sequence[Callable[[], Env]],
        shared_memory: bool = True,
        copy: bool = True,
        context: str | None = None,
        daemon: bool = True,
        worker: Callable[..., None] | None = None,
        observation_mode: str | tuple[Space[Any], Space[Any]] = "same",
        autoreset_mode: str | AutoresetMode = AutoresetMode.NEXT_STEP,
        max_concurrency: int | None = None,
        *,
        num_workers: int | None = None,
        pin_workers: bool | None = None,
        restart_workers: bool = False,
        start_timeout: float | None = DEFAULT_START_TIMEOUT,
        batch_size: int | None = None,
        parent_group: bool = False,
    ) -> None:
        self._state = AsyncState.DEFAULT
        self._call_ids: list[int] | None = None  # the env_ids of the pending call
        self.restart_workers = bool(restart_workers)
        self.closed = False
        # Gymnasium's AsyncVectorEnv keeps its arguments as attributes of these names
        self.env_fns, self.shared_memory, self.copy = env_fns, shared_memory, copy
        self.context, self.daemon, self.worker = context, daemon, worker
        self.observation_mode = observation_mode
        self.autoreset_mode, self.max_concurrency, self.start_timeout = A.common(
            autoreset_mode, max_concurrency, start_timeout, worker)
        self.num_envs = A.num_envs(env_fns)
        self.parent_group = bool(parent_group)
        self.num_workers = A.num_workers(num_workers, self.num_envs, self.parent_group)
        self.batch_size = A.batch_size(batch_size, self.num_envs)
        self.pin_workers = None if pin_workers is None else bool(pin_workers)
        warn_if_oversubscribed(self.num_workers, self.num_envs, usable_cores(), stacklevel=2)
        (self.metadata, self.render_mode, self.single_action_space, self.action_space,
         self.single_observation_space, self.observation_space) = A.read_spaces(
            env_fns, observation_mode, self.autoreset_mode)

        try:
            plan = SegmentPlan(
                self.num_envs, self.num_workers + self.parent_group, self.single_action_space,
                self.single_observation_space if shared_memory else None,
                check_obs_range=observation_mode == "same",
                observation_slots=slots_needed(copy),
                final_observations=self.autoreset_mode is AutoresetMode.SAME_STEP,
            )
        except CustomSpaceError as exc:
            raise ValueError(
                "Using `AsyncVector(..., shared_memory=True)` caused an error, you can disable "
                "this feature with `shared_memory=False` however this is slower."
            ) from exc
        self._plan = plan
        self._pool = pool = WorkerPool(
            env_fns, plan, scratch_bytes(plan), context=context, daemon=daemon,
            autoreset_mode=self.autoreset_mode, max_concurrency=max_concurrency,
            pin_workers=self.pin_workers, restart_workers=self.restart_workers,
            start_timeout=self.start_timeout, parent_group=self.parent_group)
        self._groups = pool.groups
        self._obs = ObservationSlots(plan, self.single_observation_space, self.num_envs, copy,
                                     pool.allocate_scratch)
        self._partial = PartialBatches(pool, self.single_observation_space,
                                       self.single_action_space, self.autoreset_mode,
                                       self.restart_workers)
        try:
            pool.start()
        except _UNREGISTERED as exc:
            if pool.start_method != "fork":
                _add_note(exc, _UNREGISTERED_HINT)
            self.closed = True
            raise
        except BaseException:
            self.closed = True
            raise
        weakref.finalize(self, finalize, pool.resources)
        try:
            self._check_spaces()
        except BaseException:
            # the caller never gets the env: free the workers and the segment now
            self.close(terminate=True)
            raise

    # -- properties ------------------------------------------------------------------------
    @property
    def observations(self) -> Any:
        """Without shared memory, the batch the last reset or step returned (before any
        copy), as Gymnasium's ``AsyncVectorEnv.observations``; ``None`` with shared memory,
        whose batches are read from the segment's slots."""
        return self._obs.batch

    # one per sub-environment, as Gymnasium's AsyncVectorEnv gives them (not VectorEnv's one)
    @property
    def np_random_seed(self) -> tuple[int, ...]:  # type: ignore[override]
        """The ``np_random_seed`` of every sub-environment."""
        return self.get_attr("np_random_seed")

    @property  # type: ignore[misc]
    def np_random(self) -> tuple[np.random.Generator, ...]:  # type: ignore[override]
        """The ``np_random`` generator of every sub-environment."""
        return self.get_attr("np_random")

    # -- the doorbell protocol -------------------------------------------------------------
    def _choose_slot(self) -> int:
        """The observation slot the next partial call writes (see :class:`ObservationSlots`)."""
        return self._obs.choose()

    def _wait(self, timeout: float | None, name: str) -> list[M.Reply | None]:
        """The pool's replies to the pending command; a death ends the pending call."""
        try:
            return self._pool.wait(timeout, name)
        except WorkerDiedError:
            self._state = AsyncState.DEFAULT
            raise

    def _raise_errors(self, errors: list[EnvError]) -> None:
        """Log every sub-env error the Gymnasium way and raise the last one (if any)."""
        if errors:
            self._state = AsyncState.DEFAULT
            raise_logged(errors)

    def _assert_not_pending(self, method: str, end: str = ".") -> None:
        """Gymnasium's ``AlreadyPendingCallError`` if a call is pending (its wording, too),
        or if envs sent with ``send``/``async_reset`` have not all been received."""
        if self._state != AsyncState.DEFAULT:
            raise AlreadyPendingCallError(
                f"Calling `{method}` while waiting for a pending call to "
                f"`{self._state.value}` to complete{end}",
                str(self._state.value),
            )
        outstanding = self._partial.outstanding
        if outstanding:
            busy = self._partial.busy(range(self.num_envs))
            raise AlreadyPendingCallError(
                f"Calling `{method}` while {outstanding} envs sent with `send` or "
                f"`async_reset` have not been received (envs {busy}): `recv` them first.",
                "recv",
            )

    def _assert_pending(self, state: AsyncState, method: str, start: str) -> None:
        """Gymnasium's ``NoAsyncCallError`` unless ``state`` is the pending call."""
        if self._state != state:
            raise NoAsyncCallError(
                f"Calling `{method}` without any prior call to `{start}`.", state.value
            )

    def _assert_is_running(self) -> None:
        if self.closed:
            raise ClosedEnvironmentError(
                f"Trying to operate on `{type(self).__name__}`, after a call to `close()`."
            )
        if self._pool.broken is not None:
            raise self._pool.broken

    # -- reset -----------------------------------------------------------------------------
    def reset(self, *, seed: int | list[int | None] | None = None,
              options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        """Reset every sub-environment (or those in ``options["reset_mask"]``)."""
        self.reset_async(seed=seed, options=options)
        return self.reset_wait()

    def reset_async(self, seed: int | list[int | None] | None = None,
                    options: dict[str, Any] | None = None) -> None:
        """Send the reset to the workers; :meth:`reset_wait` collects it."""
        self._assert_is_running()
        seed = A.seeds(seed, self.num_envs)
        self._assert_not_pending("reset_async", end="")
        self._partial.stale.clear()  # a replaced worker's idle envs are reset here anyway
        mask = None
        if options is not None and "reset_mask" in options:
            options = dict(options)
            mask = A.reset_mask(options.pop("reset_mask"), self.num_envs)
        requests = [
            M.Reset(list(seed[g.start:g.stop]), options,
                    None if mask is None else [bool(m) for m in mask[g.start:g.stop]])
            for g in self._groups
        ]
        self._pool.ring(M.Command.REQUEST, requests, self._obs.begin())
        self._state = AsyncState.WAITING_RESET

    def reset_wait(self, timeout: float | None = None) -> tuple[Any, dict[str, Any]]:
        """Wait for the reset sent by :meth:`reset_async` and return ``(observations, infos)``."""
        infos, errors = self._collect(AsyncState.WAITING_RESET, "reset_async", timeout)
        self._raise_errors(errors)
        return self._obs.read(self.copy), infos

    # -- step ------------------------------------------------------------------------------
    def step(self, actions: Any, env_ids: Any = None
             ) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Step every sub-environment with its action from the batch ``actions``.

        With ``batch_size < num_envs`` (or ``env_ids`` given) this is EnvPool's
        ``step(actions, env_id)``: exactly ``send(actions, env_ids)`` then ``recv()``, so it
        returns the first ``batch_size`` envs to finish (``infos["env_id"]``), not
        necessarily those just sent; ``env_ids=None`` means the envs of the last ``recv``
        (every env if there was none since the last ``reset``/``step``).
        """
        if env_ids is None and self.batch_size == self.num_envs:
            self.step_async(actions)
            return self.step_wait()
        self.send(actions, env_ids)
        return self.recv()

    def _assert_no_call(self, method: str) -> None:
        if self._state != AsyncState.DEFAULT:
            raise AlreadyPendingCallError(
                f"Calling `{method}` while waiting for a pending call to "
                f"`{self._state.value}` to complete.", str(self._state.value))

    def step_async(self, actions: Any) -> None:
        """Write the action batch into the segment and wake the workers.

        A batch that does not fit the action space raises ``ValueError`` here, before any
        worker sees it; the env stays usable.
        """
        self._assert_is_running()
        self._assert_not_pending("step_async")
        layout = self._plan.actions
        if layout is None:  # no layout for the action space: pickled, as in Gymnasium
            per_env = self._iterate_actions(actions)
            requests = [M.Step(per_env[g.start:g.stop]) for g in self._groups]
            self._pool.ring(M.Command.REQUEST, requests, self._obs.begin())
        else:
            try:
                layout.write_batch(actions)
            except ValueError as exc:
                raise invalid_actions(str(exc), _gymnasium_refusal(
                    self.action_space, actions, self.num_envs)) from None
            self._pool.ring(M.Command.STEP, slot=self._obs.begin())
        self._state = AsyncState.WAITING_STEP

    def _iterate_actions(self, actions: Any) -> list[Any]:
        """One action per env, split by Gymnasium's ``iterate`` (and raising its errors)."""
        try:
            per_env = list(iterate(self.action_space, actions))
        except Exception as exc:  # Gymnasium's own refusal, with its type kept
            raise invalid_actions(f"actions: {exc}", type(exc)) from exc
        if len(per_env) != self.num_envs:
            raise invalid_actions(
                f"actions: expected one action for each of the {self.num_envs} envs, got "
                f"{len(per_env)}", None)
        return per_env

    def step_wait(self, timeout: float | None = None
                  ) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Wait for the step sent by :meth:`step_async` and return its batched results.

        On ``multiprocessing.TimeoutError`` the step stays pending: call ``step_wait`` again
        to complete it. With ``restart_workers=True``, replacing a worker that died during
        the step may take longer than ``timeout``: each step of the replacement's start is
        bounded by ``start_timeout`` instead.
        """
        infos, errors = self._collect(AsyncState.WAITING_STEP, "step_async", timeout,
                                      rows=True)
        replaced, self._pool.replaced = self._pool.replaced, []
        if replaced:
            infos = self._report_replaced(replaced, infos, errors)
        self._raise_errors(errors)
        rewards, terminations, truncations = self._pool.results
        return (self._obs.read(self.copy), rewards.copy(), terminations.copy(),
                truncations.copy(), infos)

    def _collect(self, state: AsyncState, started_by: str, timeout: float | None,
                 rows: bool = False) -> tuple[dict[str, Any], list[EnvError]]:
        """Wait for the pending reset or step (``state``) and merge its replies (``rows``:
        and the infos the step wrote into the envs' info rows)."""
        self._assert_is_running()
        name = state.value
        self._assert_pending(state, f"{name}_wait", started_by)
        replies = self._wait(timeout, name)
        self._state = AsyncState.DEFAULT
        self._partial.last_ids = None
        return self._merge_replies(replies, rows)

    def _merge_replies(self, replies: Sequence[M.Reply | None], rows: bool = False
                       ) -> tuple[dict[str, Any], list[EnvError]]:
        """Batch the infos of a reset or step's replies and, with ``rows``, of the envs'
        info rows (in env order), collect the errors and keep the observations that came by
        pipe."""
        errors: list[EnvError] = []
        per_env: list[tuple[int, Any]] = []
        for reply in replies:
            if reply is None:  # nothing to report: the common step
                continue
            per_env.extend(reply.infos)
            errors.extend(reply.errors)
            self._obs.store_pipe(reply.observations)
        info_rows = self._pool.info_rows
        # SAME_STEP's episode ends left in the envs' rows (their info rows hold final infos)
        finals = self._pool.finals if rows else []
        if rows and info_rows.learned:
            if not per_env and not finals and info_rows.learned == self.num_envs:
                batched = info_rows.read_batch(range(self.num_envs))
                if batched is not None:  # every env's info in its row, with one schema
                    return batched, errors
            ended = set(finals)
            per_env.extend((i, info_rows.read(i)) for i in info_rows.set_rows()
                           if i not in ended)
        if finals:
            per_env.extend((i, self._pool.final_rows.info(i)) for i in finals)
        if finals or (rows and info_rows.learned):
            per_env.sort(key=itemgetter(0))
        infos: dict[str, Any] = {}
        for i, info in per_env:
            infos = self._add_info(infos, M.as_dict(info), i)
        return infos, errors

    def _report_replaced(self, replaced: list[tuple[int, M.Reply]], infos: dict[str, Any],
                         errors: list[EnvError]) -> dict[str, Any]:
        """The envs of workers replaced during this step: truncated, reward 0, observation
        from their fresh reset, info ``worker_restarted`` (plus, in SAME_STEP mode, the reset's
        info, as for any reset there)."""
        rewards, terminations, truncations = self._pool.results
        same_step = self.autoreset_mode is AutoresetMode.SAME_STEP
        for w, reply in replaced:
            group = self._groups[w]
            rewards[group.start:group.stop] = 0.0
            terminations[group.start:group.stop] = False
            truncations[group.start:group.stop] = True
            reset_infos = dict(reply.infos) if same_step else {}
            for i in group:
                infos = self._add_info(infos, {**reset_infos.get(i, {}), "worker_restarted": True},
                                       i)
            errors.extend(reply.errors)
            self._obs.store_pipe(reply.observations)
        return infos

    # -- call, get_attr, set_attr, render (fastvec._env_calls): their call state -----------
    def _call_sent(self, ids: list[int] | None) -> None:
        """A call went to the workers (for the envs ``ids``, or every env): it is pending."""
        self._call_ids = ids
        self._state = AsyncState.WAITING_CALL

    def _call_replies(self, timeout: float | None
                      ) -> tuple[list[M.Reply | None], list[int] | None]:
        """Wait for the pending call and end it: its replies and its env ids."""
        self._assert_pending(AsyncState.WAITING_CALL, "call_wait", "call_async")
        replies = self._wait(timeout, "call")
        self._state = AsyncState.DEFAULT
        return replies, self._call_ids

    # -- close -----------------------------------------------------------------------------
    def close_extras(self, timeout: float | None = None, terminate: bool = False) -> None:
        """Close the sub-environments, end the workers and free the segment.

        Parameters
        ----------
        timeout
            Seconds to wait for a pending call and for the sub-environments to close; past it
            the workers are terminated.
        terminate
            End the workers at once without closing the sub-environments.
        """
        pool = self._pool
        pool.closing = True  # a worker that dies now is not replaced
        timeout = 0 if terminate else timeout
        healthy = pool.broken is None and pool.resources.shm is not None
        if healthy and not terminate and self._partial.outstanding:
            logger.warn(
                f"Calling `close` while {self._partial.outstanding} envs sent with `send` or "
                "`async_reset` have not been received: their results are dropped."
            )
            try:
                self._partial.drain(timeout)
            except multiprocessing.TimeoutError:
                terminate = True
            except WorkerDiedError:
                healthy = False
        self._partial.forget()
        try:
            if healthy and self._state != AsyncState.DEFAULT:
                logger.warn(
                    f"Calling `close` while waiting for a pending call to "
                    f"`{self._state.value}` to complete."
                )
                getattr(self, f"{self._state.value}_wait")(timeout)
        except multiprocessing.TimeoutError:
            terminate = True
        except Exception:
            # the pending call's own error was already logged; closing goes on
            healthy = pool.broken is None
        if healthy and not terminate:
            try:
                pool.ring(M.Command.REQUEST, [M.Close()] * len(self._groups))
                self._gather_results(pool.wait(timeout, "close"))
            except multiprocessing.TimeoutError:
                terminate = True
            except WorkerDiedError:
                pass
        self._state = AsyncState.DEFAULT
        pool.shutdown(terminate=terminate or not healthy)

    def __enter__(self) -> AsyncVectorEnv:
        """Support the with-statement: the env is closed when the block ends."""
        return self

    def __exit__(self, *args: Any) -> Literal[False]:
        self.close()
        return False

    def __del__(self) -> None:
        if not getattr(self, "closed", True) and hasattr(self, "_pool"):
            self.close(terminate=True)


# An env registered only in the parent is unknown to spawn and forkserver workers.
_UNREGISTERED = (gymnasium.error.NameNotFound, gymnasium.error.NamespaceNotFound,
                 gymnasium.error.VersionNotFound)
_UNREGISTERED_HINT = (
    "spawn and forkserver workers re-import modules but never see a `gymnasium.register()` "
    "made only in the parent: use `fastvec.make_vec(id, ...)` (it sends the EnvSpec), "
    "register the env in a module that the env function imports, or use context='fork'."
)


def _add_note(exc: BaseException, note: str) -> None:
    if hasattr(exc, "add_note"):  # Python 3.11+
        exc.add_note(note)
    else:
        exc.args = (f"{exc.args[0] if exc.args else ''}\n{note}", *exc.args[1:])


def _gymnasium_refusal(action_space: Space[Any], actions: Any, num_envs: int
                       ) -> type[BaseException] | None:
    """The type of error Gymnasium's AsyncVectorEnv raises for this action batch, if any.

    Only on the error path: it splits the batch with Gymnasium's ``iterate`` as its
    ``step_async`` does, then counts the actions as its ``zip(..., strict=True)`` does.
    """
    try:
        count = sum(1 for _ in iterate(action_space, actions))
    except Exception as exc:
        return type(exc)
    return None if count == num_envs else ValueError
