"""Packs: K trials of one architecture trained as one stacked model, each exactly as it would train alone.

A small classifier's step is mostly per-operation overhead, so K members in one batched op cost little more than
one. Each member keeps its own initial weights, batch order (its trial's seed), BatchNorm statistics and
torch.optim optimizer and scheduler: the optimizer steps on the member's slice of the stacked parameters.
torch.func's vmap was checked: its BatchNorm needs patched modules and its optimizers are not per member.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tuner import trainer
from tuner.model import build_model, count_parameters
from tuner.optim import build_optimizer
from tuner.trainer import EpochMetrics, TrainingDiverged, autocast

__all__ = ["Member", "Pack", "stackable"]

_CONV = (nn.Conv1d, nn.Conv2d)
_POOL = (nn.MaxPool1d, nn.MaxPool2d)
_NORM = (nn.BatchNorm1d, nn.BatchNorm2d)


def stackable(model: nn.Module) -> bool:
    """An ``nn.Sequential`` of the layers tuner's models are made of (a user's too), in their plain forms."""
    if not isinstance(model, nn.Sequential) or len(model) == 0:
        return False
    for layer in model:
        if isinstance(layer, nn.Flatten):
            ok = layer.start_dim == 1 and layer.end_dim == -1
        elif isinstance(layer, _CONV):
            ok = layer.groups == 1 and layer.padding_mode == "zeros" and isinstance(layer.padding, tuple)
        elif isinstance(layer, _NORM):
            ok = layer.affine and layer.track_running_stats and layer.momentum is not None
        else:
            ok = type(layer) in (nn.Linear, nn.ReLU, *_POOL)
        if not ok:
            return False
    return True


@dataclass
class Member:
    """One trial in a pack: what it trains (``cfg``: a TrialConfig), its seed, and its own progress."""

    key: Any  # the caller's handle on the trial
    cfg: Any
    seed: int
    generator: torch.Generator = field(init=False)
    optimizer: torch.optim.Optimizer = field(init=False)
    scheduler: torch.optim.lr_scheduler.LRScheduler = field(init=False)
    epoch: int = 0
    steps: int = 0

    def __post_init__(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)


class Pack:
    """Members with one architecture (``build_model`` of the same model config on the same input shape),
    stacked along a new first axis; members join and leave between epochs."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, device: torch.device) -> None:
        self.input_shape, self.num_classes, self.device = input_shape, num_classes, device
        self.members: list[Member] = []
        self.layers: list[nn.Module] = []
        self.params: dict[str, torch.Tensor] = {}  # state_dict name -> [K, ...], a leaf that requires grad
        self.buffers: dict[str, torch.Tensor] = {}  # BatchNorm's running averages, [K, ...]
        self._grads: list[torch.Tensor] = []
        self.param_count = 0  # of one member
        self._plan: list[tuple[nn.Module, dict[str, torch.Tensor]]] = []
        # A pack of one trains its member's own module as tuner.trainer does: stacking one costs up to 20% a step.
        self.solo: nn.Module | None = None

    def build(self, member: Member) -> nn.Module:
        torch.manual_seed(member.seed)  # the member's initial weights, as tuner.trainer.fit draws them
        return build_model(member.cfg.model, self.input_shape, self.num_classes).to(self.device)

    def change(self, *, leave: Sequence[Member] = (), join: Sequence[Member] = ()) -> None:
        """Drop ``leave`` and add ``join`` (fresh members): the others keep their weights and optimizer states."""
        kept = [m for m in self.members if all(m is not gone for gone in leave)]
        states = [self.state_dict(m) for m in kept]
        optimizers = [(m.optimizer.state_dict(), m.scheduler.state_dict()) for m in kept]
        last: tuple[tuple[int, Any], nn.Module] | None = None
        for member in join:
            key = (member.seed, member.cfg.model)  # members of one seed (the probe's) are built once
            model = copy.deepcopy(last[1]) if last is not None and last[0] == key else self.build(member)
            last = key, model
            if not self.layers:
                if not stackable(model):
                    raise ValueError(f"model._target_={member.cfg.model.target!r} cannot be stacked in a pack")
                self.layers = list(model.children())
            states.append(model.state_dict())
            self.param_count = count_parameters(model)
        self.members = kept + list(join)
        self.params, self.buffers, self._grads, self._plan, self.solo = {}, {}, [], [], None
        if len(self.members) == 1:
            member, self.solo = self.members[0], nn.Sequential(*self.layers).to(self.device)
            self.solo.load_state_dict({**states[0], **self._tracked(member)})
            member.optimizer, member.scheduler = build_optimizer(
                self.solo.parameters(), member.cfg.optimizer, device=self.device
            )
            if optimizers:
                member.optimizer.load_state_dict(optimizers[0][0])
                member.scheduler.load_state_dict(optimizers[0][1])
            return
        if not self.members:
            return
        names = [n for n, _ in nn.Sequential(*self.layers).named_parameters()]
        self.params = {n: torch.stack([s[n] for s in states]).detach().requires_grad_() for n in names}
        # One buffer holds every gradient, so that zeroing them is one op a step (backward adds into the views).
        self._flat = torch.zeros(sum(t.numel() for t in self.params.values()), device=self.device)
        self._grads = [
            g.view_as(t)
            for g, t in zip(
                self._flat.split([t.numel() for t in self.params.values()]), self.params.values(), strict=True
            )
        ]
        for tensor, grad in zip(self.params.values(), self._grads, strict=True):
            tensor.grad = grad
        self.buffers = {
            n: torch.stack([s[n] for s in states])
            for n in states[0]
            if n not in self.params
            if not n.endswith("num_batches_tracked")
        }
        # The gradients live stacked too; each member's optimizer sees its slices (backward adds into them in place).
        for k, member in enumerate(self.members):
            views = [t.detach()[k] for t in self._stacked()]
            for view, grad in zip(views, self._grads, strict=True):
                view.grad = grad[k]
            member.optimizer, member.scheduler = build_optimizer(views, member.cfg.optimizer, device=self.device)
            if k < len(optimizers):  # loaded after the scheduler set its first lr
                member.optimizer.load_state_dict(optimizers[k][0])
                member.scheduler.load_state_dict(optimizers[k][1])
        self._plan = [
            (
                layer,
                {n.split(".", 1)[1]: t for n, t in {**self.params, **self.buffers}.items() if n.startswith(f"{i}.")},
            )
            for i, layer in enumerate(self.layers)
        ]

    def _stacked(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def state_dict(self, member: Member) -> dict[str, torch.Tensor]:
        """The member's weights and running averages under the names of its own ``nn.Module``."""
        if self.solo is not None:
            return {n: t.detach().clone() for n, t in self.solo.state_dict().items()}
        k = next(i for i, m in enumerate(self.members) if m is member)
        state = {n: t.detach()[k].clone() for n, t in {**self.params, **self.buffers}.items()}
        return {**state, **self._tracked(member)}

    def _tracked(self, member: Member) -> dict[str, torch.Tensor]:
        """BatchNorm's step counts, which the stacked form does not keep (it is the member's step count)."""
        return {
            f"{i}.num_batches_tracked": torch.tensor(member.steps, device=self.device)
            for i, layer in enumerate(self.layers)
            if isinstance(layer, _NORM)
        }

    def model(self, member: Member) -> nn.Module:
        """The member as a model of its own (for the best model's checkpoint)."""
        model = self.build(member)
        model.load_state_dict(self.state_dict(member))
        return model

    def forward(self, x: torch.Tensor, *, training: bool) -> torch.Tensor:
        """Logits ``[K, B, classes]`` of inputs ``[K, B, *input_shape]``, member k on row k."""
        k, batch = x.shape[:2]
        conv = not isinstance(self.layers[0], nn.Flatten)
        # Conv layers keep [B, K * C, ...] (grouped convolution, BatchNorm over K * C channels); dense ones [K, B, F].
        x = x.transpose(0, 1).reshape(batch, k * x.shape[2], *x.shape[3:]) if conv else x
        for layer, p in self._plan:
            if isinstance(layer, nn.Flatten):
                x = x.reshape(batch, k, -1).transpose(0, 1) if conv else x.flatten(2)
                conv = False
            elif isinstance(layer, nn.Linear):
                x = torch.bmm(x, p["weight"].transpose(1, 2))
                x = x + p["bias"].unsqueeze(1) if "bias" in p else x
            elif isinstance(layer, _CONV):
                op = F.conv1d if isinstance(layer, nn.Conv1d) else F.conv2d
                weight = p["weight"].flatten(0, 1)
                bias = p["bias"].flatten() if "bias" in p else None
                x = op(x, weight, bias, layer.stride, layer.padding, layer.dilation, groups=k)
            elif isinstance(layer, _NORM):
                flat = x if conv else x.transpose(0, 1).reshape(batch, -1)
                flat = F.batch_norm(
                    flat,
                    p["running_mean"].view(-1),
                    p["running_var"].view(-1),
                    p["weight"].flatten(),
                    p["bias"].flatten(),
                    training,
                    float(layer.momentum or 0.0),  # stackable() admits only a set momentum
                    layer.eps,
                )
                x = flat if conv else flat.view(batch, k, -1).transpose(0, 1)
            elif isinstance(layer, nn.ReLU):
                x = F.relu(x)
            else:  # max-pool, each channel on its own
                x = layer(x)
        return x

    def _losses(
        self, xb: torch.Tensor, yb: torch.Tensor, *, training: bool, bf16: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each member's per-sample cross-entropy ``[K, B]``, and the logits."""
        with autocast(self.device, bf16):
            logits = self.forward(xb, training=training)
        k, batch = yb.shape
        return F.cross_entropy(logits.float().flatten(0, 1), yb.flatten(), reduction="none").view(k, batch), logits

    def _batches(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
        """Each member's own shuffle of the epoch (its generator, as tuner.trainer's), batch by batch."""
        perms = torch.stack([torch.randperm(len(x), generator=m.generator) for m in self.members]).to(x.device)
        for start in range(0, len(x), batch_size):
            idx = perms[:, start : start + batch_size]
            if idx.shape[1] < 2:  # BatchNorm cannot normalize a one-sample batch
                return
            yield idx

    def train_epoch(
        self,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        x_val: torch.Tensor,
        y_val: torch.Tensor,
        *,
        batch_size: int,
        eval_batch_size: int = 1024,
        bf16: bool = False,
    ) -> list[EpochMetrics | TrainingDiverged]:
        """One more epoch for every member: its metrics, or why it diverged (it leaves at the caller's change)."""
        if self.solo is not None:
            return [self._solo_epoch((x_train, y_train, x_val, y_val), batch_size, eval_batch_size, bf16)]
        start = time.perf_counter()
        k = len(self.members)
        total = torch.zeros(k, device=self.device)
        seen = 0
        for idx in self._batches(x_train, y_train, batch_size):
            losses, _ = self._losses(x_train[idx], y_train[idx], training=True, bf16=bf16)
            self._flat.zero_()
            losses.mean(1).sum().backward()  # each member's mean loss: the members' gradients stay apart
            if not seen and any(t.grad is not g for t, g in zip(self._stacked(), self._grads, strict=True)):
                raise RuntimeError("autograd replaced a pack's stacked gradient instead of adding into it")
            for member in self.members:
                member.optimizer.step()
                member.steps += 1
            total.add_(losses.detach().sum(1))
            seen += idx.shape[1]
        train_losses = (total / max(seen, 1)).tolist()
        lrs = [m.optimizer.param_groups[0]["lr"] for m in self.members]
        for member in self.members:
            member.scheduler.step()
        val_losses, accuracies = self.evaluate(x_val, y_val, batch_size=eval_batch_size, bf16=bf16)
        seconds = time.perf_counter() - start
        results: list[EpochMetrics | TrainingDiverged] = []
        for j, member in enumerate(self.members):
            member.epoch += 1
            if not math.isfinite(train_losses[j]):
                results.append(TrainingDiverged(f"training loss became {train_losses[j]} at epoch {member.epoch}"))
                continue
            results.append(EpochMetrics(member.epoch, train_losses[j], val_losses[j], accuracies[j], seconds, lrs[j]))
        return results

    def _solo_epoch(
        self,
        data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        batch_size: int,
        eval_batch_size: int,
        bf16: bool,
    ) -> EpochMetrics | TrainingDiverged:
        """The one member's epoch, as tuner.trainer.train runs it."""
        assert self.solo is not None
        member, n = self.members[0], len(data[0])
        member.epoch += 1
        member.steps += sum(1 for s in range(0, n, batch_size) if n - s >= 2)
        try:
            return trainer.epoch_metrics(
                self.solo,
                member.optimizer,
                member.scheduler,
                data,
                epoch=member.epoch,
                batch_size=batch_size,
                generator=member.generator,
                eval_batch_size=eval_batch_size,
                bf16=bf16,
            )
        except TrainingDiverged as err:
            return err

    @torch.inference_mode()
    def evaluate(
        self, x: torch.Tensor, y: torch.Tensor, *, batch_size: int, bf16: bool = False
    ) -> tuple[list[float], list[float]]:
        """Each member's mean cross-entropy and accuracy, BatchNorm on its own running averages."""
        k = len(self.members)
        loss = torch.zeros(k, device=self.device)
        correct = torch.zeros(k, device=self.device, dtype=torch.long)
        for start in range(0, len(x), batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            stacked = xb.unsqueeze(0).expand(k, *xb.shape)
            losses, logits = self._losses(stacked, yb.unsqueeze(0).expand(k, -1), training=False, bf16=bf16)
            loss += losses.sum(1)
            correct += (logits.argmax(dim=2) == yb).sum(1)
        n = max(len(x), 1)
        return (loss / n).tolist(), (correct / n).tolist()
