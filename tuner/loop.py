"""A worker's loop on Optuna's ask-and-tell: ask within the budget, beat while the trial trains, tell. It knows
storages and objectives only, not how a trial trains (stress.py's workers run it without torch); tuner.parallel
runs one per worker.

Not ``study.optimize``: it asks outside any lock (W workers overshoot ``study.n_trials``) and beats only on
RDBStorage, through private names; here each storage's public ``record_heartbeat`` is used.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from tuner._compat import trial_id
from tuner.budget import Budget, BudgetReached
from tuner.faults import beating, check_interrupt
from tuner.journal import HeartbeatJournalStorage

__all__ = ["Told", "fail_stale_trials", "run_trials", "stale_check"]

log = logging.getLogger("tuner")

# study.ask() warns when the storage has heartbeats, which only optimize() sends: here the loop sends them.
warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize", UserWarning)
# Set once for the process: warnings.catch_warnings() in the worker threads would race on the filters.
warnings.filterwarnings("ignore", ".*fail_stale_trials is experimental", optuna.exceptions.ExperimentalWarning)

# A worker looks for other workers' dead trials at most this often (Optuna looks before every trial): each look
# reads the study's running trials.
STALE_CHECK_S = 1.0

Told = Callable[[optuna.Study, FrozenTrial], None]  # called after each trial this process tells


def fail_stale_trials(study: optuna.Study, storage: BaseStorage) -> None:
    """Fail the trials of dead workers (no heartbeat for the grace period) and queue their retries."""
    if isinstance(storage, HeartbeatJournalStorage):
        storage.fail_stale_trials(study)
    else:
        optuna.storages.fail_stale_trials(study)  # a no-op without heartbeats


def stale_check(study: optuna.Study, storage: BaseStorage) -> Callable[[], None]:
    """``fail_stale_trials`` at most every ``STALE_CHECK_S``; tune() failed the stale trials as the worker started."""
    checked = time.monotonic()

    def check() -> None:
        nonlocal checked
        if time.monotonic() - checked > STALE_CHECK_S:
            fail_stale_trials(study, storage)
            checked = time.monotonic()

    return check


def _run_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    objective: Callable[[optuna.Trial], float],
    storage: BaseStorage,
    interval: int | None,
) -> FrozenTrial:
    """Train ``trial`` and tell its end; a failure is recorded (``fail_reason``) and the study goes on."""
    value: float | None = None
    given_up = False
    with beating(storage, lambda: [trial_id(trial)], interval):
        try:
            value, state = objective(trial), TrialState.COMPLETE
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except KeyboardInterrupt:
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
        except optuna.exceptions.UpdateFinishedTrialError:
            state, given_up = TrialState.FAIL, True
        except Exception:
            state = TrialState.FAIL
            log.debug("trial %d failed", trial.number, exc_info=True)  # its fail_reason holds the first line
    told = study.tell(trial, value, state=None if value is not None else state, skip_if_finished=True)
    if given_up or (
        told.state == TrialState.FAIL and state != TrialState.FAIL and "fail_reason" not in told.user_attrs
    ):
        log.warning(
            "trial %d was given up for dead by another worker (no heartbeat for study.grace_period) and queued "
            "again; this worker goes on. A longer study.grace_period avoids this on a loaded machine.",
            trial.number,
        )
    return told


def run_trials(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float],
    *,
    storage: BaseStorage,
    budget: Budget,
    heartbeat_interval: int | None,
    told: list[Told],
    deadline: float | None,
    should_stop: Callable[[], bool],
) -> None:
    """One worker's trials, until the budget is used, the time is up, or ``should_stop()``; a failing trial
    is recorded and the worker goes on, an interrupt fails the trial and goes on up."""
    check_stale = stale_check(study, storage)
    while not should_stop() and (deadline is None or time.monotonic() < deadline):
        check_stale()
        try:
            trial = budget.ask(study)
        except BudgetReached:
            return  # the other workers started the last trials: this worker is done
        frozen = _run_trial(study, trial, objective, storage, heartbeat_interval)
        for callback in told:
            callback(study, frozen)
        check_interrupt()  # a safe point: the trial is told
