"""``trainer.pack=auto``: the probe measures each pack size on the device; the rule, per shape, and the study's
record."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch

import tuner.packauto
from tests.conftest import compose_raw
from tuner.config import ConfigError, parse_trial
from tuner.data import load_splits
from tuner.packauto import CANDIDATES, PROBE_SHARE, AutoPack, choose, probe
from tuner.trainer import TrainJob
from tuner.tune import prepare, tune


def test_choose_trains_one_at_a_time_unless_a_pack_trains_each_member_twice_as_fast() -> None:
    assert choose({1: 100.0, 2: 150.0, 4: 190.0, 8: 199.0}) == 1  # 1.99x: the study would not be faster
    assert choose({1: 100.0, 2: 150.0, 4: 190.0, 8: 210.0}) == 4  # the smallest within 10% of the best
    assert choose({1: 100.0, 2: 250.0, 4: 260.0}) == 2
    assert choose({1: 0.0}) == 1  # the composed config diverged in the probe: no rate to compare with
    assert choose({1: 100.0, 2: 150.0, 4: 300.0}, most=2) == 1  # a small study: packs of 4 would share too much
    assert choose({1: 100.0, 2: 250.0, 4: 400.0}, most=2) == 2


def test_pack_auto_packs_a_study_of_n_trials_at_most_n_over_12_at_once_so_that_it_tries_6_shapes() -> None:
    assert [AutoPack(optuna.create_study(), n).most for n in (10, 24, 50, 200)] == [1, 2, 4, 16]
    assert AutoPack(optuna.create_study(), None).most is None  # no budget: as the probe finds


def test_probe_measures_one_alone_and_growing_packs_on_this_device() -> None:
    cfg = parse_trial(compose_raw("data=digits", "model.hidden_units=32"))
    rates = probe(cfg, load_splits(cfg.data), torch.device("cpu"))
    assert list(rates) == [1, *CANDIDATES][: len(rates)] and len(rates) >= 2
    assert all(rate > 0 for rate in rates.values())


def _fake_probe(probed: list[int], *, seconds: float = 0.0) -> Any:
    """A device where packs of 4 pay for batches of 32 and none pay for 256 (decided by the rule), each probe
    taking ``seconds``; ``probed`` gets each probed batch size."""

    def fake(cfg: Any, *args: Any) -> dict[int, float]:
        time.sleep(seconds)
        probed.append(cfg.data.batch_size)
        if cfg.data.batch_size == 32:
            return {1: 100.0, 2: 180.0, 4: 300.0, 8: 310.0}
        return {1: 100.0, 2: 110.0}

    return fake


def test_pack_auto_sizes_each_shape_from_its_probe_records_it_and_a_rerun_packs_as_the_study_began(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'auto.db'}"
    common = ["data=digits", f"study.storage={url}", f"study.output_dir={tmp_path}", "trainer.workers=1"]
    common += ["trainer.pack=auto", "trainer.epochs=1", "space=lr", "pruner=none"]  # no warm-up: packs at once
    common += ["+space.data.batch_size={type: categorical, choices: [32, 256]}"]
    probed: list[int] = []
    monkeypatch.setattr(tuner.packauto, "probe", _fake_probe(probed))
    tune(*prepare(compose_raw(*common, "study.n_trials=48")))  # 48 trials try 6 shapes of packs of 4 at least
    study = optuna.load_study(study_name="digits-mlp", storage=url)
    assert sorted(probed) == [32, 256]  # each shape once
    records = {json.loads(k)["batch_size"]: v for k, v in study.user_attrs["pack_auto"].items()}
    assert records[32] == {"member_steps_per_s": {"1": 100.0, "2": 180.0, "4": 300.0, "8": 310.0}, "chosen": 4}
    assert records[256]["chosen"] == 1
    sizes = {b: [t.user_attrs["pack_size"] for t in study.trials if t.params["data.batch_size"] == b] for b in records}
    assert max(sizes[32]) > 1 and set(sizes[256]) == {1}, sizes  # trained in packs where they pay, alone elsewhere
    # A pack of one takes one trial: each of them drew its own learning rate and batch size, as without packs.
    alone = [t for t in study.trials if t.params["data.batch_size"] == 256]
    assert alone and all(t.user_attrs["pack_id"] == t.number for t in alone)
    tune(*prepare(compose_raw(*common, "study.n_trials=56")))
    assert sorted(probed) == [32, 256]  # the stored choices, not new probes
    assert len(optuna.load_study(study_name="digits-mlp", storage=url).trials) == 56


def test_pack_auto_probes_new_shapes_only_while_probing_took_a_small_share_of_the_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'share.db'}"
    overrides = ["data=digits", f"study.storage={url}", f"study.output_dir={tmp_path}", "trainer.workers=1"]
    overrides += ["trainer.pack=auto", "trainer.epochs=1", "space=lr", "pruner=none", "study.n_trials=24"]
    overrides += ["+space.model.hidden_units={type: int, low: 16, high: 256, log: true}"]  # a new shape each trial
    probed: list[int] = []
    monkeypatch.setattr(tuner.packauto, "probe", _fake_probe(probed, seconds=0.5))
    start = time.monotonic()
    tune(*prepare(compose_raw(*overrides)))
    wall = time.monotonic() - start
    # Each probe (0.5 s) waits until probing is back under PROBE_SHARE of the slot's time: the first one is free.
    assert 1 <= len(probed) <= 1 + PROBE_SHARE * wall / 0.5, (len(probed), wall)
    study = optuna.load_study(study_name="digits-mlp", storage=url)
    assert len(study.trials) == 24 and all(t.user_attrs["pack_size"] == 1 for t in study.trials)  # as probed


def test_pack_auto_trains_one_at_a_time_when_the_probe_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path / 'failed.db'}"
    overrides = ["data=digits", f"study.storage={url}", f"study.output_dir={tmp_path}", "trainer.workers=1"]
    overrides += ["trainer.pack=auto", "trainer.epochs=1", "space=lr", "pruner=none", "study.n_trials=24"]

    def broken(*args: Any) -> dict[int, float]:
        raise RuntimeError("the probe's worker died")

    monkeypatch.setattr(tuner.packauto, "probe", broken)
    tune(*prepare(compose_raw(*overrides)))
    study = optuna.load_study(study_name="digits-mlp", storage=url)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 24
    assert all(t.user_attrs["pack_size"] == 1 for t in study.trials)
    assert "no probe of trial 0's shape (the probe's worker died)" in caplog.text


def test_pack_auto_takes_the_nearest_probed_shape_of_the_same_model_and_batch_size() -> None:
    study = optuna.create_study()
    auto = AutoPack(study, n_trials=100)
    job = _job("model.hidden_units=64", "data.batch_size=32")
    auto.record(job, {1: 100.0, 2: 180.0, 4: 300.0})
    auto.record(_job("model.hidden_units=512", "data.batch_size=32"), {1: 100.0, 2: 101.0})
    assert auto.known(job) == 4
    assert auto.nearest(_job("model.hidden_units=90", "data.batch_size=32")) == 4  # closer to 64 than to 512
    assert auto.nearest(_job("model.hidden_units=400", "data.batch_size=32")) == 1
    assert auto.nearest(_job("model.hidden_units=64", "data.batch_size=64")) == 1  # no shape of that batch size
    assert len(study.user_attrs["pack_auto"]) == 2
    study.set_user_attr("pack_auto", {"shape": {"batch_size": 32}, "chosen": 8})  # an older tuner's one record
    assert AutoPack(study, n_trials=100).nearest(job) == 1


def _job(*overrides: str) -> TrainJob:
    return TrainJob(parse_trial(compose_raw("data=digits", *overrides)), 0, "cpu")


@pytest.mark.parametrize("value", ["0", "sometimes", "1.5"])
def test_pack_takes_auto_or_a_count(value: str) -> None:
    with pytest.raises(ConfigError, match=r"trainer.pack must be auto or an integer >= 1, but got "):
        parse_trial(compose_raw(f"trainer.pack={value}"))
