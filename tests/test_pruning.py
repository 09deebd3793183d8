from __future__ import annotations

import math
from pathlib import Path

import optuna
import sqlalchemy

from tuner.config import PluginConfig
from tuner.plugins import make_pruner
from tuner.pruning import CachedCompletedTrials
from tuner.storage import make_storage

EPOCHS = 8
MEDIAN = "optuna.pruners.MedianPruner"


def _objective(trial: optuna.Trial) -> float:
    """A learning curve whose height depends on x, reported each epoch like tuner's objective."""
    x = trial.suggest_float("x", 0.0, 1.0)
    value = 0.0
    for epoch in range(1, EPOCHS + 1):
        value = x * (1 - math.exp(-epoch / 3))
        trial.report(value, epoch)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return value


def _objective_reported(trial: optuna.Trial) -> float:
    """The same curve, pruned as tuner's objective does: from the values reported, not the trial read back."""
    x = trial.suggest_float("x", 0.0, 1.0)
    value, reported = 0.0, {}
    for epoch in range(1, EPOCHS + 1):
        value = x * (1 - math.exp(-epoch / 3))
        trial.report(value, epoch)
        reported[epoch] = value
        pruner = trial.study.pruner
        assert isinstance(pruner, CachedCompletedTrials)
        if pruner.prune_reported(trial.study, trial.number, reported):
            raise optuna.TrialPruned()
    return value


def _run(
    storage: optuna.storages.BaseStorage,
    pruner: optuna.pruners.BasePruner,
    name: str,
    objective=_objective,
    *,
    told: bool = False,
) -> optuna.Study:
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        direction="maximize",
        sampler=optuna.samplers.RandomSampler(seed=3),
        pruner=pruner,
    )
    told_ = [pruner.told] if told and isinstance(pruner, CachedCompletedTrials) else []
    study.optimize(objective, n_trials=24, callbacks=told_)  # tuner's workers tell the pruner the same way
    return study


def test_pruning_cached_median_prunes_exactly_as_optunas_median(tmp_path: Path) -> None:
    storage = make_storage(f"sqlite:///{tmp_path / 'p.db'}", heartbeat_interval=None)
    options = {"n_startup_trials": 3, "n_warmup_steps": 2}
    plain = _run(storage, optuna.pruners.MedianPruner(**options), "plain")
    cached = _run(storage, make_pruner(PluginConfig(MEDIAN, options)), "cached")
    reported = _run(storage, make_pruner(PluginConfig(MEDIAN, options)), "reported", _objective_reported)
    told = _run(storage, make_pruner(PluginConfig(MEDIAN, options)), "told", _objective_reported, told=True)
    states = [(t.state, len(t.intermediate_values)) for t in plain.trials]
    assert [(t.state, len(t.intermediate_values)) for t in cached.trials] == states
    assert [(t.state, len(t.intermediate_values)) for t in reported.trials] == states
    assert [(t.state, len(t.intermediate_values)) for t in told.trials] == states
    assert sum(s == optuna.trial.TrialState.PRUNED for s, _ in states) >= 5  # the comparison had pruning to match


def test_pruning_cached_median_reads_once_per_trial_not_per_epoch_and_less_when_told(tmp_path: Path) -> None:
    storage = make_storage(f"sqlite:///{tmp_path / 'q.db'}", heartbeat_interval=None)
    engine = storage.engine  # type: ignore[attr-defined]
    selects = {"n": 0}

    def count(conn: object, cursor: object, statement: str, *args: object) -> None:
        selects["n"] += statement.lstrip().upper().startswith("SELECT")

    sqlalchemy.event.listen(engine, "before_cursor_execute", count)
    per_pruner = {}
    for name, pruner in (
        # Never prunes (every epoch is a warm-up step), so all epochs run on both; no startup trials to wait for.
        ("plain", optuna.pruners.MedianPruner(n_startup_trials=0, n_warmup_steps=EPOCHS)),
        ("cached", make_pruner(PluginConfig(MEDIAN, {"n_startup_trials": 0, "n_warmup_steps": EPOCHS}))),
        ("told", make_pruner(PluginConfig(MEDIAN, {"n_startup_trials": 0, "n_warmup_steps": EPOCHS}))),
    ):
        selects["n"] = 0
        _run(storage, pruner, name, told=name == "told")
        per_pruner[name] = selects["n"]
    # 24 trials x 8 epochs: the plain pruner reads the study at every epoch, the cached one once per trial, the
    # one told of each completed trial once in all (the rest are Optuna's own reads: ask, tell).
    assert per_pruner["cached"] < 0.6 * per_pruner["plain"], per_pruner
    assert per_pruner["told"] < per_pruner["cached"] - 20, per_pruner


def _two_workers(
    tmp_path: Path, *, refresh_s: float
) -> tuple[optuna.Study, optuna.Study, CachedCompletedTrials, optuna.Trial]:
    """This worker's study, pruner and running trial (one report of 0.5, not pruned: nothing completed yet),
    and another worker's handle on the same study."""
    url = f"sqlite:///{tmp_path / 'w.db'}"
    mine = optuna.create_study(storage=make_storage(url, heartbeat_interval=None), study_name="s", direction="maximize")
    other = optuna.load_study(storage=make_storage(url, heartbeat_interval=None), study_name="s")
    median = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    pruner = CachedCompletedTrials(median, refresh_s=refresh_s)
    trial = mine.ask()
    trial.report(0.5, 1)
    assert not pruner.prune(mine, mine.trials[0])  # no completed trial yet: nothing to compare with
    return mine, other, pruner, trial


def test_pruning_cache_sees_trials_another_worker_completed_after_refresh(tmp_path: Path) -> None:
    mine, other, pruner, trial = _two_workers(tmp_path, refresh_s=0)
    done = other.ask()
    done.report(0.9, 1)
    other.tell(done, 0.9)  # another worker completes a better trial while this one runs
    frozen = next(t for t in mine.get_trials(deepcopy=False) if t.number == trial.number)
    assert pruner.prune(mine, frozen)  # 0.5 is below the median of the completed trials (0.9)


def test_pruning_trial_started_before_the_startup_trials_completed_is_pruned_once_they_have(tmp_path: Path) -> None:
    mine, other, pruner, trial = _two_workers(tmp_path, refresh_s=3600)  # too few completed: Optuna waits
    done = other.ask()
    done.report(0.9, 1)
    done.report(0.9, 2)
    other.tell(done, 0.9)  # another worker completes the startup trial well within refresh_s
    trial.report(0.5, 2)
    frozen = next(t for t in mine.get_trials(deepcopy=False) if t.number == trial.number)
    assert pruner.prune(mine, frozen)  # as Optuna's own MedianPruner decides at this epoch
