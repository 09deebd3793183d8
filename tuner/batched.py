"""This process's running trials kept in memory, and their writes sent to the database in batches.

Optuna's ``RDBStorage`` (optuna 5.0) makes every ``suggest_*``, ``set_user_attr`` and ``report`` a transaction of
its own and has no batching (checked: ``RDBStorage``, ``_CachedStorage``, ``JournalStorage``): on SQLite those ORM
round trips dominated the tuner process's CPU on short trials (docs/benchmarks.md). ``BatchedTrialWrites`` writes
a trial's queued writes in one transaction when training starts, ``FLUSH_S`` after its last write, and at the
tell, and runs its other per-trial statements in SQLAlchemy Core (tuner.trial_rows). A killed process loses at
most ``FLUSH_S`` of a running trial's writes, and that trial is retried (tuner.faults).
"""

from __future__ import annotations

import atexit
import copy
import dataclasses
import json
import math
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Container, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import optuna
import sqlalchemy
from optuna import distributions
from optuna.storages import RDBStorage
from optuna.storages._rdb import models
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import orm
from sqlalchemy.dialects import sqlite as sqlite_dialect

from tuner.trial_rows import TRIALS, bare_trial, check_study, load_trials

__all__ = ["FLUSH_S", "BatchedTrialWrites", "check_running", "hand_over", "write_now"]

# A running trial's queued writes wait at most this long for the next write to send them.
FLUSH_S = 1.0
# Trials this process finished, kept as stored so that its caches' next refresh need not read them back.
FINISHED_KEPT = 256
# A process looks for other workers' dead trials at most this often per study (Optuna looks before every trial).
STALE_CHECK_S = 1.0


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

    def put_back(self, taken: _Owned) -> None:
        """Queue again the writes of ``taken`` that failed to be written, before those queued since."""
        self.params = taken.params + self.params
        self.user_attrs = taken.user_attrs | self.user_attrs
        self.system_attrs = taken.system_attrs | self.system_attrs
        self.intermediate = taken.intermediate | self.intermediate


def _copy(trial: FrozenTrial) -> FrozenTrial:
    """A copy that later writes to ``trial`` leave alone: its dicts copied, not a deepcopy (called on every read).

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
        self._finished: OrderedDict[int, _Finished] = OrderedDict()  # the last FINISHED_KEPT told here
        self._owned_lock = threading.RLock()
        self._flush_lock = threading.Lock()  # one flush at a time: a later value never lands before an earlier one
        self._stale_checked: dict[int, float] = {}  # study id -> when this process last looked for dead trials
        atexit.register(_flush_at_exit, weakref.ref(self))

    # --- Owning a trial ---------------------------------------------------------------------------------

    def _create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> FrozenTrial:
        if self._batched and template_trial is None:
            frozen = self._insert_running_trial(study_id)
        else:
            frozen = super()._create_new_trial(study_id, template_trial)
        if self._batched and frozen.state == TrialState.RUNNING:
            self._own(study_id, _copy(frozen))
        return frozen

    def _insert_running_trial(self, study_id: int) -> FrozenTrial:
        """``RDBStorage._create_new_trial`` without a template (optuna 5.0) in three Core statements instead of
        the ORM: the insert, then the trial's number counted inside the same write transaction."""
        start = datetime.now()
        with self.engine.begin() as conn:
            check_study(conn, study_id)
            inserted = conn.execute(
                sqlalchemy.insert(TRIALS).values(study_id=study_id, state=TrialState.RUNNING, datetime_start=start)
            )
            trial_id = int(inserted.lastrowid)  # SQLite only (self._batched)
            past = sqlalchemy.select(sqlalchemy.func.count(TRIALS.c.trial_id)).where(
                TRIALS.c.study_id == study_id, TRIALS.c.trial_id < trial_id
            )
            number = int(conn.execute(past).scalar_one())
            conn.execute(sqlalchemy.update(TRIALS).where(TRIALS.c.trial_id == trial_id).values(number=number))
        return bare_trial(trial_id, number, TrialState.RUNNING, start, None)

    def _own(self, study_id: int, trial: FrozenTrial) -> None:
        with self._owned_lock:
            self._owned[trial._trial_id] = _Owned(study_id, trial)

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Sequence[float] | None = None) -> bool:
        if trial_id not in self._owned:
            changed = super().set_trial_state_values(trial_id, state, values)
            if changed and self._batched and state == TrialState.RUNNING:  # this process popped a queued trial
                self._own(self._study_id_of(trial_id), super().get_trial(trial_id))
            return changed
        if state.is_finished():
            return self._finish(trial_id, state, values)
        self.release(trial_id)  # its queued writes first
        return super().set_trial_state_values(trial_id, state, values)

    def _finish(self, trial_id: int, state: TrialState, values: Sequence[float] | None) -> bool:
        """Tell an owned trial: its queued writes, values and state in one transaction (``RDBStorage`` spends an
        ORM session on the state alone), and the trial kept as stored, for this process's next reads."""
        with self._flush_lock:
            with self._owned_lock:
                owned = self._owned.get(trial_id)
                if owned is None:  # finished by another thread meanwhile: RDBStorage refuses it
                    return super().set_trial_state_values(trial_id, state, values)
                taken = owned.take()
            told = _Told(state, list(values) if values is not None else None, datetime.now())
            try:
                gone = self._write_or_put_back({trial_id: taken}, told={trial_id: told})
            except sqlalchemy.exc.IntegrityError:
                return False  # as RDBStorage.set_trial_state_values
            with self._owned_lock:
                self._owned.pop(trial_id, None)
                if gone:
                    raise _finished_error(owned.trial.number)
                final = owned.trial
                final.state, final.values, final.datetime_complete = state, told.values, told.at
                self._finished[trial_id] = _Finished(owned.study_id, final)
                while len(self._finished) > FINISHED_KEPT:
                    self._finished.popitem(last=False)
        return True

    def release(self, trial_id: int) -> None:
        """Write the trial's queued writes and stop keeping it in memory: reads go to the database again."""
        self.flush([trial_id])
        with self._owned_lock:
            self._owned.pop(trial_id, None)

    def still_running(self, trial_id: int) -> bool:
        """Whether an owned trial is still RUNNING in the database; when not, this process stops owning it."""
        if trial_id not in self._owned:
            return True  # every write of a trial not owned here goes to RDBStorage, which refuses a finished one
        with self.engine.connect() as conn:
            state = conn.execute(sqlalchemy.select(TRIALS.c.state).where(TRIALS.c.trial_id == trial_id)).scalar()
        if state == TrialState.RUNNING:
            return True
        with self._owned_lock:
            self._owned.pop(trial_id, None)
        return False

    def _study_id_of(self, trial_id: int) -> int:
        with orm.Session(self.engine) as session:
            return int(models.TrialModel.find_or_raise_by_id(trial_id, session).study_id)

    # --- Heartbeats -------------------------------------------------------------------------------------

    def record_heartbeat(self, trial_id: int) -> None:
        """``RDBStorage.record_heartbeat`` (optuna 5.0: an ORM read, then an insert or an update, at every
        trial's start) as one upsert, with the database's own clock as Optuna uses."""
        if not self._batched:
            super().record_heartbeat(trial_id)
            return
        insert = sqlite_dialect.insert(models.TrialHeartbeatModel.__table__)
        beat = insert.values(trial_id=trial_id, heartbeat=sqlalchemy.func.now())
        with self.engine.begin() as conn:
            conn.execute(
                beat.on_conflict_do_update(index_elements=["trial_id"], set_={"heartbeat": sqlalchemy.func.now()})
            )

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        """Optuna's ``fail_stale_trials`` runs before every trial; a trial is stale only after its grace period
        (at least a second), so this process looks at most every ``STALE_CHECK_S``: a query saved per trial."""
        if self._batched:
            now = time.monotonic()
            if now - self._stale_checked.get(study_id, -math.inf) < STALE_CHECK_S:
                return []
            self._stale_checked[study_id] = now
        return super()._get_stale_trial_ids(study_id)

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
            raise _finished_error(owned.trial.number)

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
            gone = self._write_or_put_back(taken)
            with self._owned_lock:
                for t in gone:
                    self._owned.pop(t, None)
            return gone

    def _write_or_put_back(self, batch: dict[int, _Owned], told: dict[int, _Told] | None = None) -> set[int]:
        """``_write``; if it fails (the database locked past its busy timeout, a full disk), the writes are
        queued again for the next flush, so the error loses none of the trial's values."""
        try:
            return self._write(batch, told)
        except BaseException:
            with self._owned_lock:
                for trial_id, taken in batch.items():
                    if trial_id in self._owned:
                        self._owned[trial_id].put_back(taken)
            raise

    def _write(self, batch: dict[int, _Owned], told: dict[int, _Told] | None = None) -> set[int]:
        """Write ``batch``'s queued writes, and the state and values of the ``told`` trials, in one
        transaction; returns the trials that were no longer RUNNING, which get none of it."""
        told = told or {}
        with self.engine.begin() as conn:
            running = set()
            for trial_id, tell in told.items():  # an update first: it takes the write lock, then all is exact
                finish = sqlalchemy.update(TRIALS).where(
                    TRIALS.c.trial_id == trial_id, TRIALS.c.state == TrialState.RUNNING
                )
                if conn.execute(finish.values(state=tell.state, datetime_complete=tell.at)).rowcount:
                    running.add(trial_id)
            others = [t for t in batch if t not in told]
            if others:
                rows = conn.execute(
                    sqlalchemy.select(TRIALS.c.trial_id, TRIALS.c.state).where(TRIALS.c.trial_id.in_(others))
                )
                running |= {trial_id for trial_id, state in rows if state == TrialState.RUNNING}
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
                    self._upsert(conn, model, ["trial_id", "key"], attrs)
            steps = [
                {"trial_id": t, "step": step, "intermediate_value": v, "intermediate_value_type": kind}
                for t in running
                for step, (v, kind) in batch[t].intermediate.items()
            ]
            if steps:
                self._upsert(conn, models.TrialIntermediateValueModel, ["trial_id", "step"], steps)
            values = []
            for t in running & told.keys():
                for objective, v in enumerate(told[t].values or ()):
                    stored, kind = models.TrialValueModel.value_to_stored_repr(v)
                    values.append({"trial_id": t, "objective": objective, "value": stored, "value_type": kind})
            if values:
                self._upsert(conn, models.TrialValueModel, ["trial_id", "objective"], values)
        return set(batch) - running

    @staticmethod
    def _upsert(conn: sqlalchemy.Connection, model: Any, keys: list[str], rows: list[dict[str, Any]]) -> None:
        insert = sqlite_dialect.insert(model.__table__)
        changed = {c: insert.excluded[c] for c in rows[0] if c not in keys}
        conn.execute(insert.on_conflict_do_update(index_elements=keys, set_=changed), rows)

    # --- Reads: this process's running and just-told trials come from memory --------------------------

    def _mirror(self, trial_id: int) -> FrozenTrial | None:
        with self._owned_lock:
            owned = self._owned.get(trial_id)
            if owned is not None:
                return _copy(owned.trial)
            finished = self._finished.get(trial_id)
            return None if finished is None else _copy(finished.trial)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        mirror = self._mirror(trial_id)
        if mirror is not None:
            return mirror
        if not self._batched:
            return super().get_trial(trial_id)
        with self.engine.connect() as conn:
            found = load_trials(conn, TRIALS.c.trial_id == trial_id)
        if not found:
            raise KeyError(models.NOT_FOUND_MSG)
        return found[0]

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
        """``RDBStorage._get_trials`` (optuna 5.0; what Optuna's cached storage refreshes with) in Core:
        this process's running trials and the trials it told last come from memory, the others are loaded
        with six plain SELECTs instead of the ORM's session and object per row."""
        if not self._batched:
            return super()._get_trials(study_id, states, included_trial_ids, trial_id_greater_than)
        included = [t for t in included_trial_ids if t <= trial_id_greater_than]
        with self._owned_lock:
            mine = {t: o.trial for t, o in self._owned.items() if o.study_id == study_id}
            wanted = [
                _copy(trial)
                for t, trial in mine.items()
                if (t in included_trial_ids or t > trial_id_greater_than) and (states is None or trial.state in states)
            ]
        where = [TRIALS.c.study_id == study_id]
        if mine:
            where.append(TRIALS.c.trial_id.not_in(list(mine)))
        if states is not None:
            where.append(TRIALS.c.state.in_(list(states)))  # type: ignore[call-overload]
        if trial_id_greater_than > -1:
            newer = TRIALS.c.trial_id > trial_id_greater_than
            where.append(sqlalchemy.or_(TRIALS.c.trial_id.in_(included), newer) if included else newer)
        with self.engine.connect() as conn:
            found = load_trials(conn, *where, known=self._finished_copies)
            if not found and not mine:
                check_study(conn, study_id)
        return sorted([*found, *wanted], key=lambda t: t._trial_id)

    def _finished_copies(self, rows: Sequence[Any]) -> dict[int, FrozenTrial]:
        """Copies of the trials of ``rows`` (trial id, number, datetime_start) that this process told.

        A row must match its kept trial: SQLite reuses the largest trial ids after a study is deleted."""
        with self._owned_lock:
            kept = [(row, self._finished.get(row.trial_id)) for row in rows]
            return {
                row.trial_id: _copy(finished.trial)
                for row, finished in kept
                if finished is not None
                and (finished.trial.number, finished.trial.datetime_start) == (row.number, row.datetime_start)
            }

    def delete_study(self, study_id: int) -> None:
        with self._owned_lock:  # its trials' ids may be used again (SQLite)
            for trials in (self._owned, self._finished):
                for trial_id in [t for t, kept in trials.items() if kept.study_id == study_id]:
                    del trials[trial_id]
        super().delete_study(study_id)


@dataclass(frozen=True)
class _Finished:
    """A trial this process told, as stored."""

    study_id: int
    trial: FrozenTrial


@dataclass(frozen=True)
class _Told:
    """The state and values a trial is told with, and the moment stored as its ``datetime_complete``."""

    state: TrialState
    values: list[float] | None
    at: datetime


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
    """Write ``trial``'s queued writes now, if its storage batches them: the objective calls it when training
    starts. Raises ``UpdateFinishedTrialError`` when another process has finished the trial meanwhile."""
    backend = _batching_backend(trial)
    if backend is not None and trial._trial_id in backend.flush([trial._trial_id]):
        raise _finished_error(trial.number)


def check_running(trial: optuna.Trial) -> None:
    """Raise ``UpdateFinishedTrialError``, as ``RDBStorage``'s next write would, when another process has
    finished ``trial`` (failed it for want of a heartbeat): its queued writes are then dropped.

    The objective calls it when training ends, before it saves a best model: Optuna handles that error from
    the objective, but not from its own ``tell`` after the objective succeeded (an ``AssertionError`` in
    ``_run_trial``, optuna 5.0). One read, not a write: the tell writes everything a moment later.
    """
    backend = _batching_backend(trial)
    if backend is not None and not backend.still_running(trial._trial_id):
        raise _finished_error(trial.number)


def _finished_error(number: int) -> optuna.exceptions.UpdateFinishedTrialError:
    return optuna.exceptions.UpdateFinishedTrialError(f"Trial#{number} has already finished and can not be updated.")
