"""fastvec under a process-wide start method of spawn or forkserver (what ``import torchrl``
sets, and Python 3.14's default on Linux): an env builds and steps with each ``context``,
``context=None`` follows the process-wide method, and the results are SyncVectorEnv's.

Each case runs in a fresh interpreter: the start method is set once per process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import functools, json, multiprocessing, sys
import numpy as np
from gymnasium.vector import SyncVectorEnv
import fastvec, trainer_envs

if __name__ == "__main__":
    multiprocessing.set_start_method(sys.argv[1])
    trainer_envs.PARENT_MARK = "parent"
    fns = [functools.partial(trainer_envs.StartMethodProbeEnv, index=i) for i in range(3)]
    actions = [np.array([(i + t) % 2 for i in range(3)]) for t in range(40)]

    def run(envs):
        out = [envs.reset(seed=11)[0].tolist()]
        for a in actions:
            obs, rew, term, trunc, _ = envs.step(a)
            out.append([obs.tolist(), rew.tolist(), term.tolist(), trunc.tolist()])
        return out

    reference = SyncVectorEnv(fns)
    expected = run(reference)
    reference.close()
    report = {}
    for context in (None, "fork", "forkserver", "spawn"):
        with fastvec.AsyncVectorEnv(fns, context=context, num_workers=2) as envs:
            report[str(context)] = {"same": run(envs) == expected,
                                    "started": [list(s) for s in envs.get_attr("started")]}
    print(json.dumps(report))
"""


@pytest.mark.parametrize("global_method", ["spawn", "forkserver"])
def test_builds_and_steps_under_every_context(global_method, tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(SCRIPT)
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [tests, *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, str(script), global_method], capture_output=True,
                          text=True, timeout=100, env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    # how each context's workers were started: (the method they know, the parent's memory)
    expected = {"None": [global_method, None], "fork": ["fork", "parent"],
                "forkserver": ["forkserver", None], "spawn": ["spawn", None]}
    for context, started in expected.items():
        assert report[context]["same"], f"context={context}: results differ from SyncVectorEnv"
        assert report[context]["started"] == [started] * 3, (context, report[context])
