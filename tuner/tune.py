"""Run a study from checked config: the one place that puts storage, study, objective and summary together."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.storages import BaseStorage
from optuna.trial import TrialState
from tqdm.contrib.logging import logging_redirect_tqdm

from tuner.artifacts import artifact_dir, artifact_store, restore_checkpoint
from tuner.budget import Budget, budget_used
from tuner.checkpoint import load_model
from tuner.config import ConfigError, RunConfig, parse_run, parse_trial, set_path
from tuner.definition import data_content, definition
from tuner.faults import FailureStreak, FailureStreakError, check_interrupt, interruptible, interrupts_allowed
from tuner.loop import fail_stale_trials
from tuner.model import build_model
from tuner.notes import write_end_note, write_start_note
from tuner.objective import Objective
from tuner.pack import stackable
from tuner.packauto import AutoPack
from tuner.parallel import run_workers
from tuner.plots import save_dashboard_plots
from tuner.plugins import make_pruner, make_sampler, pruner_startup
from tuner.secrets import safe_url
from tuner.space import Param, parse_space, values_from_params
from tuner.storage import check_storage_url, make_storage, study_lock
from tuner.study import finished_trials, open_study
from tuner.summary import Progress, Summary, count_states, format_summary
from tuner.trainer import evaluate, resolve_device
from tuner.workers import ProcessTrainer, resolve_workers, warm_up

__all__ = ["prepare", "quiet_libraries", "score_best", "tune"]

log = logging.getLogger("tuner")


def prepare(raw: dict[str, Any]) -> tuple[RunConfig, list[Param]]:
    """Check everything that can be checked without side effects; raises ``ConfigError``."""
    from tuner.paths import check_run_paths

    run = parse_run(raw)
    params = parse_space(raw.get("space"), raw)
    make_sampler(run.sampler, seed=run.study.seed)
    make_pruner(run.pruner)
    check_storage_url(run.study.storage)
    check_run_paths(run)
    try:
        resolve_device(run.trial.trainer.device)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return run, params


def quiet_libraries() -> None:
    # Our per-trial line replaces Optuna's; alembic and SQLAlchemy chatter at INFO on first use.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in ("alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)


def score_best(study: optuna.Study, storage: BaseStorage, objective: Objective) -> tuple[float, int] | None:
    """Score the best trial's saved model once on the held-out test split, stored as the ``test_accuracy``
    user attribute: ``(accuracy, test samples)``, or ``None`` when there is no model to score."""
    best = study.best_trial
    model_path = objective.best_model_path
    cfg = parse_trial(set_path(objective.run.raw, values_from_params(objective.params, best.params)))
    device = resolve_device(cfg.trainer.device)
    loaded = load_model(model_path, map_location=device) if model_path.exists() else None
    held = loaded[1]["meta"].get("trial") if loaded else None
    if loaded is None or held != best.number:
        # Parallel workers share best_model.pt: another worker's lesser best may have landed last.
        # The best trial's own uploaded checkpoint is the one to score.
        if not restore_checkpoint(best, storage, artifact_store(objective.run.study), model_path):
            return None  # it said why, in one warning
        log.info(
            "best trial %d's checkpoint restored to %s from its artifacts (it held trial %s)",
            best.number,
            model_path,
            held,
        )
        loaded = load_model(model_path, map_location=device)
    splits = objective.splits(cfg.data, device)
    _, accuracy = evaluate(loaded[0], splits.x_test, splits.y_test, batch_size=cfg.trainer.eval_batch_size)
    study.set_user_attr("test_accuracy", {"trial": best.number, "value": accuracy, "samples": len(splits.x_test)})
    return accuracy, len(splits.x_test)


def _recover_stale_trials(study: optuna.Study, storage: BaseStorage) -> None:
    """At start, fail and queue again the trials of dead workers, so that the budget counts their retries."""
    before = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
    fail_stale_trials(study, storage)
    failed = len(study.get_trials(deepcopy=False, states=(TrialState.FAIL,))) - before
    if failed:
        log.warning("%d trial(s) of a dead worker marked FAIL and queued again (up to study.max_retry times)", failed)


def _note_running(study: optuna.Study, run: RunConfig) -> None:
    """Trials still RUNNING at the end belong to other workers, or to a dead one: say when the latter come back."""
    running = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    if not running:
        return
    interval = run.study.heartbeat_interval
    if interval is None:
        when = "heartbeats are off (study.heartbeat_interval=null): a dead worker's trial stays RUNNING"
    else:
        grace = run.study.grace_period or 2 * interval
        when = (
            f"a dead worker's trial is failed and queued again {grace} s after its last heartbeat "
            "(study.grace_period): run the same command again then to train it"
        )
    log.warning("%d trial(s) still RUNNING count toward study.n_trials (%s); %s", len(running), running, when)


def tune(run: RunConfig, params: list[Param], *, processes: int = 1) -> Summary:
    """Run (or continue) the study until it has ``study.n_trials`` finished trials, with ``trainer.workers``
    workers; ``processes``: how many tuner processes share this machine's cores (``trainer.workers=auto``).

    Ctrl-C and SIGTERM stop loading data and training at once and wait for the next safe point elsewhere, so
    every trial they stop is queued again and none is half-written.
    """
    with interruptible():
        return _tune(run, params, processes=processes)


def _tune(run: RunConfig, params: list[Param], *, processes: int) -> Summary:
    quiet_libraries()
    start = time.monotonic()
    trainer_cfg = run.trial.trainer
    if trainer_cfg.threads is not None:
        torch.set_num_threads(trainer_cfg.threads)
    device = resolve_device(trainer_cfg.device)
    workers = resolve_workers(trainer_cfg.workers, trainer_cfg.threads, device, processes=processes)
    fork = device.type == "cpu"  # CPU workers fork from the forkserver, CUDA ones start fresh (tuner.workers._launch)
    if workers > 1 and fork:
        warm_up()  # the forkserver imports beside what follows
    model_path = Path(run.study.output_dir) / "best_model.pt"
    objective = Objective(run, params, best_model_path=model_path)
    # Load the data before the storage is touched: a missing data set must not leave a study behind.
    with interrupts_allowed():
        splits = objective.splits(run.trial.data, device)
    model = build_model(run.trial.model, splits.input_shape, splits.num_classes)  # one that cannot be built: stop
    pack = trainer_cfg.pack  # None: auto, decided once the study is open
    if pack != 1 and not stackable(model):
        log.info("model._target_=%r cannot be stacked (tuner.pack): one trial at a time", run.trial.model.target)
        pack = 1
    defined = definition(run.raw, params, data_content(splits.arrays()))
    storage = make_storage(
        run.study.storage,
        heartbeat_interval=run.study.heartbeat_interval,
        grace_period=run.study.grace_period,
        max_retry=run.study.max_retry,
    )
    study = open_study(run, storage, defined=defined)
    if pack is None:
        pack = AutoPack(study, run.study.n_trials)
    url = safe_url(run.study.storage)
    write_start_note(study, run, params)  # the dashboard's study note; its Results are written at the end
    _recover_stale_trials(study, storage)
    # Trials running in other workers count; a dead worker's trial does not, its retry does (tuner.budget).
    remaining = run.study.n_trials - budget_used(study.get_trials(deepcopy=False))
    workers = max(min(workers, remaining), 1)
    log.info(
        "study %r in %s: %d finished trials, %d to run (%s sampler, %s pruner, %d searched params, %s)",
        study.study_name,
        url,
        finished_trials(study),
        max(remaining, 0),
        run.sampler.name,
        run.pruner.name,
        len(params),
        "training in this process" if workers == 1 else f"{workers} worker processes",
    )
    if remaining > 0:
        studies, objectives = [study], [objective]
        if workers > 1:
            studies += [open_study(run, storage) for _ in range(1, workers)]
            objectives = [objective.for_worker(ProcessTrainer(trainer_cfg.threads, fork=fork)) for _ in range(workers)]
        progress = Progress(remaining)
        streak = FailureStreak(run.study.max_failure_streak)
        deadline = None if run.study.timeout is None else time.monotonic() + run.study.timeout
        check_interrupt()  # one that came during start-up: before any trial is asked
        try:
            with logging_redirect_tqdm():
                run_workers(
                    studies,
                    objectives,
                    storage=storage,
                    budget=Budget(run.study.n_trials, lambda: study_lock(run.study.storage, run.study.name)),
                    heartbeat_interval=run.study.heartbeat_interval,
                    told=[progress, streak],
                    deadline=deadline,
                    max_retry=run.study.max_retry,
                    should_stop=lambda: streak.message is not None,
                    pack=pack,
                    pack_warmup=pruner_startup(study.pruner),
                )
        finally:
            progress.close()
            for each in objectives:
                each.trainer.close()
        if streak.message is not None:
            raise FailureStreakError(streak.message)
    summary = Summary(
        study_name=study.study_name, storage=url, states=count_states(study), wall_seconds=time.monotonic() - start
    )
    summary.pack_sizes = [
        t.user_attrs["pack_size"] for t in study.get_trials(deepcopy=False) if "pack_size" in t.user_attrs
    ]
    if any(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        best = study.best_trial
        summary.best_number, summary.best_value = best.number, best.value
        summary.best_params = values_from_params(params, best.params)
        scored = score_best(study, storage, objective)
        if scored is not None:
            summary.test_accuracy, summary.test_size = scored
            summary.model_path = str(objective.best_model_path)
    summary.hints.append(
        f"a bigger study: python -m tuner study.name={study.study_name}-big study.n_trials={run.study.n_trials * 4} "
        f"trainer.epochs={run.trial.trainer.epochs * 2}"
        + (" data.train_subset=null" if run.trial.data.train_subset is not None else "")
    )
    write_end_note(study, params)
    save_dashboard_plots(study, params)
    summary.artifact_dir = str(artifact_dir(run.study))
    summary.hints.append("what mattered, as HTML: python -m tuner.report <the same overrides>")
    summary.hints.append("zoom in on the best region: python -m tuner.refine <the same overrides>")
    check_interrupt()  # one that came while the best model was scored: the study is complete
    _note_running(study, run)
    log.info("study finished\n%s", format_summary(summary))
    return summary
