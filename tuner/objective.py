"""The Optuna objective: sample a trial's config, train it (tuner.trainer), report, prune, keep the best model."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from pathlib import Path

import optuna
import torch

from tuner.artifacts import artifact_store, upload_best_artifacts
from tuner.checkpoint import save_checkpoint
from tuner.config import DataConfig, RunConfig, TrialConfig, parse_trial, set_path
from tuner.data import Splits, SplitsCache
from tuner.faults import Interrupted, error_reason, interrupts_allowed, interrupts_deferred
from tuner.pruning import CachedCompletedTrials
from tuner.space import Param, suggest
from tuner.trainer import (
    EpochMetrics,
    LocalTrainer,
    Setup,
    TrainingDiverged,
    TrainJob,
    release_memory,
    resolve_device,
)
from tuner.workers import ProcessTrainer

__all__ = ["Objective", "trial_seed"]

METRIC = "val_accuracy"
Trainer = LocalTrainer | ProcessTrainer


def trial_seed(study_seed: int, number: int) -> int:
    """A distinct, reproducible seed per trial, recorded on the trial."""
    return (study_seed * 1_000_003 + number) % 2**31


class _SavedBest:
    """The value of the model last saved to ``best_model.pt`` by this process, and the lock to save it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.value: float | None = None


class Objective:
    """The objective of tuner.loop's workers: trains each trial with ``trainer`` (here, or in a worker process) and
    reports, prunes and saves the best model here; its ``for_worker`` copies share its data cache and saved best."""

    def __init__(self, run: RunConfig, params: list[Param], *, best_model_path: Path) -> None:
        self.run = run
        self.params = params
        self.best_model_path = best_model_path
        self.trainer: Trainer = LocalTrainer()  # for_worker gives a copy a worker process's trainer
        self._splits = SplitsCache()
        self._saved = _SavedBest()  # shared by the objectives of this process's worker threads
        self.last_trials: list[int] = []  # the trials this worker trains or last trained (tuner.loop requeues)

    def for_worker(self, trainer: Trainer) -> Objective:
        """An objective for another worker thread: its own trainer and last trial, the same data and saved best."""
        other = copy.copy(self)
        other.trainer, other.last_trials = trainer, []
        return other

    @property
    def cache(self) -> SplitsCache:
        return self._splits

    def splits(self, cfg: DataConfig, device: torch.device) -> Splits:
        return self._splits.get(cfg, device)

    def __call__(self, trial: optuna.Trial) -> float:
        """Train one trial; a trial that fails records why in its ``fail_reason`` user attr."""
        self.last_trials = []
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

    def begin(self, trial: optuna.Trial) -> TrainJob:
        """Sample the trial's config from the study's sampler, and its seed."""
        self.last_trials.append(trial.number)
        cfg = parse_trial(set_path(self.run.raw, suggest(trial, self.params, self.run.raw)))
        seed = cfg.trainer.seed if cfg.trainer.seed is not None else trial_seed(self.run.study.seed, trial.number)
        if cfg.trainer.seed is None and isinstance(trial.user_attrs.get("seed"), int):
            seed = trial.user_attrs["seed"]  # a retried trial (tuner.faults) trains again with the seed it had
        return TrainJob(cfg, seed, str(resolve_device(cfg.trainer.device)))

    def setup(self, trial: optuna.Trial, job: TrainJob, setup: Setup) -> None:
        with interrupts_deferred():
            trial.set_user_attr("seed", job.seed)
            trial.set_user_attr("device", setup.device)
            trial.set_user_attr("param_count", setup.param_count)

    def report(self, trial: optuna.Trial, metrics: EpochMetrics, history: list[EpochMetrics]) -> None:
        """Report the epoch (the last of ``history``); raise ``optuna.TrialPruned`` if the pruner stops the trial."""
        pruner = trial.study.pruner
        with interrupts_deferred():
            trial.report(metrics.val_accuracy, metrics.epoch)
            if isinstance(pruner, CachedCompletedTrials):
                prune = pruner.prune_reported(trial.study, trial.number, {m.epoch: m.val_accuracy for m in history})
            else:
                prune = trial.should_prune()
        if prune:
            raise optuna.TrialPruned(f"pruned at epoch {metrics.epoch} with {METRIC}={metrics.val_accuracy:.4f}")

    def end(self, trial: optuna.Trial, history: list[EpochMetrics]) -> None:
        """The trial's last epoch and mean epoch time, however it ended."""
        if history:
            last = history[-1]
            trial.set_user_attr("train_loss", last.train_loss)
            trial.set_user_attr("val_loss", last.val_loss)
            trial.set_user_attr("epochs_run", last.epoch)
            trial.set_user_attr("epoch_time_s", sum(m.seconds for m in history) / len(history))

    def keep(
        self,
        trial: optuna.Trial,
        job: TrainJob,
        history: list[EpochMetrics],
        model: Callable[[], torch.nn.Module | None],
    ) -> None:
        """Save ``model()`` as the best model if the trial's last epoch beats every completed trial."""
        value = history[-1].val_accuracy
        with self._saved.lock:
            if self._is_best(trial.study, value) and (built := model()) is not None:
                splits = self.splits(job.cfg.data, torch.device(job.device))
                self._save_best(trial, job.cfg, built, splits, history, value)
                self._saved.value = value

    def _train_trial(self, trial: optuna.Trial) -> float:
        job = self.begin(trial)
        splits = self.splits(job.cfg.data, torch.device(job.device))
        history: list[EpochMetrics] = []

        def on_epoch(metrics: EpochMetrics) -> None:
            history.append(metrics)
            self.report(trial, metrics, history)

        def keep_model() -> bool:
            with interrupts_deferred():
                return self._is_best(trial.study, history[-1].val_accuracy)

        # Training may be interrupted at once; the storage writes inside it are not cut short (tuner.faults).
        try:
            with interrupts_allowed():
                model = self.trainer.fit(
                    job,
                    splits,
                    on_setup=lambda setup: self.setup(trial, job, setup),
                    on_epoch=on_epoch,
                    keep_model=keep_model,
                )
        except TrainingDiverged as err:
            trial.set_user_attr("fail_reason", f"TrainingDiverged: {err}")
            raise
        finally:
            # A trial another worker gave up for dead ends here (UpdateFinishedTrialError): no best model.
            self.end(trial, history)
        self.keep(trial, job, history, lambda: model)
        return history[-1].val_accuracy

    def _save_best(
        self,
        trial: optuna.Trial,
        cfg: TrialConfig,
        model: torch.nn.Module,
        splits: Splits,
        history: list[EpochMetrics],
        value: float,
    ) -> None:
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

    def _is_best(self, study: optuna.Study, value: float) -> bool:
        """Better than every completed trial, and than the best saved here whose trial is not yet told."""
        better = (lambda a, b: a > b) if self.run.study.direction == "maximize" else (lambda a, b: a < b)
        if self._saved.value is not None and not better(value, self._saved.value):
            return False
        try:
            return better(value, study.best_value)
        except ValueError:  # no completed trial yet
            return True
