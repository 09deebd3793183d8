"""The sampler and the pruner, built from their config sections with ``hydra.utils.instantiate``."""

from __future__ import annotations

import inspect
from typing import Any

import optuna
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from tuner._compat import startup_trials
from tuner.config import ConfigError, PluginConfig
from tuner.pruning import CachedCompletedTrials
from tuner.schema import locate

__all__ = ["make_pruner", "make_sampler", "pruner_startup"]


def _build(group: str, cfg: PluginConfig, base: type, **extra: Any) -> Any:
    try:
        built = instantiate({"_target_": cfg.target, **cfg.options}, **extra, _convert_="all")
    except InstantiationException as err:  # the class refused its options
        reason = str(err.__cause__ or err).strip().splitlines()[0]
        options = ", ".join(f"{group}.{k}={v!r}" for k, v in cfg.options.items()) or "no options"
        raise ConfigError(f"{group}._target_={cfg.target!r} rejects its options ({options}): {reason}") from None
    if not isinstance(built, base):
        raise ConfigError(f"{group}._target_={cfg.target!r} built a {type(built).__name__}, not a {base.__name__}.")
    return built


def make_sampler(cfg: PluginConfig, *, seed: int) -> optuna.samplers.BaseSampler:
    """The sampler, seeded from ``study.seed`` (a sampler class that takes a ``seed``)."""
    takes_seed = "seed" in inspect.signature(locate(cfg.target)).parameters
    return _build("sampler", cfg, optuna.samplers.BaseSampler, **({"seed": seed} if takes_seed else {}))


def make_pruner(cfg: PluginConfig) -> optuna.pruners.BasePruner:
    pruner: optuna.pruners.BasePruner = _build("pruner", cfg, optuna.pruners.BasePruner)
    if isinstance(pruner, optuna.pruners.PercentilePruner):  # median and percentile: see tuner.pruning
        return CachedCompletedTrials(pruner)
    return pruner


def pruner_startup(pruner: optuna.pruners.BasePruner) -> int:
    """How many complete trials the pruner waits for before it prunes any (median and percentile); else 0."""
    return startup_trials(pruner.pruner) if isinstance(pruner, CachedCompletedTrials) else 0
