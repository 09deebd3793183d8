"""The study: created or continued from typed config, one experiment, each handle with its own sampler stream."""

from __future__ import annotations

import json
import warnings
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from tuner.config import ConfigError, RunConfig
from tuner.definition import check_definition
from tuner.plugins import make_pruner, make_sampler
from tuner.secrets import mask_password, safe_url
from tuner.storage import study_lock

__all__ = ["FINISHED", "finished_trials", "open_study"]

# The states that count toward study.n_trials: every trial that ran to an end.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# Sampler streams' seeds lie this far apart, so that no stream reaches another's seed.
WORKER_SEED_STRIDE = 1_000_003
STREAMS_ATTR = "sampler_streams"  # how many sampler streams the study has handed out


def _without_password(value: Any, url: str) -> Any:
    """``value`` (the config as JSON data) with the storage password masked in every string, wherever it was
    copied (an interpolation of ``${study.storage}``, a URL in another key)."""
    if isinstance(value, dict):
        return {k: _without_password(v, url) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_password(v, url) for v in value]
    return mask_password(value, url) if isinstance(value, str) else value


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def _claim_stream(study: optuna.Study, url: str) -> int:
    """A sampler stream of its own for this study handle: 0 for the study's first, then 1, 2, ... under the
    storage's budget lock, so that handles opened at the same moment, in any process on any machine, differ."""
    with study_lock(url, study.study_name):
        stream = int(study.user_attrs.get(STREAMS_ATTR, 0))
        study.set_user_attr(STREAMS_ATTR, stream + 1)
    return stream


def open_study(cfg: RunConfig, storage: BaseStorage, *, defined: dict[str, str] | None = None) -> optuna.Study:
    """Create the study or load it to continue toward ``study.n_trials``.

    ``defined`` (``tuner.definition.definition``) is checked against the stored study's definition first, and
    stored with a new study. Each handle's sampler is seeded with ``study.seed`` plus its own stream (times a
    prime): a study's first run draws as ``study.seed`` says, and no rerun or parallel worker repeats another's.
    """
    name = cfg.study.name
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=optuna.samplers.RandomSampler(),  # replaced below, once this handle's stream is known
        pruner=make_pruner(cfg.pruner),
        direction=optuna.study.StudyDirection[cfg.study.direction.upper()],
        load_if_exists=True,
    )
    if study.user_attrs.get("babysit"):  # tuner.babysit's: trials trained and steered one by one, not a search
        raise ConfigError(
            f"study.name={name!r} is a babysit study (python -m tuner.babysit), not a search: use another study.name."
        )
    if study.direction.name.lower() != cfg.study.direction:
        raise ConfigError(
            f"study.direction={cfg.study.direction!r}, but the stored study {name!r} was created "
            f"to {study.direction.name.lower()}; use another study.name."
        )
    if defined is not None:
        check_definition(study, defined, url=safe_url(cfg.study.storage), accept=cfg.study.accept_changes)
    if "config" not in study.user_attrs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(["val_accuracy"])
        stored = _without_password(json.loads(json.dumps(cfg.raw, default=str)), cfg.study.storage)
        stored["study"]["storage"] = safe_url(cfg.study.storage)  # never store a password
        study.set_user_attr("config", stored)
    study.sampler = make_sampler(
        cfg.sampler, seed=cfg.study.seed + _claim_stream(study, cfg.study.storage) * WORKER_SEED_STRIDE
    )
    return study
