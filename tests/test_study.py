from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from tests.conftest import compose_raw
from tuner.config import ConfigError, PluginConfig, parse_run
from tuner.plugins import make_pruner, make_sampler
from tuner.storage import make_storage
from tuner.study import open_study


def test_study_sampler_and_pruner_options_are_checked() -> None:
    tpe = PluginConfig("optuna.samplers.TPESampler", {"n_startup_trials": 3})
    assert isinstance(make_sampler(tpe, seed=0), optuna.samplers.TPESampler)
    assert isinstance(make_pruner(PluginConfig("optuna.pruners.NopPruner", {})), optuna.pruners.NopPruner)
    with pytest.raises(ConfigError, match=r"pruner._target_='optuna.pruners.MedianPruner' rejects its options"):
        make_pruner(PluginConfig("optuna.pruners.MedianPruner", {"n_startup_trials": -1}))


def test_study_resume_reseeds_sampler_so_params_do_not_repeat(tmp_path: Path) -> None:
    raw = compose_raw(f"study.storage=sqlite:///{tmp_path / 'r.db'}")
    run = parse_run(raw)
    storage = make_storage(run.study.storage)
    first = open_study(run, storage)
    first.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=5)
    again = open_study(run, storage)  # the same command run again
    again.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=5)
    xs = [t.params["x"] for t in again.trials]
    assert len(xs) == 10 and len(set(xs)) == 10


def test_study_direction_mismatch_is_an_error(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'd.db'}"
    open_study(parse_run(compose_raw(f"study.storage={url}")), make_storage(url))
    with pytest.raises(ConfigError, match="study.direction='minimize', but the stored study"):
        open_study(parse_run(compose_raw(f"study.storage={url}", "study.direction=minimize")), make_storage(url))


def test_study_parallel_workers_starting_together_propose_different_params(tmp_path: Path) -> None:
    raw = compose_raw(f"study.storage=sqlite:///{tmp_path / 'w.db'}")
    run = parse_run(raw)
    storage = make_storage(run.study.storage)
    # Both open the study before either has a trial, as parallel workers started together do.
    workers = [open_study(run, storage) for _ in (0, 1)]
    for study in workers:
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    xs = [t.params["x"] for t in workers[0].trials]
    assert len(xs) == 6 and len(set(xs)) == 6
