from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from tuner.budget import BudgetReached, budget_used
from tuner.study import make_storage

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")


@pytest.mark.parametrize("scheme", ["sqlite", "journal"])
def test_budget_storage_refuses_a_fresh_trial_beyond_n_trials_but_runs_a_retry(tmp_path: Path, scheme: str) -> None:
    url = f"{scheme}:///{tmp_path / 'study.db'}"
    a = optuna.create_study(storage=make_storage(url, heartbeat_interval=None, trial_budget=3), study_name="s")
    b = optuna.load_study(storage=make_storage(url, heartbeat_interval=None, trial_budget=3), study_name="s")
    first, second = a.ask(), b.ask()  # two workers, each with a trial
    a.tell(first, 0.5)
    third = b.ask()
    with pytest.raises(BudgetReached):  # 1 finished + 2 running fill study.n_trials=3
        a.ask()
    b.tell(third, state=TrialState.FAIL)  # say second's worker died: its trial fails and a retry is queued
    b.tell(second, state=TrialState.FAIL)
    RetryHeartbeatStaleTrialCallback()(b, b.get_trials()[second.number])
    assert budget_used(a.get_trials()) == 2  # the dead trial's slot goes to its retry
    retry = a.ask()  # pops the queued retry
    assert retry.params == second.params and retry.number == 3
    with pytest.raises(BudgetReached):
        b.ask()
    assert len(a.get_trials()) == 4 and (tmp_path / "study.db.tuner-lock").exists()


@pytest.mark.parametrize("scheme", ["sqlite", "postgresql"])
def test_budget_counts_in_sql_exactly_as_over_the_trials(
    tmp_path: Path, scheme: str, request: pytest.FixtureRequest
) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}" if scheme == "sqlite" else request.getfixturevalue("postgres_url")
    storage = make_storage(url, heartbeat_interval=None, trial_budget=100)
    study = optuna.create_study(storage=storage, study_name="s")
    for value in (0.1, 0.2, 0.3):
        study.tell(study.ask(), value)
    study.tell(study.ask(), state=TrialState.PRUNED)
    dead = study.ask()
    study.tell(dead, state=TrialState.FAIL)
    RetryHeartbeatStaleTrialCallback()(study, study.get_trials()[dead.number])  # queues a WAITING retry
    study.tell(study.ask(), state=TrialState.FAIL)  # the retry ran and failed too (counted, not replaced)
    study.ask()  # one running
    study.enqueue_trial({})  # one waiting: not counted
    trials = study.get_trials()
    assert {t.state for t in trials} == {
        TrialState.COMPLETE,
        TrialState.PRUNED,
        TrialState.FAIL,
        TrialState.RUNNING,
        TrialState.WAITING,
    }
    statements: list[str] = []
    engine = storage.engine  # type: ignore[attr-defined]
    sqlalchemy.event.listen(engine, "before_cursor_execute", lambda *args: statements.append(args[2]))
    assert storage.budget_count(study._study_id) == budget_used(trials) == 6  # type: ignore[attr-defined]
    # Counted in the database: no trial's params, values or attributes are loaded (as get_all_trials would).
    assert len(statements) <= 3 and not any("trial_params" in s or "trial_values" in s for s in statements)
