"""tuner.trial_rows: Optuna's trial tables read with SQLAlchemy Core give the trials Optuna's ORM gives."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest
from optuna.storages import RDBStorage

from tuner.trial_rows import TRIALS, check_study, load_trials


def as_compared(trial: optuna.trial.FrozenTrial) -> str:
    """Every field of a trial, NaN equal to NaN (FrozenTrial's own == says NaN != NaN)."""
    return repr(sorted(vars(trial).items()))


def various_trials(study: optuna.Study) -> None:
    """Trials in every state with every kind of stored value, written by Optuna's own RDBStorage."""

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 1e-4, 1.0, log=True)
        trial.suggest_int("n", 2, 64, step=2)
        trial.suggest_categorical("c", [None, True, "adam", 0.5])
        trial.set_user_attr("nested", {"a": [1, 2.5, None], "b": "β"})
        study._storage.set_trial_system_attr(trial._trial_id, "sys", [trial.number])
        for step, value in enumerate([0.5, math.nan, math.inf, -math.inf]):
            trial.report(value, step)
        if trial.number % 4 == 1:
            raise optuna.TrialPruned
        if trial.number % 4 == 2:
            raise RuntimeError("a failed trial")
        return math.inf if trial.number == 3 else x

    study.optimize(objective, n_trials=8, catch=(RuntimeError,))
    study.enqueue_trial({"x": 0.5})  # WAITING
    study.ask()  # RUNNING, with nothing written yet


def test_trial_rows_load_every_kind_of_trial_as_optunas_orm_builds_it(tmp_path: Path) -> None:
    storage = RDBStorage(f"sqlite:///{tmp_path / 'r.db'}")
    various_trials(optuna.create_study(storage=storage, study_name="s", direction="maximize"))
    several = optuna.create_study(storage=storage, study_name="m", directions=["minimize", "maximize"])
    several.optimize(lambda t: (t.suggest_float("x", 0, 1), -math.inf), n_trials=3)
    for name in ("s", "m"):
        study_id = storage.get_study_id_from_name(name)
        with storage.engine.connect() as conn:
            got = load_trials(conn, TRIALS.c.study_id == study_id)
        expected = storage._get_trials(study_id, None, set(), -1)
        assert len(expected) >= 3 and [as_compared(t) for t in got] == [as_compared(t) for t in expected]
    with storage.engine.connect() as conn, pytest.raises(KeyError):
        check_study(conn, 999)
