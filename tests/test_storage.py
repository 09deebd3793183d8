from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
from optuna.storages._rdb import models

from tests.conftest import compose_raw, run_with_read_only
from tuner.budget import Budget
from tuner.config import ConfigError
from tuner.secrets import safe_url
from tuner.storage import check_storage_url, make_storage, study_lock


def test_storage_sqlite_storage_uses_wal_and_round_trips(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    study = optuna.create_study(storage=make_storage(url), study_name="s")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    with sqlite3.connect(tmp_path / "a.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert len(optuna.load_study(study_name="s", storage=url).trials) == 3


def test_storage_foreign_sqlite_file_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "mine.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (text TEXT)")
        conn.execute("INSERT INTO notes VALUES ('keep me')")
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="without Optuna's tables; it was left untouched"):
        make_storage(f"sqlite:///{path}")
    assert path.read_bytes() == before


def test_storage_sqlite_file_whose_tables_another_worker_is_still_creating_is_opened(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    engine = sqlalchemy.create_engine(f"sqlite:///{path}")
    models.BaseModel.metadata.tables["studies"].create(engine)  # the first table another worker has created
    engine.dispose()
    study = optuna.create_study(storage=make_storage(f"sqlite:///{path}"), study_name="s")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    assert len(optuna.load_study(study_name="s", storage=f"sqlite:///{path}").trials) == 2


def test_storage_non_database_file_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a database at all, just some text that is long enough " * 10)
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="is not an Optuna database"):
        make_storage(f"sqlite:///{path}")
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("not a url", "study.storage must be a database URL such as sqlite:///tuner.db, but got"),
        ("sqlite:///no/such/folder/t.db", "the folder 'no/such/folder' does not exist"),
        ("sqlite://", "study.storage must name a SQLite file"),
    ],
)
def test_storage_bad_storage_url_is_named(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        check_storage_url(url)


def test_storage_safe_url_masks_password() -> None:
    masked = safe_url("postgresql://alice:s3cret@db.example/optuna")
    assert "s3cret" not in masked and "alice" in masked


@pytest.mark.parametrize("scheme", ["postgresql+psycopg2", "postgresql", "postgresql+psycopg"])
def test_storage_unreachable_server_error_hides_password(scheme: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_storage(f"{scheme}://alice:s3cret@127.0.0.1:1/optuna")
    assert "s3cret" not in str(info.value)
    assert "study.storage=" in str(info.value)


@pytest.mark.slow
def test_storage_workers_opening_a_new_sqlite_file_together_all_succeed(tmp_path: Path) -> None:
    # Parallel workers of one multirun create the tables of a new file at the same moment.
    script = (
        "import sys, time\n"
        "from tuner.storage import make_storage\n"
        "while time.time() < float(sys.argv[2]):\n"
        "    time.sleep(0.001)\n"
        "make_storage(sys.argv[1])\n"
    )
    for round_ in range(2):
        url = f"sqlite:///{tmp_path / f'new{round_}.db'}"
        start = time.time() + 5  # after every process has imported optuna
        procs = [
            subprocess.Popen([sys.executable, "-c", script, url, str(start)], stderr=subprocess.PIPE, text=True)
            for _ in range(4)
        ]
        errors = [p.communicate(timeout=120)[1] for p in procs]
        assert [p.returncode for p in procs] == [0] * 4, errors


def _storage_url(kind: str, tmp_path: Path, postgres_url: str | None) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'a.db'}"
    if kind == "journal":
        return f"journal:///{tmp_path / 'a.log'}"
    assert postgres_url is not None
    return postgres_url


@pytest.mark.parametrize("kind", ["sqlite", "journal", "postgresql"])
def test_storage_each_storage_round_trips_a_study(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    url = _storage_url(kind, tmp_path, request.getfixturevalue("postgres_url") if kind == "postgresql" else None)
    study = optuna.create_study(storage=make_storage(url), study_name="s", direction="maximize")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=3)
    study.set_user_attr("note", "kept")
    again = optuna.load_study(study_name="s", storage=make_storage(url))  # a second worker or a later run
    stored = [(t.number, t.params, t.value, t.state) for t in again.trials]
    assert stored == [(t.number, t.params, t.value, t.state) for t in study.trials]
    assert again.user_attrs == {"note": "kept"} and again.direction == optuna.study.StudyDirection.MAXIMIZE


def test_storage_bare_postgresql_url_uses_psycopg3(postgres_url: str) -> None:
    storage = make_storage(postgres_url.replace("postgresql+psycopg://", "postgresql://"))
    assert isinstance(storage, optuna.storages.RDBStorage)
    assert storage.engine.dialect.driver == "psycopg"
    assert storage.get_heartbeat_interval() == 60  # heartbeats are on by default


def test_storage_incompatible_optuna_schema_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    optuna.create_study(storage=f"sqlite:///{path}", study_name="old")
    with sqlite3.connect(path) as conn:  # what an Optuna 3.0 database says about its schema
        conn.execute("UPDATE alembic_version SET version_num = 'v3.0.0.a'")
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="an Optuna database this Optuna cannot use; it was left untouched"):
        make_storage(f"sqlite:///{path}")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.db"]  # no -wal or -shm file either


def test_storage_foreign_journal_file_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "app.log"
    path.write_text("2026-01-01 12:00:00 INFO started\n")
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="is not an Optuna journal file; it was left untouched"):
        make_storage(f"journal:///{path}")
    assert path.read_bytes() == before


def _pg_tables(url: str) -> dict[str, int]:
    """Every table of the database with its row count."""
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        names = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        return {n: conn.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0] for n in names}  # type: ignore[index]


def test_storage_postgresql_database_of_other_tables_is_refused_and_left_untouched(postgres_url: str) -> None:
    import psycopg

    with psycopg.connect(postgres_url) as conn:
        conn.execute("CREATE TABLE invoices (id integer)")
        conn.execute("INSERT INTO invoices VALUES (1)")
    with pytest.raises(ConfigError, match="a database with other tables and not Optuna's; it was left untouched"):
        make_storage(postgres_url)
    assert _pg_tables(postgres_url) == {"invoices": 1}  # no Optuna table created among them


def test_storage_postgresql_incompatible_optuna_schema_is_refused_and_left_untouched(postgres_url: str) -> None:
    import psycopg

    optuna.create_study(storage=make_storage(postgres_url), study_name="old").optimize(
        lambda t: t.suggest_float("x", 0, 1), n_trials=2
    )
    with psycopg.connect(postgres_url) as conn:  # what an Optuna 3.0 database says about its schema
        conn.execute("UPDATE alembic_version SET version_num = 'v3.0.0.a'")
        conn.execute("DROP TABLE trial_heartbeats")  # and a table that Optuna 3.0 did not have yet
    before = _pg_tables(postgres_url)
    with pytest.raises(ConfigError, match="an Optuna database this Optuna cannot use; it was left untouched"):
        make_storage(postgres_url)
    assert _pg_tables(postgres_url) == before  # RDBStorage alone would have created trial_heartbeats again


@pytest.mark.parametrize("kind", ["sqlite", "journal", "postgresql"])
def test_storage_each_queued_trial_goes_to_one_worker_only(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # Retries and refine's queued trials are WAITING: parallel workers must not train one twice. tuner's
    # workers ask under the study's lock (tuner.budget); SQLite alone would hand a trial to two of them.
    url = _storage_url(kind, tmp_path, request.getfixturevalue("postgres_url") if kind == "postgresql" else None)
    storage = make_storage(url, heartbeat_interval=None)
    budget = Budget(None, lambda: study_lock(url, "q"))
    queued = 60
    first = optuna.create_study(storage=storage, study_name="q")
    for i in range(queued):
        first.enqueue_trial({"x": i})
    popped: list[list[int]] = [[] for _ in range(4)]
    go = threading.Barrier(4)

    def worker(mine: list[int]) -> None:
        study = optuna.load_study(study_name="q", storage=storage)  # each worker its own handle
        go.wait()
        while True:
            trial = budget.ask(study)
            if trial.number >= queued:  # the queue is empty: this is a fresh trial
                return
            mine.append(trial.number)

    threads = [threading.Thread(target=worker, args=(mine,)) for mine in popped]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = sorted(n for mine in popped for n in mine)
    assert everything == list(range(queued))  # each queued trial once, none twice


@pytest.mark.slow
@pytest.mark.parametrize("url_of", [lambda d: f"sqlite:///{d / 't.db'}", lambda d: f"journal:///{d / 't.log'}"])
def test_storage_a_read_only_storage_is_one_line_and_left_untouched(tmp_path: Path, url_of: Any) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    url = url_of(folder)
    from tuner.tune import prepare, tune

    tune(
        *prepare(
            compose_raw(
                "data=digits",
                f"study.storage={url}",
                f"study.output_dir={tmp_path / 'out'}",
                "study.n_trials=1",
                "trainer.epochs=1",
                "trainer.workers=1",
            )
        )
    )
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    command = [
        sys.executable,
        "-m",
        "tuner",
        "data=digits",
        f"study.storage={url}",
        "study.n_trials=2",
        "trainer.epochs=1",
        f"study.output_dir={tmp_path / 'out'}",
        f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    done = run_with_read_only(folder, command)

    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "is read-only, and tuner writes there" in out and "Traceback" not in out
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
