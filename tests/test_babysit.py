"""``python -m tuner.babysit``: one model as one trial, steered at epoch boundaries, resumed, forked, continued.

The job runs in this process's main thread (it installs the signal handlers); a helper thread plays the person at
the dashboard, writing the trial's ``set:`` keys as optuna-dashboard's form does, or runs ``python -m tuner.steer``.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import TrialState

from tests.conftest import compose_raw
from tuner.babysit import babysit
from tuner.config import ConfigError
from tuner.steer import steer
from tuner.storage import make_storage

FAST = ["data=digits", "model.hidden_units=32", "model.num_layers=1"]


def _overrides(tmp_path: Path, *more: str) -> list[str]:
    return [
        *FAST,
        f"study.storage=sqlite:///{tmp_path / 'babysit.db'}",
        f"study.output_dir={tmp_path / 'tuned'}",
        f"babysit.dir={tmp_path / 'runs'}/${{babysit.study}}",
        *more,
    ]


def _run(tmp_path: Path, *more: str, changed: list[str] | None = None) -> None:
    babysit(compose_raw(*_overrides(tmp_path, *more)), changed=changed or [])


def _trials(tmp_path: Path, study: str = "digits-mlp-babysit") -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'babysit.db'}")
    return optuna.load_study(study_name=study, storage=storage).get_trials()


def _person(tmp_path: Path, act: Callable[[optuna.storages.BaseStorage, int], None]) -> threading.Thread:
    """A thread that waits for trial 0's first epoch, then calls ``act(storage, trial_id)``."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            storage = make_storage(f"sqlite:///{tmp_path / 'babysit.db'}")  # its schema lock: the job creates it too
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    study_id = storage.get_study_id_from_name("digits-mlp-babysit")
                    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, 0)
                    if storage.get_trial(trial_id).intermediate_values:
                        break
                except KeyError:
                    pass
                time.sleep(0.05)
            act(storage, trial_id)
        except BaseException as err:  # reported by the test, not lost in the thread
            errors.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.errors = errors  # type: ignore[attr-defined]
    thread.start()
    return thread


def _wait_for_events(storage: optuna.storages.BaseStorage, trial_id: int, n: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        events = storage.get_trial(trial_id).user_attrs.get("babysit_events") or []
        if len(events) >= n:
            return list(events)
        time.sleep(0.05)
    raise AssertionError(f"the job recorded {n} events in 60 s: {events}")


def test_values_set_as_the_dashboard_writes_them_apply_at_the_next_epoch_and_stop_completes(tmp_path: Path) -> None:
    def dashboard(storage: optuna.storages.BaseStorage, trial_id: int) -> None:
        # One form submission: every widget's key, the empty fields as "" and the stop choice at "keep training".
        for key, value in {
            "set:optimizer.lr": "0.0123",
            "set:optimizer.momentum": "abc",
            "set:optimizer.weight_decay": "",
            "set:stop": 0,
        }.items():
            storage.set_trial_user_attr(trial_id, key, value)
        _wait_for_events(storage, trial_id, 2)
        storage.set_trial_user_attr(trial_id, "set:stop", 1)

    person = _person(tmp_path, dashboard)
    _run(tmp_path, "trainer.epochs=500")
    person.join(timeout=60)
    assert not person.errors  # type: ignore[attr-defined]
    (trial,) = _trials(tmp_path)
    assert trial.state == TrialState.COMPLETE
    last = max(trial.intermediate_values)
    assert last < 500 and trial.value == trial.intermediate_values[last]  # stopped, with its last epoch's value
    lr, momentum, stop = trial.user_attrs["babysit_events"]
    at = lr["epoch"]
    assert lr == {
        "epoch": at,
        "key": "optimizer.lr",
        "source": "dashboard",
        "old": 0.05,
        "new": 0.0123,
        "applied": True,
    }
    assert momentum["applied"] is False and momentum["new"] == "abc" and momentum["old"] == 0.9
    assert momentum["reason"] == "optimizer.momentum must be a number, but got 'abc'."
    assert stop["key"] == "stop" and stop["applied"] and stop["epoch"] == last
    history = {h["epoch"]: h for h in trial.user_attrs["history"]}
    assert sorted(history) == list(range(1, last + 1)) == sorted(trial.intermediate_values)
    assert {history[e]["lr"] for e in range(1, at + 1)} == {0.05}  # the old value up to the boundary
    assert {history[e]["lr"] for e in range(at + 1, last + 1)} == {0.0123}  # the new one from the next epoch
    assert all(trial.user_attrs[k] == "" for k in ("set:optimizer.lr", "set:optimizer.momentum", "set:stop"))
    assert trial.user_attrs["babysit_status"].startswith(f"complete after epoch {last}: stopped by set:stop")
    assert 0.0 < trial.user_attrs["test_accuracy"] <= 1.0

    # The curve with its changes marked, as the dashboard's custom plot and python -m tuner.report draw it.
    from tuner.plots import babysit_curves
    from tuner.report import write_report

    study = optuna.load_study(study_name="digits-mlp-babysit", storage=f"sqlite:///{tmp_path / 'babysit.db'}")
    marks = {t.name: t for t in babysit_curves(study).data}
    # The form writes its keys one at a time: the rejected value may reach the job one boundary after the lr.
    assert list(marks["trial 0: changes"].x) == [at, last] and list(marks["trial 0: rejected"].x) == [momentum["epoch"]]
    assert marks["trial 0: changes"].text[0] == "optimizer.lr 0.05 -> 0.0123 (dashboard)"
    text = write_report(study, [], tmp_path / "report", storage="sqlite:///babysit.db", evaluator="ped_anova")
    assert f"trial 0 after epoch {at}: optimizer.lr 0.05 -> 0.0123 (dashboard)" in text
    assert "Babysat runs, with the changes marked" in (tmp_path / "report" / "index.html").read_text()


def test_the_terminal_command_sets_the_lr_is_told_of_a_rejected_value_and_stops_the_trial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    exits: list[object] = []

    def terminal(storage: optuna.storages.BaseStorage, trial_id: int) -> None:
        for value in ("steer.lr=0.02", "steer.momentum=1.5", "steer.stop=true"):
            try:
                steer(compose_raw(*_overrides(tmp_path, value)))
                exits.append(0)
            except SystemExit as err:
                exits.append(err.code)

    person = _person(tmp_path, terminal)
    _run(tmp_path, "trainer.epochs=500")
    person.join(timeout=60)
    assert not person.errors  # type: ignore[attr-defined]
    out = capsys.readouterr().out
    assert exits == [0, 1, 0]  # a rejected value is a failed command
    assert "sent to trial 0 of digits-mlp-babysit: set:optimizer.lr=0.02" in out
    assert "optimizer.lr 0.05 -> 0.02" in out
    assert "rejected after epoch" in out and "optimizer.momentum must be a number in [0, 1), but got 1.5." in out
    (trial,) = _trials(tmp_path)
    assert (
        trial.state == TrialState.COMPLETE and trial.value == trial.intermediate_values[max(trial.intermediate_values)]
    )
    events = trial.user_attrs["babysit_events"]
    assert [(e["key"], e["applied"], e["source"]) for e in events] == [
        ("optimizer.lr", True, "terminal"),
        ("optimizer.momentum", False, "terminal"),
        ("stop", True, "terminal"),
    ]
    history = trial.user_attrs["history"]
    assert history[-1]["lr"] == 0.02
    # Only a running trial can be steered; the command names what it found.
    with pytest.raises(ConfigError, match=r"steer.trial=0: trial 0 of 'digits-mlp-babysit' is COMPLETE; fork it"):
        steer(compose_raw(*_overrides(tmp_path, "steer.lr=0.1", "steer.trial=0")))
    with pytest.raises(ConfigError, match=r"name one running trial of 'digits-mlp-babysit' \(running: none\)"):
        steer(compose_raw(*_overrides(tmp_path, "steer.lr=0.1")))
    with pytest.raises(ConfigError, match=r"python -m tuner.steer sets nothing"):
        steer(compose_raw(*_overrides(tmp_path)))


def _state(path: Path) -> dict[str, Any]:
    return torch.load(path, weights_only=True)


@pytest.mark.slow
def test_sigint_and_sigkill_mid_run_then_the_same_command_continues_to_the_model_of_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    epochs = 30
    overrides = _overrides(tmp_path, "data.batch_size=8", f"trainer.epochs={epochs}")
    command = [sys.executable, "-m", "tuner.babysit", *overrides]
    storage = make_storage(f"sqlite:///{tmp_path / 'babysit.db'}")

    def reported() -> int:
        try:
            study_id = storage.get_study_id_from_name("digits-mlp-babysit")
            trial = storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id, 0))
        except KeyError:
            return 0
        return max(trial.intermediate_values, default=0)

    def start_and_stop(at: int, sig: signal.Signals) -> subprocess.CompletedProcess[str]:
        proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 180
        while reported() < at and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()[0]
        if sig == signal.SIGKILL:  # meanwhile, a second job on the same trial is refused: the first holds it
            with pytest.raises(ConfigError, match="trial 0 of babysit study 'digits-mlp-babysit' is being trained"):
                babysit(compose_raw(*overrides), changed=[])
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
        return subprocess.CompletedProcess(command, proc.returncode, out)

    interrupted = start_and_stop(3, signal.SIGINT)
    assert interrupted.returncode == 130, interrupted.stdout
    assert "run the same command again to continue from its checkpoint" in interrupted.stdout
    (trial,) = _trials(tmp_path)
    assert trial.state == TrialState.RUNNING and trial.user_attrs["babysit_status"].startswith("interrupted by SIGINT")
    killed = start_and_stop(reported() + 3, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert "resumes at epoch" in killed.stdout
    finished = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stdout + finished.stderr
    (trial,) = _trials(tmp_path)  # one trial, one curve
    assert trial.state == TrialState.COMPLETE
    assert sorted(trial.intermediate_values) == list(range(1, epochs + 1))  # no epoch missing or repeated
    assert [h["epoch"] for h in trial.user_attrs["history"]] == list(range(1, epochs + 1))

    _run(tmp_path, "data.batch_size=8", f"trainer.epochs={epochs}", "babysit.study=uninterrupted")
    (alone,) = _trials(tmp_path, "uninterrupted")
    assert alone.intermediate_values == trial.intermediate_values
    resumed = _state(tmp_path / "runs" / "digits-mlp-babysit" / "trial-0" / f"epoch-{epochs}.pt")
    reference = _state(tmp_path / "runs" / "uninterrupted" / "trial-0" / f"epoch-{epochs}.pt")
    assert resumed["state_dict"].keys() == reference["state_dict"].keys()
    for name, tensor in reference["state_dict"].items():  # the same model, bit for bit (same seeds, CPU)
        assert torch.equal(resumed["state_dict"][name], tensor), name
    assert resumed["babysit"]["history"] == [
        {**h, "epoch_time_s": r["epoch_time_s"]}
        for h, r in zip(reference["babysit"]["history"], resumed["babysit"]["history"], strict=True)
    ]


def test_a_fork_continues_its_parents_checkpoint_exactly_and_with_a_changed_lr_branches_from_it(tmp_path: Path) -> None:
    _run(tmp_path, "trainer.epochs=4")
    fork = ["babysit.fork=0", "babysit.fork_epoch=2"]
    _run(tmp_path, *fork, "trainer.epochs=4", changed=["trainer.epochs"])
    _run(tmp_path, *fork, "optimizer.lr=0.01", changed=["optimizer.lr"])
    _run(tmp_path, *fork, "optimizer.lr=0.01", changed=["optimizer.lr"])  # the same command: nothing new to train
    parent, same, lower = _trials(tmp_path)
    for child in (same, lower):
        assert child.state == TrialState.COMPLETE
        assert child.user_attrs["babysit_parent"] == {"study": "digits-mlp-babysit", "trial": 0, "epoch": 2}
        assert sorted(child.intermediate_values) == [1, 2, 3, 4]  # the parent's first two epochs, then its own
        assert [child.intermediate_values[e] for e in (1, 2)] == [parent.intermediate_values[e] for e in (1, 2)]
    # Unchanged, the fork trains epochs 3 and 4 as its parent did: model, optimizer, RNG and batch order restored.
    assert same.intermediate_values == parent.intermediate_values
    assert [h["lr"] for h in lower.user_attrs["history"]] == [0.05, 0.05, 0.01, 0.01]
    assert lower.user_attrs["babysit_config"]["optimizer"]["lr"] == 0.01
    with pytest.raises(ConfigError, match=r"model.hidden_units=64: a fork keeps its parent's model.hidden_units=32"):
        _run(tmp_path, "babysit.fork=0", "model.hidden_units=64", changed=["model.hidden_units"])
    with pytest.raises(ConfigError, match=r"babysit.fork_epoch=7: no such checkpoint in .*\(its epochs: 1, 2, 3, 4\)"):
        _run(tmp_path, "babysit.fork=0", "babysit.fork_epoch=7")
    assert len(_trials(tmp_path)) == 3


def test_continue_the_best_trial_of_a_tuned_study_from_its_saved_model(tmp_path: Path) -> None:
    from tuner.tune import prepare, tune

    tune(*prepare(compose_raw(*_overrides(tmp_path, "study.n_trials=3", "trainer.epochs=2", "trainer.workers=1"))))
    storage = f"sqlite:///{tmp_path / 'babysit.db'}"
    best = optuna.load_study(study_name="digits-mlp", storage=storage).best_trial
    with pytest.raises(ConfigError, match=r"trainer.epochs=2: it starts at epoch 2 of digits-mlp trial"):
        _run(tmp_path, "babysit.from_best=true")
    # A learning rate of ~0 keeps the best model's weights: a model that did not start from them would be at chance.
    _run(
        tmp_path,
        "babysit.from_best=true",
        "trainer.epochs=3",
        "optimizer.lr=1e-9",
        changed=["trainer.epochs", "optimizer.lr"],
    )
    (trial,) = _trials(tmp_path)
    assert trial.user_attrs["babysit_parent"] == {"study": "digits-mlp", "trial": best.number, "epoch": 2}
    assert {e: trial.intermediate_values[e] for e in (1, 2)} == best.intermediate_values
    assert abs(trial.intermediate_values[3] - best.intermediate_values[2]) < 0.05
    config = trial.user_attrs["babysit_config"]
    assert config["optimizer"]["lr"] == 1e-9  # the command line's, on top of the best trial's values
    for path in ("model.hidden_units", "data.batch_size", "optimizer.name"):  # searched in the tuned study
        section, key = path.split(".")
        assert config[section][key] == best.params[path]


def test_a_babysit_study_and_a_tuning_study_are_never_mixed(tmp_path: Path) -> None:
    from tuner.tune import prepare, tune

    _run(tmp_path, "trainer.epochs=1")
    with pytest.raises(ConfigError, match=r"study.name='digits-mlp-babysit' is a babysit study"):
        tune(*prepare(compose_raw(*_overrides(tmp_path, "study.name=digits-mlp-babysit", "study.n_trials=1"))))
    tune(*prepare(compose_raw(*_overrides(tmp_path, "study.n_trials=1", "trainer.epochs=1", "trainer.workers=1"))))
    with pytest.raises(ConfigError, match=r"babysit.study='digits-mlp' in .* is a tuning study"):
        _run(tmp_path, "babysit.study=digits-mlp")
    with pytest.raises(ConfigError, match=r"babysits other data \(data.content: sha256:\w+ -> sha256:\w+\)"):
        _run(tmp_path, "data.train_subset=500")
    with pytest.raises(ConfigError, match=r"babysit.fork=0 and babysit.from_best=true: choose one"):
        _run(tmp_path, "babysit.fork=0", "babysit.from_best=true")
    with pytest.raises(ConfigError, match=r"trainer.pack=4: python -m tuner.babysit trains one model in this process"):
        _run(tmp_path, "trainer.pack=4", changed=["trainer.pack"])
    assert len(_trials(tmp_path)) == 1
