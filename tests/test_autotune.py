"""fastvec.autotune and ``python -m fastvec.bench --autotune``: driven by a fake clock (or a
tiny budget), never judged by timings."""

from __future__ import annotations

import functools
import io
import json
import re
import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest

import fastvec
from envs import FailError, FailingEnv, broken_env
from fastvec._autotune import (
    MIN_TRIAL_SECONDS,
    PLANNED_SHARE,
    AutotuneResult,
    AutotuneRow,
    Setting,
    default_worker_counts,
    plan_trials,
    settings,
)
from fastvec._processes import usable_cores
from fastvec.errors import AutotuneError, OversubscribedWarning

CARTPOLE = functools.partial(gym.make, "CartPole-v1")
# "   1           2  auto   12,345   ±3%   1.00x   0.12" (the best row starts with "*")
# a table row: num_workers, batch_size, pin_workers (a parent_group column may come between)
ROW = re.compile(r"^[* ] +(\d+)!? +(?:(?:yes|no) +)?(\d+) +(auto|pinned|unpinned) +[\d,]+ ")


class FakeClock:
    """Advances ``tick`` seconds per call; past ``stall_at`` it jumps ``stall`` once (a
    step that took long); past ``interrupt_at`` it raises KeyboardInterrupt (Ctrl-C)."""

    def __init__(self, tick: float = 1e-3, stall_at: float | None = None, stall: float = 0.0,
                 interrupt_at: float | None = None) -> None:
        self.now, self.tick = 0.0, tick
        self.stall_at, self.stall = stall_at, stall
        self.interrupt_at = interrupt_at
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        self.now += self.tick
        if self.stall_at is not None and self.now >= self.stall_at:
            self.now += self.stall
            self.stall_at = None
        if self.interrupt_at is not None and self.now >= self.interrupt_at:
            raise KeyboardInterrupt
        return self.now


def table_rows(result: AutotuneResult) -> list[tuple[int, int, str]]:
    return [(int(m[1]), int(m[2]), m[3]) for line in result.format().splitlines()
            if (m := ROW.match(line))]


def check_best_builds(fns, result: AutotuneResult) -> None:
    """``AsyncVectorEnv(env_fns, **result.best)`` is a working vector env."""
    assert set(result.best) == {"num_workers", "batch_size", "pin_workers", "parent_group"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OversubscribedWarning)
        envs = fastvec.AsyncVectorEnv(fns, **result.best)
    with envs:
        obs, _ = envs.reset(seed=0)
        assert obs.shape == (len(fns), 4)
        step = envs.step(np.zeros(len(fns), dtype=np.int64))
        assert step[0].shape == (result.best["batch_size"], 4)


# -- the search, on a fake clock -----------------------------------------------------------

def test_fake_clock_runs_every_planned_round_of_every_setting():
    clock = FakeClock()
    out = io.StringIO()
    result = fastvec.autotune([CARTPOLE] * 2, budget=6.0, num_workers=[1, 2], pin=(None,),
                              parent_group=(False,), rounds=3, clock=clock, file=out)
    assert [row.setting for row in result.rows] == [Setting(1, 2, None), Setting(2, 2, None)]
    # 2 settings x 3 rounds, each filling its share of the budget left after building
    assert result.rounds == result.planned_rounds == 3
    assert [len(row.rates) for row in result.rows] == [3, 3]
    assert [len(row.others) for row in result.rows] == [3, 3]
    assert all(rate > 0 for row in result.rows for rate in row.rates)
    trial = (6.0 - result.setup_seconds) * PLANNED_SHARE / 6
    assert result.trial_seconds + result.warmup_seconds == pytest.approx(trial)
    assert result.elapsed <= result.budget
    assert result.elapsed == pytest.approx(clock.now, abs=0.01)
    # the table lists each setting once, and the best one is the highest median
    assert table_rows(result) == [(1, 2, "auto"), (2, 2, "auto")]
    assert result.best_row.median == max(row.median for row in result.rows)
    assert str(result) == result.format()
    assert "best: AsyncVectorEnv(env_fns, " in str(result)
    # the progress bar went to `file`: one line per start and per trial, the last complete;
    # then the table
    text = out.getvalue()
    assert text.endswith(result.format() + "\n")
    lines = text[:-len(result.format()) - 1].splitlines()
    assert sum("started" in line for line in lines) == 2
    assert sum(": " in line and "env-steps/s" in line for line in lines) == 6
    assert lines[-1].startswith("[####################] 8/8")
    check_best_builds([CARTPOLE] * 2, result)


def test_no_round_starts_that_would_end_past_the_budget():
    # budget 6 s, 2 settings x 3 rounds of ~0.9 s: round 2 stalls 1.5 s (a slow step), so
    # round 3 would end near 8.4 s and is not started
    clock = FakeClock(stall_at=2.5, stall=1.5)
    result = fastvec.autotune([CARTPOLE] * 2, budget=6.0, num_workers=[1, 2], pin=(None,),
                              parent_group=(False,), rounds=3, clock=clock, progress=False)
    assert (result.rounds, result.planned_rounds) == (2, 3)
    assert [len(row.rates) for row in result.rows] == [2, 2]
    assert result.elapsed <= result.budget
    assert "stopped after 2 of 3 planned rounds" in result.format()


def test_partial_batches_of_any_size_leave_nothing_in_flight_between_rounds():
    # batch_size 2 of 3 envs: after the timed loop one env or two are still in flight, and
    # every one must be received before the next round's async_reset
    result = fastvec.autotune([CARTPOLE] * 3, budget=2.0, num_workers=[1], batch_sizes=[3, 2, 1],
                              pin=(False,), partial=True, parent_group=(False,), rounds=3,
                              clock=FakeClock(), progress=False)
    assert [row.setting.batch_size for row in result.rows] == [3, 2, 1]
    assert [len(row.rates) for row in result.rows] == [3, 3, 3]
    assert "batch_size < num_envs: a send/recv loop" in result.format()
    check_best_builds([CARTPOLE] * 3, result)


def test_more_workers_than_cores_are_timed_without_the_warning_and_marked():
    cores = usable_cores()
    fns = [CARTPOLE] * (cores + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", OversubscribedWarning)
        result = fastvec.autotune(fns, budget=1.0, num_workers=[cores + 1], pin=(None,),
                                  parent_group=(False,), rounds=1, clock=FakeClock(),
                                  progress=False)
    (row,) = result.rows
    assert row.oversubscribed and row.setting.num_workers == cores + 1
    text = result.format()
    assert re.search(rf"^\* +{cores + 1}! ", text, re.M), text
    assert "OversubscribedWarning silenced during the trials" in text


def test_a_tiny_real_budget_tries_the_defaults_and_returns_working_settings():
    result = fastvec.autotune([CARTPOLE] * 2, budget=0.5, progress=False)
    cores = usable_cores()
    expected = settings(2, cores, None, None, (None, False), False, (False, True))
    assert [row.setting for row in result.rows] == expected
    assert any(row.setting.parent_group for row in result.rows)
    assert result.rounds >= 1
    assert all(len(row.rates) == result.rounds for row in result.rows)
    assert len(table_rows(result)) == len(expected)
    assert "other work" in result.format()
    check_best_builds([CARTPOLE] * 2, result)


# -- errors: raised clearly, nothing left behind ----------------------------------------------

def test_an_env_that_raises_in_a_trial_raises_autotune_error_and_leaks_nothing():
    fns = [functools.partial(FailingEnv, i, failing=(1,), fail_at=3) for i in range(2)]
    # gymnasium.logger.error reports the env's error through warnings.warn (a UserWarning)
    with pytest.warns(UserWarning) as record, pytest.raises(
            AutotuneError, match=r"timing AsyncVectorEnv\(num_workers=1, batch_size=2, "
            r"pin_workers=None, parent_group=False\) failed in round 1: FailError: env 1 "
                r"failed") as info:
        fastvec.autotune(fns, budget=2.0, num_workers=[1, 2], pin=(None,), clock=FakeClock(),
                         progress=False)
    assert isinstance(info.value.__cause__, FailError)
    assert any("Received the following error from Worker-1" in str(w.message) for w in record)
    # the conftest guard checks that every worker and segment of both settings is gone


def test_an_env_that_cannot_be_built_raises_autotune_error():
    with pytest.warns(UserWarning), pytest.raises(
            AutotuneError, match=r"building AsyncVectorEnv\(num_workers=1, .*FailError: "
            r"cannot build this env") as info:
        fastvec.autotune([CARTPOLE, broken_env], budget=2.0, num_workers=[2, 1], pin=(None,),
                         clock=FakeClock(), progress=False)
    assert isinstance(info.value.__cause__, FailError)


def test_env_kwargs_reach_every_vector_env():
    with pytest.raises(AutotuneError, match=r"building .*ValueError"):
        fastvec.autotune([CARTPOLE] * 2, budget=1.0, num_workers=[1],
                         env_kwargs={"context": "no-such-start-method"}, clock=FakeClock(),
                         progress=False)


@pytest.mark.parametrize("partial", [False, True])
def test_ctrl_c_in_a_trial_closes_every_vector_env(partial):
    # interrupted in round 1, with partial batches in flight when partial=True
    clock = FakeClock(interrupt_at=1.0)
    with pytest.raises(KeyboardInterrupt):
        fastvec.autotune([CARTPOLE] * 2, budget=6.0, num_workers=[1, 2], pin=(None,),
                         partial=partial, clock=clock, progress=False)


def test_arguments_are_checked():
    fns = [CARTPOLE] * 4
    with pytest.raises(ValueError, match="partial=True"):
        fastvec.autotune(fns, batch_sizes=[2])
    with pytest.raises(ValueError, match=r"batch_sizes must be integers in \[1, num_envs=4\]"):
        fastvec.autotune(fns, batch_sizes=[5], partial=True)
    with pytest.raises(ValueError, match="num_workers candidates"):
        fastvec.autotune(fns, num_workers=[0])
    for pin in (("yes",), (1,)):
        with pytest.raises(ValueError, match="pin candidates"):
            fastvec.autotune(fns, pin=pin)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="may not set batch_size, num_workers"):
        fastvec.autotune(fns, env_kwargs={"num_workers": 2, "batch_size": 2})
    for budget in (0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="budget"):
            fastvec.autotune(fns, budget=budget)
    with pytest.raises(ValueError, match="rounds"):
        fastvec.autotune(fns, rounds=0)
    with pytest.raises(ValueError, match="at least one environment"):
        fastvec.autotune([])


# -- candidates and plan ----------------------------------------------------------------------

def test_default_worker_counts_are_powers_of_two_and_the_cores_capped_at_num_envs():
    assert default_worker_counts(32, 2) == [1, 2]
    assert default_worker_counts(32, 8) == [1, 2, 4, 8]
    assert default_worker_counts(32, 12) == [1, 2, 4, 8, 12]
    assert default_worker_counts(3, 8) == [1, 2, 3]
    assert default_worker_counts(1, 4) == [1]
    assert default_worker_counts(8, 1) == [1]


def test_settings_time_automatic_pinning_once_where_it_cannot_pin():
    assert settings(8, 2, None, None, (None, False), False) == [
        Setting(1, 8, None), Setting(2, 8, None), Setting(2, 8, False)]
    assert settings(8, 2, [2, 1, 9], None, (None, False, True), True) == [
        Setting(1, 8, None), Setting(1, 8, True), Setting(1, 4, None), Setting(1, 4, True),
        Setting(2, 8, None), Setting(2, 8, False), Setting(2, 8, True),
        Setting(2, 4, None), Setting(2, 4, False), Setting(2, 4, True),
        Setting(8, 8, None), Setting(8, 8, True), Setting(8, 4, None), Setting(8, 4, True)]
    assert settings(1, 2, None, None, (None,), True) == [Setting(1, 1, None)]
    # a parent group is one of the groups counted: one worker process fewer
    assert settings(8, 2, None, None, (None, False), False, (False, True)) == [
        Setting(1, 8, None), Setting(0, 8, None, True), Setting(2, 8, None),
        Setting(2, 8, False), Setting(1, 8, None, True), Setting(1, 8, False, True)]
    with pytest.raises(ValueError, match="parent_group candidates must be True or False"):
        settings(8, 2, None, None, (None,), False, (1,))  # type: ignore[arg-type]
    # numpy integers are integers; the settings hold plain ints
    (setting,) = settings(8, 2, [np.int64(2)], [np.int64(8)], (True,), False)
    assert setting == Setting(2, 8, True) and type(setting.num_workers) is int


def test_plan_fits_the_rounds_in_the_budget_and_always_runs_one():
    assert plan_trials(10.0, 2, 3) == (3, pytest.approx(10.0 * PLANNED_SHARE / 6))
    # too short for 3 rounds of minimal trials: as many rounds as fit
    assert plan_trials(4 * MIN_TRIAL_SECONDS / PLANNED_SHARE + 1e-9, 2, 3) == (
        2, pytest.approx(MIN_TRIAL_SECONDS))
    assert plan_trials(0.001, 4, 5) == (1, MIN_TRIAL_SECONDS)
    assert plan_trials(-3.0, 4, 5) == (1, MIN_TRIAL_SECONDS)


# -- the table ---------------------------------------------------------------------------------

def _result(others: list[float | None]) -> AutotuneResult:
    rows = [AutotuneRow(Setting(1, 8, None), rates=[100.0, 120.0, 110.0], others=others),
            AutotuneRow(Setting(2, 8, None), rates=[200.0, 220.0, 210.0], others=others),
            AutotuneRow(Setting(2, 4, False), rates=[300.0, 330.0, 315.0], others=others,
                        oversubscribed=True)]
    return AutotuneResult(rows, num_envs=8, cores=2, budget=30.0, rounds=3, planned_rounds=5,
                          trial_seconds=1.0, warmup_seconds=0.2, setup_seconds=1.5,
                          elapsed=29.0, default=Setting(2, 8, None))


def test_table_marks_the_best_and_compares_each_row_with_the_defaults():
    result = _result([0.1, 0.2, 0.1])
    assert result.best == {"num_workers": 2, "batch_size": 4, "pin_workers": False,
                           "parent_group": False}
    lines = result.format().splitlines()
    assert re.split(r"\s{2,}", lines[0].strip()) == [
        "num_workers", "batch_size", "pin_workers", "env-steps/s", "spread", "vs default",
        "other work"]
    assert lines[2].split() == ["1", "8", "auto", "110", "±9%", "0.52x", "0.10"]
    assert lines[3].split() == ["2", "8", "auto", "210", "±5%", "1.00x", "0.10"]
    assert lines[4].split() == ["*", "2!", "4", "unpinned", "315", "±5%", "1.50x", "0.10"]
    text = "\n".join(lines)
    assert "calm: little other work during the trials" in text
    assert "stopped after 3 of 5 planned rounds" in text
    assert "only with num_workers = 2 (the usable cores; 1 with a parent group); with any " \
           "other count it never pins, so auto and unpinned are timed once there" in text
    result.rows.pop()
    assert "it never pins\n" in result.format()  # no unpinned row: nothing timed once
    assert "took 29.0 s of the 30 s budget (building the vector envs: 1.5 s)" in text
    assert text.endswith("best: AsyncVectorEnv(env_fns, num_workers=2, batch_size=4, "
                         "pin_workers=False, parent_group=False)")
    assert "parent_group" not in lines[0]  # no row has a parent group: no column
    assert json.loads(json.dumps(result.to_json()))["best"] == result.best


def test_table_shows_a_parent_group_column_when_one_was_timed():
    result = _result([0.1, 0.2, 0.1])
    result.rows.append(AutotuneRow(Setting(1, 8, None, True), rates=[400.0, 400.0, 400.0],
                                   others=[0.1, 0.2, 0.1]))
    lines = result.format().splitlines()
    assert re.split(r"\s{2,}", lines[0].strip())[:3] == [
        "num_workers", "parent_group", "batch_size"]
    assert lines[2].split()[:3] == ["1", "no", "8"]
    assert lines[5].split()[:4] == ["*", "1", "yes", "8"]
    assert "parent_group yes: the calling process steps one group" in "\n".join(lines)
    assert result.best["parent_group"] is True


def test_table_says_when_the_machine_was_busy_or_its_load_unknown():
    busy = _result([0.9, 1.2, 0.3])
    assert busy.busy is True and busy.other_work == pytest.approx(0.9)
    assert "over all trials 0.90 of 2, BUSY" in busy.format()
    unknown = _result([None, None, None])
    assert unknown.busy is None
    assert "machine load: unknown" in unknown.format()


# -- packaging and the command line -----------------------------------------------------------

def test_import_fastvec_does_not_import_the_bench():
    code = "import sys, fastvec; print(fastvec.autotune.__name__, 'fastvec.bench' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.stdout.split() == ["autotune", "False"], proc.stderr
    assert "autotune" in fastvec.__all__ and "AutotuneResult" in fastvec.__all__


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fastvec.bench", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_autotune_env_prints_the_table_and_the_best_settings(tmp_path):
    out = tmp_path / "autotune.json"
    proc = _run("--autotune", "--autotune-env", "CartPole-v1", "--num-envs", "2",
                "--autotune-budget", "0.5", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("CartPole-v1 x2\n")
    rows = [m for line in proc.stdout.splitlines() if (m := ROW.match(line))]
    expected = settings(2, usable_cores(), None, None, (None, False), False, (False, True))
    assert len(rows) == len(expected)
    assert "best: AsyncVectorEnv(env_fns, num_workers=" in proc.stdout
    assert "autotune: round 1/" in proc.stderr  # the progress bar
    data = json.loads(out.read_text())
    assert data["num_envs"] == 2 and len(data["rows"]) == len(expected)
    assert set(data["best"]) == {"num_workers", "batch_size", "pin_workers", "parent_group"}


def test_cli_autotune_workload_with_partial_batches_beside_a_busy_process():
    proc = _run("--autotune", "--workload", "cartpole", "--num-envs", "4",
                "--autotune-partial", "--autotune-budget", "0.5", "--quiet", "--contention", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.startswith("contention: 1 busy-looping process ran beside the trials")
    assert "\nworkload cartpole x4\n" in proc.stdout
    sizes = {int(m[2]) for line in proc.stdout.splitlines() if (m := ROW.match(line))}
    assert sizes == {4, 2}


@pytest.mark.parametrize(("args", "message"), [
    (("--autotune",), "--autotune needs the env to tune for"),
    (("--autotune", "--workload", "cartpole", "--autotune-env", "CartPole-v1"), "not both"),
    (("--autotune", "--workload", "cartpole,image"), "one --workload"),
    (("--autotune", "--workload", "cartpole", "--num-envs", "2,4"), "one --num-envs"),
    (("--autotune", "--workload", "cartpole", "--num-workers", "2"), "--num-workers has no"),
    (("--autotune", "--autotune-env", "NoSuchEnv-v0"), "--autotune-env NoSuchEnv-v0"),
    (("--autotune-env", "CartPole-v1"), "--autotune-env needs --autotune"),
    (("--autotune-budget", "5"), "--autotune-budget needs --autotune"),
])
def test_cli_autotune_usage_errors(args, message):
    proc = _run(*args)
    assert proc.returncode == 2
    assert message in proc.stderr
