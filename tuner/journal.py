"""Optuna's JournalStorage on a file, with the heartbeats that Optuna 5.0 gives only RDBStorage.

Without them a SIGKILLed worker's trial would stay RUNNING forever. A beat is a system attr holding the worker's
wall clock (workers sharing a file must share a clock), and ``fail_stale_trials`` fails and retries a trial as
Optuna's own does on RDBStorage, with the same ``RetryHeartbeatStaleTrialCallback``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from tuner.config import ConfigError

__all__ = ["HEARTBEAT_ATTR", "HeartbeatJournalStorage", "check_journal_file"]

HEARTBEAT_ATTR = "tuner:heartbeat"


class HeartbeatJournalStorage(JournalStorage):
    def __init__(
        self,
        path: str,
        *,
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
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period
        self.heartbeat_stale_trial_callback = heartbeat_stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        # A trial another worker gave up for dead is finished: nothing to beat for (RDBStorage does not check).
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())

    def fail_stale_trials(self, study: optuna.Study) -> list[int]:
        """Fail the study's trials whose worker has not beaten for the grace period, and queue their retries;
        return their numbers. A no-op with heartbeats off."""
        if self.heartbeat_interval is None:
            return []
        grace = self.grace_period if self.grace_period is not None else 2 * self.heartbeat_interval
        study_id = self.get_study_id_from_name(study.study_name)
        now = time.time()
        failed = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            start = trial.datetime_start.timestamp() if trial.datetime_start else now
            # A retry copies the dead trial's system attrs, old heartbeat included: its start counts as a beat,
            # or other workers would find each retry stale at once.
            if now - max(float(trial.system_attrs.get(HEARTBEAT_ATTR, 0.0)), start) <= grace:
                continue
            trial_id = self.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            try:
                self.set_trial_state_values(trial_id, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker failed it first, and queues the retry
            failed.append(trial.number)
            if self.heartbeat_stale_trial_callback is not None:
                self.heartbeat_stale_trial_callback(study, copy.deepcopy(self.get_trial(trial_id)))
        return failed


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
