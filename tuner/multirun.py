"""``python -m tuner -m ...``: one study per Hydra job, named from the job's overrides, and one table at the end.

A job's study is ``<data>-<model>`` followed by its other overrides in Hydra's ``override_dirname`` form
(``digits-mlp,optimizer.name=sgd``), leaving out those that only say where or how long to run (``study.*``
but ``study.seed``, ``hydra.*``, the free ``trainer.*`` keys); ``study.name=...`` wins over all of this.
Each job writes ``study.json`` (its password masked) into its output folder, and ``StudiesTable`` (a Hydra
callback) reads them back with the sweep's own ``study.storage``, whose password is held in memory only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from tuner.definition import FREE
from tuner.secrets import mask_passwords_in_logs, safe_url
from tuner.summary import count_states

__all__ = [
    "JOB_RECORD",
    "StudiesTable",
    "format_table",
    "jobs_at_once",
    "keep_summary_in_job_log",
    "name_suffix",
    "storage_url",
    "study_row",
    "write_job_record",
]

log = logging.getLogger("tuner")

JOB_RECORD = "study.json"
# Keys already in the base name (<data>-<model>), or that say where/how long to run, not what is trained.
_BASE_KEYS = ("data", "model")
# Not the free data.* keys: a multirun over data.path is one study per file.
_EXCLUDED_KEYS = frozenset(k for k in FREE if k.startswith("trainer."))
_EXCLUDED_PREFIXES = ("study.", "hydra.", "hydra/")


def _excluded(key: str) -> bool:
    if key == "study.seed":  # a different seed samples other trials: its own study
        return False
    return key in _BASE_KEYS or key in _EXCLUDED_KEYS or key.startswith(_EXCLUDED_PREFIXES)


def jobs_at_once(n_jobs: object) -> int:
    """Jobs a Hydra launcher with ``hydra.launcher.n_jobs`` runs at the same time (joblib's -1: one per core)."""
    if not isinstance(n_jobs, int) or n_jobs < 1:
        return os.cpu_count() or 1
    return n_jobs


def name_suffix(overrides: list[str]) -> str | None:
    """The part a multirun job adds to the study name, or ``None`` when ``study.name`` is given explicitly;
    parsed by Hydra (``+key``/``++key`` count as ``key``) and sorted by key like ``hydra.job.override_dirname``."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    items: list[tuple[str, str]] = []
    for override in parsed:
        key = override.key_or_group
        if key == "study.name":
            return None
        if override.is_delete() or _excluded(key):
            continue
        items.append((key, override.get_value_element_as_str()))
    return "".join(f",{k}={v}" for k, v in sorted(items))


class _NotTheSummary(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("study finished")


def keep_summary_in_job_log() -> None:
    """Send each job's end-of-study summary to its own ``tuner.log`` only: the table at the end covers it.
    Hydra's job logging has a console and a file handler on the root logger (hydra-core 1.3.8)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.addFilter(_NotTheSummary())


def write_job_record(output_dir: str | Path, *, study: str, storage: str) -> None:
    """Leave the job's study where ``StudiesTable`` finds it, with any storage password masked."""
    (Path(output_dir) / JOB_RECORD).write_text(json.dumps({"study": study, "storage": safe_url(storage)}) + "\n")


def _unmasked(recorded: str, configured: str | None) -> str | None:
    """The URL to read a job's study from: its record, with the password of the sweep's own ``study.storage``
    put back when the record is that URL masked; ``None`` when a masked password cannot be recovered."""
    if configured is not None and recorded == safe_url(configured):
        return configured
    return recorded if safe_url(recorded) == recorded and "***" not in recorded else None


def study_row(study_name: str, storage: str) -> dict[str, Any]:
    """A study read back from storage: best value, the best trial's test accuracy if scored, trials by state."""
    study = optuna.load_study(study_name=study_name, storage=storage)
    row: dict[str, Any] = {"study": study_name, "best": None, "test": None, "states": count_states(study)}
    with contextlib.suppress(ValueError):  # ValueError: no completed trial
        row["best"] = study.best_value
    test = study.user_attrs.get("test_accuracy")
    if isinstance(test, dict):
        row["test"] = test.get("value")
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per study: best val_accuracy, test accuracy of the best trial, trials by state."""

    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    table = [("study", "best val_accuracy", "test_accuracy", "trials")]
    for row in rows:
        states = ", ".join(f"{n} {s.lower()}" for s, n in row["states"].items())
        table.append((row["study"], num(row["best"]), num(row["test"]), f"{sum(row['states'].values())} ({states})"))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in table)


def storage_url(config: DictConfig) -> str | None:
    """``study.storage`` resolved (``${oc.env:...}``), or ``None`` where it does not resolve to a string."""
    try:
        url = OmegaConf.select(config, "study.storage")
    except Exception:  # an interpolation that fails here fails again later, with its own message
        return None
    return url if isinstance(url, str) else None


class StudiesTable(Callback):
    """Hydra callback: after a multirun, one table across its jobs' studies, read back from storage."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        mask_passwords_in_logs(storage_url(config))  # the launcher logs each job's overrides, the storage URL too

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        configured = storage_url(config)
        seen: dict[tuple[str, str], None] = {}  # ordered set: several workers share one study
        for record in sorted(sweep_dir.glob(f"*/{JOB_RECORD}"), key=lambda p: _job_order(p.parent.name)):
            data = json.loads(record.read_text())
            storage = _unmasked(data["storage"], configured)
            if storage is None:
                log.warning(
                    "study %r in %s is left out of the table: its password is not kept on disk",
                    data["study"],
                    data["storage"],
                )
                continue
            seen[(data["study"], storage)] = None
        if not seen:
            return
        rows: list[dict[str, Any]] = []
        for study_name, storage in seen:
            try:
                rows.append(study_row(study_name, storage))
            except Exception as err:  # a vanished file or server: say so, don't hide the other studies
                log.warning("study %r in %s could not be read back: %s", study_name, safe_url(storage), err)
        storages = sorted({safe_url(storage) for _, storage in seen})
        log.info("%d studies in %s\n%s", len(rows), ", ".join(storages), format_table(rows))


def _job_order(name: str) -> tuple[int, str]:
    return (int(name), name) if name.isdigit() else (1 << 30, name)
