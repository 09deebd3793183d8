"""The Optuna objective: sample a trial's config, build model, data and optimizer, train, report, prune."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import optuna
import torch

from tuner.artifacts import artifact_store, upload_best_artifacts
from tuner.checkpoint import save_checkpoint
from tuner.config import DataConfig, RunConfig, TrialConfig, parse_trial, set_path
from tuner.data import Splits, load_splits, source_key
from tuner.faults import Interrupted, error_reason
from tuner.model import build_model, count_parameters
from tuner.optim import build_optimizer
from tuner.space import Param, suggest
from tuner.trainer import EpochMetrics, TrainingDiverged, resolve_device, train

__all__ = ["Objective", "release_memory", "trial_seed"]

METRIC = "val_accuracy"


def trial_seed(study_seed: int, number: int) -> int:
    """A distinct, reproducible seed per trial, recorded on the trial."""
    return (study_seed * 1_000_003 + number) % 2**31


def release_memory() -> None:
    """Free what a failed trial left behind; on CUDA, return the cached blocks to the device."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class Objective:
    """Callable for ``study.optimize``; keeps each data set in memory on its device across trials."""

    def __init__(self, run: RunConfig, params: list[Param], *, best_model_path: Path) -> None:
        self.run = run
        self.params = params
        self.best_model_path = best_model_path
        self._splits: dict[tuple[Any, ...], Splits] = {}
        self.last_trial_number: int | None = None

    def splits(self, cfg: DataConfig, device: torch.device) -> Splits:
        key = (source_key(cfg), str(device))
        if key not in self._splits:
            self._splits[key] = load_splits(cfg).to(device)
        return self._splits[key]

    def trial_config(self, trial: optuna.Trial) -> TrialConfig:
        return parse_trial(set_path(self.run.raw, suggest(trial, self.params, self.run.raw)))

    def __call__(self, trial: optuna.Trial) -> float:
        """Train one trial; a trial that fails records why in its ``fail_reason`` user attr."""
        self.last_trial_number = trial.number
        try:
            return self._train_trial(trial)
        except (optuna.TrialPruned, TrainingDiverged):
            raise
        except KeyboardInterrupt as err:
            name = err.signal_name if isinstance(err, Interrupted) else "SIGINT"
            trial.set_user_attr("fail_reason", f"interrupted by {name}")
            raise
        except torch.OutOfMemoryError as err:
            oom = error_reason(err)
        except Exception as err:
            trial.set_user_attr("fail_reason", error_reason(err))
            raise
        # Out of memory. Leaving the except block dropped the traceback, and with it the last references
        # to this trial's model, optimizer and batches: collect them and hand the memory back to the GPU.
        trial.set_user_attr("fail_reason", oom)
        release_memory()
        raise torch.OutOfMemoryError(oom)

    def _train_trial(self, trial: optuna.Trial) -> float:
        cfg = self.trial_config(trial)
        device = resolve_device(cfg.trainer.device)
        seed = cfg.trainer.seed if cfg.trainer.seed is not None else trial_seed(self.run.study.seed, trial.number)
        if cfg.trainer.seed is None and isinstance(trial.user_attrs.get("seed"), int):
            seed = trial.user_attrs["seed"]  # a retried trial (tuner.faults) trains again with the seed it had
        torch.manual_seed(seed)
        splits = self.splits(cfg.data, device)
        model = build_model(cfg.model, splits.input_shape, splits.num_classes).to(device)
        optimizer, scheduler = build_optimizer(model.parameters(), cfg.optimizer, device=device)
        trial.set_user_attr("seed", seed)
        trial.set_user_attr("device", str(device))
        trial.set_user_attr("param_count", count_parameters(model))

        history: list[EpochMetrics] = []

        def on_epoch(metrics: EpochMetrics) -> None:
            history.append(metrics)
            trial.report(metrics.val_accuracy, metrics.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {metrics.epoch} with {METRIC}={metrics.val_accuracy:.4f}")

        try:
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
                seed=seed,
                eval_batch_size=cfg.trainer.eval_batch_size,
                bf16=cfg.trainer.bf16,
                on_epoch=on_epoch,
            )
        except TrainingDiverged as err:
            trial.set_user_attr("fail_reason", f"TrainingDiverged: {err}")
            raise
        finally:
            if history:
                last = history[-1]
                trial.set_user_attr("train_loss", last.train_loss)
                trial.set_user_attr("val_loss", last.val_loss)
                trial.set_user_attr("epochs_run", last.epoch)
                trial.set_user_attr("epoch_time_s", sum(m.seconds for m in history) / len(history))
        value = history[-1].val_accuracy
        if self._is_best(trial.study, value):
            save_checkpoint(
                self.best_model_path,
                model,
                model_cfg=cfg.model,
                input_shape=splits.input_shape,
                classes=splits.classes,
                mean=splits.mean,
                std=splits.std,
                meta={"study": trial.study.study_name, "trial": trial.number, METRIC: value, "data": cfg.data.name},
            )
            # The dashboard's artifacts for each new best: the checkpoint, learning curve, confusion matrix.
            upload_best_artifacts(
                trial,
                artifact_store(self.run.study),
                checkpoint=self.best_model_path,
                history=history,
                model=model,
                x_val=splits.x_val,
                y_val=splits.y_val,
                classes=splits.classes,
            )
        return value

    def _is_best(self, study: optuna.Study, value: float) -> bool:
        try:
            best = study.best_value
        except ValueError:  # no completed trial yet
            return True
        return value > best if self.run.study.direction == "maximize" else value < best
