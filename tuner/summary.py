"""What a person reads: a progress bar and one line per trial while the study runs, a table at the end."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

__all__ = ["Progress", "Summary", "fmt", "format_summary", "rows_table", "trial_line"]

log = logging.getLogger("tuner")


def fmt(value: Any) -> str:
    """A setting's value as every printed table shows it (floats to 4 significant digits)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def rows_table(rows: list[tuple[str, str]]) -> str:
    """``key  value`` lines, the keys padded to one width."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def trial_line(trial: FrozenTrial, best: FrozenTrial | None) -> str:
    state = trial.state.name
    if trial.state == TrialState.COMPLETE and trial.value is not None:
        result = f"val_accuracy={trial.value:.4f}"
    elif trial.state == TrialState.PRUNED and trial.intermediate_values:
        step = max(trial.intermediate_values)
        result = f"at epoch {step} (val_accuracy={trial.intermediate_values[step]:.4f})"
    else:
        result = str(trial.user_attrs.get("fail_reason", ""))
    seconds = trial.duration.total_seconds() if trial.duration else 0.0
    best_part = f" | best {best.value:.4f} (#{best.number})" if best is not None and best.value is not None else ""
    params = " ".join(f"{k}={fmt(v)}" for k, v in trial.params.items())
    return f"trial {trial.number} {state} {result} in {seconds:.1f}s{best_part} | {params}"


class Progress:
    """Optuna callback: a bar over this run's trials and a log line per finished trial."""

    def __init__(self, total: int) -> None:
        # tqdm hides itself when stderr is not a terminal (CI, logs); the per-trial lines remain.
        self.bar = tqdm(total=total, unit="trial", disable=None, dynamic_ncols=True)
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()  # called from every worker thread

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        with self._lock:
            self.counts[trial.state.name.lower()] += 1
            try:
                best: FrozenTrial | None = study.best_trial
            except ValueError:
                best = None
            log.info(trial_line(trial, best))
            postfix: dict[str, object] = dict(self.counts)
            if best is not None and best.value is not None:
                postfix["best"] = round(best.value, 4)
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


@dataclass
class Summary:
    study_name: str
    storage: str  # with any password masked
    states: dict[str, int]
    wall_seconds: float
    best_number: int | None = None
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    test_accuracy: float | None = None
    test_size: int = 0
    model_path: str | None = None
    artifact_dir: str | None = None  # optuna-dashboard --artifact-dir, for the trials' files
    hints: list[str] = field(default_factory=list)
    pack_sizes: list[int] = field(default_factory=list)  # each trial's pack_size, of those trained in packs


def format_summary(s: Summary) -> str:
    states = ", ".join(f"{n} {state.lower()}" for state, n in s.states.items() if n)
    rows: list[tuple[str, str]] = [("study", s.study_name), ("trials", f"{sum(s.states.values())} ({states})")]
    rows.append(("wall time", time.strftime("%H:%M:%S", time.gmtime(s.wall_seconds)) + " this run"))
    packed = [n for n in s.pack_sizes if n > 1]  # a pack of one is a trial trained alone
    if s.pack_sizes:
        mean = f", {sum(packed) / len(packed):.1f} members on average" if packed else ""
        rows.append(("packs", f"{len(packed)} of {len(s.pack_sizes)} trials trained in packs{mean}"))
    if s.best_number is None:
        rows.append(("best trial", "none completed"))
    else:
        rows.append(("best trial", f"#{s.best_number}"))
        rows.append(("val_accuracy", f"{s.best_value:.4f}"))
        if s.test_accuracy is not None:
            rows.append(("test_accuracy", f"{s.test_accuracy:.4f} ({s.test_size} held-out samples, scored once)"))
        rows += [(f"  {k}", fmt(v)) for k, v in s.best_params.items()]
    if s.model_path:
        rows.append(("best model", s.model_path))
    rows.append(("storage", s.storage))
    artifacts = f" --artifact-dir {s.artifact_dir}" if s.artifact_dir else ""
    rows.append(("dashboard", f"optuna-dashboard {s.storage}{artifacts}  (or python -m tuner.dashboard)"))
    rows += [("next", hint) for hint in s.hints]
    return rows_table(rows)


def count_states(study: optuna.Study) -> dict[str, int]:
    counts = Counter(t.state for t in study.get_trials(deepcopy=False))
    return {state.name: counts[state] for state in TrialState if counts[state]}
