from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
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
