"""Artifacts that tuner attaches to trials, read back through Optuna's artifact API."""

from __future__ import annotations

import io
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import torch
from optuna.artifacts import FileSystemArtifactStore, download_artifact, get_all_artifact_meta
from PIL import Image

from tests.conftest import compose_raw
from tuner.artifacts import artifact_dir
from tuner.checkpoint import load_model
from tuner.config import parse_run, parse_trial
from tuner.data import load_splits
from tuner.tune import prepare, tune


def test_artifacts_best_trial_has_a_loadable_model_and_two_images(digits_study: tuple[list[str], Any]) -> None:
    overrides, study = digits_study
    run = parse_run(compose_raw(*overrides))
    folder = artifact_dir(run.study)
    assert folder == Path(run.study.storage.removeprefix("sqlite:///")).with_name("study_artifacts")
    store = FileSystemArtifactStore(folder)
    metas = {m.filename: m for m in get_all_artifact_meta(study.best_trial, storage=study._storage)}
    assert set(metas) == {"best_model.pt", "learning_curve.png", "confusion_matrix.png"}
    assert metas["learning_curve.png"].mimetype == "image/png"

    download_artifact(
        artifact_store=store, artifact_id=metas["best_model.pt"].artifact_id, file_path=str(folder / "m.pt")
    )
    model, payload = load_model(folder / "m.pt")
    assert payload["meta"]["trial"] == study.best_trial.number
    splits = load_splits(parse_trial(compose_raw(*overrides)).data)
    with torch.no_grad():
        accuracy = (model(splits.x_val).argmax(1) == splits.y_val).float().mean().item()
    assert accuracy == pytest.approx(study.best_value, abs=1e-6)  # the very model that scored the best trial

    for name in ("learning_curve.png", "confusion_matrix.png"):
        with store.open_reader(metas[name].artifact_id) as reader:
            image = Image.open(io.BytesIO(reader.read()))
            assert image.format == "PNG" and image.size[0] >= 400


def test_artifacts_only_trials_that_were_best_when_they_finished_carry_files(
    digits_study: tuple[list[str], Any],
) -> None:
    _, study = digits_study
    best_so_far = float("-inf")
    for trial in sorted(study.trials, key=lambda t: t.datetime_complete or t.datetime_start):
        metas = get_all_artifact_meta(trial, storage=study._storage)
        new_best = trial.value is not None and trial.value > best_so_far
        assert bool(metas) == new_best, (trial.number, trial.state, trial.value, best_so_far)
        if new_best:
            best_so_far = trial.value


@pytest.mark.parametrize("where", ["database copied elsewhere", "artifact_dir removed"])
def test_artifacts_missing_folder_still_finishes_the_study_and_says_so_once(
    digits_study: tuple[list[str], Any], tmp_path: Path, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    overrides, study = digits_study
    source = next(o for o in overrides if o.startswith("study.storage=")).split("sqlite:///", 1)[1]
    with sqlite3.connect(source) as src, sqlite3.connect(tmp_path / "copy.db") as dst:
        src.backup(dst)  # the database alone, without its artifact folder or best_model.pt
    keep = [o for o in overrides if not o.startswith(("study.storage=", "study.output_dir="))]
    moved = [f"study.storage=sqlite:///{tmp_path / 'copy.db'}", f"study.output_dir={tmp_path / 'out'}"]
    if where == "artifact_dir removed":
        (tmp_path / "artifacts").mkdir()
        (tmp_path / "artifacts").rmdir()
        moved.append(f"study.artifact_dir={tmp_path / 'artifacts'}")

    with caplog.at_level(logging.WARNING, logger="tuner"):
        summary = tune(*prepare(compose_raw(*keep, *moved)))  # the study is full: the end scores its best

    assert summary.best_number == study.best_trial.number and summary.test_accuracy is None
    (warning,) = [r.message for r in caplog.records if r.name == "tuner" and r.levelno == logging.WARNING]
    assert "is not in the artifact folder" in warning and f"trial {study.best_trial.number}'s checkpoint" in warning
