"""The benchmarks under scripts/ that the README quotes: they run, and their fairness checks hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each test runs a benchmark script end to end

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_scripts_bench_quick_compares_the_same_trials_on_every_side(tmp_path: Path) -> None:
    result = _script("bench.py", "--quick", "--datasets", "digits", "--json", str(tmp_path / "b.json"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (row,) = json.loads((tmp_path / "b.json").read_text())["summary"]
    assert row["dataset"] == "digits" and row["rounds"] == 2 and row["trials_per_round"] == 4
    assert row["same_sampled_params"]  # every variant sampled the same parameters, round by round
    assert sorted(row["states"]) == ["memory", "reference", "reference_mt", "sqlite"]
    # 2 rounds of 4 trials each, exactly, also where tuner's workers train side by side
    assert all(sum(states.values()) == 8 for states in row["states"].values())
    assert row["wall"]["memory_over_reference"] > 0 and len(row["by_cost"]) == 4
    # every trial reports at least one epoch: 2 rounds of 4 trials on each side
    assert all(len(epochs) == 2 and min(epochs) >= 4 for epochs in row["epochs_per_round"].values())
    paired = row["paired"]
    assert paired["n"] == paired["better"] + paired["same"] + paired["worse"] >= 1
    assert "same sampled parameters on all sides: True" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json"]  # no database or artifacts left behind


def test_scripts_bench_pack_prints_one_row_per_pack_size(tmp_path: Path) -> None:
    args = ["--models", "mlp", "--batch-sizes", "128", "--sizes", "1", "2", "--rounds", "1", "--epochs", "1"]
    result = _script("bench_pack.py", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[2:]]
    assert [r[2] for r in rows] == ["1", "2"] and all(float(r[3]) > 0 and r[5].endswith("x") for r in rows)


def test_scripts_bench_study_runs_each_pack_setting_and_compares_it(tmp_path: Path) -> None:
    overrides = ["data=digits", "study.n_trials=4", "trainer.epochs=1", "pruner=none"]
    result = _script("bench_study.py", "--packs", "1", "2", "--seeds", "0", "--", *overrides, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    rows = [line.split() for line in lines[1:3]]
    assert [r[0] for r in rows] == ["1", "2"] and all(int(r[5]) == 4 for r in rows)  # 4 trials completed each
    assert lines[-1].startswith("trainer.pack=2: median wall") and "x pack=1" in lines[-1]
    assert list(tmp_path.iterdir()) == []  # its studies lived in a temporary folder


def test_scripts_bench_budget_prints_one_row_per_block(tmp_path: Path) -> None:
    result = _script("bench_budget.py", "--blocks", "2", "--block", "10", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    assert [r[0] for r in rows] == ["10", "20"] and all(float(r[3]) > 0 for r in rows)


def test_scripts_bench_workers_prints_one_row_per_shape(tmp_path: Path) -> None:
    result = _script("bench_workers.py", "--steps", "20", "--shapes", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[1:-1]]
    assert len(rows) == 2 and all(float(r[2]) > 0 and r[4].endswith("x") for r in rows)
    assert result.stdout.splitlines()[-1].startswith("speed-up over one after the other")


def test_scripts_bench_startup_times_both_ways_of_starting_workers(tmp_path: Path) -> None:
    result = _script("bench_startup.py", "--rounds", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {line[:22].strip(): line[22:].split() for line in result.stdout.splitlines()[1:]}
    assert sorted(rows) == ["forkserver", "fresh / forkserver", "fresh interpreters"]
    assert float(rows["forkserver"][0]) > 0 and float(rows["fresh interpreters"][0]) > 0
    assert rows["fresh / forkserver"][0].endswith("x")


def test_scripts_stress_kills_a_worker_mid_trial_and_loses_nothing(tmp_path: Path) -> None:
    result = _script("stress.py", "--trials", "45", "--workers", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {line[:20].strip(): line[20:] for line in result.stdout.splitlines()[1:]}
    server = ["PostgreSQL"] if os.environ.get("TUNER_TEST_POSTGRES_URL") else []  # .ci/run starts one
    assert sorted(rows) == sorted(["SQLite WAL", "journal file", *server])
    for label, row in rows.items():
        fields = dict(pair.rsplit(" ", 1) for pair in row.strip().split("  ") if " " in pair)
        assert int(fields["killed after"]) >= 15, (label, row)  # a third of 45, with the victim's trial running
        assert int(fields["retried"]) >= 1, (label, row)  # so its trial was failed and trained again
        for kept in ("lost", "left RUNNING", "left WAITING", "extra", "worker crashes"):
            assert fields[kept] == "0", (label, kept, row)
