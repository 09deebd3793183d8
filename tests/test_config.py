from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from tests.conftest import compose_raw
from tuner.config import SETTINGS, ConfigError, check_target, get_path, parse_run, parse_trial, set_path
from tuner.schema import RefineConfig
from tuner.space import parse_space


def test_config_defaults_parse_to_typed_settings() -> None:
    run = parse_run(compose_raw())
    assert run.study.n_trials >= 1 and run.study.storage == "sqlite:///tuner.db"
    assert run.study.name == "mnist1d-mlp"
    assert run.trial.model.target == "tuner.model.mlp" and run.trial.model.options["batch_norm"] is True
    assert run.trial.data.name == "mnist1d"
    assert run.sampler.target == "optuna.samplers.RandomSampler" and run.pruner.name == "MedianPruner"
    assert run.trial.data.target == "tuner.datasets.mnist1d" and run.trial.data.options == {"num_samples": 5000}
    assert run.trial.trainer.workers is None  # auto


ONE_FOLDER = "a name without '/' or '\\' that does not start with '.'"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("study.n_trials=0", "study.n_trials must be an integer >= 1, but got 0."),
        ("study.n_trials=abc", "study.n_trials must be an integer >= 1, but got 'abc'."),
        ("study.n_trials=2.5", "study.n_trials must be an integer >= 1, but got 2.5."),
        ("study.direction=up", "study.direction must be one of maximize, minimize, but got 'up'."),
        ("trainer.epochs=0", "trainer.epochs must be an integer >= 1, but got 0."),
        ("trainer.device=gpu", "trainer.device must be auto, cpu, cuda, cuda:N or mps, but got 'gpu'."),
        ("optimizer.lr=-1", "optimizer.lr must be a number in (0, inf), but got -1.0."),
        ("optimizer.momentum=1.5", "optimizer.momentum must be a number in [0, 1), but got 1.5."),
        ("optimizer.name=lbfgs", "optimizer.name must be one of sgd, adam, rmsprop, but got 'lbfgs'."),
        ("data.batch_size=1", "data.batch_size must be an integer >= 2, but got 1."),
        ("model.batch_norm=maybe", "model.batch_norm must be true or false, but got 'maybe'."),
        ("data.seed=-1", "data.seed must be an integer >= 0, but got -1."),
        ("data.val_fraction=1.5", "data.val_fraction must be a number in (0, 1), but got 1.5."),
        ("data.batch_size=many", "data.batch_size must be an integer >= 2, but got 'many'."),
        ("data.num_samples=true", "data.num_samples must be an integer, but got True."),
        ("trainer.workers=0", "trainer.workers must be auto or an integer >= 1, but got 0."),
        ("trainer.bf16=maybe", "trainer.bf16 must be true or false, but got 'maybe'."),
        ("study.timeout=0", "study.timeout must be a number in (0, inf) or null, but got 0.0."),
        ("dashboard.port=70000", "dashboard.port must be an integer in [1, 65535], but got 70000."),
        ("refine.margin=2", "refine.margin must be a number in (0, 1], but got 2.0."),
        ("model.hidden_units=0", "model.hidden_units must be an integer >= 1, but got 0."),
        ("study.name=../x", f"study.name must be {ONE_FOLDER}, but got '../x'."),
        ("study.name=a/b", f"study.name must be {ONE_FOLDER}, but got 'a/b'."),
        (
            "study.name=" + "x" * 300,
            f"study.name must be at most 200 characters, but got '{'x' * 40}... (300 characters)'.",
        ),
    ],
)
def test_config_bad_value_names_key_and_value(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_run(compose_raw(override))
    assert str(info.value) == message


def test_config_npz_needs_a_path() -> None:
    with pytest.raises(ConfigError) as info:
        parse_run(compose_raw("data=npz"))
    assert str(info.value) == "data.path must be set (tuner.datasets.npz has no default), but got None."


def test_config_set_path_copies_and_get_path_reads() -> None:
    raw: dict[str, Any] = {"optimizer": {"lr": 0.1, "momentum": 0.9}, "a": {"b": {"c": 1, "d": 2}}, "e": [1]}
    changed = set_path(raw, {"optimizer.lr": 0.5, "a.b.c": 3, "a.b.d": 4})
    assert changed == {"optimizer": {"lr": 0.5, "momentum": 0.9}, "a": {"b": {"c": 3, "d": 4}}, "e": [1]}
    assert raw == {"optimizer": {"lr": 0.1, "momentum": 0.9}, "a": {"b": {"c": 1, "d": 2}}, "e": [1]}  # untouched
    again = set_path(changed, {"optimizer.momentum": 0.99})
    assert changed["optimizer"]["momentum"] == 0.9 and again["optimizer"] == {"lr": 0.5, "momentum": 0.99}
    assert get_path(raw, "optimizer.nope", None) is None
    with pytest.raises(KeyError):
        get_path(raw, "optimizer.nope")


def test_config_trial_sections_parse_alone() -> None:
    trial = parse_trial(set_path(compose_raw("model=cnn"), {"model.channels": 8}))
    assert trial.model.name == "cnn" and trial.model.options["channels"] == 8


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "+trainer.epoch=3",
            "trainer.epoch is not a tuner setting (did you mean trainer.epochs?), but got trainer.epoch=3.",
        ),
        ("+study.n_trial=9", "study.n_trial is not a tuner setting (did you mean study.n_trials?)"),
        (
            "+model.hidden_unit=8",
            "model.hidden_unit is not a parameter of tuner.model.mlp (did you mean model.hidden_units?)",
        ),
        ("+refine.topk=3", "refine.topk is not a tuner setting (did you mean refine.top_k?)"),
        ("+tuner.trail=3", "tuner.trail is not a tuner setting (did you mean tuner.trial?)"),
        ("+worker=2", "worker is not a tuner setting"),  # joblib's jobs on one study are gone
        ("+foo=1", "foo is not a tuner setting (tuner reads study, optimizer, trainer, model, data, space, "),
        ("+optimiser.lr=0.1", "optimiser is not a tuner setting (did you mean optimizer?)"),
        ("data.zzz=1", "data.zzz is not a data setting or a parameter of tuner.datasets.mnist1d (data reads name, "),
        ("data.num_sample=9", "data.num_sample is not a data setting or a parameter of tuner.datasets.mnist1d (did "),
        ("trainer.epoch=3", "trainer.epoch is not a tuner setting (did you mean trainer.epochs?), but got trainer.ep"),
        ("+sampler.n_startup=3", "sampler.n_startup is not a parameter of optuna.samplers.RandomSampler (sampler rea"),
    ],
)
def test_config_unknown_key_is_an_error_naming_it_and_the_closest_setting(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_run(compose_raw(override))
    assert message in str(info.value)


def test_config_trial_sections_refuse_unknown_keys_too() -> None:
    raw = set_path(compose_raw(), {"trainer.epoch": 3})
    with pytest.raises(ConfigError, match=r"trainer\.epoch is not a tuner setting \(did you mean trainer\.epochs\?\)"):
        parse_trial(raw)


CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize(
    "override", sorted(f"{p.parent.name}={p.stem}" for p in CONF.glob("*/*.yaml")), ids=lambda o: o
)
def test_config_every_shipped_option_is_read_whole(override: str) -> None:
    extra = ["data.path=my.npz"] if override == "data=npz" else []
    raw = compose_raw(override, *extra, "+tuner.trial=3")  # the sweeper's key
    run = parse_run(raw)
    assert parse_space(raw["space"], raw) and run.raw["tuner"] == {"trial": 3}


CONF_FILES = sorted(p for p in CONF.glob("*/*.yaml") if p.parent.name in ("model", "data", "sampler", "pruner"))


@pytest.mark.parametrize("path", CONF_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_each_option_file_carries_only_its_own_keys(path: Path) -> None:
    values = OmegaConf.to_container(OmegaConf.load(path))
    assert isinstance(values, dict) and "_target_" in values
    # Every key is a parameter of its _target_ (check_target refuses any other): no "unused" keys.
    section = path.parent.name
    given = {"model": ("input_shape", "num_classes"), "data": ("seed",)}.get(section, ())
    shared = ("val_fraction", "train_subset") if section == "data" else ()
    values = {**values, "path": "x.npz"} if path.stem == "npz" else values
    _, options = check_target(section, values, given=given, shared=shared)
    assert set(options) == set(values) - {"_target_", *shared}


def test_config_yaml_only_chooses_options_the_schema_declares_the_rest() -> None:
    assert set(OmegaConf.load(CONF / "config.yaml")) == {"defaults", "hydra"}
    assert compose_raw("study.n_trials=7")["study"]["n_trials"] == 7  # defaults from tuner.schema, overridable


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("nowhere.load", "data._target_='nowhere.load' cannot be imported (No module named 'nowhere')."),
        ("tuner.datasets.nothing", "data._target_='tuner.datasets.nothing' cannot be imported (module 'tuner.da"),
        ("tuner.datasets.MIRRORS", "data._target_='tuner.datasets.MIRRORS' is not a class or a function."),
    ],
)
def test_config_a_bad_data_target_is_one_line_naming_it(target: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_run(compose_raw(f"data._target_={target}", "~data.num_samples"))
    assert str(info.value).startswith(message)


def test_config_settings_list_the_keys_each_command_reads() -> None:
    assert SETTINGS["refine"] == tuple(f.name for f in fields(RefineConfig))
    defaults = compose_raw()
    for section in ("study", "dashboard", "report", "refine"):
        assert set(defaults[section]) == set(SETTINGS[section] or ()), section
