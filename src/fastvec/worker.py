"""The worker process: runs one contiguous group of sub-environments.

It waits on its doorbell in the segment. A step command reads each env's action from the
segment, steps the env (autoreset handled here) and writes observation, reward and flags back.
Anything that is not fixed-size (a non-empty info, an error, observations when
``shared_memory=False``, every other command's result) goes through the worker's pipe, and
only then.
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import time
import traceback
from collections.abc import Mapping
from multiprocessing.reduction import ForkingPickler
from typing import Any

import numpy as np
from gymnasium.spaces.utils import is_space_dtype_shape_equiv
from gymnasium.vector import AutoresetMode

from fastvec import _memory
from fastvec import _protocol as P
from fastvec import _kernels
from fastvec._kernels import Segment
from fastvec._sync import Doorbells, kill_group_on_parent_death
from fastvec.layout import _describe

_FORBIDDEN_CALLS = ("reset", "step", "close", "_setattr", "_check_spaces")


def _lead_process_group() -> bool:
    """Make this worker the leader of a new process group, which every process its envs start
    joins: the parent (or this worker, when the parent dies) can then end them all at once.
    Ctrl-C from a terminal reaches the foreground group only, so it no longer reaches them."""
    try:
        os.setpgid(0, 0)
    except OSError:  # not allowed (a session leader): its descendants are not tracked
        return False
    return True


def _set_parent_death_signal() -> None:
    """Ask Linux to kill this worker's group when its parent process dies (a no-op elsewhere).

    Linux signals when the parent *thread* that forked us ends; the C handler then checks
    that the process itself is gone, so this is safe for envs made on any thread.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        # a real-time signal: no library an env loads claims it, and its default action
        # (should an env replace the handler) still ends the worker
        kill_group_on_parent_death(signal.SIGRTMIN + 3)
    except OSError:  # the ppid check in the wait loop still covers this
        pass


def _parent_alive(start_ppid: int, parent_pid: int) -> bool:
    """Whether the vector env's process lives (``start_ppid``: our parent when we started)."""
    if os.getppid() != start_ppid:  # reparented: our parent (or the server) died
        return False
    if start_ppid == parent_pid:
        return True
    try:  # forkserver: the vector env's process is not our parent
        os.kill(parent_pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _end_group() -> None:
    """SIGKILL this worker's process group: the worker and every process its envs started."""
    os.killpg(0, signal.SIGKILL)


def error_payload(exc: BaseException) -> tuple[Any, ...]:
    """Describe ``exc`` for the parent: the pickled exception when it pickles, else its text."""
    trace = traceback.format_exc()
    try:
        blob = pickle.dumps(exc)
        pickle.loads(blob)
    except Exception:
        blob = None
    try:
        type_blob = pickle.dumps(type(exc))
    except Exception:
        type_blob = None
    try:
        message = str(exc)
    except Exception:  # a broken __str__ must not take the worker down
        message = f"<{type(exc).__name__}: str() failed>"
    return (blob, type_blob, type(exc).__qualname__, message, trace)


def _unpicklable(what: str, index: int, exc: Exception) -> tuple[int, tuple]:
    try:
        raise TypeError(f"the {what} of env {index} cannot be pickled: {exc}") from exc
    except TypeError as error:
        return (index, error_payload(error))


class _NotADict(TypeError):
    """Raised in the step loop for an info that is not a mapping; explained by env_error."""


_NOT_RETURNED = object()
_REWARD_PROBE = np.zeros(1, np.float64)
_FLAG_PROBE = np.zeros(1, np.bool_)


def _returned(index: int, what: str, value: Any, cause: BaseException | None) -> Exception:
    """``env <index> returned <what>: <value> (<cause>)``, a TypeError if ``cause`` is one."""
    kind = TypeError if isinstance(cause, TypeError) else ValueError
    if value is _NOT_RETURNED:  # the cause already describes the value
        return kind(f"env {index} returned {what}: {cause}")
    reason = "" if cause is None else f" ({cause})"
    return kind(f"env {index} returned {what}: {_describe(value)}{reason}")


def _explain(exc: BaseException, index: int, result: Any, step: bool) -> BaseException:
    """The error to report for env ``index`` (the error path only, so the step stays fast).

    An exception raised in the env's own code is reported as it is. One raised while storing
    what the env returned (``result``: its step or reset return value) becomes a ValueError or
    TypeError naming the env and the part of the result that Gymnasium cannot batch.
    """
    if isinstance(exc, _NotADict):
        return _returned(index, "an info that is not a dict", exc.args[0], None)
    inner = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
    if inner is not None:
        code = inner.tb_frame.f_code
        if code.co_name == "write_slot" and code.co_filename.endswith(
                ("layout.py", "_kernels.pyx")):
            return _returned(index, "an observation that does not fit the observation space",
                             _NOT_RETURNED, exc)
        return exc  # raised in the env's code (or below it)
    if result is _NOT_RETURNED:
        return exc
    if not step:
        try:
            _, _ = result
        except Exception as error:
            return _returned(index, "a reset result that is not (obs, info)", result, error)
        return exc
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
    return exc


def env_error(exc: BaseException, index: int, result: Any = _NOT_RETURNED,
              step: bool = True) -> tuple[int, tuple]:
    """``(index, payload)`` for an exception raised while env ``index`` ran (see _explain)."""
    explained = _explain(exc, index, result, step)
    if explained is exc:
        return (index, error_payload(exc))
    try:
        raise explained from exc
    except Exception as error:
        return (index, error_payload(error))
    finally:
        # the raise made a cycle (this frame <-> explained's traceback) that would keep
        # ``exc`` and so the step loop's frame, with its views into the segment, alive
        explained = exc = None


def _keep_picklable(entries: list | None, errors: list, what: str) -> list | None:
    if not entries:
        return entries
    kept = []
    for index, value in entries:
        try:
            ForkingPickler.dumps(value)
        except Exception as exc:
            errors.append(_unpicklable(what, index, exc))
        else:
            kept.append((index, value))
    return kept


def picklable_reply(reply: tuple, start: int) -> bytes:
    """Pickle ``reply`` for the parent; what does not pickle becomes an error of its env."""
    try:
        return bytes(ForkingPickler.dumps(reply))
    except Exception:
        pass
    if len(reply) == 3:  # a step or reset: (infos, errors, observations)
        infos, errors, pipe_obs = reply
        errors = list(errors or [])
        infos = _keep_picklable(infos, errors, "info")
        pipe_obs = _keep_picklable(pipe_obs, errors, "observation")
        reply = (infos, errors, pipe_obs)
    else:  # call, set_attr, check_spaces, close: (results, errors)
        results, errors = reply
        errors = list(errors)
        kept = _keep_picklable(list(enumerate(results, start)), errors, "result")
        picked = dict(kept or [])
        reply = ([picked.get(start + j) for j in range(len(results))], errors)
    errors.sort(key=lambda entry: entry[0])
    return bytes(ForkingPickler.dumps(reply))


class Worker:
    def __init__(self, index: int, start: int, env_fns: list, pipe, plan: P.SegmentPlan,
                 segment_handle: _memory.Handle, autoreset_mode: AutoresetMode,
                 shared_memory_obs: bool, semaphore, parent_pid: int) -> None:
        self.index = index
        self.spin = P.SpinBudget()
        self.start = start
        self.pipe = pipe
        self.plan = plan
        self.autoreset_mode = autoreset_mode
        self.shared_memory_obs = shared_memory_obs
        self.semaphore = semaphore
        self.parent_pid = parent_pid
        # Under forkserver our parent process is the server, not the vector env's process.
        self.start_ppid = os.getppid()
        # whether this worker leads a process group of its own (worker_main makes it one)
        self.own_group = False
        self.line = plan.worker_line(index)
        self.pending = plan.parent_line + P.PENDING

        self.shm = _memory.attach(segment_handle)
        buffer = self.shm.buf
        assert buffer is not None
        plan.check_header(buffer)  # before any use: only our parent's segment will do
        self.doorbells = Doorbells(buffer)
        self.segment = Segment(buffer)
        plan.bind(self.segment, buffer)
        self.rewards, self.terminations, self.truncations = plan.result_arrays(buffer)

        self.envs: list = []
        self.env_fns = env_fns
        self.autoreset = [False] * len(env_fns)
        self.last_obs: list = [None] * len(env_fns)

    # -- lifetime ------------------------------------------------------------------------
    def detach(self) -> None:
        self.plan.unbind()
        self.rewards = self.terminations = self.truncations = None
        self.segment.release()
        self.doorbells.release()
        self.shm.close()

    def close_envs(self) -> list:
        errors = []
        for j, env in enumerate(self.envs):
            try:
                env.close()
            except Exception as exc:
                errors.append((self.start + j, error_payload(exc)))
        self.envs = []
        return errors

    def parent_alive(self) -> bool:
        return _parent_alive(self.start_ppid, self.parent_pid)

    def phase(self, status: int, env: int = 0) -> None:
        """Tell the parent what this worker is doing while it starts (read on a timeout)."""
        self.doorbells.store(self.line + P.STATUS_ENV, env)
        self.doorbells.store(self.line + P.STATUS, status)

    # -- the loop ------------------------------------------------------------------------
    def run(self, seq: int) -> None:
        """Serve commands until ``close``; ``seq`` is the last command sequence seen."""
        doorbells = self.doorbells
        seq_offset = self.line + P.CMD_SEQ
        while True:
            idle_since = time.monotonic()
            spin_until = idle_since + self.spin.budget()
            while True:
                spin = max(0.0, spin_until - time.monotonic())
                if doorbells.wait_while_equal(seq_offset, seq, P.WAIT_SLICE * 10, spin, True):
                    break
                if not self.parent_alive():
                    if self.own_group:  # as the parent-death signal does where it exists
                        _end_group()
                    return
            self.spin.record(time.monotonic() - idle_since)
            seq = doorbells.load(seq_offset)
            command = doorbells.load(self.line + P.CMD)
            if command == P.CMD_STEP:
                reply = self.step_group()
                closing = False
            else:
                name, data = self.pipe.recv()
                closing = name == "close"
                reply = self.handle(name, data)
            doorbells.store(self.line + P.INFO_PENDING, 0 if reply is None else 1)
            if doorbells.add(self.pending, -1) == 0:
                doorbells.wake(self.pending)
            doorbells.store(self.line + P.DONE_SEQ, seq)
            if reply is not None:
                # sent after the counter so a large reply can never deadlock the parent's wait
                self.pipe.send_bytes(picklable_reply(reply, self.start))
            if closing:
                return

    # -- commands ------------------------------------------------------------------------
    def observation_layout(self):
        """The observation slot the current command writes (None: observations go by pipe)."""
        slots = self.plan.observation_slots
        return slots[self.doorbells.load(self.line + P.SLOT)] if slots else None

    def step_group(self, pickled_actions: list[Any] | None = None) -> tuple | None:
        """Step every env of the group; ``pickled_actions``: the group's actions when the
        action space has no layout (else they are read from the segment)."""
        # the per-step hot path: locals hoisted, kernels called directly on the fast path
        segment = self.segment
        action_root = self.plan.actions.root if self.plan.actions is not None else None
        pickled: list[Any] = pickled_actions if pickled_actions is not None else []
        observations = self.observation_layout()
        obs_root = observations.root if observations is not None else None
        read_slot, write_slot = _kernels.read_slot, _kernels.write_slot
        rewards, terminations, truncations = self.rewards, self.terminations, self.truncations
        semaphore = self.semaphore
        permit = self.line + P.PERMIT
        next_step = self.autoreset_mode is AutoresetMode.NEXT_STEP
        same_step = self.autoreset_mode is AutoresetMode.SAME_STEP
        autoreset = self.autoreset
        last_obs = self.last_obs
        infos = errors = pipe_obs = None
        result = _NOT_RETURNED
        i = self.start - 1
        for j, env in enumerate(self.envs):
            i += 1
            try:
                if semaphore is not None:
                    semaphore.acquire()
                    self.doorbells.store(permit, 1)
                try:
                    if next_step and autoreset[j]:
                        result = _NOT_RETURNED
                        obs, info = env.reset()
                        reward, terminated, truncated = 0.0, False, False
                    else:
                        result = env.step(pickled[j] if action_root is None
                                          else read_slot(action_root, i))
                        obs, reward, terminated, truncated, info = result
                        if same_step and (terminated or truncated):
                            final_obs, final_info = obs, info
                            obs, reset_info = env.reset()
                            info = {"final_info": final_info, "final_obs": final_obs,
                                    **reset_info}
                finally:
                    if semaphore is not None:
                        self.doorbells.store(permit, 0)
                        semaphore.release()
                if next_step:
                    autoreset[j] = bool(terminated or truncated)
                # kept for a masked reset, which rewrites the envs it skips into its slot
                last_obs[j] = obs
                if obs_root is not None:
                    if not write_slot(segment, obs_root, obs, i):
                        observations.write_slot(obs, i)  # converts, or names the bad leaf
                else:
                    if pipe_obs is None:
                        pipe_obs = []
                    pipe_obs.append((i, obs))
                rewards[i] = reward
                terminations[i] = terminated
                truncations[i] = truncated
                if type(info) is not dict and not isinstance(info, Mapping):
                    raise _NotADict(info)
            except Exception as exc:
                if errors is None:
                    errors = []
                errors.append(env_error(exc, i, result))
                continue
            if info:
                if infos is None:
                    infos = []
                infos.append((i, info))
        if infos is None and errors is None and pipe_obs is None:
            return None
        return (infos, errors, pipe_obs)

    def reset_group(self, seeds: list, options: Any, mask: list[bool] | None,
                    publish: bool = True) -> tuple:
        """Reset the envs (those in ``mask``); ``publish=False`` keeps the observations here."""
        infos, errors, pipe_obs = [], [], []
        result = _NOT_RETURNED
        observations = self.observation_layout() if publish else None
        for j, env in enumerate(self.envs):
            i = self.start + j
            # which env a start-up reset was on, should it hang there (see worker_main)
            self.doorbells.store(self.line + P.STATUS_ENV, i)
            if mask is not None and not mask[j]:
                # an env left alone keeps its observation, whichever slot this reset writes
                if observations is None:
                    pipe_obs.append((i, self.last_obs[j]))
                elif self.last_obs[j] is not None:
                    observations.write_slot(self.last_obs[j], i)
                continue
            try:
                if self.semaphore is not None:
                    self.semaphore.acquire()
                    self.doorbells.store(self.line + P.PERMIT, 1)
                try:
                    result = env.reset(seed=seeds[j], options=options)
                    obs, info = result
                finally:
                    if self.semaphore is not None:
                        self.doorbells.store(self.line + P.PERMIT, 0)
                        self.semaphore.release()
                self.autoreset[j] = False
                self.last_obs[j] = obs
                if observations is not None:
                    observations.write_slot(obs, i)
                else:
                    if publish:
                        pipe_obs.append((i, obs))
                if type(info) is not dict and not isinstance(info, Mapping):
                    raise _NotADict(info)
            except Exception as exc:
                errors.append(env_error(exc, i, result, step=False))
                continue
            if info:
                infos.append((i, info))
        return (infos, errors, pipe_obs)

    def per_env(self, fn) -> tuple:
        results, errors = [], []
        for j, env in enumerate(self.envs):
            try:
                results.append(fn(j, env))
            except Exception as exc:
                results.append(None)
                errors.append((self.start + j, error_payload(exc)))
        return (results, errors)

    def handle(self, name: str, data: Any) -> tuple | None:
        if name == "step":
            return self.step_group(data)
        if name == "reset":
            seeds, options, mask = data
            return self.reset_group(seeds, options, mask)
        if name == "call":
            attr_name, args, kwargs = data

            def call(j, env):
                if attr_name in _FORBIDDEN_CALLS:
                    raise ValueError(
                        f"Trying to call function `{attr_name}` with `call`, use "
                        f"`{attr_name}` directly instead."
                    )
                attr = env.get_wrapper_attr(attr_name)
                return attr(*args, **kwargs) if callable(attr) else attr

            return self.per_env(call)
        if name == "setattr":
            attr_name, values = data
            return self.per_env(lambda j, env: env.set_wrapper_attr(attr_name, values[j]))
        if name == "check_spaces":
            mode, obs_space, action_space = data

            def check(j, env):
                same_obs = (obs_space == env.observation_space if mode == "same"
                            else is_space_dtype_shape_equiv(obs_space, env.observation_space))
                return (same_obs, action_space == env.action_space)

            return self.per_env(check)
        if name == "close":
            return ([None] * len(self.envs), self.close_envs())
        raise RuntimeError(f"Received unknown command `{name}`.")


def worker_main(index: int, start: int, env_fns, pipe, parent_pipe, plan: P.SegmentPlan,
                segment_handle: _memory.Handle, autoreset_mode: AutoresetMode,
                shared_memory_obs: bool, semaphore, parent_pid: int, core: int | None = None, *,
                initial_reset: tuple[bool, bool] | None = None) -> None:
    """Entry point of a worker process (picklable for spawn and forkserver).

    The worker leads a process group of its own, so every process its envs start can be
    ended with it: by the parent at close and after the worker's death, and by the worker
    (the kernel's parent-death signal on Linux, else the wait loop's parent check) when the
    parent dies. While it starts, it writes what it is doing into its control line
    (``STATUS``: building or resetting env ``STATUS_ENV``), which the parent reads when
    the start takes too long.

    ``initial_reset``: this worker replaces one that died; ``(publish, autoreset)`` says
    whether to reset the new envs before serving (seed ``None``), write their observations
    into the current slot and send the reset's reply after ``ready``, and whether their next
    step is an autoreset.
    """
    # Ctrl-C is the parent's to handle, also when a SIGINT reaches us or our own group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    own_group = _lead_process_group()
    start_ppid = os.getppid()
    _set_parent_death_signal()
    if not _parent_alive(start_ppid, parent_pid):  # it died before the signal was set
        if own_group:
            _end_group()
        return
    if core is not None:
        try:
            os.sched_setaffinity(0, {core})
        except (AttributeError, OSError):  # not Linux, or the core went away: run unpinned
            pass
    if parent_pipe is not None:
        parent_pipe.close()
    worker = None
    try:
        try:
            worker = Worker(index, start, [fn for fn in env_fns], pipe, plan, segment_handle,
                            autoreset_mode, shared_memory_obs, semaphore, parent_pid)
        except Exception as exc:  # a segment that is not our parent's, say: tell the parent
            pipe.send(("init_error", (start, error_payload(exc))))
            return
        worker.own_group = own_group
        for j, fn in enumerate(worker.env_fns):
            worker.phase(P.STATUS_BUILDING, start + j)
            try:
                worker.envs.append(fn())
            except Exception as exc:
                pipe.send(("init_error", (start + j, error_payload(exc))))
                return
        reply = None
        if initial_reset is not None:
            publish, autoreset = initial_reset
            worker.phase(P.STATUS_RESETTING, start)
            reply = worker.reset_group([None] * len(worker.envs), None, None, publish)
            worker.autoreset = [autoreset] * len(worker.envs)
        # read before announcing readiness: the parent may ring as soon as it hears us
        seq = worker.doorbells.load(worker.line + P.CMD_SEQ)
        worker.phase(P.STATUS_READY)
        pipe.send(("ready", None))
        if reply is not None:
            pipe.send_bytes(picklable_reply(reply, start))
        worker.run(seq)
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass
    finally:
        if worker is not None:
            if worker.envs:
                worker.close_envs()
            worker.detach()
        pipe.close()
