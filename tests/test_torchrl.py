"""The README's TorchRL recipe: TorchRL's ``GymWrapper`` over a fastvec env, against the same
wrapper over Gymnasium's ``SyncVectorEnv`` on the same seeded envs, rollout by rollout.

``import torchrl`` sets the process-wide start method to spawn, so the recipe runs in a fresh
interpreter (as a user's script does) rather than in the test process."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

if importlib.util.find_spec("torchrl") is None:
    pytest.skip("TorchRL is not installed: pip install torch==2.13.0 '.[torchrl]'",
                allow_module_level=True)

SCRIPT = r"""
import json, multiprocessing, sys
import fastvec, trainer_envs
from gymnasium.vector import AutoresetMode, SyncVectorEnv

if __name__ == "__main__":
    # imported under the main guard: spawned workers re-run a script's top level
    import torch
    from torchrl.envs import GymWrapper

    def policy(td):
        return td.set("action", (td["observation"][..., 0] > 0).long())

    def rollout(venv):
        env = GymWrapper(venv, categorical_action_encoding=True)
        env.set_seed(3)
        td = env.rollout(120, policy, break_when_any_done=False)
        env.close()
        return td

    report = {"start_method": multiprocessing.get_start_method()}
    fns = trainer_envs.random_time_fns(4, jitter=0.001)
    for mode in (AutoresetMode.DISABLED,):
        ours = rollout(fastvec.AsyncVectorEnv(fns, autoreset_mode=mode, num_workers=2))
        theirs = rollout(SyncVectorEnv(fns, autoreset_mode=mode))
        same = set(ours.keys(True, True)) == set(theirs.keys(True, True)) and all(
            torch.equal(ours[key], theirs[key]) for key in theirs.keys(True, True))
        report[mode.value] = {"same": same, "resets": int(ours["next", "done"].sum()),
                              "shape": list(ours.batch_size)}
    with fastvec.AsyncVectorEnv(fns, num_workers=1) as next_step:
        try:
            GymWrapper(next_step)
            report["next_step"] = "accepted"
        except RuntimeError as exc:
            report["next_step"] = str(exc)
    print(json.dumps(report))
"""


def test_gym_wrapper_over_fastvec_matches_sync_vector_env(tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(SCRIPT)
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [tests, *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=110, env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["start_method"] == "spawn"  # what `import torchrl` set
    for mode in ("Disabled",):
        assert report[mode]["same"], report
        assert report[mode]["shape"] == [4, 120]
        assert report[mode]["resets"] > 4  # episodes ended inside the rollout
    assert "SAME_STEP or DISABLED" in report["next_step"]
