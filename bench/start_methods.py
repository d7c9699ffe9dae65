"""How long building a vector env takes under each process-wide start method.

Every measurement runs a fresh trainer-like script (the start method is process-wide, and a
forkserver keeps its server between envs): it imports torch at its top when asked (as a
script that imports torchrl does; spawned workers and the forkserver re-run a script's
top-level imports), sets the start method with ``multiprocessing.set_start_method``, then
times ``AsyncVectorEnv(...)`` of fastvec and of Gymnasium over the same CartPole env
functions (until the constructor returns; ``close`` separately), the two backends
alternating. Prints medians and the fastvec/Gymnasium ratio. Run it from a plain
(non-editable) install: an editable install with ``editable.rebuild`` checks its build at
every import of a compiled module, in every worker too.

    python bench/start_methods.py --num-envs 8,32 --repeats 3 [--torch]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, multiprocessing, os, sys, time
if os.environ["BENCH_TORCH"] == "1":
    import torch  # noqa: F401
import gymnasium as gym
if os.environ["BENCH_BACKEND"] == "fastvec":
    from fastvec import AsyncVectorEnv
else:
    from gymnasium.vector import AsyncVectorEnv


def make():
    return gym.make("CartPole-v1")


if __name__ == "__main__":
    multiprocessing.set_start_method(sys.argv[1])
    n = int(sys.argv[2])
    t0 = time.perf_counter()
    envs = AsyncVectorEnv([make] * n)
    t1 = time.perf_counter()
    envs.reset(seed=0)
    envs.step(envs.action_space.sample())
    t2 = time.perf_counter()
    envs.close()
    t3 = time.perf_counter()
    print(json.dumps({"build": t1 - t0, "first_step": t2 - t1, "close": t3 - t2}))
"""


def measure(script: str, method: str, backend: str, n: int, with_torch: bool
            ) -> dict[str, float]:
    env = {**os.environ, "BENCH_BACKEND": backend, "BENCH_TORCH": "1" if with_torch else "0"}
    out = subprocess.run([sys.executable, script, method, str(n)], capture_output=True,
                         text=True, check=True, timeout=600, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-envs", default="8,32")
    parser.add_argument("--methods", default="fork,forkserver,spawn")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch", choices=["no", "yes", "both"], default="both")
    args = parser.parse_args()
    torches = {"no": [False], "yes": [True], "both": [False, True]}[args.torch]
    directory = tempfile.mkdtemp()
    script = os.path.join(directory, "trainer.py")
    with open(script, "w") as f:
        f.write(CHILD)
    print("method      torch  envs  gym-async build  fastvec build  ratio   "
          "(fastvec close, gym close)")
    for with_torch in torches:
        for method in args.methods.split(","):
            for n in (int(x) for x in args.num_envs.split(",")):
                times: dict[str, list[dict[str, float]]] = {"gym": [], "fastvec": []}
                for _ in range(args.repeats):
                    for backend in ("gym", "fastvec"):
                        times[backend].append(measure(script, method, backend, n, with_torch))
                med = {b: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                       for b, rs in times.items()}
                print(f"{method:<11} {'yes' if with_torch else 'no':<6} {n:>4}  "
                      f"{med['gym']['build']:>13.3f} s  {med['fastvec']['build']:>11.3f} s  "
                      f"{med['fastvec']['build'] / med['gym']['build']:>5.2f}x   "
                      f"({med['fastvec']['close']:.3f} s, {med['gym']['close']:.3f} s)",
                      flush=True)


if __name__ == "__main__":
    main()
