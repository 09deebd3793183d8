"""Optimizer and learning-rate decay: torch's own classes, built in one place."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from tuner.schema import OptimizerConfig

__all__ = ["build_optimizer"]


def build_optimizer(
    params: Iterable[torch.Tensor], cfg: OptimizerConfig, *, device: torch.device
) -> tuple[torch.optim.Optimizer, LRScheduler]:
    """Return the optimizer and its per-epoch decay ``lr_epoch = lr / (1 + lr_decay * epoch)``."""
    # Fused kernels: one kernel for all parameters instead of a few ops per tensor (small models are per-op bound).
    fused = device.type in ("cpu", "cuda")
    optimizer: torch.optim.Optimizer
    if cfg.name == "sgd":
        optimizer = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused
        )
    elif cfg.name == "adam":
        optimizer = torch.optim.Adam(
            params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay, fused=fused
        )
    elif cfg.name == "rmsprop":
        # RMSprop's running average of squared gradients plays the role of Adam's beta2.
        optimizer = torch.optim.RMSprop(
            params, lr=cfg.lr, alpha=cfg.beta2, eps=cfg.eps, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    else:
        raise ValueError(f"optimizer.name must be one of sgd, adam, rmsprop, but got {cfg.name!r}.")
    decay = cfg.lr_decay
    return optimizer, LambdaLR(optimizer, lambda epoch: 1.0 / (1.0 + decay * epoch))
