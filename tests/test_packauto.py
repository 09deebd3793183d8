"""``trainer.pack=auto``: the probe measures each pack size on the device; the rule and the study's record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
import torch

import tuner.packauto
from tests.conftest import compose_raw
from tuner.config import ConfigError, parse_trial
from tuner.data import load_splits
from tuner.packauto import CANDIDATES, choose, probe
from tuner.tune import prepare, tune


def test_choose_trains_one_at_a_time_unless_a_pack_trains_each_member_twice_as_fast() -> None:
    assert choose({1: 100.0, 2: 150.0, 4: 190.0, 8: 199.0}) == 1  # 1.99x: the study would not be faster
    assert choose({1: 100.0, 2: 150.0, 4: 190.0, 8: 210.0}) == 4  # the smallest within 10% of the best
    assert choose({1: 100.0, 2: 250.0, 4: 260.0}) == 2
    assert choose({1: 0.0}) == 1  # the composed config diverged in the probe: no rate to compare with


def test_probe_measures_one_alone_and_growing_packs_on_this_device() -> None:
    cfg = parse_trial(compose_raw("data=digits", "model.hidden_units=32"))
    rates = probe(cfg, load_splits(cfg.data), torch.device("cpu"))
    assert list(rates) == [1, *CANDIDATES][: len(rates)] and len(rates) >= 2
    assert all(rate > 0 for rate in rates.values())


def test_pack_auto_records_its_choice_on_the_study_and_a_rerun_packs_as_the_study_began(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'auto.db'}"
    common = ["data=digits", f"study.storage={url}", f"study.output_dir={tmp_path}", "trainer.workers=1"]
    common += ["trainer.pack=auto", "trainer.epochs=2", "space=lr", "pruner=none"]  # no warm-up: packs at once
    probed: list[int] = []

    def fake_probe(*args: Any) -> dict[int, float]:  # a device where packs of 4 pay: decided by the rule
        probed.append(1)
        return {1: 100.0, 2: 180.0, 4: 300.0, 8: 310.0}

    monkeypatch.setattr(tuner.packauto, "probe", fake_probe)
    tune(*prepare(compose_raw(*common, "study.n_trials=4")))
    study = optuna.load_study(study_name="digits-mlp", storage=url)
    record = study.user_attrs["pack_auto"]
    assert record["chosen"] == 4 and record["member_steps_per_s"] == {"1": 100.0, "2": 180.0, "4": 300.0, "8": 310.0}
    assert record["shape"]["device"] == "cpu" and record["shape"]["batch_size"] == 128
    assert max(t.user_attrs["pack_size"] for t in study.trials) > 1  # trained in packs
    tune(*prepare(compose_raw(*common, "study.n_trials=6")))
    assert probed == [1]  # the stored choice, not a new probe
    assert len(optuna.load_study(study_name="digits-mlp", storage=url).trials) == 6


@pytest.mark.parametrize("value", ["0", "sometimes", "1.5"])
def test_pack_takes_auto_or_a_count(value: str) -> None:
    with pytest.raises(ConfigError, match=r"trainer.pack must be auto or an integer >= 1, but got "):
        parse_trial(compose_raw(f"trainer.pack={value}"))
