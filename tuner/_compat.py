"""Every non-public name of Optuna and Hydra that tuner uses, in one place; tests/test_compat.py checks each.

Checked against optuna 5.0.0, hydra-core 1.3.8 and hydra-joblib-launcher 1.2.0. When an upgrade breaks one,
its canary test fails and this module is the only one to change.
"""

from __future__ import annotations

import optuna
from optuna.pruners import PercentilePruner

__all__ = ["LAUNCHER_LOGGERS", "optuna_table_names", "startup_trials", "trial_id"]

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
