"""The folders a run writes, checked before the first trial (nothing is created here): a missing folder is fine
when its nearest existing parent is one tuner can write into.
"""

from __future__ import annotations

import os
from pathlib import Path

from tuner.artifacts import artifact_dir
from tuner.config import ConfigError, RunConfig
from tuner.datasets import download_folder

__all__ = ["check_folder", "check_run_paths"]


def _problem(path: Path) -> str | None:
    """Why ``path`` cannot be (or become) a folder to write into; ``None`` when it can."""
    folder = path.absolute()
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    nearest = "" if folder == path.absolute() else f"its nearest existing parent {str(folder)!r} "
    if not folder.exists():
        return f"{nearest or 'it '}is a broken link"
    if not folder.is_dir():
        return f"{nearest or 'it '}is a file, not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{nearest or 'it '}is read-only for this user"
    return None


def check_folder(key: str, value: str | Path, *, shown: str | None = None) -> None:
    """Refuse ``value`` (the setting ``key``) unless it is a writable folder or can be created as one; ``shown``:
    how the setting reads when ``value`` was derived from it (a default)."""
    problem = _problem(Path(value))
    if problem is not None:
        setting = shown if shown is not None else f"{key}={str(value)!r}"
        raise ConfigError(f"{setting} must be a folder tuner can write into (or create), but {problem}.")


def check_run_paths(run: RunConfig) -> None:
    """Every folder ``python -m tuner`` writes: the best model's, the artifacts' and a data set's download folder
    (``tuner.storage.check_storage_url`` checks the storage file's)."""
    study = run.study
    check_folder("study.output_dir", study.output_dir)
    artifacts = artifact_dir(study)
    default = None if study.artifact_dir is not None else f"study.artifact_dir=null (so {str(artifacts)!r})"
    check_folder("study.artifact_dir", artifacts, shown=default)
    data = run.trial.data
    target = download_folder(data)
    if target is not None:
        root = data.options.get("root")
        into = "" if str(target) == root else f" (downloading into {str(target)!r})"
        check_folder("data.root", target, shown=f"data.root={root!r}{into}")
