from __future__ import annotations

import threading
from pathlib import Path

import optuna
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from tuner.budget import Budget, BudgetReached, budget_used
from tuner.storage import make_storage, study_lock

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


def _url(scheme: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if scheme == "postgresql":
        return str(request.getfixturevalue("postgres_url"))
    return f"{scheme}:///{tmp_path / 'study.db'}"


@pytest.mark.parametrize("scheme", ["sqlite", "journal", "postgresql"])
def test_budget_refuses_a_fresh_trial_beyond_n_trials_but_runs_a_retry(
    tmp_path: Path, scheme: str, request: pytest.FixtureRequest
) -> None:
    url = _url(scheme, tmp_path, request)
    budget = Budget(3, lambda: study_lock(url, "s"))
    a = optuna.create_study(storage=make_storage(url, heartbeat_interval=None), study_name="s")
    b = optuna.load_study(storage=make_storage(url, heartbeat_interval=None), study_name="s")
    first, second = budget.ask(a), budget.ask(b)  # two workers, each with a trial
    a.tell(first, 0.5)
    third = budget.ask(b)
    with pytest.raises(BudgetReached):  # 1 finished + 2 running fill study.n_trials=3
        budget.ask(a)
    b.tell(third, state=TrialState.FAIL)  # say second's worker died: its trial fails and a retry is queued
    b.tell(second, state=TrialState.FAIL)
    RetryHeartbeatStaleTrialCallback()(b, b.get_trials()[second.number])
    assert budget_used(a.get_trials()) == 2  # the dead trial's slot goes to its retry
    retry = budget.ask(a)  # pops the queued retry
    assert retry.params == second.params and retry.number == 3
    with pytest.raises(BudgetReached):
        budget.ask(b)
    assert len(a.get_trials()) == 4
    if scheme != "postgresql":
        assert (tmp_path / "study.db.tuner-lock").exists()


def test_budget_counts_every_state_as_the_trials_say(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=make_storage(url, heartbeat_interval=None), study_name="s")
    for value in (0.1, 0.2, 0.3):
        study.tell(study.ask(), value)
    study.tell(study.ask(), state=TrialState.PRUNED)
    dead = study.ask()
    study.tell(dead, state=TrialState.FAIL)
    RetryHeartbeatStaleTrialCallback()(study, study.get_trials()[dead.number])  # queues a WAITING retry
    study.tell(study.ask(), state=TrialState.FAIL)  # the retry ran and failed too (counted, not replaced)
    study.ask()  # one running
    study.enqueue_trial({})  # one waiting: not counted, and popped by the next ask whatever the count
    assert budget_used(study.get_trials()) == 6
    with pytest.raises(BudgetReached):
        Budget(6, lambda: study_lock(url, "s")).ask(study)
    assert Budget(7, lambda: study_lock(url, "s")).ask(study).number == 7  # the queued one


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["sqlite", "journal"])
def test_budget_workers_racing_for_the_last_trials_stop_at_exactly_n_trials(tmp_path: Path, scheme: str) -> None:
    url = f"{scheme}:///{tmp_path / 'study.db'}"
    optuna.create_study(storage=make_storage(url, heartbeat_interval=None), study_name="s")
    budget = Budget(25, lambda: study_lock(url, "s"))

    def worker() -> None:
        study = optuna.load_study(storage=make_storage(url, heartbeat_interval=None), study_name="s")
        while True:
            try:
                trial = budget.ask(study)
            except BudgetReached:
                return
            study.tell(trial, trial.suggest_float("x", 0, 1))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    trials = optuna.load_study(storage=make_storage(url, heartbeat_interval=None), study_name="s").get_trials()
    assert len(trials) == 25 and all(t.state == TrialState.COMPLETE for t in trials)
