"""The sampler and the pruner, built from their config sections."""

from __future__ import annotations

from typing import Any

import optuna

from tuner.config import ConfigError, PluginConfig
from tuner.pruning import CachedCompletedTrials

__all__ = ["PRUNERS", "SAMPLERS", "make_pruner", "make_sampler"]

SAMPLERS: dict[str, type[optuna.samplers.BaseSampler]] = {
    "random": optuna.samplers.RandomSampler,
    "tpe": optuna.samplers.TPESampler,
    "qmc": optuna.samplers.QMCSampler,
    "gp": optuna.samplers.GPSampler,
}
PRUNERS: dict[str, type[optuna.pruners.BasePruner]] = {
    "median": optuna.pruners.MedianPruner,
    "percentile": optuna.pruners.PercentilePruner,
    "hyperband": optuna.pruners.HyperbandPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
    "none": optuna.pruners.NopPruner,
}


def _build(group: str, table: dict[str, Any], cfg: PluginConfig, **extra: Any) -> Any:
    cls = table.get(cfg.name)
    if cls is None:
        raise ConfigError(f"{group}.name must be one of {', '.join(table)}, but got {cfg.name!r}.")
    try:
        return cls(**cfg.options, **extra)
    except (TypeError, ValueError) as err:
        options = ", ".join(f"{group}.{k}={v!r}" for k, v in cfg.options.items())
        raise ConfigError(f"{group}={cfg.name} rejects its options ({options}): {err}") from None


def make_sampler(cfg: PluginConfig, *, seed: int) -> optuna.samplers.BaseSampler:
    sampler: optuna.samplers.BaseSampler = _build("sampler", SAMPLERS, cfg, seed=seed)
    return sampler


def make_pruner(cfg: PluginConfig) -> optuna.pruners.BasePruner:
    pruner: optuna.pruners.BasePruner = _build("pruner", PRUNERS, cfg)
    if isinstance(pruner, optuna.pruners.PercentilePruner):  # median and percentile: see tuner.pruning
        return CachedCompletedTrials(pruner)
    return pruner
