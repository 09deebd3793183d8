"""``study.n_trials`` as one budget for every worker sharing a study.

Optuna's ``MaxTrialsCallback`` checks after each trial, so W workers overshoot by up to W-1 trials,
and a check before ``study.ask()`` still races with the other workers. Here the storage itself
refuses to create a fresh trial once the budget is used, holding a lock across the count and the
insert (a PostgreSQL advisory lock; a lock file beside a SQLite or journal file, for the workers of
one machine). Popping a queued (WAITING) retry creates no trial and is never refused.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from optuna.trial import FrozenTrial, TrialState

__all__ = ["BudgetGate", "BudgetReached", "budget_used", "file_lock"]

T = TypeVar("T")


class BudgetReached(Exception):
    """``study.ask()`` was refused: finished and running trials already fill ``study.n_trials``."""


def budget_used(trials: Iterable[FrozenTrial]) -> int:
    """Finished and running trials, less the dead or interrupted ones whose retry replaces them.

    A trial retried by ``RetryHeartbeatStaleTrialCallback`` appears in its copy's ``retry_history``.
    """
    trials = list(trials)
    replaced = {n for t in trials for n in t.system_attrs.get("retry_history", ())}
    return sum((t.state.is_finished() or t.state == TrialState.RUNNING) and t.number not in replaced for t in trials)


class BudgetGate:
    """Storage mixin: set ``trial_budget`` and creating a fresh trial raises ``BudgetReached`` once it is used."""

    trial_budget: int | None = None

    def budget_lock(self, study_id: int) -> contextlib.AbstractContextManager[None]:
        raise NotImplementedError

    def budget_count(self, study_id: int) -> int:
        """``budget_used`` of the study's trials; a storage may count without loading every trial."""
        storage: Any = self  # a BaseStorage: the class this is mixed into
        return budget_used(storage.get_all_trials(study_id, deepcopy=False))

    def gate(self, study_id: int, template_trial: FrozenTrial | None, create: Callable[[], T]) -> T:
        """Run ``create`` (the storage's own trial insert) unless it would exceed the budget."""
        if template_trial is not None or self.trial_budget is None:  # enqueue_trial / add_trial / a retry copy
            return create()
        with self.budget_lock(study_id):
            if self.budget_count(study_id) >= self.trial_budget:
                raise BudgetReached(f"study.n_trials={self.trial_budget} is reached by this study's workers")
            return create()


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """An exclusive ``flock`` on a lock file of its own (never on the SQLite file: that would drop SQLite's locks)."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
