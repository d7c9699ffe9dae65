"""Smoke tests for the ``python -m fastvec.bench`` command line."""

import importlib.util
import json
import re
import subprocess
import sys

import pytest

import fastvec
from fastvec.bench import main
from fastvec.bench.cli import build_parser
from fastvec.bench.runner import usable_cores

BACKENDS = {"fastvec", "gym-async", "gym-sync"}
# "[#####...............]  1/3  0:02 / ~0:07  cartpole x4 rep 1/1 fastvec: 12.3k steps/s"
PROGRESS = re.compile(r"\[[#.]{20}\] +\d+/\d+  \d+:\d\d / ~\d+:\d\d  \S")
TINY = ("--seconds", "0.1", "--warmup", "0", "--repeats", "1")

needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib is not installed (fastvec[plot])")
needs_atari = pytest.mark.skipif(
    importlib.util.find_spec("ale_py") is None or importlib.util.find_spec("cv2") is None,
    reason="ale-py or opencv is not installed (fastvec[atari])")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastvec.bench", *args],
                          capture_output=True, text=True, timeout=120)


def test_help_explains_every_flag():
    proc = _run("--help")
    assert proc.returncode == 0, proc.stderr
    for action in build_parser()._actions:
        for flag in action.option_strings:
            assert flag in proc.stdout, flag
        assert action.help, f"{action.option_strings} has no help text"
    for flag in ("--workload", "--num-envs", "--num-workers", "--seconds", "--repeats",
                 "--warmup", "--json", "--plot", "--backends", "--quiet", "--contention"):
        assert flag in proc.stdout
    for workload in ("image", "cartpole", "dict", "compute", "jitter", "policy", "atari"):
        assert workload in proc.stdout


def test_cartpole_run_writes_json_and_shows_progress(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run("--workload", "cartpole", "--num-envs", "4", "--seconds", "0.2",
                "--repeats", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "cartpole" in proc.stdout
    # not a terminal: one progress line per event, each with the bar, elapsed and estimate
    progress = [line for line in proc.stderr.splitlines() if PROGRESS.match(line)]
    assert any("cartpole x4 rep 1/1 gym-sync" in line for line in progress), proc.stderr
    assert progress[-1].startswith("[####################] 3/3"), progress[-1]
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


def test_the_parent_group_backend_is_timed_on_request(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["--workload", "cartpole", "--num-envs", "4", *TINY, "--quiet",
                 "--backends", "fastvec,fastvec-parent,gym-sync", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {r["backend"]: r for r in data["results"]}
    assert list(rows) == ["fastvec", "fastvec-parent", "gym-sync"]
    assert rows["fastvec-parent"]["median"] > 0 and rows["fastvec-parent"]["error"] is None
    # fastvec's default less the parent's own group
    assert rows["fastvec-parent"]["processes"] == rows["fastvec"]["processes"] - 1
    assert "fastvec-parent/gym-sync" in {q["ratio"] for q in data["ratios"]}


@needs_matplotlib
def test_plot_writes_png_with_a_point_per_num_envs(tmp_path):
    png, out = tmp_path / "bench.png", tmp_path / "bench.json"
    proc = _run("--workload", "image", "--num-envs", "2,4", "--backends", "fastvec,gym-sync",
                *TINY, "--plot", str(png), "--json", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # --quiet
    assert f"plot written to {png}" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
    points = {(r["backend"], r["num_envs"]) for r in json.loads(out.read_text())["results"]}
    assert points == {(b, n) for b in ("fastvec", "gym-sync") for n in (2, 4)}


def test_plot_without_matplotlib_exits_2_before_running(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises
    png = tmp_path / "bench.png"
    assert main(["--workload", "cartpole", *TINY, "--plot", str(png)]) == 2
    captured = capsys.readouterr()
    assert "pip install 'fastvec[plot]'" in captured.err
    assert "matplotlib" in captured.err
    assert captured.out == ""  # nothing was measured
    assert not png.exists()


@needs_atari
def test_atari_workload_smoke():
    proc = _run("--workload", "atari", "--num-envs", "2", *TINY)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("atari")]
    # atari has a no-IPC ceiling too (and, with partial batches, a fastvec-partial row)
    assert {row[2] for row in rows} - {"fastvec-partial"} == BACKENDS | {"ceiling"}
    assert all(row[1] == "2" and row[4] != "failed" for row in rows), proc.stdout
    assert "A.L.E" not in proc.stderr  # the emulator's banner is silenced


def test_atari_is_skipped_with_a_note_when_ale_py_is_missing(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ale_py", None)
    out = tmp_path / "bench.json"
    assert main(["--workload", "atari,cartpole", "--num-envs", "2", "--backends", "gym-sync",
                 *TINY, "--json", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "atari: skipped, ale-py" in captured.out
    assert "pip install 'fastvec[atari]'" in captured.out
    data = json.loads(out.read_text())
    assert "atari" in data["skipped"]
    assert [(r["workload"], r["backend"]) for r in data["results"]] == [("cartpole", "gym-sync")]


def _run_with_json(tmp_path, workload: str, num_envs: str):
    """``--workload WORKLOAD --num-envs NUM_ENVS`` (TINY, with --json), which must succeed:
    the run, its stdout's lines and the JSON it wrote."""
    out = tmp_path / "bench.json"
    proc = _run("--workload", workload, "--num-envs", num_envs, *TINY, "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    return proc, proc.stdout.splitlines(), json.loads(out.read_text())


def test_jitter_run_reports_each_backends_fraction_of_the_ceiling(tmp_path):
    _, lines, data = _run_with_json(tmp_path, "jitter", "2")
    assert "of ceiling" in lines[0] and "of bound" not in lines[0]
    rows = {line.split()[2]: line.split() for line in lines if line.startswith("jitter ")}
    # fastvec with partial batches is a row of its own, now that fastvec has recv()
    assert set(rows) == BACKENDS | {"ceiling", "fastvec-partial"}
    for backend in BACKENDS | {"fastvec-partial"}:  # each timed row ends with its fraction
        assert re.fullmatch(r"\d+\.\d\d", rows[backend][-1]), rows[backend]
    assert any(line.startswith("jitter: ") and "uniform per step" in line for line in lines)
    low, high = data["jitter_rounds_per_step"]
    assert high == pytest.approx(5 * low)  # 100-500 us
    assert {"fastvec/ceiling", "fastvec-partial/ceiling"} <= {q["ratio"] for q in data["ratios"]}


def test_policy_run_reports_the_bound_and_each_backends_fraction(tmp_path):
    proc, lines, data = _run_with_json(tmp_path, "policy", "4")
    assert "of bound" in lines[0] and "of ceiling" not in lines[0]
    rows = {line.split()[2]: line.split() for line in lines
            if line.startswith("policy ") and line.split()[1] == "4"}
    expected = BACKENDS | {"bound"}
    if hasattr(fastvec.AsyncVectorEnv, "recv"):
        expected.add("fastvec-db")
    assert set(rows) == expected
    for backend in expected - {"bound"}:
        assert re.fullmatch(r"\d+\.\d\d", rows[backend][-1]), rows[backend]
    p = data["policy"]["4"]
    assert p["bound"] == pytest.approx(4 * p["cores"] / (p["policy_seconds"]
                                                         + p["env_batch_seconds"]))
    bound_row = next(r for r in data["results"] if r["backend"] == "bound")
    assert bound_row["median"] == pytest.approx(p["bound"])
    assert p["blas"] in proc.stdout and f"x{p['depth']}" in p["policy"]
    assert any(line.startswith("policy x4: bound = 4 envs x") for line in lines)
    # the double-buffered loop's own bound: the policy twice, on 2 rows each, in one thread
    policy = 2 * p["half_policy_seconds"]
    assert p["double_buffered_bound"] == pytest.approx(
        4 / max(policy, (policy + p["env_batch_seconds"]) / p["cores"]))
    assert any(line.startswith("policy x4: a double-buffered loop runs the policy twice")
               and "its own bound is" in line for line in lines)


needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="Ray is not installed (fastvec[ray])")


@needs_ray
def test_ray_run_compares_fastvec_ray_with_local_fastvec_and_tianshou(tmp_path):
    """--ray starts a local two-node cluster and times fastvec.ray beside local fastvec (and
    Tianshou's RayVectorEnv when tianshou is installed, else a note says it was skipped)."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fastvec.bench", "--ray", "--workload", "cartpole",
         "--num-envs", "4", *TINY, "--json", str(out), "--quiet"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "vs fastvec" in lines[0] and "vs gym-async" not in lines[0]
    data = json.loads(out.read_text())
    rows = {r["backend"]: r for r in data["results"]}
    tianshou = importlib.util.find_spec("tianshou") is not None
    assert set(rows) == {"fastvec", "fastvec-ray"} | ({"tianshou-ray"} if tianshou else set())
    assert all(r["error"] is None and r["median"] > 0 for r in rows.values())
    assert rows["fastvec-ray"]["processes"] == 4  # two actors, one worker each
    assert data["ray"] == {"nodes": 2, "cpus_per_node": max(1, usable_cores() // 2)}
    ratios = {q["ratio"] for q in data["ratios"]}
    assert "fastvec-ray/fastvec" in ratios
    assert any(line.startswith("fastvec-ray cartpole x4:") and "ms per step" in line
               for line in lines)
    if tianshou:
        assert "fastvec-ray/tianshou-ray" in ratios
    else:
        assert "tianshou-ray: skipped, needs Tianshou" in proc.stdout


def test_ray_backends_need_the_ray_flag(capsys):
    assert main(["--backends", "fastvec-ray", *TINY]) == 2
    assert "run with --ray" in capsys.readouterr().err
