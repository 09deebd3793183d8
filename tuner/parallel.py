"""The tuner process's workers: one per ``(study, objective)`` pair, each running tuner.loop's loop (or
tuner.packing's, for packs), alone in the calling thread or a thread each, with Ctrl-C and SIGTERM ending them all.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from copy import deepcopy

import optuna
from optuna.storages import BaseStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from tuner.budget import Budget
from tuner.faults import Interrupted, check_interrupt, interrupts_allowed
from tuner.loop import Told, run_trials, stale_check
from tuner.objective import Objective
from tuner.packauto import AutoPack
from tuner.packing import run_packs
from tuner.pruning import CachedCompletedTrials
from tuner.workers import ProcessTrainer

__all__ = ["run_workers"]


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
    pack: int | AutoPack = 1,
    pack_warmup: int = 0,
) -> None:
    """One worker per ``(study, objective)`` pair (a study handle each, with its own sampler seed): alone in
    this thread, else a thread each. On Ctrl-C or SIGTERM every worker process is ended, each interrupted
    trial is queued again and the interrupt goes on up; a worker that fails stops the others after their trial.
    ``pack`` > 1 (or auto's choice per shape): each worker trains that many trials at once, after ``pack_warmup``
    complete (tuner.packing).
    """
    stop = threading.Event()
    # Each worker's pruner learns of the trials every worker completes without reading the study (tuner.pruning).
    told = [*(told or []), *(s.pruner.told for s in studies if isinstance(s.pruner, CachedCompletedTrials))]

    def work(study: optuna.Study, objective: Objective) -> None:
        if pack != 1:
            run_packs(
                study,
                objective,
                size=pack,
                warmup=pack_warmup,
                storage=storage,
                budget=budget,
                heartbeat_interval=heartbeat_interval,
                told=told,
                before_ask=stale_check(study, storage),
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
            told=told,
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
