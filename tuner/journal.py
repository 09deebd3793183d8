"""Optuna's JournalStorage on a file, with the heartbeats that Optuna 5.0 gives only RDBStorage.

Optuna 5.0's ``JournalStorage`` is not a ``BaseHeartbeat`` (checked in optuna/storages/journal/_storage.py),
so a SIGKILLed worker's trial would stay RUNNING forever. This subclass implements Optuna's own
``BaseHeartbeat`` interface, so Optuna's heartbeat thread, ``fail_stale_trials`` and
``RetryHeartbeatStaleTrialCallback`` work on it unchanged. The heartbeat is a system attr holding
the worker's wall clock: workers sharing one journal file must share a clock (one machine, or NTP).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from tuner.budget import BudgetGate, file_lock
from tuner.config import ConfigError

__all__ = ["HEARTBEAT_ATTR", "HeartbeatJournalStorage", "check_journal_file"]

HEARTBEAT_ATTR = "tuner:heartbeat"


class HeartbeatJournalStorage(BudgetGate, JournalStorage, BaseHeartbeat):
    def __init__(
        self,
        path: str,
        *,
        trial_budget: int | None = None,
        heartbeat_interval: int | None = None,
        grace_period: int | None = None,
        heartbeat_stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None,
    ) -> None:
        # Same checks and default grace period as RDBStorage.
        if heartbeat_interval is not None and heartbeat_interval <= 0:
            raise ValueError(f"heartbeat_interval must be a positive integer, but got {heartbeat_interval=}.")
        if grace_period is not None and grace_period <= 0:
            raise ValueError(f"grace_period must be a positive integer, but got {grace_period=}.")
        super().__init__(JournalFileBackend(path))
        self.path = path
        self.trial_budget = trial_budget
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.heartbeat_stale_trial_callback = heartbeat_stale_trial_callback

    def budget_lock(self, study_id: int) -> contextlib.AbstractContextManager[None]:
        return file_lock(self.path + ".tuner-lock")

    def create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> int:
        return self.gate(
            study_id, template_trial, lambda: super(BudgetGate, self).create_new_trial(study_id, template_trial)
        )

    def record_heartbeat(self, trial_id: int) -> None:
        # A trial another worker gave up for dead is finished: nothing to beat for (RDBStorage does not check).
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        assert self.heartbeat_interval is not None
        grace = self.grace_period if self.grace_period is not None else 2 * self.heartbeat_interval
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            start = trial.datetime_start.timestamp() if trial.datetime_start else now
            # A retry copies the dead trial's system attrs, old heartbeat included: its start counts as a beat,
            # or other workers would find each retry stale at once.
            if now - max(float(trial.system_attrs.get(HEARTBEAT_ATTR, 0.0)), start) > grace:
                stale.append(trial._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self.heartbeat_stale_trial_callback


def check_journal_file(url: str, path: Path) -> None:
    """Refuse a non-empty file whose first line is not an Optuna journal record, before anything appends to it."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb") as f:
        first = f.readline(1 << 20)
    try:
        record = json.loads(first)
    except ValueError:
        record = None
    if not isinstance(record, dict) or "op_code" not in record:
        raise ConfigError(
            f"study.storage={url!r} is not an Optuna journal file; it was left untouched. "
            "Point study.storage at a new file or an Optuna journal."
        )
