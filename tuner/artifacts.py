"""Files a person opens from a trial's page in optuna-dashboard: the model, its learning curve, its confusion matrix,
stored with Optuna's artifact API. Only a trial that is the study's new best gets them (it alone has a saved model):
about ln(n) + 0.6 of n random trials, so the cost grows with the log of the study's size (scripts/bench_artifacts.py).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import optuna
import torch
from matplotlib.figure import Figure  # the object API: no pyplot state, renders with Agg
from matplotlib.ticker import MaxNLocator
from optuna.artifacts import FileSystemArtifactStore, download_artifact, get_all_artifact_meta, upload_artifact
from optuna.artifacts.exceptions import ArtifactNotFound
from optuna.trial import FrozenTrial
from sqlalchemy.engine import make_url
from torch import nn

from tuner.config import StudyConfig
from tuner.trainer import EpochMetrics

__all__ = ["artifact_dir", "artifact_store", "confusion_matrix", "restore_checkpoint", "upload_best_artifacts"]

CHECKPOINT_NAME = "best_model.pt"
CURVE_NAME = "learning_curve.png"
CONFUSION_NAME = "confusion_matrix.png"

log = logging.getLogger("tuner")


def artifact_dir(study: StudyConfig) -> Path:
    """``study.artifact_dir``, or by default ``<db stem>_artifacts`` beside a SQLite file (``./tuner_artifacts``
    for server storages): one folder for every study in a storage, so one dashboard command shows them all."""
    if study.artifact_dir is not None:
        return Path(study.artifact_dir)
    url = make_url(study.storage)
    if url.get_backend_name() == "sqlite" and url.database:
        db = Path(url.database)
        return db.with_name(f"{db.stem}_artifacts")
    return Path("tuner_artifacts")


def artifact_store(study: StudyConfig) -> FileSystemArtifactStore:
    folder = artifact_dir(study)
    folder.mkdir(parents=True, exist_ok=True)  # FileSystemArtifactStore expects the folder to exist
    return FileSystemArtifactStore(folder)


def plot_learning_curve(history: Sequence[EpochMetrics], path: Path, *, title: str) -> None:
    """Train and validation loss (left axis) and validation accuracy (right axis) per epoch, as PNG."""
    epochs = [m.epoch for m in history]
    fig = Figure(figsize=(6, 3.6), dpi=100)
    ax = fig.add_subplot()
    ax.plot(epochs, [m.train_loss for m in history], "o-", label="train loss", color="tab:blue")
    ax.plot(epochs, [m.val_loss for m in history], "s-", label="val loss", color="tab:orange")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("cross-entropy loss")
    acc = ax.twinx()
    acc.plot(epochs, [m.val_accuracy for m in history], "^-", label="val accuracy", color="tab:green")
    acc.set_ylabel("val accuracy")
    lines = ax.get_lines() + acc.get_lines()
    ax.legend(lines, [str(line.get_label()) for line in lines], loc="center right", fontsize="small")
    ax.set_title(title)
    fig.subplots_adjust(left=0.12, right=0.86, bottom=0.14, top=0.9)  # fixed: tight_layout draws the figure again
    fig.savefig(path, format="png")


@torch.no_grad()
def confusion_matrix(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts with true classes as rows, predicted classes as columns."""
    model.eval()
    predicted = torch.cat([model(chunk).argmax(1) for chunk in torch.split(x, 2048)])
    return torch.bincount(y * num_classes + predicted, minlength=num_classes**2).reshape(num_classes, num_classes).cpu()


def plot_confusion_matrix(counts: torch.Tensor, classes: Sequence[str], path: Path, *, title: str) -> None:
    n = len(classes)
    fig = Figure(figsize=(1.6 + 0.45 * n, 1.2 + 0.45 * n), dpi=100)
    ax = fig.add_subplot()
    ax.imshow(counts.numpy(), cmap="Blues")
    high = int(counts.max()) if counts.numel() else 0
    for i in range(n):
        for j in range(n):
            value = int(counts[i, j])
            if value:
                color = "white" if value > high / 2 else "black"
                ax.text(j, i, str(value), ha="center", va="center", fontsize=7, color=color)
    ax.set_xticks(range(n), [str(c) for c in classes], rotation=90, fontsize=7)
    ax.set_yticks(range(n), [str(c) for c in classes], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.subplots_adjust(left=0.16, right=0.96, bottom=0.16, top=0.92)
    fig.savefig(path, format="png")


def upload_best_artifacts(
    trial: optuna.Trial,
    store: FileSystemArtifactStore,
    *,
    checkpoint: Path,
    history: Sequence[EpochMetrics],
    model: nn.Module,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    classes: Sequence[str],
) -> list[str]:
    """Attach the checkpoint, learning curve and validation confusion matrix to ``trial``; returns artifact ids."""
    ids = [upload_artifact(artifact_store=store, file_path=str(checkpoint), study_or_trial=trial)]
    with tempfile.TemporaryDirectory(prefix="tuner-artifacts-") as tmp:
        curve, confusion = Path(tmp) / CURVE_NAME, Path(tmp) / CONFUSION_NAME
        last = history[-1]
        plot_learning_curve(
            history, curve, title=f"trial {trial.number}: val_accuracy {last.val_accuracy:.4f} at epoch {last.epoch}"
        )
        counts = confusion_matrix(model, x_val, y_val, len(classes))
        plot_confusion_matrix(counts, classes, confusion, title=f"trial {trial.number}: validation split")
        for path in (curve, confusion):
            ids.append(upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial))
    return ids


def restore_checkpoint(
    trial: FrozenTrial, storage: optuna.storages.BaseStorage, store: FileSystemArtifactStore, path: Path
) -> bool:
    """Put ``trial``'s uploaded checkpoint at ``path`` (atomically); ``False``, with one warning, when it has none
    or the artifact folder is gone. Parallel workers share one ``best_model.pt`` and may leave the lesser of two
    new bests there; each trial's own upload is the one to trust."""
    metas = [m for m in get_all_artifact_meta(trial, storage=storage) if m.filename == CHECKPOINT_NAME]
    if not metas:
        log.warning("trial %d has no checkpoint artifact: its model is not scored", trial.number)
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tuner-restore-") as tmp:
        fetched = Path(tmp) / CHECKPOINT_NAME
        try:
            download_artifact(artifact_store=store, file_path=str(fetched), artifact_id=metas[-1].artifact_id)
        except ArtifactNotFound:
            log.warning(
                "trial %d's checkpoint (artifact %s) is not in the artifact folder: the folder was moved or "
                "removed since the study was written (a database copied elsewhere, or another study.artifact_dir), "
                "so the dashboard lacks the files of its earlier trials and this checkpoint is not scored",
                trial.number,
                metas[-1].artifact_id,
            )
            return False
        fetched.replace(path)
    return True
