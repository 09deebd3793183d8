"""Canaries for tuner._compat: each fails when an Optuna or Hydra upgrade changes a non-public name tuner uses."""

from __future__ import annotations

import importlib
import logging
import sqlite3
from pathlib import Path

import optuna
import pytest

from tuner._compat import LAUNCHER_LOGGERS, optuna_table_names, startup_trials, trial_id


@pytest.mark.parametrize("pruner", [optuna.pruners.MedianPruner, optuna.pruners.PercentilePruner])
def test_compat_startup_trials_reads_the_pruners_own_setting(pruner: type) -> None:
    options = {"percentile": 25.0} if pruner is optuna.pruners.PercentilePruner else {}
    assert startup_trials(pruner(n_startup_trials=7, **options)) == 7


def test_compat_optuna_table_names_are_the_tables_optuna_creates(tmp_path: Path) -> None:
    optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.db'}").engine.dispose()
    with sqlite3.connect(tmp_path / "o.db") as conn:
        created = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert optuna_table_names() == created - {"alembic_version"}
    assert {"studies", "trials", "version_info"} <= optuna_table_names()


@pytest.mark.parametrize("name", LAUNCHER_LOGGERS)
def test_compat_launcher_loggers_are_the_launchers_own(name: str) -> None:
    # Each launcher module logs its jobs' overrides through a module logger of its own name.
    module = importlib.import_module(name)
    assert isinstance(module.log, logging.Logger) and module.log.name == name


def test_compat_trial_id_is_the_storages_id_of_the_trial(tmp_path: Path) -> None:
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.db'}")
    study = optuna.create_study(storage=storage, study_name="s")
    study.tell(study.ask(), 0.0)  # ids and numbers differ across studies: a second study makes them part
    other = optuna.create_study(storage=storage, study_name="t")
    trial = other.ask()
    study_id = storage.get_study_id_from_name("t")
    assert trial_id(trial) == storage.get_trial_id_from_study_id_trial_number(study_id, trial.number) != trial.number


def test_compat_the_digits_table_is_what_load_digits_returns() -> None:
    import numpy as np
    from sklearn.datasets import load_digits

    from tuner._compat import sklearn_digits_table
    from tuner.datasets import digits

    assert sklearn_digits_table() is not None  # else data=digits imports scikit-learn: over a second a process
    loaded, fast = load_digits(), digits()
    assert np.array_equal(fast["x_train"][:, 0] * 16, loaded.images.astype(np.float32))
    assert np.array_equal(fast["y_train"], loaded.target) and fast["y_train"].dtype == np.int64
