from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from sqlalchemy.engine import URL, make_url

from tuner.__main__ import config_dir


def compose_raw(*overrides: str) -> dict[str, Any]:
    """The plain dict that ``python -m tuner <overrides>`` works from (the real config tree); a value the schema
    refuses raises the ``ConfigError`` that the command prints."""
    from tuner.config import composition_error

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        try:
            cfg = compose(config_name="config", overrides=list(overrides))
        except Exception as err:
            refused = composition_error(err)
            if refused is None:
                raise
            raise refused from None
    raw = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(raw, dict)
    return raw


@pytest.fixture
def raw() -> dict[str, Any]:
    return compose_raw()


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """tuner built as a wheel and installed (no deps) into a folder of its own: ``(wheel, site)``.

    Put ``site`` first on PYTHONPATH to run the installed copy instead of this checkout.
    """
    root = Path(__file__).resolve().parents[1]
    tmp = tmp_path_factory.mktemp("wheel")
    dist, site = tmp / "dist", tmp / "site"
    for args in (
        ["wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(root)],
        ["install", "--no-deps", "-q", "--target", str(site)],
    ):
        if args[0] == "install":
            args.append(str(next(dist.glob("tuner-*.whl"))))
        done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    (wheel,) = dist.glob("tuner-*.whl")
    return wheel, site


@pytest.fixture(scope="session")
def digits_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], Any]:
    """A small study that tuner wrote (data=digits) for the dashboard, report and refine tests.

    Returns the overrides that reach it (``python -m tuner.<app> *overrides``) and the loaded study.
    """
    import optuna

    from tuner.tune import prepare, tune

    tmp = tmp_path_factory.mktemp("digits_study")
    overrides = [
        "data=digits",
        f"study.storage=sqlite:///{tmp / 'study.db'}",
        f"study.output_dir={tmp / 'out'}",
        "study.n_trials=8",
        "trainer.epochs=3",
        "pruner.n_startup_trials=3",
        "pruner.n_warmup_steps=1",
        # One trial at a time: the tests that use it check which trial was a new best when it finished.
        "trainer.workers=1",
    ]
    tune(*prepare(compose_raw(*overrides)))
    return overrides, optuna.load_study(study_name="digits-mlp", storage=f"sqlite:///{tmp / 'study.db'}")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database on the test PostgreSQL server that .ci/run starts (TUNER_TEST_POSTGRES_URL).

    Skipped only outside CI: with CI set, a missing server fails the test instead of hiding it.
    """
    base = os.environ.get("TUNER_TEST_POSTGRES_URL")
    if not base:
        if os.environ.get("CI"):
            pytest.fail("TUNER_TEST_POSTGRES_URL is not set: .ci/run starts a PostgreSQL server for these tests")
        pytest.skip("no test PostgreSQL server (TUNER_TEST_POSTGRES_URL); .ci/run starts one")
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(base)
    name = f"tuner_{uuid.uuid4().hex[:12]}"
    admin = url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield url.set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every PostgreSQL test is ``slow`` (a database of its own per test): those that take ``postgres_url``,
    and a storage kind parametrized as ``postgresql`` (which asks for the fixture when it runs). Slow tests run
    first."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        params = callspec.params.values() if callspec is not None else ()
        if "postgres_url" in getattr(item, "fixturenames", ()) or "postgresql" in params:
            item.add_marker(pytest.mark.slow)
    # The slow tests first (the order is stable within each kind): the two test processes then end together
    # instead of one waiting for a long test that started last.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@dataclass(frozen=True)
class Secret:
    """A storage password, as the PostgreSQL server gets it and as it is written in ``study.storage``."""

    password: str
    written: str  # in the URL: as it is, or percent-encoded
    quoting: str = ""  # how the override holds the URL: "" bare, "'" in quotes, "\\" with Hydra's escapes

    def url(self, base: str) -> str:
        """``base`` (a URL without password: postgresql://tuner@host/db) with this password in it."""
        return base.replace("://tuner@", f"://tuner:{self.written}@", 1)

    def override(self, base: str) -> str:
        """The value of ``study.storage=`` on a command line, quoted or escaped as Hydra reads it."""
        if self.quoting == "\\":
            return base.replace("://tuner@", f"://tuner:{_hydra_escaped(self.written)}@", 1)
        return f"'{self.url(base)}'" if self.quoting == "'" else self.url(base)

    def spellings(self) -> set[str]:
        """The password as the URL has it, decoded, encoded (urllib, SQLAlchemy), in Hydra's override grammar,
        and as JSON and a Python repr write each of those."""
        rendered = URL.create("x", username="u", password=self.password).render_as_string(hide_password=False)
        forms = {self.password, self.written, quote(self.password, safe=""), quote_plus(self.password)}
        forms |= {quote(self.password), rendered[len("x://u:") : -1]}
        forms |= {_hydra_escaped(f) for f in forms}
        forms |= {json.dumps(f)[1:-1] for f in forms} | {repr(f)[1:-1] for f in forms}
        return forms

    def leaks(self, text: str) -> list[str]:
        """The spellings of the password in ``text``, also where YAML folded a long line at a space."""
        unfolded = re.sub(r"\n *", " ", text)
        return sorted(f for f in self.spellings() if f in text or f in unfolded)


def _hydra_escaped(text: str) -> str:
    # The characters that Hydra's override grammar escapes with a backslash (hydra-core 1.3.8: OverrideLexer.g4 ESC).
    return re.sub(r"([\\()\[\]{}:=, \t])", r"\\\1", text)


# Passwords that need encoding in a URL or quoting in an override, and a plain one. Each is accepted by the test
# server (it trusts loopback) and parsed by SQLAlchemy as ``password``.
SECRETS = {
    "plain": Secret("Pw-4f9c2e71", "Pw-4f9c2e71"),
    "percent-encoded": Secret("p@ss:w/rd%1", "p%40ss%3Aw%2Frd%251"),
    "unicode-space-quoted": Secret("späß wört", "späß wört", quoting="'"),
    "unicode-space-encoded": Secret("späß wört", "sp%C3%A4%C3%9F%20w%C3%B6rt"),
    "plus-hash-question-encoded": Secret("a+b#c?d", "a+b%23c%3Fd"),
    "plus-hash-question-quoted": Secret("x+y#z?w=1", "x+y#z?w=1", quoting="'"),
    "hydra-escaped": Secret("k:e y,(1)", "k:e y,(1)", quoting="\\"),
}


def leaks_in_files(folder: Path, secret: Secret) -> dict[str, list[str]]:
    """Each file under ``folder`` that holds a spelling of the password, with the spellings found."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            hits = secret.leaks(path.read_bytes().decode("utf-8", errors="replace"))
            if hits:
                found[str(path.relative_to(folder))] = hits
    return found


def postgres_dump(url: str) -> str:
    """Every value of every row of every table in the database, one per line (JSON texts as they are stored)."""
    import psycopg

    plain = make_url(url).set(drivername="postgresql", password=None).render_as_string(hide_password=False)
    with psycopg.connect(plain) as conn:
        tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        assert "study_system_attributes" in tables and "study_user_attributes" in tables, tables
        return "\n".join(str(v) for t in tables for row in conn.execute(f'SELECT * FROM "{t}"') for v in row)


def run_with_read_only(folder: Path, command: list[str]) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in ``folder`` made read-only the way a read-only disk is, which root cannot write through
    either: a read-only bind mount in a mount namespace of its own. Skips where namespaces are not allowed."""
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare -m (a private mount namespace) for a read-only folder")
    script = f'mount --bind {folder} {folder} && mount -o remount,bind,ro {folder} && cd {folder} && exec "$@"'
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", *command], capture_output=True, text=True, timeout=300
    )
