"""This process's running trials kept in memory, and their writes sent to the database in batches.

Every ``trial.suggest_*``, ``set_user_attr`` and ``report`` is a transaction of its own in Optuna's
``RDBStorage`` (optuna 5.0), about 1.3 ms of this process's CPU each through the ORM, and Optuna's cached
storage reads a running trial back from the database at every ``study.get_trials``. With two workers on
scripts/bench.py's digits study that was ~26 writes and ~6 reads of running trials per 36 ms trial: the
tuner process used 55-60 ms of CPU a trial against 12 ms with in-memory storage, and the workers waited for it.
Optuna has no batching for trial writes (checked: ``RDBStorage``, ``_CachedStorage``, ``JournalStorage``).

``BatchedTrialWrites`` (a subclass of ``RDBStorage``) owns each trial this process created or popped while it
runs: it keeps the trial as a ``FrozenTrial`` in memory (every read in this process gets it from there) and
queues its params, attributes and intermediate values. They are written in one transaction:

- when training starts (``write_now``), so the dashboard shows a trial's params while it trains;
- at a write that comes ``FLUSH_S`` or more after the trial's last one was written, so a slow trial's
  per-epoch values reach the database as they come, and a fast trial's in few transactions;
- before the trial's state changes: a finished trial is always stored whole;
- when the process exits.

A process killed in between loses at most ``FLUSH_S`` of a running trial's writes; that trial is failed for
want of a heartbeat and trained again from the start (tuner.faults), so no finished trial is incomplete.
Other processes see a running trial's values up to ``FLUSH_S`` late.
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import json
import threading
import time
import weakref
from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
import sqlalchemy
from optuna import distributions
from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import orm
from sqlalchemy.dialects import sqlite as sqlite_dialect

__all__ = ["FLUSH_S", "BatchedTrialWrites", "hand_over", "write_now"]

# A running trial's queued writes wait at most this long for the next write to send them.
FLUSH_S = 1.0


@dataclass
class _Owned:
    """A running trial of this process: what readers here see, and what the database has yet to get."""

    study_id: int
    trial: FrozenTrial
    written_at: float = field(default_factory=time.monotonic)
    params: list[dict[str, Any]] = field(default_factory=list)
    user_attrs: dict[str, str] = field(default_factory=dict)  # key -> JSON
    system_attrs: dict[str, str] = field(default_factory=dict)
    intermediate: dict[int, tuple[float | None, Any]] = field(default_factory=dict)  # step -> stored repr

    def pending(self) -> bool:
        return bool(self.params or self.user_attrs or self.system_attrs or self.intermediate)

    def take(self) -> _Owned:
        """The queued writes, moved out into a copy of their own."""
        taken = dataclasses.replace(self)
        self.params, self.user_attrs, self.system_attrs, self.intermediate = [], {}, {}, {}
        self.written_at = time.monotonic()
        return taken


def _copy(trial: FrozenTrial) -> FrozenTrial:
    """A copy that later writes to ``trial`` leave alone: its dicts copied (a deepcopy cost 2 ms a digits trial).

    Values inside them are not: params and distributions are immutable, attributes are JSON that nothing here
    changes in place.
    """
    copied = copy.copy(trial)
    copied.params, copied.distributions = dict(trial.params), dict(trial.distributions)
    copied.user_attrs, copied.system_attrs = dict(trial.user_attrs), dict(trial.system_attrs)
    copied.intermediate_values = dict(trial.intermediate_values)
    return copied


def _flush_at_exit(ref: weakref.ReferenceType[BatchedTrialWrites]) -> None:
    storage = ref()
    if storage is not None:
        storage.flush()


class BatchedTrialWrites(RDBStorage):
    """``RDBStorage`` that keeps its own running trials in memory and writes them in batches (SQLite only).

    On other databases every call goes straight to ``RDBStorage``: a server shared by many machines is where
    other workers' pruners read running trials, and it has not been measured here.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_owned()

    def _init_owned(self) -> None:
        self._batched = self.engine.dialect.name == "sqlite"
        self._owned: dict[int, _Owned] = {}
        self._owned_lock = threading.RLock()
        self._flush_lock = threading.Lock()  # one flush at a time: a later value never lands before an earlier one
        atexit.register(_flush_at_exit, weakref.ref(self))

    # --- Owning a trial ---------------------------------------------------------------------------------

    def _create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> FrozenTrial:
        frozen = super()._create_new_trial(study_id, template_trial)
        if self._batched and frozen.state == TrialState.RUNNING:
            self._own(study_id, _copy(frozen))
        return frozen

    def _own(self, study_id: int, trial: FrozenTrial) -> None:
        with self._owned_lock:
            self._owned[trial._trial_id] = _Owned(study_id, trial)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        if trial_id not in self._owned:
            changed = super().set_trial_state_values(trial_id, state, values)
            if changed and self._batched and state == TrialState.RUNNING:  # this process popped a queued trial
                self._own(self._study_id_of(trial_id), super().get_trial(trial_id))
            return changed
        self.release(trial_id)  # its queued writes first: a finished trial is stored whole
        return super().set_trial_state_values(trial_id, state, values)

    def release(self, trial_id: int) -> None:
        """Write the trial's queued writes and stop keeping it in memory: reads go to the database again."""
        self.flush([trial_id])
        with self._owned_lock:
            self._owned.pop(trial_id, None)

    def _study_id_of(self, trial_id: int) -> int:
        with orm.Session(self.engine) as session:
            return int(models.TrialModel.find_or_raise_by_id(trial_id, session).study_id)

    # --- Writes -----------------------------------------------------------------------------------------

    def _set_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: distributions.BaseDistribution,
        previous_distribution: distributions.BaseDistribution | None,
    ) -> None:
        owned = self._owned.get(trial_id)
        if owned is None or previous_distribution is None:
            # Not ours, or the first time this process sets this param: RDBStorage checks the study's
            # stored distribution for it (one query), later calls get it from Optuna's cache.
            super()._set_trial_param(trial_id, param_name, param_value_internal, distribution, previous_distribution)
            if owned is not None:
                with self._owned_lock:
                    self._mirror_param(owned, param_name, param_value_internal, distribution)
            return
        distributions.check_distribution_compatibility(previous_distribution, distribution)
        with self._owned_lock:
            self._mirror_param(owned, param_name, param_value_internal, distribution)
            owned.params.append(
                {
                    "trial_id": trial_id,
                    "param_name": param_name,
                    "param_value": param_value_internal,
                    "distribution_json": distributions.distribution_to_json(distribution),
                }
            )
        self._maybe_flush(trial_id, owned)

    @staticmethod
    def _mirror_param(owned: _Owned, name: str, value: float, distribution: distributions.BaseDistribution) -> None:
        owned.trial.params[name] = distribution.to_external_repr(value)
        owned.trial.distributions[name] = distribution

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        if not self._queue_attr(trial_id, "user_attrs", key, value):
            super().set_trial_user_attr(trial_id, key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        if not self._queue_attr(trial_id, "system_attrs", key, value):
            super().set_trial_system_attr(trial_id, key, value)

    def _queue_attr(self, trial_id: int, kind: str, key: str, value: Any) -> bool:
        """Queue a user or system attribute (``kind``) of an owned trial; False for a trial not ours."""
        owned = self._owned.get(trial_id)
        if owned is None:
            return False
        with self._owned_lock:
            getattr(owned.trial, kind)[key] = json.loads(json.dumps(value))  # what a read from the database gives
            getattr(owned, kind)[key] = json.dumps(value)
        self._maybe_flush(trial_id, owned)
        return True

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        owned = self._owned.get(trial_id)
        if owned is None:
            super().set_trial_intermediate_value(trial_id, step, intermediate_value)
            return
        stored = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(intermediate_value)
        with self._owned_lock:
            owned.trial.intermediate_values[step] = intermediate_value
            owned.intermediate[step] = stored
        self._maybe_flush(trial_id, owned)

    def _maybe_flush(self, trial_id: int, owned: _Owned) -> None:
        if time.monotonic() - owned.written_at >= FLUSH_S and trial_id in self.flush([trial_id]):
            # Another process finished it (no heartbeat for its grace period, longer than FLUSH_S): refuse
            # this write as RDBStorage refuses each write to a finished trial, so the objective stops.
            raise optuna.exceptions.UpdateFinishedTrialError(
                f"Trial#{owned.trial.number} has already finished and can not be updated."
            )

    def flush(self, trial_ids: Sequence[int] | None = None) -> set[int]:
        """Write the queued writes of ``trial_ids`` (all owned trials when None) in one transaction.

        A trial that another process has meanwhile finished (failed for want of a heartbeat) gets none
        of them, as ``RDBStorage`` would refuse each; this process stops owning it. Returns those trials.
        """
        with self._flush_lock:
            with self._owned_lock:
                ids = list(self._owned) if trial_ids is None else [t for t in trial_ids if t in self._owned]
                taken = {t: self._owned[t].take() for t in ids}
                taken = {t: owned for t, owned in taken.items() if owned.pending()}
            if not taken:
                return set()
            gone = self._write(taken)
            with self._owned_lock:
                for t in gone:
                    self._owned.pop(t, None)
            return gone

    def _write(self, batch: dict[int, _Owned]) -> set[int]:
        trials = models.TrialModel.__table__
        with self.engine.begin() as conn:
            rows = conn.execute(
                sqlalchemy.select(trials.c.trial_id, trials.c.state).where(trials.c.trial_id.in_(batch))
            )
            running = {trial_id for trial_id, state in rows if state == TrialState.RUNNING}
            params = [row for t in running for row in batch[t].params]
            if params:
                table = models.TrialParamModel.__table__
                conn.execute(sqlite_dialect.insert(table).on_conflict_do_nothing(), params)
            for model, attr in (
                (models.TrialUserAttributeModel, "user_attrs"),
                (models.TrialSystemAttributeModel, "system_attrs"),
            ):
                attrs = [
                    {"trial_id": t, "key": k, "value_json": v}
                    for t in running
                    for k, v in getattr(batch[t], attr).items()
                ]
                if attrs:
                    insert = sqlite_dialect.insert(model.__table__)
                    upsert = insert.on_conflict_do_update(
                        index_elements=["trial_id", "key"], set_={"value_json": insert.excluded.value_json}
                    )
                    conn.execute(upsert, attrs)
            values = [
                {"trial_id": t, "step": step, "intermediate_value": v, "intermediate_value_type": kind}
                for t in running
                for step, (v, kind) in batch[t].intermediate.items()
            ]
            if values:
                insert = sqlite_dialect.insert(models.TrialIntermediateValueModel.__table__)
                upsert = insert.on_conflict_do_update(
                    index_elements=["trial_id", "step"],
                    set_={
                        "intermediate_value": insert.excluded.intermediate_value,
                        "intermediate_value_type": insert.excluded.intermediate_value_type,
                    },
                )
                conn.execute(upsert, values)
        return set(batch) - running

    # --- Reads: this process's running trials come from memory ----------------------------------------

    def _mirror(self, trial_id: int) -> FrozenTrial | None:
        with self._owned_lock:
            owned = self._owned.get(trial_id)
            return None if owned is None else _copy(owned.trial)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        mirror = self._mirror(trial_id)
        return mirror if mirror is not None else super().get_trial(trial_id)

    def get_trial_user_attrs(self, trial_id: int) -> dict[str, Any]:
        mirror = self._mirror(trial_id)
        return mirror.user_attrs if mirror is not None else super().get_trial_user_attrs(trial_id)

    def get_trial_system_attrs(self, trial_id: int) -> dict[str, Any]:
        mirror = self._mirror(trial_id)
        return mirror.system_attrs if mirror is not None else super().get_trial_system_attrs(trial_id)

    def get_trial_param(self, trial_id: int, param_name: str) -> float:
        mirror = self._mirror(trial_id)
        if mirror is None:
            return super().get_trial_param(trial_id, param_name)
        return mirror.distributions[param_name].to_internal_repr(mirror.params[param_name])

    def _get_trials(
        self,
        study_id: int,
        states: Container[TrialState] | None,
        included_trial_ids: set[int],
        trial_id_greater_than: int,
    ) -> list[FrozenTrial]:
        """``RDBStorage._get_trials`` (optuna 5.0; what Optuna's cached storage refreshes with) without
        loading this process's running trials from the database: their in-memory copies take their place."""
        included = {t for t in included_trial_ids if t <= trial_id_greater_than}
        with self._owned_lock:
            mine = {t: o.trial for t, o in self._owned.items() if o.study_id == study_id}
            wanted = {
                t: _copy(trial)
                for t, trial in mine.items()
                if (t in included or t > trial_id_greater_than) and (states is None or trial.state in states)
            }
        if not mine:  # read outside the lock: this process's writers need not wait for it
            return super()._get_trials(study_id, states, included_trial_ids, trial_id_greater_than)
        trial_ids = models.TrialModel.trial_id
        with orm.Session(self.engine) as session:
            models.StudyModel.find_or_raise_by_id(study_id, session)
            query = (
                session.query(models.TrialModel)
                .options(orm.selectinload(models.TrialModel.params))
                .options(orm.selectinload(models.TrialModel.values))
                .options(orm.selectinload(models.TrialModel.user_attributes))
                .options(orm.selectinload(models.TrialModel.system_attributes))
                .options(orm.selectinload(models.TrialModel.intermediate_values))
                .filter(models.TrialModel.study_id == study_id, trial_ids.not_in(list(mine)))
            )
            if states is not None:
                query = query.filter(models.TrialModel.state.in_(list(states)))  # type: ignore[call-overload]
            if trial_id_greater_than > -1:
                newer = trial_ids > trial_id_greater_than
                query = query.filter(sqlalchemy.or_(trial_ids.in_(included), newer) if included else newer)
            found = [self._build_frozen_trial_from_trial_model(t) for t in query.order_by(trial_ids).all()]
        return sorted([*found, *wanted.values()], key=lambda t: t._trial_id)


def _batching_backend(trial: optuna.Trial) -> BatchedTrialWrites | None:
    storage: Any = trial.study._storage  # Optuna wraps an RDBStorage in its _CachedStorage (optuna 5.0)
    backend = getattr(storage, "_backend", storage)
    return backend if isinstance(backend, BatchedTrialWrites) else None


def hand_over(trial: optuna.Trial) -> None:
    """Write ``trial`` out and stop keeping it here: another process will report into it (tuner.handoff).

    This process then reads the trial from the database, with what the other process wrote.
    """
    backend = _batching_backend(trial)
    if backend is not None:
        backend.release(trial._trial_id)


def write_now(trial: optuna.Trial) -> None:
    """Write ``trial``'s queued writes now, if its storage batches them.

    The objective calls it when training starts and when it ends. It raises ``UpdateFinishedTrialError``,
    as each write to ``RDBStorage`` would, when another process has finished the trial meanwhile: Optuna
    handles that error from the objective, but not from its own ``tell`` after the objective succeeded.
    """
    backend = _batching_backend(trial)
    if backend is not None and trial._trial_id in backend.flush([trial._trial_id]):
        raise optuna.exceptions.UpdateFinishedTrialError(
            f"Trial#{trial.number} has already finished and can not be updated."
        )
