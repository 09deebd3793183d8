"""End to end: prepare() + tune() on small real data into a fresh SQLite file."""

from __future__ import annotations

import gc
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from tests.conftest import compose_raw
from tuner.checkpoint import load_model
from tuner.config import parse_trial
from tuner.data import load_splits
from tuner.tune import prepare, tune

USER_ATTRS = {"seed", "device", "param_count", "train_loss", "val_loss", "epochs_run", "epoch_time_s"}


def _overrides(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "data=digits",
        f"study.storage=sqlite:///{tmp_path / 'study.db'}",
        f"study.output_dir={tmp_path / 'out'}",
        "study.n_trials=8",
        "trainer.epochs=3",
        "pruner.n_startup_trials=2",
        "pruner.n_warmup_steps=1",
        "trainer.workers=1",  # one trial at a time: which trials the pruner stops does not depend on timing
        *extra,
    ]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, optuna.Study]:
    tmp_path = tmp_path_factory.mktemp("study")
    summary = tune(*prepare(compose_raw(*_overrides(tmp_path))))
    study = optuna.load_study(study_name="digits-mlp", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert summary.best_number == study.best_trial.number
    return tmp_path, study


def test_tune_writes_every_trial_with_epochs_and_user_attrs(finished: tuple[Path, optuna.Study]) -> None:
    _, study = finished
    assert len(study.trials) == 8
    assert study.metric_names == ["val_accuracy"]
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert complete
    for trial in complete:
        assert sorted(trial.intermediate_values) == [1, 2, 3]
        assert trial.value == trial.intermediate_values[3]
        assert trial.user_attrs.keys() >= USER_ATTRS
        assert trial.user_attrs["device"] == "cpu"
        for path in ("optimizer.momentum", "optimizer.beta1", "optimizer.beta2"):
            if f"1-{path}" in trial.params:  # reverse-log: the used value sits beside the sampled 1 - value
                assert trial.user_attrs[path] == pytest.approx(1 - trial.params[f"1-{path}"])


@pytest.mark.slow
def test_tune_parallel_workers_write_every_trial_and_keep_the_best_trials_model(tmp_path: Path) -> None:
    summary = tune(*prepare(compose_raw(*_overrides(tmp_path, "study.n_trials=10", "trainer.workers=2"))))
    study = optuna.load_study(study_name="digits-mlp", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert len(study.trials) == 10 and sorted(t.number for t in study.trials) == list(range(10))
    assert {t.state for t in study.trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    for trial in study.trials:
        assert trial.user_attrs.keys() >= USER_ATTRS and trial.intermediate_values
        assert trial.user_attrs["epochs_run"] == max(trial.intermediate_values)
    # Two workers finish trials at nearly the same moment: best_model.pt must still hold the best one.
    model, payload = load_model(tmp_path / "out" / "best_model.pt")
    assert payload["meta"]["trial"] == study.best_trial.number == summary.best_number
    splits = load_splits(parse_trial(compose_raw(*_overrides(tmp_path))).data)
    with torch.no_grad():
        accuracy = (model(splits.x_val).argmax(1) == splits.y_val).float().mean().item()
    assert accuracy == pytest.approx(study.best_value, abs=1e-6)
    assert summary.test_accuracy is not None and summary.test_accuracy > 0.8
    assert gc.get_freeze_count() == 0  # the objects frozen while the workers ran are collectable again


def test_tune_prunes_a_trial(finished: tuple[Path, optuna.Study]) -> None:
    _, study = finished
    pruned = study.get_trials(states=(TrialState.PRUNED,))
    assert pruned, [t.state for t in study.trials]
    assert all(max(t.intermediate_values) < 3 for t in pruned)
    assert all("train_loss" in t.user_attrs for t in pruned)


def test_tune_saves_the_best_model_and_scores_it_on_test(finished: tuple[Path, optuna.Study]) -> None:
    tmp_path, study = finished
    model, payload = load_model(tmp_path / "out" / "best_model.pt")
    assert payload["meta"]["trial"] == study.best_trial.number
    raw = torch.load(tmp_path / "out" / "best_model.pt", weights_only=True)  # loadable without pickle code
    assert "state_dict" in raw
    splits = load_splits(parse_trial(compose_raw("data=digits")).data)
    with torch.no_grad():
        accuracy = (model(splits.x_test).argmax(1) == splits.y_test).float().mean().item()
    stored = study.user_attrs["test_accuracy"]
    assert stored["trial"] == study.best_trial.number
    assert stored["value"] == pytest.approx(accuracy)
    assert accuracy > 0.8


@pytest.mark.slow
def test_tune_scores_the_best_trials_own_checkpoint_when_another_workers_landed_last(tmp_path: Path) -> None:
    overrides = _overrides(tmp_path)
    tune(*prepare(compose_raw(*overrides)))
    study = optuna.load_study(study_name="digits-mlp", storage=f"sqlite:///{tmp_path / 'study.db'}")
    best, path = study.best_trial, tmp_path / "out" / "best_model.pt"
    # What a parallel worker's lesser best leaves behind: another trial's checkpoint (here: with zeroed weights).
    payload = torch.load(path, weights_only=True)
    payload["meta"]["trial"] = next(t.number for t in study.trials if t.number != best.number)
    payload["state_dict"] = {k: torch.zeros_like(v) for k, v in payload["state_dict"].items()}
    torch.save(payload, path)
    summary = tune(*prepare(compose_raw(*overrides)))  # the study is full: no training, the summary scores again
    assert torch.load(path, weights_only=True)["meta"]["trial"] == best.number
    assert summary.test_accuracy is not None and summary.test_accuracy > 0.8  # the best trial's own weights


def test_tune_resume_continues_to_the_total_without_repeating(finished: tuple[Path, optuna.Study]) -> None:
    tmp_path, _ = finished
    tune(*prepare(compose_raw(*_overrides(tmp_path))))  # same command: already at the total
    url = f"sqlite:///{tmp_path / 'study.db'}"
    assert len(optuna.load_study(study_name="digits-mlp", storage=url).trials) == 8
    tune(*prepare(compose_raw(*_overrides(tmp_path), "study.n_trials=11")))
    trials = optuna.load_study(study_name="digits-mlp", storage=url).trials
    assert [t.number for t in trials] == list(range(11))
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 11


def test_tune_nan_trial_fails_with_reason_and_study_goes_on(tmp_path: Path) -> None:
    # A learning rate of 1e6 without BatchNorm makes the loss overflow.
    overrides = _overrides(
        tmp_path,
        "space=lr",
        "space.optimizer.lr.low=1e5",
        "space.optimizer.lr.high=1e6",
        "model.batch_norm=false",
        "study.n_trials=2",
    )
    summary = tune(*prepare(compose_raw(*overrides)))
    study = optuna.load_study(study_name="digits-mlp", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]
    assert all(t.user_attrs["fail_reason"].startswith("TrainingDiverged: training loss became") for t in study.trials)
    assert summary.best_number is None


def test_tune_says_when_trials_still_running_at_the_end_come_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    base = _overrides(tmp_path, "study.n_trials=1", "trainer.epochs=1", "study.heartbeat_interval=30")
    tune(*prepare(compose_raw(*base)))
    # A worker that was killed mid-trial (SIGKILL: nothing told the storage) left one trial RUNNING.
    optuna.load_study(study_name="digits-mlp", storage=f"sqlite:///{tmp_path / 'study.db'}").ask()

    with caplog.at_level("WARNING", logger="tuner"):
        summary = tune(*prepare(compose_raw(*base, "study.n_trials=2")))

    assert summary.states == {"COMPLETE": 1, "RUNNING": 1}
    (note,) = [r.getMessage() for r in caplog.records if "still RUNNING" in r.getMessage()]
    assert "1 trial(s) still RUNNING count toward study.n_trials ([1])" in note
    assert "60 s after its last heartbeat" in note and "run the same command again" in note
