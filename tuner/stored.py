"""Studies already in storage, for the commands that read them (dashboard, report, refine): a typo in
``study.storage`` or ``study.name`` is an error that lists what is there, not a new empty database.
"""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage

from tuner.config import ConfigError, RunConfig
from tuner.definition import CONTENT_KEY, check_definition, definition
from tuner.plugins import make_pruner, make_sampler
from tuner.secrets import safe_url
from tuner.space import Param, parse_space
from tuner.storage import JOURNAL_SCHEME, check_storage_url, make_storage

__all__ = ["check_experiment", "load_existing_study", "open_existing_storage", "study_names", "study_params"]


def open_existing_storage(url: str) -> BaseStorage:
    parsed = check_storage_url(url)
    kind = {"sqlite": "SQLite file", JOURNAL_SCHEME: "journal file"}.get(parsed.get_backend_name())
    if kind is not None and not Path(str(parsed.database)).is_file():
        raise ConfigError(
            f"study.storage={safe_url(url)!r}: there is no such {kind}; run python -m tuner with it first."
        )
    return make_storage(url)


def study_names(storage: BaseStorage) -> list[str]:
    return [s.study_name for s in storage.get_all_studies()]


def load_existing_study(run: RunConfig, storage: BaseStorage | None = None) -> optuna.Study:
    """``study.name`` from ``study.storage``, with the run's sampler and pruner (Optuna does not store them)."""
    storage = storage if storage is not None else open_existing_storage(run.study.storage)
    names = study_names(storage)
    if run.study.name not in names:
        listed = ", ".join(repr(n) for n in names) or "none"
        raise ConfigError(
            f"study.name={run.study.name!r} is not in {safe_url(run.study.storage)} (its studies: {listed})."
        )
    return optuna.load_study(
        study_name=run.study.name,
        storage=storage,
        sampler=make_sampler(run.sampler, seed=run.study.seed),
        pruner=make_pruner(run.pruner),
    )


def check_experiment(study: optuna.Study, run: RunConfig, *, content: str | None = None) -> None:
    """Stop, as ``python -m tuner`` would, when this command's config defines another experiment than the study's
    (``tuner.definition``); without ``content`` the data's fingerprint is not compared. Writes nothing."""
    params = parse_space(run.raw.get("space"), run.raw)
    ignore = () if content is not None else (CONTENT_KEY,)
    now = definition(run.raw, params, content)
    check_definition(study, now, url=safe_url(run.study.storage), ignore=ignore, record=False)


def study_params(study: optuna.Study) -> list[Param]:
    """The study's search space: parsed from the config tuner stored with it, else from its trials' distributions
    (a study tuner did not write; reverse-log params then show as the sampled ``1 - value``)."""
    stored = study.user_attrs.get("config")
    if isinstance(stored, dict) and isinstance(stored.get("space"), dict):
        try:
            return parse_space(stored["space"], stored)
        except ConfigError:
            pass  # written by another version of tuner: fall back to what the trials say
    distributions: dict[str, BaseDistribution] = {}
    for trial in study.get_trials(deepcopy=False):
        distributions.update(trial.distributions)
    return [Param(path=name, distribution=dist) for name, dist in distributions.items()]
