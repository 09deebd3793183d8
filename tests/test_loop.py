from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from tuner.budget import Budget
from tuner.loop import fail_stale_trials, run_trials
from tuner.storage import make_storage, study_lock


def _run(url: str, objective: object, n_trials: int, *, heartbeat_interval: int | None = None) -> optuna.Study:
    storage = make_storage(url, heartbeat_interval=heartbeat_interval, grace_period=2 if heartbeat_interval else None)
    study = optuna.create_study(storage=storage, study_name="s", load_if_exists=True)
    run_trials(
        study,
        objective,  # type: ignore[arg-type]
        storage=storage,
        budget=Budget(n_trials, lambda: study_lock(url, "s")),
        heartbeat_interval=heartbeat_interval,
        told=[],
        deadline=None,
        should_stop=lambda: False,
    )
    return study


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["sqlite", "journal"])
def test_loop_a_live_trial_beats_so_another_worker_does_not_fail_it(tmp_path: Path, scheme: str) -> None:
    url = f"{scheme}:///{tmp_path / 'study.db'}"
    other_storage = make_storage(url, heartbeat_interval=1, grace_period=2)

    def objective(trial: optuna.Trial) -> float:
        # Longer than the grace period: only the loop's repeated beats keep the trial alive (RDBStorage counts a
        # trial that never beat as alive; the SIGKILL tests in test_faults check that a silent one is failed).
        time.sleep(3.5)
        other = optuna.load_study(study_name="s", storage=other_storage)
        fail_stale_trials(other, other_storage)  # what another worker does before its next trial
        return trial.suggest_float("x", 0.0, 1.0)

    study = _run(url, objective, 1, heartbeat_interval=1)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]


def test_loop_a_failing_or_pruned_trial_is_told_and_the_worker_goes_on_to_n_trials(tmp_path: Path) -> None:
    def objective(trial: optuna.Trial) -> float:
        if trial.number == 0:
            raise ValueError("a broken trial")
        if trial.number == 1:
            raise optuna.TrialPruned()
        return trial.suggest_float("x", 0.0, 1.0)

    study = _run(f"sqlite:///{tmp_path / 'study.db'}", objective, 4)
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.PRUNED, TrialState.COMPLETE, TrialState.COMPLETE]


def test_loop_an_interrupt_fails_the_trial_and_goes_on_up(tmp_path: Path) -> None:
    def objective(trial: optuna.Trial) -> float:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(f"sqlite:///{tmp_path / 'study.db'}", objective, 3)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL]  # told, and no second trial asked


@pytest.mark.slow
def test_loop_a_storage_only_worker_loads_no_torch() -> None:
    # The loop asks, beats and tells on a storage: a process that runs trials elsewhere (scripts/stress.py's
    # workers, a user's own objective) does not pay torch's second of import for it.
    script = "import sys; import tuner.loop; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
