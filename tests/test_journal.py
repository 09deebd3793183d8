from __future__ import annotations

import time
from pathlib import Path

import optuna
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from tuner.journal import HeartbeatJournalStorage
from tuner.loop import fail_stale_trials
from tuner.storage import make_storage

pytestmark = [
    pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
    pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used:UserWarning"),
]


@pytest.mark.slow
def test_journal_dead_workers_trial_fails_and_is_retried_with_its_history(tmp_path: Path) -> None:
    url = f"journal:///{tmp_path / 'study.log'}"
    worker = optuna.create_study(storage=make_storage(url, heartbeat_interval=1, grace_period=1), study_name="s")
    trial = worker.ask()  # a worker takes a trial, beats once, then vanishes without telling
    trial.suggest_float("lr", 1e-3, 1.0, log=True)
    trial.report(0.5, 1)
    storage = make_storage(url, heartbeat_interval=1, grace_period=1)
    assert isinstance(storage, HeartbeatJournalStorage)
    storage.record_heartbeat(storage.get_trial_id_from_study_id_trial_number(0, trial.number))

    other = optuna.load_study(study_name="s", storage=storage)
    fail_stale_trials(other, storage)  # within the grace period: still alive
    assert [t.state for t in other.get_trials()] == [TrialState.RUNNING]
    time.sleep(2.2)
    fail_stale_trials(other, storage)
    dead, retry = other.get_trials()
    assert dead.state == TrialState.FAIL
    assert retry.state == TrialState.WAITING and retry.params == dead.params
    assert RetryHeartbeatStaleTrialCallback.retry_history(retry) == [0]
    other.optimize(lambda t: t.suggest_float("lr", 1e-3, 1.0, log=True), n_trials=1)  # the retry runs next
    assert other.get_trials()[1].state == TrialState.COMPLETE and len(other.get_trials()) == 2
