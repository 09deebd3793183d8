"""``study.n_trials`` as one budget for every worker sharing a study.

Optuna's ``MaxTrialsCallback`` checks after each trial, so W workers overshoot by up to W-1 trials; here
each worker counts and asks under the study's lock (tuner.storage.study_lock), so no other worker asks between.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Callable, Iterable, Iterator

import optuna
from optuna.trial import FrozenTrial, TrialState

__all__ = ["Budget", "BudgetReached", "budget_used", "file_lock"]


class BudgetReached(Exception):
    """No trial was asked: finished and running trials already fill ``study.n_trials``."""


def budget_used(trials: Iterable[FrozenTrial]) -> int:
    """Finished and running trials, less the dead or interrupted ones whose retry (``retry_history``) replaces them."""
    trials = list(trials)
    replaced = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    return sum((t.state.is_finished() or t.state == TrialState.RUNNING) and t.number not in replaced for t in trials)


class Budget:
    """Ask trials for one study until ``n_trials`` (``None``: no limit) are used by all of its workers;
    ``lock()`` is held across the count and ``study.ask()``."""

    def __init__(self, n_trials: int | None, lock: Callable[[], contextlib.AbstractContextManager[object]]) -> None:
        if n_trials is not None and n_trials < 1:
            raise ValueError(f"n_trials must be at least 1 or None, but got {n_trials=}.")
        self.n_trials = n_trials
        self.lock = lock

    def ask(self, study: optuna.Study) -> optuna.Trial:
        """``study.ask()``, or ``BudgetReached`` when the study's trials fill the budget."""
        with self.asking(study) as ask:
            return ask()

    @contextlib.contextmanager
    def asking(self, study: optuna.Study) -> Iterator[Callable[[], optuna.Trial]]:
        """Hold the lock and count once for several asks (a pack's): each ``ask()`` is ``study.ask()``, or
        ``BudgetReached`` once the count left no room; the count reads every running trial, so once per ask would
        cost a pack's slot K reads. A WAITING trial that ``study.ask()`` takes may be a retry, which uses no more of
        the budget: counting it anyway only leaves its place to the next count."""
        with self.lock():
            used = 0 if self.n_trials is None else budget_used(study.get_trials(deepcopy=False))

            def ask() -> optuna.Trial:
                nonlocal used
                if self.n_trials is not None and used >= self.n_trials:
                    raise BudgetReached(f"study.n_trials={self.n_trials} is reached by this study's workers")
                used += 1
                return study.ask()

            yield ask


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """An exclusive ``flock`` on a lock file of its own (never on the SQLite file: that would drop SQLite's locks).

    Each call opens the file anew, so threads of one process exclude each other as processes do.
    """
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
