"""Classifiers that return logits (BatchNorm MLP and CNN, softmax regression), and ``build_model`` for these or a
user's ``torch.nn.Module``. The loss is ``F.cross_entropy`` on the logits: softmax is only in ``predict_proba``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tuner.schema import ConfigError, ModelConfig

__all__ = ["build_model", "cnn", "count_parameters", "mlp", "predict_proba", "softmax"]


def _dense_block(in_features: int, out_features: int, *, batch_norm: bool) -> list[nn.Module]:
    # BatchNorm normalizes z = Wx before the activation and learns its own shift (beta),
    # which makes the Linear layer's bias redundant.
    if batch_norm:
        return [nn.Linear(in_features, out_features, bias=False), nn.BatchNorm1d(out_features), nn.ReLU()]
    return [nn.Linear(in_features, out_features), nn.ReLU()]


def mlp(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    hidden_units: int = 128,
    num_layers: int = 2,
    batch_norm: bool = True,
) -> nn.Sequential:
    """(Linear without bias -> BatchNorm1d -> ReLU) x num_layers, then Linear -> logits."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for _ in range(num_layers):
        layers += _dense_block(width, hidden_units, batch_norm=batch_norm)
        width = hidden_units
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def cnn(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    hidden_units: int = 128,
    num_layers: int = 2,
    batch_norm: bool = True,
    channels: int = 16,
    kernel_size: int = 3,
) -> nn.Sequential:
    """(Conv without bias -> BatchNorm -> ReLU -> max-pool) x num_layers, channels doubling each block, then a dense
    BatchNorm layer -> logits; Conv2d for (C, H, W) images, Conv1d for (C, L) signals."""
    if len(input_shape) not in (2, 3):
        raise ValueError(
            f"model._target_='tuner.model.cnn' needs (channels, length) or (channels, height, width) inputs, "
            f"but got {input_shape}."
        )
    two_d = len(input_shape) == 3
    conv, norm, pool = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d) if two_d else (nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d)
    in_channels, *spatial = input_shape
    layers: list[nn.Module] = []
    width = channels
    for _ in range(num_layers):
        layers.append(conv(in_channels, width, kernel_size, padding=kernel_size // 2, bias=not batch_norm))
        if batch_norm:
            layers.append(norm(width))
        layers.append(nn.ReLU())
        if min(spatial) >= 2:  # pool only while the map is 2+ wide, so 8x8 digits and 40-sample signals both work
            layers.append(pool(2))
            spatial = [s // 2 for s in spatial]
        in_channels, width = width, width * 2
    layers.append(nn.Flatten())
    layers += _dense_block(in_channels * math.prod(spatial), hidden_units, batch_norm=batch_norm)
    layers.append(nn.Linear(hidden_units, num_classes))
    return nn.Sequential(*layers)


def softmax(input_shape: tuple[int, ...], num_classes: int) -> nn.Sequential:
    """Softmax regression: one linear map to the logits (cross-entropy applies the softmax)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the configured classifier for inputs of ``input_shape`` (one sample, no batch axis): Hydra's
    ``instantiate`` calls ``model._target_`` with ``input_shape``, ``num_classes`` and the config's other keys."""
    from hydra.errors import InstantiationException  # imported when a model is built, not by every worker import
    from hydra.utils import instantiate

    try:
        model = instantiate(
            {"_target_": cfg.target, **cfg.options},
            input_shape=tuple(input_shape),
            num_classes=num_classes,
            _convert_="all",
        )
    except InstantiationException as err:  # the model's own constructor refused its arguments
        reason = str(err.__cause__ or err).strip().splitlines()[0]
        raise ConfigError(f"model._target_={cfg.target!r} could not be built from {cfg.options}: {reason}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model._target_={cfg.target!r} returned {type(model).__name__}, not a torch.nn.Module.")
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Class probabilities: the softmax of the logits, in eval mode (BatchNorm's running averages)."""
    model.eval()
    return torch.softmax(model(x), dim=-1)
