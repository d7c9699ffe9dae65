"""Smoke test for the ``python -m fastvec.bench`` command line."""

import json
import subprocess
import sys

BACKENDS = {"fastvec", "gym-async", "gym-sync"}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastvec.bench", *args],
                          capture_output=True, text=True, timeout=120)


def test_help_exits_zero():
    proc = _run("--help")
    assert proc.returncode == 0, proc.stderr
    for flag in ("--workload", "--num-envs", "--num-workers", "--seconds", "--repeats",
                 "--json", "--backends", "--quiet"):
        assert flag in proc.stdout


def test_cartpole_run_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run("--workload", "cartpole", "--num-envs", "4", "--seconds", "0.2",
                "--repeats", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "cartpole" in proc.stdout
    data = json.loads(out.read_text())
    rows = {r["backend"]: r for r in data["results"]}
    assert set(rows) == BACKENDS
    for row in rows.values():
        assert row["workload"] == "cartpole"
        assert row["num_envs"] == 4
        assert row["error"] is None
        assert len(row["rates"]) == 1
        assert row["median"] > 0 and row["steps"][0] > 0
    assert {q["ratio"] for q in data["ratios"]} == {"fastvec/gym-async", "fastvec/gym-sync"}
    for key in ("cpu_model", "usable_cores", "python", "numpy", "gymnasium", "fastvec", "date"):
        assert data["machine"][key]
