"""Samplers and pruners built from their config sections: ``_target_`` and its options, through instantiate."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from tests.conftest import compose_raw
from tuner.config import ConfigError, parse_run
from tuner.plugins import make_pruner, make_sampler
from tuner.pruning import CachedCompletedTrials

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "sampler").glob("*.yaml")))
def test_plugins_each_shipped_sampler_is_the_optuna_class_it_names_seeded_from_the_study(option: str) -> None:
    run = parse_run(compose_raw(f"sampler={option}", "study.seed=7"))
    sampler = make_sampler(run.sampler, seed=run.study.seed)
    assert f"{type(sampler).__module__.split('._')[0]}.{type(sampler).__name__}" == run.sampler.target
    a, b = (optuna.create_study(sampler=make_sampler(run.sampler, seed=7)) for _ in range(2))
    assert a.ask().suggest_float("x", 0, 1) == b.ask().suggest_float("x", 0, 1)  # the seed reached the sampler


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "pruner").glob("*.yaml")))
def test_plugins_each_shipped_pruner_is_built_and_median_reads_completed_trials_once(option: str) -> None:
    run = parse_run(compose_raw(f"pruner={option}"))
    pruner = make_pruner(run.pruner)
    if option == "median":
        assert isinstance(pruner, CachedCompletedTrials) and isinstance(pruner.pruner, optuna.pruners.MedianPruner)
    else:
        assert type(pruner).__name__ == run.pruner.name


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["pruner.n_startup_trials=-1"], "pruner._target_='optuna.pruners.MedianPruner' rejects its options (pruner"),
        (["+sampler.n_startup=3"], "sampler.n_startup is not a parameter of optuna.samplers.RandomSampler (sampler"),
        (["pruner._target_=collections.OrderedDict"], "pruner._target_='collections.OrderedDict' has no signature"),
        (
            ["pruner=none", "pruner._target_=tuner.datasets.digits"],
            "pruner._target_='tuner.datasets.digits' built a dict, not a ",
        ),
        (["pruner._target_=optuna.pruners.Nope"], "pruner._target_='optuna.pruners.Nope' cannot be imported"),
    ],
)
def test_plugins_a_bad_target_or_option_is_one_line_naming_it(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        run = parse_run(compose_raw(*overrides))
        make_sampler(run.sampler, seed=0)
        make_pruner(run.pruner)
    assert str(info.value).startswith(message), str(info.value)
