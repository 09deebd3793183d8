"""tuner.packing: a study whose workers train trials in packs (trainer.pack) keeps every trial's own results."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import FrozenTrial, TrialState
from scipy import stats

from tests.conftest import compose_raw
from tuner.config import parse_trial, set_path
from tuner.data import load_splits
from tuner.space import values_from_params
from tuner.summary import format_summary
from tuner.trainer import EpochMetrics, TrainJob, fit
from tuner.tune import prepare, tune


def _overrides(tmp_path: Path, *extra: str) -> list[str]:
    pruner = ["pruner.n_startup_trials=2", "pruner.n_warmup_steps=1"] if "pruner=none" not in extra else []
    return [
        "data=digits",
        f"study.storage=sqlite:///{tmp_path / 'study.db'}",
        f"study.output_dir={tmp_path / 'out'}",
        "trainer.epochs=3",
        "trainer.pack=4",
        *pruner,
        *extra,
    ]


def _study(tmp_path: Path, name: str = "digits-mlp") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'study.db'}")


def _packs(trials: list[FrozenTrial]) -> dict[int, list[FrozenTrial]]:
    packs: dict[int, list[FrozenTrial]] = defaultdict(list)
    for trial in trials:
        packs[trial.user_attrs["pack_id"]].append(trial)
    return packs


@pytest.mark.parametrize("workers", [1, 2])  # in this process, and in worker processes
def test_packing_a_study_in_packs_runs_exactly_n_trials_and_members_share_their_shape(
    tmp_path: Path, workers: int
) -> None:
    summary = tune(*prepare(compose_raw(*_overrides(tmp_path, "study.n_trials=14", f"trainer.workers={workers}"))))
    trials = _study(tmp_path).trials
    assert len(trials) == 14 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    packs = _packs(trials)
    assert 1 < len(packs) < 14 and 4 <= max(len(p) for p in packs.values()) <= 8  # refilled to 2 x 4 at most
    for members in packs.values():
        shapes = {tuple(v for k, v in sorted(t.params.items()) if k.startswith(("model.", "data."))) for t in members}
        assert len(shapes) == 1  # batch size, width and depth are the pack's
        assert len({t.params["optimizer.lr"] for t in members}) == len(members)  # each its own draw
        assert all(1 <= t.user_attrs["pack_size"] <= 4 for t in members)
    assert summary.pack_sizes and len(summary.pack_sizes) == 14
    assert f"{sum(n > 1 for n in summary.pack_sizes)} of 14 trials trained in packs" in format_summary(summary)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert complete and all(sorted(t.intermediate_values) == [1, 2, 3] for t in complete)
    assert summary.best_number is not None and (tmp_path / "out" / "best_model.pt").exists()


def test_packing_a_packed_trial_stores_what_it_would_learn_alone(tmp_path: Path) -> None:
    # Learning rates that train smoothly: at the space's largest ones, a rounding difference grows chaotically.
    lr = ["space=lr", "space.optimizer.lr.low=1e-3", "space.optimizer.lr.high=3e-2"]
    overrides = _overrides(tmp_path, "study.n_trials=4", "trainer.workers=1", "pruner=none", *lr)
    run, params = prepare(compose_raw(*overrides))
    tune(run, params)
    trials = _study(tmp_path).trials
    assert len(_packs(trials)) == 1  # all four trained at once
    torch.set_num_threads(1)
    for trial in trials:
        cfg = parse_trial(set_path(run.raw, values_from_params(params, trial.params)))
        history: list[EpochMetrics] = []
        fit(
            TrainJob(cfg, trial.user_attrs["seed"], "cpu"),
            load_splits(cfg.data),
            on_setup=lambda s: None,
            on_epoch=history.append,
        )
        alone = {m.epoch: m.val_accuracy for m in history}
        assert trial.intermediate_values == pytest.approx(alone, abs=1 / 300)  # a flipped sample at most
        assert trial.user_attrs["train_loss"] == pytest.approx(history[-1].train_loss, rel=1e-4)


def test_packing_a_diverging_member_fails_alone_and_its_pack_goes_on(tmp_path: Path) -> None:
    # Without BatchNorm, learning rates above ~1e3 overflow the loss; the lower ones train.
    overrides = _overrides(
        tmp_path,
        "study.n_trials=8",
        "trainer.workers=1",
        "pruner=none",
        "space=lr",
        "model.batch_norm=false",
        "space.optimizer.lr.low=1e-3",
        "space.optimizer.lr.high=1e8",
        "study.max_failure_streak=20",
    )
    tune(*prepare(compose_raw(*overrides)))
    trials = _study(tmp_path).trials
    failed = [t for t in trials if t.state == TrialState.FAIL]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert failed and complete
    assert all(t.user_attrs["fail_reason"].startswith("TrainingDiverged: training loss became") for t in failed)
    shared = {t.user_attrs["pack_id"] for t in failed} & {t.user_attrs["pack_id"] for t in complete}
    assert shared  # a pack with a diverged member completed its other members
    assert all(t.params["optimizer.lr"] > 1.0 for t in failed)


def test_packing_a_freed_place_is_refilled_while_the_pack_trains(tmp_path: Path) -> None:
    # One worker; most trials are pruned after epoch 1: new trials join while older packs still train.
    overrides = _overrides(tmp_path, "study.n_trials=16", "trainer.workers=1", "trainer.epochs=4")
    tune(*prepare(compose_raw(*overrides)))
    trials = _study(tmp_path).trials
    spans = [(t.datetime_start, t.datetime_complete, t.user_attrs["pack_id"]) for t in trials]
    overlapping = any(a[2] != b[2] and a[0] < b[1] and b[0] < a[1] for a in spans for b in spans)
    assert overlapping
    assert max(len(members) for members in _packs(trials).values()) > 4  # a pack of 4 refilled where members left
    assert any(t.state == TrialState.PRUNED for t in trials)


@pytest.mark.slow
def test_packing_random_search_draws_per_member_from_the_space(tmp_path: Path) -> None:
    overrides = _overrides(
        tmp_path,
        "study.n_trials=120",
        "trainer.workers=1",
        "trainer.epochs=1",
        "model.hidden_units=16",
        "model.num_layers=1",
        "pruner=none",
        "trainer.pack=8",
    )
    tune(*prepare(compose_raw(*overrides)))
    trials = _study(tmp_path).trials
    assert len(trials) == 120 and len(_packs(trials)) >= 7  # 120 trials, a shape per 2 x 8
    r = [math.log10(t.params["optimizer.lr"]) for t in trials]  # alpha = 10^r, r uniform in [-4, 0]
    assert stats.kstest(r, stats.uniform(loc=-4, scale=4).cdf).pvalue > 0.01
    momentum = [t.user_attrs["optimizer.momentum"] for t in trials if "1-optimizer.momentum" in t.params]
    r = [math.log10(1 - m) for m in momentum]  # beta = 1 - 10^r, r uniform in [-3, -1]
    assert len(r) > 30 and stats.kstest(r, stats.uniform(loc=-3, scale=2).cdf).pvalue > 0.01
