"""The best trial's model on disk: state_dict plus what is needed to rebuild it and predict.

Loadable with ``torch.load(path, weights_only=True)``: only tensors, numbers, strings, lists and dicts.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tuner.model import build_model
from tuner.schema import ModelConfig

__all__ = ["atomic_save", "load_model", "save_checkpoint"]


def save_checkpoint(
    path: Path,
    model: nn.Module,
    *,
    model_cfg: ModelConfig,
    input_shape: tuple[int, ...],
    classes: tuple[str, ...],
    mean: float,
    std: float,
    meta: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write atomically (temp file + rename), so a crash never leaves a half-written checkpoint; ``extra`` (the
    state to resume training: tuner.babysit) is stored beside the model's fields."""
    payload = {
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model": {"_target_": model_cfg.target, **model_cfg.options},  # as the config wrote it
        "input_shape": list(input_shape),
        "classes": list(classes),
        "normalization": {"mean": mean, "std": std},
        "meta": meta,
        **(extra or {}),
    }
    atomic_save(payload, path)


def atomic_save(payload: dict[str, Any], path: Path) -> None:
    """``torch.save`` to a temp file beside ``path``, then rename: a reader sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_model(path: str | Path, *, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the saved model in eval mode, with the checkpoint's other fields. Normalize its inputs as
    ``normalization`` says: ``(x - mean) / std``, image pixels scaled to [0, 1] first."""
    payload = torch.load(path, map_location=map_location, weights_only=True)
    options = {k: v for k, v in payload["model"].items() if k != "_target_"}
    model_cfg = ModelConfig(target=payload["model"]["_target_"], options=options)
    model = build_model(model_cfg, tuple(payload["input_shape"]), len(payload["classes"]))
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, payload
