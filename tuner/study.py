"""Optuna's pieces, built from typed config: storage, sampler, pruner, and the study itself."""

from __future__ import annotations

import json
import sqlite3
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import TrialState
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, OperationalError

from tuner.config import ConfigError, PluginConfig, RunConfig

__all__ = [
    "FINISHED",
    "check_storage_url",
    "finished_trials",
    "make_pruner",
    "make_sampler",
    "make_storage",
    "open_study",
    "safe_url",
]

# The states that count toward study.n_trials: every trial that ran to an end.
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# SQLite waits this long for a lock before failing; 5 s or more gave 0 lock errors with 16 processes.
SQLITE_BUSY_TIMEOUT_S = 60.0
# Parallel workers' sampler seeds lie this far apart: no worker reaches another's seed by resuming.
WORKER_SEED_STRIDE = 1_000_003
SCHEMA_ATTEMPTS = 3

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
    return pruner


def safe_url(url: str) -> str:
    """The storage URL with any password masked, for logs and messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable storage URL>"


def check_storage_url(url: str) -> URL:
    """Check ``study.storage`` without touching anything: parse it and, for SQLite, look at the file."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(
            f"study.storage must be a database URL such as sqlite:///tuner.db, but got {safe_url(url)!r}."
        ) from None
    if parsed.get_backend_name() != "sqlite":
        return parsed
    if not parsed.database or parsed.database == ":memory:":
        raise ConfigError(f"study.storage must name a SQLite file, e.g. sqlite:///tuner.db, but got {url!r}.")
    path = Path(parsed.database)
    if not path.parent.is_dir():
        raise ConfigError(f"study.storage={url!r}: the folder {str(path.parent)!r} does not exist.")
    if path.exists() and path.stat().st_size > 0:
        _check_optuna_sqlite(url, path)
    return parsed


def _check_optuna_sqlite(url: str, path: Path) -> None:
    """Refuse a file that is not an Optuna database before anything writes to it."""
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as err:
        raise ConfigError(f"study.storage={url!r} is not an Optuna database ({err}); it was left untouched.") from None
    # No tables at all: a new file another worker is creating Optuna's tables in (in one transaction).
    if tables and not {"studies", "trials", "version_info"} <= tables:
        raise ConfigError(
            f"study.storage={url!r} is a SQLite file without Optuna's tables; it was left untouched. "
            "Point study.storage at a new file or an Optuna database."
        )


def make_storage(url: str) -> BaseStorage:
    """Open the study's storage. SQLite runs in WAL mode with a long busy timeout."""
    parsed = check_storage_url(url)
    engine_kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        database = str(parsed.database)

        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(database, timeout=SQLITE_BUSY_TIMEOUT_S, check_same_thread=False)
            # WAL lets readers (the dashboard) run beside the writer and doubles throughput with
            # several workers; synchronous=NORMAL is safe with WAL (28 vs 36 ms a trial, LIBRARY-NOTES).
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            return conn

        engine_kwargs["creator"] = connect
    else:
        engine_kwargs["pool_pre_ping"] = True
    try:
        return _rdb_storage(url, engine_kwargs, retry=parsed.get_backend_name() == "sqlite")
    except Exception as err:  # driver and schema errors come in many types; all mean "cannot use it"
        message = str(err).replace(url, safe_url(url)).splitlines()[0]
        raise ConfigError(f"study.storage={safe_url(url)!r} cannot be opened: {message}") from None


def _rdb_storage(url: str, engine_kwargs: dict[str, Any], *, retry: bool) -> RDBStorage:
    """``RDBStorage``, tried again when parallel workers create a new SQLite file's tables at the same moment.

    Measured: 4 processes opening one new file together, 1 start in 12 failed on alembic_version's UNIQUE
    constraint (optuna 5.0.0); the tables are there when it tries again.
    """
    for attempt in range(SCHEMA_ATTEMPTS):
        try:
            return RDBStorage(url, engine_kwargs=engine_kwargs)
        except (IntegrityError, OperationalError):
            if not retry or attempt == SCHEMA_ATTEMPTS - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def open_study(cfg: RunConfig, storage: BaseStorage, *, worker: int = 0) -> optuna.Study:
    """Create the study or load it to continue toward ``study.n_trials``.

    A resumed study's sampler is seeded with ``study.seed + trials so far``: a seeded sampler that
    restarted from ``study.seed`` would propose the parameters it already tried. Parallel workers
    that start together see the same trials, so each adds its own ``worker`` index (times a prime).
    """
    name = cfg.study.name
    try:
        existing = storage.get_all_trials(storage.get_study_id_from_name(name), deepcopy=False)
    except KeyError:
        existing = []
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=make_sampler(cfg.sampler, seed=cfg.study.seed + len(existing) + worker * WORKER_SEED_STRIDE),
        pruner=make_pruner(cfg.pruner),
        direction=optuna.study.StudyDirection[cfg.study.direction.upper()],
        load_if_exists=True,
    )
    if study.direction.name.lower() != cfg.study.direction:
        raise ConfigError(
            f"study.direction={cfg.study.direction!r}, but the stored study {name!r} was created "
            f"to {study.direction.name.lower()}; use another study.name."
        )
    if not existing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(["val_accuracy"])
        stored = json.loads(json.dumps(cfg.raw, default=str))
        stored["study"]["storage"] = safe_url(cfg.study.storage)  # never store a password
        study.set_user_attr("config", stored)
    return study
