"""Storage passwords: every spelling of one is masked in text, URLs, logs, files, notes, error messages and
Hydra's ``--cfg`` output."""

from __future__ import annotations

import io
import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
import optuna_dashboard
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from omegaconf import OmegaConf

from tests.conftest import SECRETS, Secret, compose_raw, leaks_in_files
from tuner.config import ConfigError, parse_run
from tuner.notes import write_start_note
from tuner.secrets import (
    MaskPasswords,
    mask_password,
    mask_password_in_files,
    password_spellings,
    remember,
    safe_url,
)
from tuner.storage import check_storage_url, make_storage

BASE = "postgresql://tuner@db.example:5432/optuna"
# One more spelling than the runs use: a quote, a percent sign and a space, percent-encoded in the URL.
UNIT_SECRETS = {**SECRETS, "quote-percent-encoded": Secret("it's 100%", "it%27s%20100%25")}
ids = pytest.mark.parametrize("secret", UNIT_SECRETS.values(), ids=UNIT_SECRETS.keys())


def _hydra_escaped(text: str) -> str:
    """``text`` as Hydra writes a string value in a job's overrides (the sweepers), checked by Hydra's parser
    where its grammar allows the characters unquoted."""
    escaped = "".join("\\" + c if c in "\\()[]{}:=, \t" else c for c in text)
    try:
        (override,) = OverridesParser.create().parse_overrides([f"k={escaped}"])
    except OverrideParseException:  # a character that needs quotes (#, ', non-ASCII): Hydra still writes it so
        return escaped
    assert override.value() == text  # the escapes parse back to the password
    assert override.get_value_element_as_str() == escaped  # and are the ones Hydra writes
    return escaped


@ids
def test_secrets_mask_password_masks_every_spelling(secret: Secret) -> None:
    url = secret.url(BASE)
    spellings = secret.spellings() | {_hydra_escaped(secret.password), _hydra_escaped(secret.written)}
    text = "\n".join(f"before {s} after" for s in sorted(spellings))
    masked = mask_password(text, url)
    assert secret.leaks(masked) == []
    assert set(masked.splitlines()) == {"before *** after"}  # each spelling masked whole


@ids
def test_secrets_safe_url_shows_user_host_and_database_but_no_password(secret: Secret) -> None:
    shown = safe_url(secret.url(BASE))
    assert shown == "postgresql://tuner:***@db.example:5432/optuna"
    query = safe_url(f"postgresql://tuner@db.example/optuna?password={secret.written}&sslmode=require")
    assert secret.leaks(query) == [] and query.endswith("?password=***&sslmode=require")


def test_secrets_safe_url_shows_a_value_that_is_no_url() -> None:
    assert safe_url("tuner.db") == "tuner.db"  # nothing to hide: the message names what the user typed
    with pytest.raises(ConfigError, match="such as sqlite:///tuner.db, but got 'tuner.db'"):
        check_storage_url("tuner.db")
    # Not SQLAlchemy's form, with an unencoded @ in the password: hidden up to the last @.
    assert safe_url("postgresql://tuner:p@ss@db.example/optuna") == "postgresql://tuner:***@db.example/optuna"


def test_secrets_a_short_password_is_masked_only_where_it_stands_in_a_url() -> None:
    url = "postgresql://tuner:ab1@db.example/optuna"
    assert mask_password(f"{url} trial ab1", url) == "postgresql://tuner:***@db.example/optuna trial ab1"


def test_secrets_hydras_own_escapes_are_among_the_spellings() -> None:
    # Hydra escapes these characters in an unquoted override value; the sweeper writes each job's overrides so.
    escaped = _hydra_escaped("k:e y,(1)=[2]{3}\\")
    assert escaped == "k\\:e\\ y\\,\\(1\\)\\=\\[2\\]\\{3\\}\\\\"
    assert escaped in password_spellings("k:e y,(1)=[2]{3}\\")


@ids
def test_secrets_log_records_mask_a_remembered_password(secret: Secret) -> None:
    url = secret.url(BASE)
    remember(url)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(MaskPasswords())
    logger = logging.getLogger(f"tuner.test_secrets.{id(secret)}")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("#0 : study.storage=%s", secret.override(BASE))
        logger.warning("config:\n%s", OmegaConf.to_yaml({"override_dirname": "x=1," * 20 + f"storage={url}"}))
        try:
            raise RuntimeError(f"cannot connect to {url}")
        except RuntimeError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    assert secret.leaks(stream.getvalue()) == [] and stream.getvalue().count("***") >= 3


@ids
def test_secrets_saved_yaml_is_masked_where_yaml_folded_the_password(tmp_path: Path, secret: Secret) -> None:
    url = secret.url(BASE)
    overrides = ["data=digits", "study.output_dir=" + "/long" * 12, f"study.storage={secret.override(BASE)}"]
    path = tmp_path / "hydra.yaml"
    path.write_text(OmegaConf.to_yaml({"overrides": overrides, "override_dirname": ",".join(overrides)}))
    assert secret.leaks(path.read_text()) != []
    mask_password_in_files(url, [path])
    saved = OmegaConf.load(path)
    assert secret.leaks(path.read_text()) == []
    assert saved.overrides[:2] == overrides[:2] and "tuner:***@db.example" in saved.overrides[2]


@ids
def test_secrets_unreachable_server_message_shows_the_url_masked(secret: Secret) -> None:
    url = secret.url("postgresql://tuner@127.0.0.1:1/optuna")
    with pytest.raises(ConfigError) as info:
        make_storage(url)
    assert secret.leaks(str(info.value)) == []
    assert str(info.value).startswith("study.storage='postgresql://tuner:***@127.0.0.1:1/optuna' cannot be opened")


@ids
def test_secrets_study_note_holds_no_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, secret: Secret) -> None:
    override = f"study.storage={secret.override(BASE)}"
    monkeypatch.setattr(sys, "argv", ["/x/tuner/__main__.py", override, "data=digits"])
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'notes.db'}")
    note = write_start_note(study, parse_run(compose_raw(override, "data=digits")), [])
    with sqlite3.connect(tmp_path / "notes.db") as conn:  # the note is stored in chunks, as study attrs
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        stored = "\n".join(str(v) for t in tables for row in conn.execute(f'SELECT * FROM "{t}"') for v in row)
    assert secret.leaks(note) == [] and secret.leaks(stored) == [] and "tuner:***@db.example" in stored
    assert optuna_dashboard.get_note(study) == note
    assert "postgresql://tuner:***@db.example:5432/optuna" in note


def _print_config(*args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "tuner", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("secret", SECRETS.values(), ids=SECRETS.keys())
def test_secrets_cfg_all_prints_no_password(secret: Secret) -> None:
    out = _print_config(f"study.storage={secret.override(BASE)}", "--cfg", "all")
    assert secret.leaks(out) == []
    assert out.count("postgresql://tuner:***@db.example:5432/optuna") == 3  # config, overrides, override_dirname


@pytest.mark.slow
@pytest.mark.parametrize("part", ["job", "hydra"])
def test_secrets_cfg_job_and_hydra_print_no_password(part: str) -> None:
    secret = SECRETS["percent-encoded"]
    out = _print_config(f"study.storage={secret.override(BASE)}", "--cfg", part)
    assert secret.leaks(out) == [] and "postgresql://tuner:***@db.example:5432/optuna" in out


@pytest.mark.slow
def test_secrets_cfg_job_resolved_prints_no_password_from_the_environment() -> None:
    secret = SECRETS["unicode-space-encoded"]
    override = "study.storage=postgresql://tuner:${oc.env:TUNER_TEST_DB_PASSWORD}@db.example:5432/optuna"
    out = _print_config(override, "--cfg", "job", "--resolve", env={"TUNER_TEST_DB_PASSWORD": secret.written})
    assert secret.leaks(out) == [] and "postgresql://tuner:***@db.example:5432/optuna" in out


@pytest.mark.slow
@pytest.mark.parametrize("module", ["tuner", "tuner.report", "tuner.refine", "tuner.dashboard", "tuner.train"])
def test_secrets_every_command_masks_its_saved_config_and_its_messages(tmp_path: Path, module: str) -> None:
    secret = SECRETS["percent-encoded"]
    refused = secret.override("postgresql://tuner@127.0.0.1:1/optuna")  # nothing listens on port 1
    done = subprocess.run(
        [sys.executable, "-m", module, f"study.storage={refused}", "data=digits"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    saved = sorted(p.name for p in tmp_path.rglob(".hydra/*.yaml"))
    assert saved == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert leaks_in_files(tmp_path, secret) == {} and secret.leaks(out) == []
    if module != "tuner.train":  # which trains only the sweeper's trials, and says so before opening the storage
        assert "study.storage='postgresql://tuner:***@127.0.0.1:1/optuna'" in out
