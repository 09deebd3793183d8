"""A plain PyTorch training loop that knows nothing of Optuna or Hydra (it calls ``on_epoch``), and ``fit``.

The data live as tensors on the training device, shuffled by index each epoch: a per-sample DataLoader's
collation would cost a small model a large share of each step (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from tuner.model import build_model, count_parameters
from tuner.optim import build_optimizer

if TYPE_CHECKING:
    from tuner.data import Splits, SplitsCache
    from tuner.packhost import PackHost, PackJoin
    from tuner.schema import TrialConfig

__all__ = [
    "EpochMetrics",
    "LocalTrainer",
    "Setup",
    "TrainJob",
    "TrainingDiverged",
    "autocast",
    "evaluate",
    "fit",
    "resolve_device",
    "train",
    "train_epoch",
]

# How often (in steps) the running loss is checked for NaN/inf; each check syncs with the device.
_FINITE_CHECK_EVERY = 25


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int  # 1-based: the step reported to the pruner
    train_loss: float
    val_loss: float
    val_accuracy: float
    seconds: float
    lr: float


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"trainer.device={name!r} but CUDA is not available here; use trainer.device=auto or cpu.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"trainer.device={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s) "
            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})."
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"trainer.device={name!r} but MPS is not available here; use trainer.device=auto or cpu.")
    return device


def release_memory() -> None:
    """Free what a failed trial left behind; on CUDA, return the cached blocks to the device."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[object]:
    # bf16 autocast only on CUDA: on CPU it is slower for these small models.
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled mini-batches: one gather per epoch, then each batch is a view (a slice)."""
    perm = torch.randperm(len(x), generator=generator).to(x.device)
    xs, ys = x[perm], y[perm]
    for start in range(0, len(xs), batch_size):
        xb, yb = xs[start : start + batch_size], ys[start : start + batch_size]
        if len(xb) < 2:  # BatchNorm cannot normalize a one-sample batch
            return
        yield xb, yb


@torch.inference_mode()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, bf16: bool = False
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy in eval mode (BatchNorm uses its running averages)."""
    model.eval()
    loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for start in range(0, len(x), batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        with autocast(x.device, bf16):
            logits = model(xb)
        loss += F.cross_entropy(logits.float(), yb, reduction="sum")
        correct += (logits.argmax(dim=1) == yb).sum()
    n = max(len(x), 1)
    return loss.item() / n, correct.item() / n


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    *,
    epoch: int,
    batch_size: int,
    generator: torch.Generator,
    bf16: bool = False,
    on_step: Callable[[], None] | None = None,
) -> float:
    """One epoch of shuffled mini-batches (their order drawn from ``generator``): the mean training loss.
    Raises ``TrainingDiverged`` as soon as the loss is NaN or infinite."""
    device = x_train.device
    model.train()
    total = torch.zeros((), device=device)
    seen = 0
    for step, (xb, yb) in enumerate(_batches(x_train, y_train, batch_size, generator), start=1):
        with autocast(device, bf16):
            loss = F.cross_entropy(model(xb), yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total.add_(loss.detach(), alpha=len(xb))  # one op, no host sync
        seen += len(xb)
        if step % _FINITE_CHECK_EVERY == 0 and not math.isfinite(total.item()):
            raise TrainingDiverged(f"training loss became {total.item()} at epoch {epoch}, step {step}")
        if on_step is not None:
            on_step()
    train_loss = total.item() / max(seen, 1)
    if not math.isfinite(train_loss):
        raise TrainingDiverged(f"training loss became {train_loss} at epoch {epoch}")
    return train_loss


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    eval_batch_size: int = 1024,
    bf16: bool = False,
    on_epoch: Callable[[EpochMetrics], None] | None = None,
) -> list[EpochMetrics]:
    """Train for ``epochs`` and return the per-epoch metrics; ``on_epoch`` may raise to stop early.
    Raises ``TrainingDiverged`` as soon as the loss is NaN or infinite."""
    generator = torch.Generator().manual_seed(seed)
    history: list[EpochMetrics] = []
    for epoch in range(1, epochs + 1):
        metrics = epoch_metrics(
            model,
            optimizer,
            scheduler,
            (x_train, y_train, x_val, y_val),
            epoch=epoch,
            batch_size=batch_size,
            generator=generator,
            eval_batch_size=eval_batch_size,
            bf16=bf16,
        )
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(metrics)
    return history


def epoch_metrics(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    epoch: int,
    batch_size: int,
    generator: torch.Generator,
    eval_batch_size: int,
    bf16: bool,
) -> EpochMetrics:
    """One epoch of ``train`` (``data``: train and validation inputs and labels) and its metrics."""
    x_train, y_train, x_val, y_val = data
    start = time.perf_counter()
    train_loss = train_epoch(
        model, optimizer, x_train, y_train, epoch=epoch, batch_size=batch_size, generator=generator, bf16=bf16
    )
    lr = optimizer.param_groups[0]["lr"]
    scheduler.step()
    val_loss, val_accuracy = evaluate(model, x_val, y_val, batch_size=eval_batch_size, bf16=bf16)
    return EpochMetrics(epoch, train_loss, val_loss, val_accuracy, time.perf_counter() - start, lr)


@dataclass(frozen=True)
class TrainJob:
    """What a trial trains: its resolved config, its seed and the device (``cuda``, ``cpu``, ...)."""

    cfg: TrialConfig
    seed: int
    device: str


@dataclass(frozen=True)
class Setup:
    """Known once the model is built, before its first step: stored on the trial."""

    param_count: int
    device: str


def fit(
    job: TrainJob,
    splits: Splits,
    *,
    on_setup: Callable[[Setup], None],
    on_epoch: Callable[[EpochMetrics], None],
) -> nn.Module:
    """Build the trial's model and optimizer from its config and train it; ``on_epoch`` may raise to stop."""
    cfg = job.cfg
    device = torch.device(job.device)
    torch.manual_seed(job.seed)  # the trial's initial weights
    model = build_model(cfg.model, splits.input_shape, splits.num_classes).to(device)
    optimizer, scheduler = build_optimizer(model.parameters(), cfg.optimizer, device=device)
    on_setup(Setup(param_count=count_parameters(model), device=str(device)))
    train(
        model,
        optimizer,
        scheduler,
        splits.x_train,
        splits.y_train,
        splits.x_val,
        splits.y_val,
        epochs=cfg.trainer.epochs,
        batch_size=cfg.data.batch_size,
        seed=job.seed,
        eval_batch_size=cfg.trainer.eval_batch_size,
        bf16=cfg.trainer.bf16,
        on_epoch=on_epoch,
    )
    return model


class LocalTrainer:
    """Trains in this process (``trainer.workers=1``, the sweeper's jobs); keeps the model, wanted or not."""

    def __init__(self) -> None:
        self._host: PackHost | None = None
        self._sent: list[tuple[list[PackJoin], list[int]]] = []

    def fit(
        self,
        job: TrainJob,
        splits: Splits,
        *,
        on_setup: Callable[[Setup], None],
        on_epoch: Callable[[EpochMetrics], None],
        keep_model: Callable[[], bool],
    ) -> nn.Module | None:
        return fit(job, splits, on_setup=on_setup, on_epoch=on_epoch)

    def _packs(self, cache: SplitsCache) -> PackHost:
        from tuner.packhost import PackHost

        if self._host is None:
            self._host = PackHost(cache.get)
        return self._host

    def pack_send(self, joins: Sequence[PackJoin], leaves: Sequence[int], cache: SplitsCache) -> None:
        """One epoch of the packs trained in this process, on the tuner process's data, run at ``pack_recv``."""
        self._packs(cache)
        self._sent.append((list(joins), list(leaves)))

    def pack_recv(self) -> dict[int, tuple[Setup | None, EpochMetrics | BaseException]]:
        assert self._host is not None
        return self._host.epoch(*self._sent.pop(0))

    def pack_state(self, key: int) -> dict[str, torch.Tensor]:
        assert self._host is not None
        return self._host.state(key)

    def pack_probe(self, job: TrainJob, most: int | None, cache: SplitsCache) -> dict[int, float]:
        return self._packs(cache).probe(job, most)

    def close(self) -> None:
        self._host, self._sent = None, []
