"""tuner: Optuna studies of BatchNorm/softmax PyTorch classifiers, configured with Hydra."""

from __future__ import annotations

from typing import Any

from tuner.schema import ConfigError

__all__ = ["ConfigError", "load_model"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # tuner.load_model imports torch on first use: python -m tuner and its errors start without it.
    if name == "load_model":
        from tuner.checkpoint import load_model

        return load_model
    raise AttributeError(f"module 'tuner' has no attribute {name!r}")
