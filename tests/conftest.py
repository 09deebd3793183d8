from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tuner.__main__ import config_dir


def compose_raw(*overrides: str) -> dict[str, Any]:
    """The plain dict that ``python -m tuner <overrides>`` works from (the real config tree)."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
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
