from __future__ import annotations

import math
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from optuna.storages import RDBStorage
from optuna.trial import TrialState

import tuner.study
from tests.test_trial_rows import as_compared, various_trials
from tuner import batched
from tuner.batched import check_running, hand_over, write_now
from tuner.study import make_storage


def _elsewhere(url: str, number: int) -> optuna.trial.FrozenTrial:
    """The trial as another process reads it: a plain RDBStorage of its own, no cache, nothing shared."""
    storage = RDBStorage(url)
    try:
        study_id = storage.get_study_id_from_name("s")
        return storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id, number))
    finally:
        storage.engine.dispose()


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'b.db'}"


def test_batched_trial_is_written_when_training_starts_and_stored_whole_when_told(url: str) -> None:
    study = optuna.create_study(
        storage=make_storage(url, heartbeat_interval=None), study_name="s", direction="maximize"
    )

    def suggest(trial: optuna.Trial) -> tuple[float, int]:
        return trial.suggest_float("lr", 1e-4, 1.0, log=True), trial.suggest_int("layers", 1, 3)

    # A param's first trial in a process is written at once: RDBStorage checks the study's stored distribution.
    study.optimize(lambda t: suggest(t)[0], n_trials=1)
    trial = study.ask()
    lr, layers = suggest(trial)
    trial.set_user_attr("seed", 7)
    assert _elsewhere(url, 1).params == {}  # queued: one transaction instead of three
    write_now(trial)
    stored = _elsewhere(url, 1)
    assert stored.params == {"lr": lr, "layers": layers}
    assert stored.user_attrs == {"seed": 7}
    assert stored.state == TrialState.RUNNING
    for epoch, value in enumerate([0.5, 0.7, math.nan]):
        trial.report(value, epoch)
    trial.set_user_attr("train_loss", 0.25)
    study.tell(trial, 0.7)
    stored = _elsewhere(url, 1)
    assert stored.state == TrialState.COMPLETE and stored.value == 0.7
    values = stored.intermediate_values
    assert (values[0], values[1], sorted(values)) == (0.5, 0.7, [0, 1, 2]) and math.isnan(values[2])
    assert stored.user_attrs == {"seed": 7, "train_loss": 0.25}
    assert stored.distributions["lr"] == optuna.distributions.FloatDistribution(1e-4, 1.0, log=True)


def test_batched_reads_in_this_process_see_the_queued_writes(url: str) -> None:
    study = optuna.create_study(storage=make_storage(url, heartbeat_interval=None), study_name="s")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    trial = study.ask()
    x = trial.suggest_float("x", 0, 1)
    trial.set_user_attr("device", "cpu")
    trial.report(0.3, 0)
    (running,) = study.get_trials(states=(TrialState.RUNNING,))
    assert (running.params, running.user_attrs, running.intermediate_values) == ({"x": x}, {"device": "cpu"}, {0: 0.3})
    storage = study._storage._backend  # type: ignore[attr-defined]  # the RDBStorage under Optuna's cache
    assert storage.get_trial_user_attrs(trial._trial_id) == {"device": "cpu"}
    assert storage.get_trial_param(trial._trial_id, "x") == x
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2
    assert _elsewhere(url, 2).params == {}


def test_batched_slow_trial_writes_each_value_as_it_comes(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batched, "FLUSH_S", 0.05)
    study = optuna.create_study(storage=make_storage(url, heartbeat_interval=None), study_name="s")
    trial = study.ask()
    trial.report(0.1, 0)  # within FLUSH_S of the ask: queued
    assert _elsewhere(url, 0).intermediate_values == {}
    time.sleep(0.06)
    trial.report(0.2, 1)  # an epoch that took longer than FLUSH_S: written at once, with the queued one
    assert _elsewhere(url, 0).intermediate_values == {0: 0.1, 1: 0.2}


def test_batched_trial_failed_by_another_process_keeps_its_failure(url: str) -> None:
    study = optuna.create_study(storage=make_storage(url, heartbeat_interval=None), study_name="s")
    trial = study.ask()
    other = make_storage(url, heartbeat_interval=None)  # another worker that gave this trial up for dead
    other.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    trial.report(0.5, 0)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        study.tell(trial, 0.5)
    stored = _elsewhere(url, 0)
    assert stored.state == TrialState.FAIL
    assert stored.intermediate_values == {}  # nothing written after it failed
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)  # and this process goes on
    assert _elsewhere(url, 1).state == TrialState.COMPLETE


def test_batched_write_after_a_stall_is_refused_once_another_process_failed_the_trial(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batched, "FLUSH_S", 0.05)
    study = optuna.create_study(storage=make_storage(url, heartbeat_interval=None), study_name="s")
    trial = study.ask()
    make_storage(url, heartbeat_interval=None).set_trial_state_values(trial._trial_id, TrialState.FAIL)
    time.sleep(0.06)  # this worker stalled past its grace period; another one failed its trial
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        trial.report(0.5, 0)  # the objective stops here, as with RDBStorage's own writes
    assert _elsewhere(url, 0).intermediate_values == {}


def test_batched_check_running_refuses_a_trial_failed_elsewhere_and_drops_its_queued_writes(url: str) -> None:
    study = optuna.create_study(storage=make_storage(url, heartbeat_interval=None), study_name="s")
    trial = study.ask()
    trial.report(0.5, 0)
    check_running(trial)  # still running: no error, nothing written yet
    assert _elsewhere(url, 0).intermediate_values == {}
    make_storage(url, heartbeat_interval=None).set_trial_state_values(trial._trial_id, TrialState.FAIL)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        check_running(trial)
    with pytest.raises(ValueError, match="Cannot tell a FAIL trial"):  # what tuner.tune's workers go on after
        study.tell(trial, 0.5)
    stored = _elsewhere(url, 0)
    assert (stored.state, stored.intermediate_values) == (TrialState.FAIL, {})


def test_batched_writes_refused_by_a_locked_database_are_written_with_the_next_ones(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tuner.study, "SQLITE_BUSY_TIMEOUT_S", 0.2)
    study = optuna.create_study(storage=make_storage(url, heartbeat_interval=None), study_name="s")
    trial = study.ask()
    trial.report(0.5, 0)
    trial.set_user_attr("seed", 3)
    blocker = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock past the busy timeout
    with pytest.raises(sqlalchemy.exc.OperationalError, match="locked"):
        write_now(trial)
    blocker.execute("ROLLBACK")
    blocker.close()
    trial.report(0.6, 1)
    study.tell(trial, 0.6)
    stored = _elsewhere(url, 0)
    assert (stored.state, stored.intermediate_values, stored.user_attrs) == (
        TrialState.COMPLETE,
        {0: 0.5, 1: 0.6},
        {"seed": 3},
    )


def test_batched_popped_queued_trial_is_stored_whole(url: str) -> None:
    study = optuna.create_study(storage=make_storage(url, heartbeat_interval=None), study_name="s")
    study.enqueue_trial({"x": 0.25})
    study.optimize(lambda t: t.suggest_float("x", 0, 1) + t.suggest_float("y", 0, 1), n_trials=1)
    stored = _elsewhere(url, 0)
    assert stored.state == TrialState.COMPLETE
    assert stored.params["x"] == 0.25 and stored.value == pytest.approx(0.25 + stored.params["y"])


def test_batched_queued_writes_are_written_when_the_process_exits(url: str) -> None:
    code = (
        "import optuna\nfrom tuner.study import make_storage\n"
        f"study = optuna.create_study(storage=make_storage({url!r}), study_name='s')\n"
        "trial = study.ask()\ntrial.suggest_float('x', 0, 1)\ntrial.report(0.5, 0)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    stored = _elsewhere(url, 0)
    assert list(stored.params) == ["x"] and stored.intermediate_values == {0: 0.5}


def test_batched_handed_over_trial_is_read_back_with_what_the_other_process_wrote(url: str) -> None:
    study = optuna.create_study(storage=make_storage(url, heartbeat_interval=None), study_name="s")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    trial = study.ask()
    x = trial.suggest_float("x", 0, 1)
    hand_over(trial)  # as the tuner sweeper does before its job (python -m tuner.train) starts
    assert _elsewhere(url, 1).params == {"x": x}
    job = RDBStorage(url)  # the job's process reports into the trial
    job.set_trial_intermediate_value(trial._trial_id, 0, 0.42)
    job.engine.dispose()
    study.tell(trial, state=TrialState.PRUNED)  # Optuna takes a pruned trial's value from its last report
    assert _elsewhere(url, 1).value == 0.42


def test_batched_reads_build_every_trial_as_optuna_does(url: str) -> None:
    writer = RDBStorage(url)
    for name, directions in (("s", ["maximize"]), ("m", ["minimize", "maximize"])):
        study = optuna.create_study(storage=writer, study_name=name, directions=directions)
        if len(directions) == 1:
            various_trials(study)
        else:
            study.optimize(lambda t: (t.suggest_float("x", 0, 1), -math.inf), n_trials=3)
    plain, batched_storage = RDBStorage(url), make_storage(url, heartbeat_interval=None)
    for study_id in (plain.get_study_id_from_name("s"), plain.get_study_id_from_name("m")):
        every = plain._get_trials(study_id, None, set(), -1)
        assert len(every) >= 3
        middle = every[len(every) // 2]._trial_id
        for states, included, greater in (
            (None, set(), -1),
            (None, {every[0]._trial_id, every[1]._trial_id}, middle),
            ((TrialState.COMPLETE,), set(), every[0]._trial_id),
            ((TrialState.WAITING, TrialState.RUNNING), set(), -1),
        ):
            expected = plain._get_trials(study_id, states, included, greater)
            got = batched_storage._get_trials(study_id, states, included, greater)
            assert [as_compared(t) for t in got] == [as_compared(t) for t in expected]
        for trial in every:
            assert as_compared(batched_storage.get_trial(trial._trial_id)) == as_compared(trial)
    with pytest.raises(KeyError):
        batched_storage._get_trials(999, None, set(), -1)
    with pytest.raises(KeyError):
        batched_storage.get_trial(999)


def test_batched_trials_told_here_are_kept_exactly_as_stored(url: str) -> None:
    """What this process reads from memory (its trials, created and told in Core) is what the file holds."""
    storage = make_storage(url, heartbeat_interval=None)
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    various_trials(study)
    study.optimize(lambda t: t.suggest_float("x", 1e-4, 1.0, log=True), n_trials=40, n_jobs=2)
    here = study.trials  # through Optuna's cache: told trials from memory, the others loaded in Core
    stored = RDBStorage(url).get_all_trials(study._study_id)
    assert [as_compared(t) for t in here] == [as_compared(t) for t in stored]
    assert [t.number for t in stored] == list(range(len(stored)))  # numbered 0..n-1 by two threads at once
    backend = storage
    told = [t for t in stored if t.state.is_finished()]
    assert all(as_compared(backend.get_trial(t._trial_id)) == as_compared(t) for t in told)
    assert {t.state for t in told} == {TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL}


def test_batched_trial_ids_used_again_after_a_study_is_deleted_read_as_the_new_trials(url: str) -> None:
    storage = make_storage(url, heartbeat_interval=None)
    ours = optuna.create_study(storage=storage, study_name="s")
    ours.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    told_here = [t._trial_id for t in ours.trials]
    elsewhere = RDBStorage(url)  # another process deletes the study and starts a new one
    optuna.delete_study(study_name="s", storage=elsewhere)
    again = optuna.create_study(storage=elsewhere, study_name="t")
    again.optimize(lambda t: t.suggest_float("y", 0, 1), n_trials=2)
    assert [t._trial_id for t in again.trials] == told_here  # SQLite gave the new trials the same ids
    read_here = optuna.load_study(study_name="t", storage=storage).trials
    assert [as_compared(t) for t in read_here] == [as_compared(t) for t in again.trials]
    # Deleted in this process, its told trials are forgotten at once.
    optuna.delete_study(study_name="t", storage=storage)
    with pytest.raises(KeyError):
        storage.get_trial(told_here[0])
