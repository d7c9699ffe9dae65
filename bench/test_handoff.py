"""Smoke run of bench/handoff.py at a tiny size: its measurements run, end their processes,
unlink their segments and print both tables."""

from __future__ import annotations

import os
import re

import handoff  # bench/ is on the path of the tests in it
import pytest


def handoff_segments() -> set[str]:
    return {f for f in os.listdir("/dev/shm") if f.startswith("fastvec_handoff_")}


def test_handoff_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    affinity = os.sched_getaffinity(0)
    before = handoff_segments()
    handoff.main(ring_size=3, workers=[1, 2], num_envs=2, pauses=[0.0, 100e-6], rounds=40,
                 seconds=0.05)
    out = capsys.readouterr().out
    assert os.sched_getaffinity(0) == affinity  # the ring's pin on the driver is undone
    per_handoff = re.search(r"ring of 3 processes on core \d+: ([\d.]+) us per hand-off", out)
    assert per_handoff is not None and float(per_handoff.group(1)) > 0
    rows = re.findall(r"^\| (\d+) \| ([\d,]+) \| ([\d.]+) \| ([\d,]+) \|", out, re.M)
    assert [int(w) for w, *_ in rows] == [1, 2]
    assert all(int(rate.replace(",", "")) > 0 for _, rate, _, _ in rows)
    assert max(float(of_best) for _, _, of_best, _ in rows) == 1.0
    trips = re.findall(r"^\| (\d+) us \| ([\d.]+) us \| ([\d.]+) us \|", out, re.M)
    assert [int(p) for p, _, _ in trips] == [0, 100]
    assert handoff_segments() <= before  # its own are unlinked
