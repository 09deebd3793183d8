"""The benchmarks under scripts/ that the README quotes: they run, and their fairness checks hold."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def test_scripts_bench_quick_compares_the_same_trials_on_all_three_sides(tmp_path: Path) -> None:
    result = _script("bench.py", "--quick", "--datasets", "digits", "--json", str(tmp_path / "b.json"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (row,) = json.loads((tmp_path / "b.json").read_text())["summary"]
    assert row["dataset"] == "digits" and row["rounds"] == 2 and row["trials_per_round"] == 4
    assert row["same_sampled_params"]  # every variant sampled the same parameters, round by round
    assert all(sum(states.values()) == 8 for states in row["states"].values())
    assert row["wall"]["memory_over_reference"] > 0 and len(row["by_cost"]) == 4
    paired = row["paired"]
    assert paired["n"] == paired["better"] + paired["same"] + paired["worse"] >= 1
    assert "same sampled parameters on all three sides: True" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json"]  # no database or artifacts left behind


def test_scripts_bench_budget_prints_one_row_per_block(tmp_path: Path) -> None:
    result = _script("bench_budget.py", "--blocks", "2", "--block", "10", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[1:]]
    assert [r[0] for r in rows] == ["10", "20"] and all(float(r[3]) > 0 for r in rows)
