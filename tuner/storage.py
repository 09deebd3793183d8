"""Optuna's storages as they are, from ``study.storage``: opened, checked first, and the study's lock."""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import threading
import time
import warnings
import weakref
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, OperationalError

from tuner._compat import optuna_table_names
from tuner.budget import file_lock
from tuner.journal import HeartbeatJournalStorage, check_journal_file
from tuner.schema import ConfigError
from tuner.secrets import mask_password, safe_url

__all__ = ["JOURNAL_SCHEME", "check_storage_url", "make_storage", "study_lock"]

# SQLite waits this long for a lock before failing: long, so that many workers queue for the write lock instead.
SQLITE_BUSY_TIMEOUT_S = 60.0
SCHEMA_ATTEMPTS = 5  # tries at a new SQLite file that parallel workers are creating: 2 s of waits in all
# study.storage=journal:///study.log (relative) or journal:////abs/study.log: Optuna's JournalStorage on a file.
JOURNAL_SCHEME = "journal"
# Any fixed numbers: the PostgreSQL advisory locks that tuner workers take while creating tables, and (with
# a study's key) while asking a trial.
SCHEMA_LOCK_KEY = 0x7475_6E65_72
BUDGET_LOCK_KEY = 0x7475_6E65


def check_storage_url(url: str) -> URL:
    """Check ``study.storage`` without touching anything: parse it and, for SQLite, look at the file."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(
            f"study.storage must be a database URL such as sqlite:///tuner.db, but got {safe_url(url)!r}."
        ) from None
    journal = parsed.get_backend_name() == JOURNAL_SCHEME
    if not journal and parsed.get_backend_name() != "sqlite":
        return parsed
    if not parsed.database or parsed.database == ":memory:":
        kind, example = ("journal", "journal:///study.log") if journal else ("SQLite", "sqlite:///tuner.db")
        raise ConfigError(f"study.storage must name a {kind} file, e.g. {example}, but got {url!r}.")
    path = Path(parsed.database)
    if not path.parent.is_dir():
        raise ConfigError(f"study.storage={url!r}: the folder {str(path.parent)!r} does not exist.")
    _check_writable(url, path)
    if journal:
        check_journal_file(url, path)
    elif path.exists() and path.stat().st_size > 0:
        _check_optuna_sqlite(url, path)
    return parsed


def _check_writable(url: str, path: Path) -> None:
    """Every command writes its storage file (and SQLite its journal beside it): a read-only one is named first."""
    for target in (path, path.parent) if path.exists() else (path.parent,):
        if not os.access(target, os.W_OK):
            what = "file" if target == path else "folder"
            raise ConfigError(
                f"study.storage={url!r}: the {what} {str(target)!r} is read-only, and tuner writes there "
                "(SQLite keeps its journal beside the file); copy the study to a writable folder."
            )


def _check_optuna_sqlite(url: str, path: Path) -> None:
    """Refuse a file that is not an Optuna database before anything writes to it."""
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as err:
        raise ConfigError(f"study.storage={url!r} is not an Optuna database ({err}); it was left untouched.") from None
    if not {"studies", "trials", "version_info"} <= tables:
        # None or some of Optuna's tables and nothing else: a new file another worker is creating them in, one
        # by one (SQLAlchemy's create_all on pysqlite commits each CREATE TABLE); RDBStorage adds the rest.
        # No version is stamped yet to check.
        if tables <= {*optuna_table_names(), "alembic_version"}:
            return
        raise ConfigError(
            f"study.storage={url!r} is a SQLite file without Optuna's tables; it was left untouched. "
            "Point study.storage at a new file or an Optuna database."
        )
    _check_optuna_schema(url, path)


def _check_optuna_schema(url: str, path: Path) -> None:
    """Optuna's own version check on a read-only connection: RDBStorage creates missing tables before it
    raises for an old or newer schema, so a writable one would touch the file."""

    def read_only() -> sqlite3.Connection:
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)

    for attempt in range(SCHEMA_ATTEMPTS):
        try:
            storage = RDBStorage(url, engine_kwargs={"creator": read_only})
        except (OperationalError, optuna.exceptions.StorageInternalError) as err:
            # A half-made file: another worker that started at the same moment has created the tables but
            # not yet stamped their version ("attempt to write a readonly database", or Optuna's
            # StorageInternalError wrapping it when the write is a commit). The other worker finishes
            # soon; a file that stays so is refused.
            if attempt < SCHEMA_ATTEMPTS - 1:
                time.sleep(0.2 * (attempt + 1))
                continue
            message = str(err)
        except Exception as err:  # RuntimeError for a schema mismatch
            message = str(err)
        else:
            storage.engine.dispose()
            return
        raise ConfigError(
            f"study.storage={url!r} is an Optuna database this Optuna cannot use; it was left untouched: "
            + message.splitlines()[0]
        ) from None


_OPENED: weakref.WeakSet[RDBStorage] = weakref.WeakSet()  # the database storages make_storage opened here
_PROCESS_LOCK = threading.Lock()  # a storage of this process only (in memory): its threads exclude each other


def study_lock(url: str, name: str) -> contextlib.AbstractContextManager[object]:
    """The lock every tuner worker of study ``name`` takes to count its trials and ask one (tuner.budget): a
    lock file beside a SQLite or journal file, a PostgreSQL advisory lock keyed by the name, or this process's."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend in ("sqlite", JOURNAL_SCHEME) and parsed.database and parsed.database != ":memory:":
        return file_lock(f"{parsed.database}.tuner-lock")
    if backend == "postgresql":
        return _advisory_lock(_engine_url(parsed), BUDGET_LOCK_KEY, zlib.crc32(name.encode()) - 2**31)
    return _PROCESS_LOCK


@contextlib.contextmanager
def _advisory_lock(url: URL, *keys: int) -> Iterator[None]:
    """A PostgreSQL session advisory lock on one or two integer keys."""
    args = ", ".join(f":k{i}" for i in range(len(keys)))
    values = {f"k{i}": key for i, key in enumerate(keys)}
    with _lock_engine(url.render_as_string(hide_password=False)).connect() as conn:
        conn.execute(sqlalchemy.text(f"SELECT pg_advisory_lock({args})"), values)
        try:
            yield
        finally:
            conn.execute(sqlalchemy.text(f"SELECT pg_advisory_unlock({args})"), values)


@functools.cache
def _lock_engine(url: str) -> sqlalchemy.Engine:
    # One small pool per server for this process's locks: a lock is taken before every trial.
    return sqlalchemy.create_engine(url, pool_size=2, pool_pre_ping=True)


def _engine_url(parsed: URL) -> URL:
    # A bare postgresql:// would pick psycopg2, which tuner does not install: use psycopg 3.
    return parsed.set(drivername="postgresql+psycopg") if parsed.drivername == "postgresql" else parsed


def make_storage(
    url: str,
    *,
    heartbeat_interval: int | None = 60,
    grace_period: int | None = None,
    max_retry: int | None = 3,
) -> BaseStorage:
    """Open the study's storage: SQLite in WAL mode with a long busy timeout, PostgreSQL through psycopg 3, or
    a journal file. A trial without a heartbeat (tuner.loop sends them) for ``grace_period`` seconds becomes
    FAIL and ``RetryHeartbeatStaleTrialCallback`` queues a copy, at most ``max_retry`` times (None: always)."""
    parsed = check_storage_url(url)
    heartbeat: dict[str, Any] = {}
    if heartbeat_interval is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # stable since optuna 2.8
            retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        heartbeat = {"heartbeat_interval": heartbeat_interval, "grace_period": grace_period}
        heartbeat["heartbeat_stale_trial_callback"] = retry
    if parsed.get_backend_name() == JOURNAL_SCHEME:
        return HeartbeatJournalStorage(str(parsed.database), **heartbeat)
    engine_kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        database = str(parsed.database)

        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(database, timeout=SQLITE_BUSY_TIMEOUT_S, check_same_thread=False)
            # WAL lets readers (the dashboard, other workers) run beside the writer; synchronous=NORMAL is
            # safe with WAL and saves an fsync at every commit.
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            return conn

        engine_kwargs["creator"] = connect
    else:
        engine_kwargs["pool_pre_ping"] = True
    rdb_url = _engine_url(parsed)
    try:
        with warnings.catch_warnings(), _creation_lock(rdb_url):
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
            if parsed.get_backend_name() == "postgresql":
                _check_optuna_server(rdb_url, url)
            storage = RDBStorage(
                rdb_url.render_as_string(hide_password=False), engine_kwargs=engine_kwargs, **heartbeat
            )
            _OPENED.add(storage)
            return storage
    except ConfigError:
        raise
    except Exception as err:  # driver and schema errors come in many types; all mean "cannot use it"
        message = mask_password(str(err), url).splitlines()[0]
        raise ConfigError(f"study.storage={safe_url(url)!r} cannot be opened: {message}") from None


def close_storages() -> None:
    """Close the connections of every database storage this process opened: SQLite folds its write-ahead log back
    into the database file when its last connection closes."""
    for storage in list(_OPENED):
        storage.engine.dispose()


def _check_optuna_server(rdb_url: URL, url: str) -> None:
    """Refuse a database of other tables, or of an Optuna schema this Optuna cannot use, before anything writes:
    RDBStorage creates its tables among an application's own, and adds missing ones to an older schema before its
    version check fails. The check runs on a read-only session."""
    engine = sqlalchemy.create_engine(rdb_url, poolclass=sqlalchemy.pool.NullPool)
    try:
        tables = set(sqlalchemy.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    if not tables:
        return
    shown = safe_url(url)
    if not {"studies", "trials", "version_info"} <= tables:
        raise ConfigError(
            f"study.storage={shown!r} is a database with other tables and not Optuna's; it was left untouched. "
            "Point study.storage at an empty database or an Optuna one."
        )
    read_only = {
        "poolclass": sqlalchemy.pool.NullPool,
        "connect_args": {"options": "-c default_transaction_read_only=on"},
    }
    try:
        RDBStorage(rdb_url.render_as_string(hide_password=False), engine_kwargs=read_only).engine.dispose()
    except Exception as err:  # RuntimeError for a schema mismatch; a read-only error if it tried to create a table
        message = mask_password(str(err), url).splitlines()[0]
        raise ConfigError(
            f"study.storage={shown!r} is an Optuna database this Optuna cannot use; it was left untouched: {message}"
        ) from None


def _creation_lock(url: URL) -> contextlib.AbstractContextManager[None]:
    """One process at a time opens a storage, so only one creates Optuna's tables: together they fail on
    alembic_version's UNIQUE constraint (SQLite) or on PostgreSQL's catalog (pg_type_typname_nsp_index)."""
    if url.get_backend_name() == "postgresql":
        return _advisory_lock(url, SCHEMA_LOCK_KEY)
    return file_lock(f"{url.database}.tuner-lock")
