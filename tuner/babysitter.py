"""The babysat model's epochs: train one, report it, checkpoint it, apply what a person set (tuner.steering).

Each epoch boundary, in this order: the epoch's value and attributes go to the trial, its checkpoint (model,
optimizer, scheduler, batch-order and torch RNG states, history, how many events it includes) is written
atomically, the curves plot is saved, then the trial's ``set:`` keys are read and applied. A run killed between
the report and the checkpoint trains that epoch again, the same way; events recorded after the checkpoint are
applied again on resume, so no change a person made is lost.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.storages import BaseStorage
from optuna.trial import TrialState
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from tqdm import tqdm

from tuner.checkpoint import save_checkpoint
from tuner.data import Splits
from tuner.faults import interrupts_allowed, interrupts_deferred
from tuner.plots import save_babysit_plot
from tuner.schema import TrialConfig
from tuner.steering import (
    EVENTS_ATTR,
    STOP_KEY,
    apply_request,
    clear_requests,
    current_settings,
    pending_requests,
    replay,
)
from tuner.trainer import TrainingDiverged, evaluate, train_epoch

__all__ = ["HISTORY_ATTR", "STATUS_ATTR", "Babysitter", "Model", "checkpoint_path", "checkpoints"]

log = logging.getLogger("tuner")

PLOT_EVERY = 5.0  # seconds between saves of the study's curves plot (and after each change, and at the end)
HISTORY_ATTR = "history"  # [{epoch, train_loss, val_loss, val_accuracy, lr, epoch_time_s}], the curve's details
STATUS_ATTR = "babysit_status"


def checkpoint_path(folder: Path, epoch: int) -> Path:
    return folder / f"epoch-{epoch}.pt"


def checkpoints(folder: Path) -> dict[int, Path]:
    """``{epoch: path}`` of the checkpoints in a trial's folder."""
    found = {}
    for path in folder.glob("epoch-*.pt"):
        stem = path.stem.removeprefix("epoch-")
        if stem.isdigit():
            found[int(stem)] = path
    return found


@dataclass
class Model:
    """What trains, and where it stands: ``epoch`` epochs done, their ``history``, ``events_seen`` applied."""

    cfg: TrialConfig
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    generator: torch.Generator
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    events_seen: int = 0


class Babysitter:
    """Trains ``model`` to ``cfg.trainer.epochs`` as trial ``number`` of ``study``, saving into ``folder``."""

    def __init__(
        self,
        study: optuna.Study,
        storage: BaseStorage,
        number: int,
        model: Model,
        splits: Splits,
        *,
        folder: Path,
        keep: int | None,
        stored: dict[str, Any],
    ) -> None:
        self.study, self.storage, self.number, self.model, self.splits = study, storage, number, model, splits
        self.trial_id = storage.get_trial_id_from_study_id_trial_number(
            storage.get_study_id_from_name(study.study_name), number
        )
        self.folder, self.keep, self.stored = folder, keep, stored  # stored: the config written with the trial
        trial = storage.get_trial(self.trial_id)
        self.events: list[dict[str, Any]] = list(trial.user_attrs.get(EVENTS_ATTR) or [])
        self._reported = set(trial.intermediate_values)  # a resumed run's epochs after its checkpoint are in it
        self.stopped_by: str | None = None
        self._plotted = time.monotonic()  # the curve itself is live in the dashboard's own plot of the trial
        name = model.cfg.optimizer.name
        for event in self.events[model.events_seen :]:  # applied after the checkpoint this run resumed from
            replay(event, model.optimizer, model.scheduler, name)
            if event["key"] == "stop":
                self.stopped_by = str(event["source"])

    def run(self) -> TrialState:
        """Train the remaining epochs, or until ``set:stop``; tell the trial and return how it ended."""
        m, total = self.model, self.model.cfg.trainer.epochs
        self._steer()
        while m.epoch < total and self.stopped_by is None:
            try:
                with interrupts_allowed():
                    metrics = self._epoch()
            except TrainingDiverged as err:
                return self._fail(f"TrainingDiverged: {err}")
            with interrupts_deferred():
                self._record(metrics)
                self._steer()
        return self._complete()

    def _epoch(self) -> dict[str, float]:
        m, cfg = self.model, self.model.cfg
        x, y = self.splits.x_train, self.splits.y_train
        epoch, start = m.epoch + 1, time.perf_counter()
        lr = m.optimizer.param_groups[0]["lr"]
        steps = sum(1 for s in range(0, len(x), cfg.data.batch_size) if len(x) - s >= 2)
        with tqdm(
            total=steps, desc=f"epoch {epoch}/{cfg.trainer.epochs}", unit="batch", leave=False, disable=None
        ) as bar:
            train_loss = train_epoch(
                m.module,
                m.optimizer,
                x,
                y,
                epoch=epoch,
                batch_size=cfg.data.batch_size,
                generator=m.generator,
                bf16=cfg.trainer.bf16,
                on_step=lambda: bar.update(1),
            )
        m.scheduler.step()
        val_loss, val_accuracy = evaluate(
            m.module,
            self.splits.x_val,
            self.splits.y_val,
            batch_size=cfg.trainer.eval_batch_size,
            bf16=cfg.trainer.bf16,
        )
        seconds = time.perf_counter() - start
        return {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            "lr": lr,
            "epoch_time_s": seconds,
        }

    def _record(self, metrics: dict[str, float]) -> None:
        m, epoch = self.model, int(metrics["epoch"])
        m.epoch, m.history = epoch, [*m.history, metrics]
        if epoch not in self._reported:  # else: an epoch trained again after a resume, to the same value
            self.storage.set_trial_intermediate_value(self.trial_id, epoch, metrics["val_accuracy"])
            self._reported.add(epoch)
        for key in ("train_loss", "val_loss", "lr", "epoch_time_s"):
            self.storage.set_trial_user_attr(self.trial_id, key, metrics[key])
        self.storage.set_trial_user_attr(self.trial_id, "epochs_run", epoch)
        self.storage.set_trial_user_attr(self.trial_id, HISTORY_ATTR, m.history)
        self._save()
        if time.monotonic() - self._plotted > PLOT_EVERY:
            self._plot()
        log.info(
            "epoch %d/%d train_loss %.4f val_loss %.4f val_accuracy %.4f lr %.4g in %.1fs",
            epoch,
            m.cfg.trainer.epochs,
            metrics["train_loss"],
            metrics["val_loss"],
            metrics["val_accuracy"],
            metrics["lr"],
            metrics["epoch_time_s"],
        )

    def _save(self) -> None:
        m = self.model
        m.events_seen = len(self.events)
        state = {
            "epoch": m.epoch,
            "history": m.history,
            "events_seen": m.events_seen,
            "optimizer": m.optimizer.state_dict(),
            "scheduler": m.scheduler.state_dict(),
            "generator": m.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "config": self.stored,
            "settings": current_settings(m.optimizer, m.cfg.optimizer.name),
        }
        save_checkpoint(
            checkpoint_path(self.folder, m.epoch),
            m.module,
            model_cfg=m.cfg.model,
            input_shape=self.splits.input_shape,
            classes=self.splits.classes,
            mean=self.splits.mean,
            std=self.splits.std,
            meta={"study": self.study.study_name, "trial": self.number, "val_accuracy": m.history[-1]["val_accuracy"]},
            extra={"babysit": state},
        )
        if self.keep is not None:
            for epoch, path in checkpoints(self.folder).items():
                if epoch <= m.epoch - self.keep:
                    path.unlink(missing_ok=True)

    def _steer(self) -> None:
        """Apply what the trial's ``set:`` keys hold now, record each as an event, then empty the keys."""
        m = self.model
        requests = pending_requests(self.storage.get_trial(self.trial_id).user_attrs)
        if not requests:
            return
        new = []
        for request in requests:
            if request.key == STOP_KEY:
                self.stopped_by = request.source
                new.append(dict(epoch=m.epoch, key="stop", source=request.source, old=False, new=True, applied=True))
                continue
            new.append(apply_request(request, m.optimizer, m.scheduler, m.cfg.optimizer.name, epoch=m.epoch))
        for event in new:
            if event["applied"]:
                log.info(
                    "after epoch %d: %s %s -> %s (%s)",
                    m.epoch,
                    event["key"],
                    event["old"],
                    event["new"],
                    event["source"],
                )
            else:
                log.warning(
                    "after epoch %d: rejected %s=%r (%s): %s",
                    m.epoch,
                    event["key"],
                    event["new"],
                    event["source"],
                    event["reason"],
                )
        self.events += new
        self.storage.set_trial_user_attr(self.trial_id, EVENTS_ATTR, self.events)
        clear_requests(self.storage, self.trial_id, requests)  # after the events: a kill between repeats, never loses
        self._plot()

    def _plot(self) -> None:
        save_babysit_plot(self.study)
        self._plotted = time.monotonic()

    def _complete(self) -> TrialState:
        m = self.model
        values = self.storage.get_trial(self.trial_id).intermediate_values
        if not values:
            return self._fail("stopped before its first epoch: no value to complete it with")
        last = values[max(values)]
        _, test = evaluate(m.module, self.splits.x_test, self.splits.y_test, batch_size=m.cfg.trainer.eval_batch_size)
        self.storage.set_trial_user_attr(self.trial_id, "test_accuracy", test)
        how = f"stopped by set:stop ({self.stopped_by})" if self.stopped_by else "trained to trainer.epochs"
        self.storage.set_trial_user_attr(self.trial_id, STATUS_ATTR, f"complete after epoch {m.epoch}: {how}")
        self.study.tell(self.number, last)
        save_babysit_plot(self.study)
        return TrialState.COMPLETE

    def _fail(self, reason: str) -> TrialState:
        self.storage.set_trial_user_attr(self.trial_id, "fail_reason", reason)
        self.storage.set_trial_user_attr(self.trial_id, STATUS_ATTR, f"failed after epoch {self.model.epoch}: {reason}")
        self.study.tell(self.number, state=TrialState.FAIL)
        save_babysit_plot(self.study)
        return TrialState.FAIL
