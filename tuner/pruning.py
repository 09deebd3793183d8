"""Median and percentile pruning without re-reading the study from storage at every epoch.

Optuna's ``PercentilePruner`` (and ``MedianPruner``) reads the completed trials at every ``should_prune``,
which on SQLite loads the running trials through the ORM each epoch. ``CachedCompletedTrials`` is told each trial
this process completes (``told``, a callback after ``study.tell``) and reads the study only after ``refresh_s`` and
while fewer than ``n_startup_trials`` have completed: its decisions are Optuna's for the trials this process
completes, and may miss those that other processes completed in the last ``refresh_s``. Never told, it reads at
each trial's first call.
"""

from __future__ import annotations

import time
from collections.abc import Container
from typing import Any

import optuna
from optuna.pruners import BasePruner, PercentilePruner
from optuna.trial import FrozenTrial, TrialState

from tuner._compat import startup_trials

__all__ = ["REFRESH_S", "CachedCompletedTrials"]

# Seconds a cached list of completed trials is used before it is read again (other workers may add to it).
REFRESH_S = 10.0
_COMPLETE = (TrialState.COMPLETE,)


class _CompletedView:
    """The study as the pruner sees it: completed trials from the cache, everything else from the study."""

    def __init__(self, study: optuna.Study, completed: list[FrozenTrial]) -> None:
        self._study, self._completed = study, completed

    def get_trials(self, deepcopy: bool = True, states: Container[TrialState] | None = None) -> list[FrozenTrial]:
        if not deepcopy and states is not None and tuple(states) == _COMPLETE:  # type: ignore[arg-type]
            return self._completed
        return self._study.get_trials(deepcopy=deepcopy, states=states)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


class CachedCompletedTrials(BasePruner):
    """Wrap a ``PercentilePruner`` (or ``MedianPruner``) so it reads completed trials once per trial."""

    def __init__(self, pruner: PercentilePruner, *, refresh_s: float = REFRESH_S) -> None:
        if refresh_s < 0:
            raise ValueError(f"refresh_s must be at least 0, but got {refresh_s=}.")
        self.pruner = pruner
        self.refresh_s = refresh_s
        self._completed: list[FrozenTrial] = []
        self._study: str | None = None
        self._seen: set[int] = set()  # the trials that asked since the cache was read (a pack's members take turns)
        self._read_at = 0.0
        self._told = False  # told of this process's completions: no read is needed to see them

    def told(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """A trial of this process ended (the signature of Optuna's ``optimize`` callbacks and tuner's told)."""
        self._told = True
        new = all(t.number != trial.number for t in self._completed)
        if trial.state == TrialState.COMPLETE and study.study_name == self._study and new:
            self._completed = [*self._completed, trial]  # a new list: a view already handed out stays as it was

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        now = time.monotonic()
        # Too few completed trials to prune by yet (n_startup_trials): read again at every call, or a trial that
        # started before the other workers completed them would never be pruned.
        starting = len(self._completed) < startup_trials(self.pruner)
        stale = now - self._read_at > self.refresh_s or study.study_name != self._study
        if (trial.number not in self._seen and not self._told) or starting or stale:
            self._completed = study.get_trials(deepcopy=False, states=_COMPLETE)
            self._study, self._read_at = study.study_name, now
            self._seen = {trial.number} | (set() if stale else self._seen)
        view: Any = _CompletedView(study, self._completed)
        return self.pruner.prune(view, trial)

    def prune_reported(self, study: optuna.Study, number: int, reported: dict[int, float]) -> bool:
        """``prune`` for a running trial from the values it reported: the same decision (a percentile pruner reads
        nothing else of the trial) without ``Trial.should_prune``'s read of the trial back from the storage."""
        running = FrozenTrial(
            number=number,
            state=TrialState.RUNNING,
            value=None,
            datetime_start=None,
            datetime_complete=None,
            params={},
            distributions={},
            user_attrs={},
            system_attrs={},
            intermediate_values=dict(reported),
            trial_id=-1,  # not read
        )
        return self.prune(study, running)
