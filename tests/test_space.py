from __future__ import annotations

import math
from typing import Any

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from tests.conftest import compose_raw
from tuner.config import ConfigError, get_path
from tuner.space import describe, describe_range, entry_param, parse_space, suggest, values_from_params


def _sample(space: dict[str, Any], raw: dict[str, Any], n: int) -> list[dict[str, Any]]:
    params = parse_space(space, raw)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    out = []
    for _ in range(n):
        trial = study.ask()
        out.append(suggest(trial, params, raw))
        study.tell(trial, 0.0)
    return out


def test_space_log_lr_has_uniform_log10_spread(raw: dict[str, Any]) -> None:
    lrs = np.array(
        [
            v["optimizer.lr"]
            for v in _sample({"optimizer": {"lr": {"type": "float", "low": 1e-4, "high": 1.0, "log": True}}}, raw, 2000)
        ]
    )
    r = np.log10(lrs)
    assert r.min() >= -4 and r.max() <= 0
    counts, _ = np.histogram(r, bins=4, range=(-4, 0))
    # alpha = 10^r, r uniform in [-4, 0]: each decade holds a quarter of the samples.
    assert np.all(np.abs(counts / len(r) - 0.25) < 0.04), counts


def test_space_reverse_log_beta_has_uniform_log10_one_minus_beta(raw: dict[str, Any]) -> None:
    space = {"optimizer": {"momentum": {"type": "float", "low": 0.9, "high": 0.999, "reverse_log": True}}}
    betas = np.array([v["optimizer.momentum"] for v in _sample(space, raw, 2000)])
    assert betas.min() >= 0.9 and betas.max() <= 0.999
    r = np.log10(1 - betas)
    counts, _ = np.histogram(r, bins=2, range=(-3, -1))
    assert np.all(np.abs(counts / len(r) - 0.5) < 0.04), counts
    # A uniform sampler would put ~90% of samples below 0.99; log-scale on 1 - beta puts half there.
    assert 0.45 < np.mean(betas < 0.99) < 0.55


def test_space_reverse_log_stores_one_minus_value_and_the_used_value(raw: dict[str, Any]) -> None:
    params = parse_space(
        {"optimizer": {"momentum": {"type": "float", "low": 0.9, "high": 0.999, "reverse_log": True}}}, raw
    )
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    used = suggest(trial, params, raw)["optimizer.momentum"]
    study.tell(trial, 1.0)
    frozen = study.trials[0]
    assert frozen.params["1-optimizer.momentum"] == pytest.approx(1 - used)
    assert frozen.distributions["1-optimizer.momentum"] == FloatDistribution(1e-3, 0.1, log=True)
    assert frozen.user_attrs["optimizer.momentum"] == pytest.approx(used)
    assert values_from_params(params, frozen.params) == {"optimizer.momentum": pytest.approx(used)}


def test_space_conditional_params_appear_only_under_their_condition() -> None:
    raw = compose_raw()  # the shipped default space searches optimizer.name over sgd and adam
    seen = _sample(raw["space"], raw, 200)
    names = {v["optimizer.name"] for v in seen}
    assert names == {"sgd", "adam"}
    for v in seen:
        if v["optimizer.name"] == "adam":
            assert {"optimizer.beta1", "optimizer.beta2", "optimizer.eps"} <= v.keys()
            assert "optimizer.momentum" not in v
        else:
            assert "optimizer.momentum" in v
            assert not {"optimizer.beta1", "optimizer.beta2", "optimizer.eps"} & v.keys()


def test_space_condition_on_fixed_config_value_never_samples() -> None:
    raw = compose_raw(
        "optimizer.name=sgd",
        "space=lr",
        "+space.optimizer.beta1={type: float, low: 0.8, high: 0.99, when: {optimizer.name: adam}}",
    )
    assert all("optimizer.beta1" not in v for v in _sample(raw["space"], raw, 20))


@pytest.mark.parametrize(
    ("when", "message"),
    [
        (
            {"optimizer.name": ["sgdd"]},
            "space.optimizer.momentum.when gives optimizer.name the value 'sgdd', which it can never take "
            "(optimizer.name must be one of sgd, adam, rmsprop, but got 'sgdd'); here it takes 'sgd' (its config "
            "value) or a value in {sgd, adam} (space.optimizer.name).",
        ),
        ({"optimizer.name": ["sgd", "sggd"]}, "gives optimizer.name the value 'sggd', which it can never take"),
        ({"model.batch_norm": "yes"}, "the value 'yes', which it can never take (model.batch_norm must be true or"),
        ({"model.num_layers": 0}, "here it takes 2 (its config value) or a value in [1, 3] (space.model.num_layers)."),
        ({"study.seed": 7}, "(study.seed is not a setting that a trial changes); here it takes 0 (its config value)."),
    ],
)
def test_space_condition_on_a_value_its_key_never_takes_is_an_error(
    raw: dict[str, Any], when: dict[str, Any], message: str
) -> None:
    space = {**raw["space"], "optimizer": {**raw["space"]["optimizer"]}}
    space["optimizer"]["momentum"] = {**space["optimizer"]["momentum"], "when": when}
    with pytest.raises(ConfigError) as info:
        parse_space(space, raw)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "when",
    [
        {"optimizer.name": ["sgd", "rmsprop"]},  # the shipped space: rmsprop needs only a wider choices list
        {"optimizer.name": "adam"},  # a choice of the space
        {"model.batch_norm": False},  # a flag takes either value
        {"model.num_layers": 3},  # in the range of an int entry
        {"data.batch_size": 100},  # fixed in this run, a valid batch size in another
    ],
)
def test_space_condition_on_a_value_some_run_gives_its_key_is_accepted(
    raw: dict[str, Any], when: dict[str, Any]
) -> None:
    space = {**raw["space"], "optimizer": {**raw["space"]["optimizer"]}}
    space["optimizer"]["momentum"] = {**space["optimizer"]["momentum"], "when": when}
    params = {p.path: p for p in parse_space(space, raw)}  # no error
    if "optimizer.momentum" in params:  # else conditioned on a fixed setting this run does not have: left out
        assert params["optimizer.momentum"].when == {
            k: tuple(v) if isinstance(v, list) else (v,) for k, v in when.items()
        }
    else:
        assert any(get_path(raw, k) not in (v if isinstance(v, list) else [v]) for k, v in when.items())


def test_space_int_log_and_categorical_distributions(raw: dict[str, Any]) -> None:
    params = {p.path: p for p in parse_space(raw["space"], raw)}
    assert params["model.hidden_units"].distribution == IntDistribution(32, 512, log=True)
    assert params["data.batch_size"].distribution == CategoricalDistribution((32, 64, 128, 256))
    units = [
        v["model.hidden_units"]
        for v in _sample({"model": {"hidden_units": raw["space"]["model"]["hidden_units"]}}, raw, 300)
    ]
    assert all(isinstance(u, int) and 32 <= u <= 512 for u in units)
    assert np.mean(np.array(units) < 128) == pytest.approx(0.5, abs=0.08)  # log scale: half below the geometric middle


def test_space_command_line_can_narrow_and_add_entries() -> None:
    raw = compose_raw(
        "space.optimizer.lr.low=1e-3", "+space.optimizer.weight_decay={type: float, low: 1e-6, high: 1e-2, log: true}"
    )
    params = {p.path: p for p in parse_space(raw["space"], raw)}
    assert params["optimizer.lr"].distribution == FloatDistribution(1e-3, 1.0, log=True)
    assert params["optimizer.weight_decay"].distribution == FloatDistribution(1e-6, 1e-2, log=True)
    assert describe(params["optimizer.weight_decay"]) == "optimizer.weight_decay: [1e-06, 0.01] log"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"type": "float", "low": 1.0, "high": 0.1}, "space.optimizer.lr.low must be below"),
        ({"type": "float", "low": 0.0, "high": 1.0, "log": True}, "space.optimizer.lr.low must be > 0 with log"),
        ({"type": "float", "low": -1.0, "high": 1.0, "log": True}, "but got -1.0"),
        ({"type": "floaty", "low": 0.1, "high": 1.0}, "space.optimizer.lr.type must be one of"),
        ({"type": "float", "low": "a", "high": 1.0}, "space.optimizer.lr.low must be a number, but got 'a'"),
        ({"type": "float", "low": 0.1, "high": 1.0, "lg": True}, "unknown keys ['lg']"),
        ({"type": "float", "low": 1e-4, "high": 2.0, "log": True}, "allows a value that the config rejects"),
        ({"type": "categorical", "choices": []}, "space.optimizer.lr.choices must be a non-empty list"),
    ],
)
def test_space_bad_entry_names_key_and_value(raw: dict[str, Any], entry: dict[str, Any], message: str) -> None:
    key = "momentum" if "allows a value" in message else "lr"  # momentum must stay below 1
    path = {"optimizer": {key: entry}}
    with pytest.raises(ConfigError) as info:
        parse_space(path, raw)
    assert message in str(info.value)


@pytest.mark.parametrize(("low", "high"), [(0.0, 0.999), (0.9, 1.0), (1.2, 1.5), (-0.5, 0.5)])
def test_space_reverse_log_bounds_outside_open_unit_interval_fail(raw: dict[str, Any], low: float, high: float) -> None:
    with pytest.raises(ConfigError, match=r"space.optimizer.momentum: reverse_log bounds must lie in \(0, 1\)"):
        parse_space({"optimizer": {"momentum": {"type": "float", "low": low, "high": high, "reverse_log": True}}}, raw)


def test_space_unknown_path_is_an_error_not_an_unused_param(raw: dict[str, Any]) -> None:
    with pytest.raises(
        ConfigError, match=r"space.optimizer.learning_rate names the config path 'optimizer.learning_rate'"
    ):
        parse_space({"optimizer": {"learning_rate": {"type": "float", "low": 1e-4, "high": 1.0}}}, raw)


def test_space_wrong_type_for_path_is_an_error(raw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"space.model.hidden_units gives model.hidden_units the value 32.0"):
        parse_space({"model": {"hidden_units": {"type": "float", "low": 32, "high": 512}}}, raw)


def test_space_study_settings_are_not_searchable(raw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="only model, data, optimizer, trainer settings can be searched"):
        parse_space({"study": {"n_trials": {"type": "int", "low": 1, "high": 5}}}, raw)


def test_space_int_bounds_must_be_integers(raw: dict[str, Any]) -> None:
    with pytest.raises(
        ConfigError, match=r"space.model.hidden_units.low must be an integer for type int, but got 32.5"
    ):
        parse_space({"model": {"hidden_units": {"type": "int", "low": 32.5, "high": 512}}}, raw)


def test_space_lr_option_searches_only_the_learning_rate() -> None:
    raw = compose_raw("space=lr")
    assert [p.path for p in parse_space(raw["space"], raw)] == ["optimizer.lr"]
    assert math.isclose(parse_space(raw["space"], raw)[0].distribution.low, 1e-4)  # type: ignore[attr-defined]


@pytest.mark.parametrize("model", ["softmax", "mlp", "cnn"])
def test_space_default_fits_every_shipped_model(model: str) -> None:
    raw = compose_raw(f"model={model}")
    searched = {p.path for p in parse_space(raw["space"], raw)}
    # The sizes the MLP and the CNN take are searched for them; softmax regression takes none, so none is searched.
    assert ({"model.hidden_units", "model.num_layers"} <= searched) == (model != "softmax")
    assert not {p.removeprefix("model.") for p in searched if p.startswith("model.")} - set(raw["model"])


@pytest.mark.parametrize(
    ("entry", "shown"),
    [
        ({"type": "float", "low": 1e-4, "high": 1.0, "log": True}, "[0.0001, 1] log"),
        ({"type": "float", "low": 0.9, "high": 0.999, "reverse_log": True}, "[0.9, 0.999] log(1 - value)"),
        ({"type": "int", "low": 1, "high": 7, "step": 2}, "[1, 7] step 2"),
        ({"type": "float", "low": 0.0, "high": 0.5}, "[0, 0.5]"),
        ({"type": "categorical", "choices": ["sgd", "adam"]}, "{sgd, adam}"),
    ],
)
def test_space_one_formatter_shows_each_range_in_the_values_the_config_receives(
    entry: dict[str, Any], shown: str
) -> None:
    param = entry_param("optimizer.x", entry)
    assert describe_range(param) == shown
    assert describe(param) == f"optimizer.x: {shown}"
