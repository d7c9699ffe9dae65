"""What one hand-off between two Python processes costs on this machine, and what it bounds.

Two measurements, each over a small shared segment with fastvec's doorbells
(:class:`fastvec._sync.Doorbells`), in processes started for it:

- **ring**: ``--ring`` processes pinned to one core pass a token around; each sleeps on its
  own word (a futex wait), then sets the next one's and wakes it. One pass of the token is
  one hand-off: a futex wake, a context switch into another Python process, a few lines of
  Python. A synchronous step of a pool whose workers outnumber the cores pays at least one
  per worker, so with ``W`` one-env workers on ``C`` cores no step of ``N`` envs beats
  ``(W * hand-off + N * env step) / C``; the script prints that bound beside fastvec's
  measured rate at each ``--workers`` count, on the bench's trivial image env.
- **wake**: the round trip parent -> worker -> parent after the parent computed for
  ``--pause`` microseconds, with the worker asleep on its futex or spinning: what a worker
  that sleeps between a trainer's steps adds to the next step (on a virtual machine, the
  wake-up of an idle core).

A script, not a test (pytest collects only its smoke test)::

    python bench/handoff.py --ring 64 --workers 2,8,64 --num-envs 64
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import secrets
import statistics
import time
import warnings
from multiprocessing import shared_memory
from multiprocessing.context import BaseContext
from typing import Any

import fastvec
from fastvec._sync import Doorbells
from fastvec.bench.workloads import ImageEnv
from fastvec.errors import OversubscribedWarning

STOP = 0xFFFFFFFF


def _segment(words: int) -> shared_memory.SharedMemory:
    return shared_memory.SharedMemory(f"fastvec_handoff_{secrets.token_hex(6)}", create=True,
                                      size=4 * words)


ANSWER_TIMEOUT = 30.0  # seconds: a process that has not answered by then is stuck or dead


def _wait_for(bells: Doorbells, offset: int, value: int, procs: list[Any]) -> None:
    """Sleep until the word at ``offset`` holds ``value`` (each wait on the value last read:
    a value read twice may have changed in between, and a wait on the newer one would sleep
    through its own answer). Raises RuntimeError if one of ``procs`` ended or none answered
    within ``ANSWER_TIMEOUT``."""
    deadline = time.monotonic() + ANSWER_TIMEOUT
    while (seen := bells.load(offset)) != value:
        if not bells.wait_while_equal(offset, seen, 0.5, 0.0, False):
            ended = [p.pid for p in procs if not p.is_alive()]
            if ended or time.monotonic() > deadline:
                raise RuntimeError(f"no answer (processes that ended: {ended or 'none'})")


def _end(procs: list[Any]) -> None:
    """Join the started ones of ``procs`` (killed if they do not stop within 10 s)."""
    for p in procs:
        if p.pid is None:  # never started
            continue
        p.join(10.0)
        if p.is_alive():
            p.kill()
            p.join()


def _ring_member(i: int, members: int, name: str, core: int) -> None:
    """Wait for the token (the round number in word ``i``), pass it to ``i + 1``; the last
    member hands it back to the driver (word ``members``)."""
    os.sched_setaffinity(0, {core})
    shm = shared_memory.SharedMemory(name)
    bells = Doorbells(shm.buf)
    seen = 0
    try:
        while True:
            bells.wait_while_equal(4 * i, seen, 10.0, 0.0, False)
            seen = bells.load(4 * i)
            if seen == STOP:
                return
            bells.store(4 * (i + 1), seen)
            bells.wake(4 * (i + 1), 1)
    finally:
        bells.release()
        shm.close()


def ring(ctx: BaseContext, members: int, rounds: int, core: int) -> float:
    """Seconds per hand-off along a token ring of ``members`` processes on ``core``."""
    shm = _segment(members + 1)
    bells = Doorbells(shm.buf)
    procs = [ctx.Process(target=_ring_member, args=(i, members, shm.name, core), daemon=True)
             for i in range(members)]
    affinity = os.sched_getaffinity(0)
    try:
        for p in procs:
            p.start()
        os.sched_setaffinity(0, {core})
        seconds = []
        for r in range(1, rounds + 1):
            start = time.perf_counter()
            bells.store(0, r)
            bells.wake(0, 1)
            _wait_for(bells, 4 * members, r, procs)
            seconds.append(time.perf_counter() - start)
        return statistics.median(seconds[rounds // 10:]) / (members + 1)
    finally:
        os.sched_setaffinity(0, affinity)
        for i in range(members):
            bells.store(4 * i, STOP)
            bells.wake(4 * i, 1)
        _end(procs)
        bells.release()
        shm.close()
        shm.unlink()


def _echo(name: str, spin: float) -> None:
    """Answer every value written to word 0 by writing it to word 1."""
    shm = shared_memory.SharedMemory(name)
    bells = Doorbells(shm.buf)
    seen = 0
    try:
        while True:
            bells.wait_while_equal(0, seen, 10.0, spin, True)
            seen = bells.load(0)
            if seen == STOP:
                return
            bells.store(4, seen)
            bells.wake(4, 1)
    finally:
        bells.release()
        shm.close()


def wake(ctx: BaseContext, pause: float, spin: float, rounds: int) -> float:
    """Median seconds of a round trip to a worker that spins up to ``spin`` seconds (0:
    sleeps at once) after the parent computed for ``pause`` seconds."""
    shm = _segment(2)
    bells = Doorbells(shm.buf)
    proc = ctx.Process(target=_echo, args=(shm.name, spin), daemon=True)
    try:
        proc.start()
        seconds = []
        for r in range(1, rounds + 1):
            computed = time.perf_counter()
            while time.perf_counter() - computed < pause:  # the trainer's forward pass
                pass
            start = time.perf_counter()
            bells.store(0, r)
            bells.wake(0, 1)
            _wait_for(bells, 4, r, [proc])
            seconds.append(time.perf_counter() - start)
        return statistics.median(seconds[rounds // 10:])
    finally:
        bells.store(0, STOP)
        bells.wake(0, 1)
        _end([proc])
        bells.release()
        shm.close()
        shm.unlink()


def env_step_seconds(steps: int) -> float:
    """Seconds one step of the bench's image env takes in this process."""
    env = ImageEnv()
    env.reset(seed=0)
    action = env.action_space.sample()
    start = time.perf_counter()
    for _ in range(steps):
        env.step(action)
    return (time.perf_counter() - start) / steps


def fastvec_rate(num_envs: int, workers: int, seconds: float) -> float:
    """fastvec's env-steps/s on ``num_envs`` image envs over ``workers`` workers."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OversubscribedWarning)
        envs: Any = fastvec.AsyncVectorEnv([ImageEnv] * num_envs, num_workers=workers)
    try:
        envs.reset(seed=0)
        actions = envs.action_space.sample()
        for _ in range(20):
            envs.step(actions)
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            envs.step(actions)
            steps += 1
        return steps * num_envs / (time.perf_counter() - start)
    finally:
        envs.close()


def main(ring_size: int, workers: list[int], num_envs: int, pauses: list[float],
         rounds: int, seconds: float) -> None:
    ctx = mp.get_context("fork")
    cores = sorted(os.sched_getaffinity(0))
    handoff = ring(ctx, ring_size, rounds, cores[-1])
    step = env_step_seconds(2000)
    print(f"ring of {ring_size} processes on core {cores[-1]}: {handoff * 1e6:.1f} us per "
          f"hand-off; the image env's step: {step * 1e6:.1f} us; {len(cores)} usable cores")
    print("| workers | fastvec env-steps/s | of the best | hand-off bound env-steps/s "
          "| bound of the best |")
    print("|---:|---:|---:|---:|---:|")
    rates = {w: fastvec_rate(num_envs, w, seconds) for w in workers}
    best = max(rates.values())
    for w, rate in rates.items():
        handoffs = max(w, len(cores))  # a step wakes every worker once (at least one per core)
        bound = num_envs * len(cores) / (handoffs * handoff + num_envs * step)
        print(f"| {w} | {rate:,.0f} | {rate / best:.2f} | {bound:,.0f} | {bound / best:.2f} |")
    print(f"({num_envs} envs; the bound counts one hand-off per worker per step and the envs' "
          "own steps, spread over every core: nothing else)")
    print("| pause before the step | worker asleep: round trip | worker spinning: round trip |")
    print("|---:|---:|---:|")
    for pause in pauses:
        asleep = wake(ctx, pause, 0.0, rounds)
        spinning = wake(ctx, pause, pause + 3e-3, rounds)
        print(f"| {pause * 1e6:.0f} us | {asleep * 1e6:.1f} us | {spinning * 1e6:.1f} us |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ring", type=int, default=64, help="processes in the token ring")
    parser.add_argument("--workers", default="2,8,16,32,64",
                        help="fastvec worker counts to time (comma list)")
    parser.add_argument("--num-envs", type=int, default=64)
    parser.add_argument("--pause", default="0,300,1000,2000",
                        help="the parent's computing before each wake, in us (comma list)")
    parser.add_argument("--rounds", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="timed seconds per fastvec worker count")
    args = parser.parse_args()
    main(args.ring, [int(w) for w in args.workers.split(",")], args.num_envs,
         [float(p) * 1e-6 for p in args.pause.split(",")], args.rounds, args.seconds)
