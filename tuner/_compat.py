"""Every non-public name of Optuna, Hydra and scikit-learn that tuner uses, in one place; tests/test_compat.py checks
each.

Checked against optuna 5.0.0, hydra-core 1.3.8, hydra-joblib-launcher 1.2.0 and scikit-learn 1.9.1. When an upgrade
breaks one, its canary test fails and this module is the only one to change.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import optuna
from optuna.pruners import PercentilePruner

__all__ = ["LAUNCHER_LOGGERS", "optuna_table_names", "sklearn_digits_table", "startup_trials", "trial_id"]

# The loggers that print each job's overrides (the storage URL among them): Hydra's basic launcher and the
# joblib launcher. Neither is a documented name.
LAUNCHER_LOGGERS = ("hydra._internal.core_plugins.basic_launcher", "hydra_plugins.hydra_joblib_launcher._core")


def startup_trials(pruner: PercentilePruner) -> int:
    """``n_startup_trials`` of a median or percentile pruner: Optuna keeps it only as a private attribute."""
    return int(pruner._n_startup_trials)


def trial_id(trial: optuna.Trial) -> int:
    """The storage's id of a live trial, for ``record_heartbeat``: the public way, by study and number, costs two
    queries a trial."""
    return int(trial._trial_id)


def optuna_table_names() -> set[str]:
    """The tables of Optuna's RDB schema, to tell a half-made Optuna file from another application's database."""
    from optuna.storages._rdb import models  # SQLAlchemy's ORM models: imported only when a SQLite file is checked

    return set(models.BaseModel.metadata.tables)


def sklearn_digits_table() -> Path | None:
    """The file ``sklearn.datasets.load_digits`` reads (``sklearn/datasets/data/digits.csv.gz``: 64 pixel columns and
    the label), found without importing scikit-learn, whose import costs each process over a second; ``None``
    where it is not (then ``load_digits`` is the way)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    return path if path.is_file() else None
