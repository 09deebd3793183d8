"""The workers' loop on Optuna's ask-and-tell: ask within the budget, beat while the trial trains, tell.

Not ``study.optimize``: it asks outside any lock (W workers overshoot ``study.n_trials``) and beats only on
RDBStorage, through private names; here each storage's public ``record_heartbeat`` is used.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from copy import deepcopy

import optuna
from optuna.storages import BaseStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from tuner._compat import trial_id
from tuner.budget import Budget, BudgetReached
from tuner.faults import Interrupted, beating, check_interrupt, interrupts_allowed
from tuner.journal import HeartbeatJournalStorage
from tuner.objective import Objective
from tuner.packing import run_packs
from tuner.workers import ProcessTrainer

__all__ = ["fail_stale_trials", "run_trials", "run_workers"]

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


def _stale_check(study: optuna.Study, storage: BaseStorage) -> Callable[[], None]:
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
    check_stale = _stale_check(study, storage)
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


def _requeue_interrupted(study: optuna.Study, objective: Objective, max_retry: int | None) -> None:
    """Queue the trials that Ctrl-C or SIGTERM ended (FAIL) to run again, as Optuna retries a dead worker's trial."""
    numbers = set(objective.last_trials)
    for trial in study.get_trials(deepcopy=False):
        reason = str(trial.user_attrs.get("fail_reason"))
        if trial.number not in numbers or trial.state != TrialState.FAIL or "interrupted" not in reason:
            continue
        copy = deepcopy(trial)
        copy.user_attrs = {k: v for k, v in trial.user_attrs.items() if k != "fail_reason"}  # the retry has not failed
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            RetryHeartbeatStaleTrialCallback(max_retry=max_retry)(study, copy)


@contextlib.contextmanager
def _heap_frozen() -> Iterator[None]:
    """Keep the objects alive when the workers start out of full garbage collections until they end: a full
    collection walks torch, SQLAlchemy, Optuna and Hydra with the GIL held and stalls every worker thread."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@_heap_frozen()
def run_workers(
    studies: list[optuna.Study],
    objectives: list[Objective],
    *,
    storage: BaseStorage,
    budget: Budget,
    heartbeat_interval: int | None = None,
    told: list[Told] | None = None,
    deadline: float | None = None,
    max_retry: int | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    pack: int = 1,
    pack_warmup: int = 0,
) -> None:
    """One worker per ``(study, objective)`` pair (a study handle each, with its own sampler seed): alone in
    this thread, else a thread each. On Ctrl-C or SIGTERM every worker process is ended, each interrupted
    trial is queued again and the interrupt goes on up; a worker that fails stops the others after their trial.
    ``pack`` > 1: each worker trains up to that many trials at once, after ``pack_warmup`` complete (tuner.packing).
    """
    stop = threading.Event()

    def work(study: optuna.Study, objective: Objective) -> None:
        if pack > 1:
            run_packs(
                study,
                objective,
                size=pack,
                warmup=pack_warmup,
                storage=storage,
                budget=budget,
                heartbeat_interval=heartbeat_interval,
                told=told or [],
                before_ask=_stale_check(study, storage),
                should_stop=lambda: (
                    stop.is_set() or should_stop() or (deadline is not None and time.monotonic() >= deadline)
                ),
            )
            return
        run_trials(
            study,
            objective,
            storage=storage,
            budget=budget,
            heartbeat_interval=heartbeat_interval,
            told=told or [],
            deadline=deadline,
            should_stop=lambda: stop.is_set() or should_stop(),
        )

    if len(studies) == 1:
        try:
            work(studies[0], objectives[0])
            check_interrupt()
        except KeyboardInterrupt:
            _requeue_interrupted(studies[0], objectives[0], max_retry)
            raise
        return
    errors: list[BaseException] = []
    running = len(studies)
    changed = threading.Condition()

    def thread(study: optuna.Study, objective: Objective) -> None:
        nonlocal running
        try:
            work(study, objective)
        except BaseException as err:
            errors.append(err)
            stop.set()
        finally:
            with changed:
                running -= 1
                changed.notify_all()

    def wait_for_all() -> None:
        # Not Thread.join(timeout): a signal that lands inside it can leave the thread looking finished
        # (CPython's tstate lock), and the interrupted trials would then be neither failed nor queued again.
        with changed:
            while running:
                changed.wait(0.1)

    for i, pair in enumerate(zip(studies, objectives, strict=True)):
        threading.Thread(target=thread, args=pair, name=f"tuner-worker-{i}", daemon=True).start()
    try:
        with interrupts_allowed():  # this thread only waits: nothing of a trial's is cut short here
            wait_for_all()
        check_interrupt()
    except KeyboardInterrupt as err:
        stop.set()
        name = err.signal_name if isinstance(err, Interrupted) else "SIGINT"
        for objective in objectives:
            if isinstance(objective.trainer, ProcessTrainer):
                objective.trainer.interrupt(name)
        wait_for_all()
        for study, objective in zip(studies, objectives, strict=True):
            _requeue_interrupted(study, objective, max_retry)
        raise
    failures = [e for e in errors if not isinstance(e, KeyboardInterrupt)]
    if failures:
        raise failures[0]
