"""The study note that optuna-dashboard shows, as tuner writes it into storage."""

from __future__ import annotations

from typing import Any

import optuna
import optuna_dashboard
import pytest

from tests.conftest import compose_raw
from tuner.config import parse_run
from tuner.notes import command_line, end_note, write_end_note, write_start_note
from tuner.space import parse_space


def test_notes_study_note_in_storage_tells_setup_space_and_results(digits_study: tuple[list[str], Any]) -> None:
    _, study = digits_study
    note = optuna_dashboard.get_note(study)
    assert study.metric_names == ["val_accuracy"]
    for text in (
        "# Study `digits-mlp`",
        "| data set | digits",
        "| sampler | RandomSampler (seed=0) |",
        "| pruner | MedianPruner (n_startup_trials=3, n_warmup_steps=1",
        "| `optimizer.lr` | [0.0001, 1] log | always |",
        "| `optimizer.momentum` | [0.9, 0.999] log(1 - value) (stored as `1-optimizer.momentum`) | optimizer.name in",
        "| `data.batch_size` | {32, 64, 128, 256} | always |",
        f"**Best trial: #{study.best_trial.number}**, val_accuracy {study.best_value:.4f}",
        "PED-ANOVA importance",
        "learning rate first",
    ):
        assert text in note, text
    assert "in progress" not in note  # the end of the run replaced the placeholder
    assert note.count("## Results") == 1
    complete = len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
    assert f"Trials: {complete} complete" in note
    for trial in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        # numeric, so the dashboard's trial table can sort and plot them
        for key in ("epoch_time_s", "param_count", "train_loss", "val_loss"):
            assert isinstance(trial.user_attrs[key], (int, float)), key


def test_notes_importance_table_ranks_params_with_the_lessons_tier() -> None:
    raw = compose_raw("space=lr", "data=digits")
    params = parse_space(raw["space"], raw)
    # Seeded, and 30 trials: with 12 unseeded ones PED-ANOVA put the irrelevant param first in 4 of 20 samples.
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        trial = study.ask()
        lr = trial.suggest_float("optimizer.lr", 1e-4, 1.0, log=True)
        trial.suggest_int("model.hidden_units", 32, 512, log=True)  # no effect on the value below
        study.tell(trial, -abs(lr - 0.01))
    note = end_note(study, params)
    table = [line for line in note.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert table[0].startswith("| 1 | `optimizer.lr` |") and table[0].endswith("| 1 |")
    assert table[1].startswith("| 2 | `model.hidden_units` |") and table[1].endswith("| 2 |")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["/x/site-packages/tuner/__main__.py", "data=digits"], "python -m tuner data=digits"),
        (["/x/tuner/refine.py", "refine.top_k=3"], "python -m tuner.refine refine.top_k=3"),
        (["/usr/bin/tuner", "study.name=a b"], "tuner 'study.name=a b'"),
    ],
)
def test_notes_command_line_is_what_a_user_would_type(argv: list[str], expected: str) -> None:
    assert command_line(argv) == expected


def test_notes_a_note_written_in_the_dashboard_is_kept_across_runs() -> None:
    raw = compose_raw("space=lr", "data=digits")
    run, params = parse_run(raw), parse_space(raw["space"], raw)
    study = optuna.create_study(study_name="kept")
    optuna_dashboard.save_note(study, "lr above 0.3 diverges: **check the BatchNorm run**")
    for _ in range(2):  # a first run and a resumed one
        write_start_note(study, run, params)
        write_end_note(study, params)
    note = optuna_dashboard.get_note(study)
    assert note.startswith("# Study `digits-mlp`")
    assert note.count("lr above 0.3 diverges: **check the BatchNorm run**") == 1
    assert note.index("## Your earlier note") < note.index("## Results")
