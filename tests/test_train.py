"""``python -m tuner.train``: the job side of the tuner sweeper (the sweeps themselves: tests/test_sweeper.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from tests.conftest import compose_raw
from tuner.handoff import TrialHandle
from tuner.train import train_trial


def test_train_trains_the_trial_it_is_handed_and_reports_each_epoch(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 't.db'}"
    study = optuna.create_study(study_name="digits-mlp", storage=url, direction="maximize")
    asked = study.ask()
    raw = compose_raw(
        "data=digits",
        "trainer.epochs=2",
        "pruner=none",
        f"study.storage={url}",
        f"study.output_dir={tmp_path / 'out'}",
        *TrialHandle(study="digits-mlp", trial=asked.number).overrides(),
    )
    value = train_trial(raw)
    assert isinstance(value, float) and 0.0 < value <= 1.0
    stored = study.trials[asked.number]
    assert sorted(stored.intermediate_values) == [1, 2]
    assert stored.intermediate_values[2] == value
    assert stored.state == optuna.trial.TrialState.RUNNING  # the sweeper, not the job, tells the result


@pytest.mark.slow
def test_train_without_a_sweeper_says_how_to_run_it(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tuner.train", "data=digits", f"study.storage=sqlite:///{tmp_path / 't.db'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 2
    assert "python -m tuner.train -m hydra/sweeper=tuner" in out and "Traceback" not in out
    assert not (tmp_path / "t.db").exists()
