"""tuner: Optuna studies of BatchNorm/softmax PyTorch classifiers, configured with Hydra."""

from __future__ import annotations

from tuner.checkpoint import load_model
from tuner.config import ConfigError

__all__ = ["ConfigError", "load_model"]
__version__ = "0.1.0"
