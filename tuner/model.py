"""Classifiers that return logits: BatchNorm MLP, BatchNorm CNN and softmax regression.

The loss is cross-entropy on the logits (``F.cross_entropy``): no softmax layer in the training
path; softmax appears only where probabilities are shown (``predict_proba``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tuner.config import ModelConfig

__all__ = ["build_model", "count_parameters", "predict_proba"]


def _dense_block(in_features: int, out_features: int, *, batch_norm: bool) -> list[nn.Module]:
    # BatchNorm normalizes z = Wx before the activation and learns its own shift (beta),
    # which makes the Linear layer's bias redundant.
    if batch_norm:
        return [nn.Linear(in_features, out_features, bias=False), nn.BatchNorm1d(out_features), nn.ReLU()]
    return [nn.Linear(in_features, out_features), nn.ReLU()]


def _mlp(cfg: ModelConfig, in_features: int, num_classes: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for _ in range(cfg.num_layers):
        layers += _dense_block(width, cfg.hidden_units, batch_norm=cfg.batch_norm)
        width = cfg.hidden_units
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _cnn(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """Conv -> BatchNorm -> ReLU -> pool blocks; Conv2d for (C, H, W) images, Conv1d for (C, L) signals."""
    if len(input_shape) not in (2, 3):
        raise ValueError(
            f"model.name='cnn' needs (channels, length) or (channels, height, width) inputs, but got {input_shape}."
        )
    two_d = len(input_shape) == 3
    conv, norm, pool = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d) if two_d else (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d)
    channels, *spatial = input_shape
    layers: list[nn.Module] = []
    width = cfg.channels
    for _ in range(cfg.num_layers):
        # Pool only while the map is at least 2 wide, so 8x8 digits and 40-sample signals both work.
        can_pool = min(spatial) >= 2
        layers.append(conv(channels, width, cfg.kernel_size, padding=cfg.kernel_size // 2, bias=not cfg.batch_norm))
        if cfg.batch_norm:
            layers.append(norm(width))
        layers.append(nn.ReLU())
        if can_pool:
            layers.append(pool(2))
            spatial = [s // 2 for s in spatial]
        channels, width = width, width * 2
    layers.append(nn.Flatten())
    layers += _dense_block(channels * math.prod(spatial), cfg.hidden_units, batch_norm=cfg.batch_norm)
    layers.append(nn.Linear(cfg.hidden_units, num_classes))
    return nn.Sequential(*layers)


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the configured classifier for inputs of ``input_shape`` (one sample, no batch axis)."""
    if cfg.name == "mlp":
        return _mlp(cfg, math.prod(input_shape), num_classes)
    if cfg.name == "cnn":
        return _cnn(cfg, input_shape, num_classes)
    if cfg.name == "softmax":
        # Softmax regression: one linear map to the logits.
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))
    raise ValueError(f"model.name must be one of mlp, cnn, softmax, but got {cfg.name!r}.")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Class probabilities: the softmax of the logits, in eval mode (BatchNorm's running averages)."""
    model.eval()
    return torch.softmax(model(x), dim=-1)
