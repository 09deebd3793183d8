from __future__ import annotations

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
