"""The trial handoff: a trial asked in one place, reported and pruned from another, told by the owner."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from tuner.handoff import TrialHandle, rebuild_trial
from tuner.storage import make_storage


def _pruner() -> optuna.pruners.BasePruner:
    return optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)


def _owner_study(url: str) -> optuna.Study:
    study = optuna.create_study(study_name="s,x='1'", storage=url, direction="maximize", pruner=_pruner())
    done = study.ask()
    for step in (1, 2):
        done.report(0.9, step)
    study.tell(done, 0.9)
    return study


@pytest.mark.slow
def test_handoff_rebuilt_trial_reports_and_is_told_to_prune(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'h.db'}"
    owner = _owner_study(url)
    asked = owner.ask()
    handle = TrialHandle(study=owner.study_name, trial=asked.number)

    # The job's side runs in another process, as the sweeper's jobs do.
    job = (
        "import sys, optuna\n"
        "from tuner.handoff import TrialHandle, rebuild_trial\n"
        "from tuner.storage import make_storage\n"
        "trial = rebuild_trial(make_storage(sys.argv[1]), TrialHandle(study=sys.argv[2], trial=int(sys.argv[3])),\n"
        "                      pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))\n"
        "trial.report(0.5, 1)\n"
        "trial.set_user_attr('seen', True)\n"
        "print('prune' if trial.should_prune() else 'go on')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", job, url, handle.study, str(handle.trial)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "prune"  # 0.5 is below the completed trial's 0.9 at epoch 1
    frozen = owner.trials[asked.number]
    assert frozen.intermediate_values == {1: 0.5} and frozen.user_attrs["seen"] is True

    owner.tell(asked, state=optuna.trial.TrialState.PRUNED)
    assert owner.trials[asked.number].state == optuna.trial.TrialState.PRUNED


def test_handoff_rebuilt_trial_cannot_change_after_the_owner_tells(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'h.db'}"
    owner = _owner_study(url)
    asked = owner.ask()
    trial = rebuild_trial(make_storage(url), TrialHandle(study=owner.study_name, trial=asked.number), pruner=_pruner())
    trial.report(0.95, 1)
    assert not trial.should_prune()
    owner.tell(asked, 0.95)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        trial.report(0.96, 2)


def test_handoff_handle_round_trips_through_hydra_overrides() -> None:
    handle = TrialHandle(study="digits-mlp,optimizer.name='adam'", trial=7)
    parsed = OverridesParser.create().parse_overrides(handle.overrides())
    raw = {"study": {"name": parsed[0].value()}, "tuner": {"trial": parsed[1].value()}}
    assert TrialHandle.from_config(raw) == handle
    assert TrialHandle.from_config({"study": {"name": "s"}}) is None
    with pytest.raises(ValueError, match="tuner.trial must be a trial number, but got 'seven'"):
        TrialHandle.from_config({"study": {"name": "s"}, "tuner": {"trial": "seven"}})
