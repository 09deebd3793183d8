"""Optuna's trial tables (optuna 5.0's RDB schema, unchanged since 3.2) read with SQLAlchemy Core.

``RDBStorage`` builds each trial through the ORM: a session, then one SELECT per child table with
``selectinload`` and an ORM object per row, the costly part of loading a trial on SQLite. ``load_trials`` runs
the same SELECTs in Core and builds the ``FrozenTrial`` as ``RDBStorage._build_frozen_trial_from_trial_model``
does (tests/test_batched.py compares the two on trials of every kind). Used by tuner.batched.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy
from optuna import distributions
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial, TrialState

__all__ = ["TRIALS", "bare_trial", "check_study", "load_trials"]

# Trial ids per IN (...) list when loading trials (SQLite allows 32,766 variables since 3.32, 999 before).
_CHUNK = 500

TRIALS = models.TrialModel.__table__


def bare_trial(
    trial_id: int, number: int, state: TrialState, start: datetime | None, complete: datetime | None
) -> FrozenTrial:
    """A trial as its row in ``trials`` gives it: no params, values, attributes or intermediate values yet."""
    return FrozenTrial(
        number=number,
        state=state,
        value=None,
        values=None,
        datetime_start=start,
        datetime_complete=complete,
        params={},
        distributions={},
        user_attrs={},
        system_attrs={},
        intermediate_values={},
        trial_id=trial_id,
    )


def check_study(conn: sqlalchemy.Connection, study_id: int) -> None:
    """Raise ``KeyError`` for a study that does not exist, as ``RDBStorage`` does."""
    studies = models.StudyModel.__table__
    if conn.execute(sqlalchemy.select(studies.c.study_id).where(studies.c.study_id == study_id)).first() is None:
        raise KeyError(models.NOT_FOUND_MSG)


def load_trials(
    conn: sqlalchemy.Connection, *where: Any, known: Callable[[Sequence[Any]], dict[int, FrozenTrial]] | None = None
) -> list[FrozenTrial]:
    """The trials matching ``where``, by trial id, built as ``RDBStorage._build_frozen_trial_from_trial_model``
    builds them (optuna 5.0) from one SELECT of the trials and one of each child table; those that ``known``
    (a function of the trial rows) returns are taken from it."""
    rows = conn.execute(
        sqlalchemy.select(
            TRIALS.c.trial_id,
            TRIALS.c.number,
            TRIALS.c.state,
            TRIALS.c.datetime_start,
            TRIALS.c.datetime_complete,
        )
        .where(*where)
        .order_by(TRIALS.c.trial_id)
    ).all()
    have = known(rows) if known is not None else {}
    trials = {
        row.trial_id: bare_trial(row.trial_id, row.number, row.state, row.datetime_start, row.datetime_complete)
        for row in rows
        if row.trial_id not in have
    }
    ids = list(trials)
    for i in range(0, len(ids), _CHUNK):
        _fill(conn, trials, ids[i : i + _CHUNK])
    return [have.get(row.trial_id) or trials[row.trial_id] for row in rows]


def _fill(conn: sqlalchemy.Connection, trials: dict[int, FrozenTrial], ids: list[int]) -> None:
    """Add the params, values, attributes and intermediate values of the trials ``ids``."""
    params = models.TrialParamModel.__table__
    for trial_id, name, value, distribution_json in conn.execute(
        sqlalchemy.select(params.c.trial_id, params.c.param_name, params.c.param_value, params.c.distribution_json)
        .where(params.c.trial_id.in_(ids))
        .order_by(params.c.param_id)
    ):
        distribution = _distribution(distribution_json)
        trials[trial_id].params[name] = distribution.to_external_repr(value)
        trials[trial_id].distributions[name] = distribution
    table = models.TrialValueModel.__table__
    values: dict[int, dict[int, float]] = {}
    for trial_id, objective, value, value_type in conn.execute(
        sqlalchemy.select(table.c.trial_id, table.c.objective, table.c.value, table.c.value_type).where(
            table.c.trial_id.in_(ids)
        )
    ):
        values.setdefault(trial_id, {})[objective] = models.TrialValueModel.stored_repr_to_value(value, value_type)
    for trial_id, by_objective in values.items():
        trials[trial_id].values = [by_objective.get(i, 0) for i in range(len(by_objective))]
    for model, kind in (
        (models.TrialUserAttributeModel, "user_attrs"),
        (models.TrialSystemAttributeModel, "system_attrs"),
    ):
        table = model.__table__
        rows = conn.execute(
            sqlalchemy.select(table.c.trial_id, table.c.key, table.c.value_json).where(table.c.trial_id.in_(ids))
        )
        for trial_id, key, value_json in rows:
            getattr(trials[trial_id], kind)[key] = json.loads(value_json)
    table = models.TrialIntermediateValueModel.__table__
    stored_to_value = models.TrialIntermediateValueModel.stored_repr_to_intermediate_value
    for trial_id, step, value, value_type in conn.execute(
        sqlalchemy.select(
            table.c.trial_id, table.c.step, table.c.intermediate_value, table.c.intermediate_value_type
        ).where(table.c.trial_id.in_(ids))
    ):
        trials[trial_id].intermediate_values[step] = stored_to_value(value, value_type)


@functools.lru_cache(maxsize=1024)
def _distribution(distribution_json: str) -> distributions.BaseDistribution:
    """A parsed distribution, shared by the trials that store the same JSON (distributions are not changed
    after they are made)."""
    return distributions.json_to_distribution(distribution_json)
