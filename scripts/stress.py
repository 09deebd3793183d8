"""Load and fault figures: 8 worker processes on one study per storage, one of them SIGKILLed partway.

    python scripts/stress.py [--trials 300] [--workers 8] [--postgres postgresql://user@127.0.0.1:5432/db] [--compare]

Each worker runs what ``python -m tuner`` runs around its objective: ``tuner.storage.make_storage`` (WAL
SQLite, journal file or PostgreSQL, with heartbeats and RetryHeartbeatStaleTrialCallback), the start-up
recovery of dead workers' trials, and tuner's loop (tuner.loop) with the shared trial budget. The objective
is synthetic (5 reported steps of ~4 ms each) so the figures measure the storage and the coordination, not training.
The workers start their trials together, once all are ready, so the one to be killed runs trials whatever its start-up.
After the workers end, one more worker starts, as a user would rerun the command, to recover what the
killed worker left. Printed per storage: trials/s, trials lost, left RUNNING, lock errors, extra trials
beyond n_trials. PostgreSQL is skipped without --postgres (or TUNER_TEST_POSTGRES_URL). ``--compare``
adds, in the same run, "plain" workers that run ``study.optimize`` with Optuna's ``MaxTrialsCallback`` instead
of tuner's loop and budget (same storages), for the ratio of throughputs and the overshoot the budget prevents.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import optuna
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

STEPS = 5
STEP_S = 0.004
HEARTBEAT_S, GRACE_S = 1, 3
GIVEN_UP = "given up for dead"  # tuner.loop's warning
LOCK_ERRORS = re.compile(r"database is locked|could not obtain lock|deadlock detected", re.IGNORECASE)
# Optuna's journal file lock: a worker killed while it held the lock leaves it until its grace period (30 s).
LOCK_STALLS = re.compile(r"Forcibly releasing the lock file")


def worker(url: str, study_name: str, n_trials: int, plain: bool, barrier: Path | None) -> None:
    from tuner.budget import Budget, budget_used
    from tuner.loop import fail_stale_trials, run_trials
    from tuner.storage import make_storage, study_lock
    from tuner.study import FINISHED

    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # tuner's "given up for dead" lines
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    storage = make_storage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S, max_retry=3)
    study = optuna.load_study(study_name=study_name, storage=storage)
    fail_stale_trials(study, storage)  # what tuner.tune does at worker start
    if budget_used(study.get_trials(deepcopy=False)) >= n_trials:
        return
    if barrier is not None:  # every worker starts its trials together: the victim is sure to run some
        (barrier / str(os.getpid())).touch()
        while not (barrier / "go").exists():
            time.sleep(0.01)

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("pid", os.getpid())  # the watcher sees whose trial runs
        x = trial.suggest_float("x", -1.0, 1.0)
        for step in range(STEPS):
            time.sleep(STEP_S)
            trial.report(x * x + step, step)
        return x * x

    if plain:  # Optuna's own recipe: each worker stops once n_trials are finished
        study.optimize(objective, callbacks=[MaxTrialsCallback(n_trials, states=FINISHED)], catch=(Exception,))
        return
    budget = Budget(n_trials, lambda: study_lock(url, study_name))
    run_trials(
        study,
        objective,
        storage=storage,
        budget=budget,
        heartbeat_interval=HEARTBEAT_S,
        told=[],
        deadline=None,
        should_stop=lambda: False,
    )


def spawn(url: str, name: str, n_trials: int, log: Path, plain: bool, barrier: Path | None) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        mode = "plain" if plain else "gate"
        args = [sys.executable, __file__, "--worker", url, name, str(n_trials), mode, str(barrier or "")]
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)


def _runs_a_trial(study: optuna.Study, pid: int) -> bool:
    trials = study.get_trials(deepcopy=False)
    return any(t.state == TrialState.RUNNING and t.user_attrs.get("pid") == pid for t in trials)


def run_storage(label: str, url: str, n_trials: int, n_workers: int, tmp: Path, plain: bool) -> dict[str, float]:
    from tuner.budget import budget_used
    from tuner.storage import make_storage

    name = f"stress-{uuid.uuid4().hex[:8]}"
    logs = [tmp / f"{label}-{'plain' if plain else 'tuner'}-{i}.log" for i in range(n_workers + 1)]
    reader = make_storage(url, heartbeat_interval=None)  # this process only watches
    study = optuna.create_study(study_name=name, storage=reader)
    barrier = tmp / f"{name}-barrier"
    barrier.mkdir()
    procs = [spawn(url, name, n_trials, logs[i], plain, barrier) for i in range(n_workers)]
    while len(list(barrier.iterdir())) < n_workers and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    (barrier / "go").touch()
    victim = procs[0]
    killed_at = None
    while any(p.poll() is None for p in procs):
        if killed_at is None and victim.poll() is None:
            done = sum(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
            if done >= n_trials // 3 and _runs_a_trial(study, victim.pid):
                # Stopped, the victim cannot finish that trial before the kill: look again, then kill or go on.
                victim.send_signal(signal.SIGSTOP)
                if _runs_a_trial(study, victim.pid):
                    victim.send_signal(signal.SIGKILL)  # mid-trial: the workers are never idle
                    killed_at = done
                else:
                    victim.send_signal(signal.SIGCONT)
        time.sleep(0.1)
    # The rerun: a worker started after the grace period fails the dead trial and runs its retry.
    time.sleep(GRACE_S + 0.5)
    rerun = spawn(url, name, n_trials, logs[-1], plain, None)
    rerun.wait()
    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state.is_finished()]
    # Throughput from the first trial's start to the last one's end: worker start-up (torch import) excluded.
    first = min(t.datetime_start for t in finished if t.datetime_start)
    last = max(t.datetime_complete for t in finished if t.datetime_complete)
    wall = (last - first).total_seconds()
    numbers = sorted(t.number for t in trials)
    crashed = [p.returncode for p in [*procs[1:], rerun] if p.returncode != 0]
    text = "".join(log.read_text(errors="replace") for log in logs if log.exists())
    retried = [t for t in trials if t.system_attrs.get("failed_trial") is not None and t.state.is_finished()]
    return {
        "trials/s": len(finished) / wall,
        "finished": len(finished),
        # A trial that should have run and did not: budget short of n_trials, or a gap in the numbers.
        "lost": max(0, n_trials - budget_used(trials)) + (numbers != list(range(len(trials)))),
        "left RUNNING": sum(t.state == TrialState.RUNNING for t in trials),
        "left WAITING": sum(t.state == TrialState.WAITING for t in trials),
        "retried": len(retried),
        "lock errors": len(LOCK_ERRORS.findall(text)),
        "lock stalls": len(LOCK_STALLS.findall(text)),
        "false deaths": text.count(GIVEN_UP),  # live trials given up for dead: retried, nothing lost
        "worker crashes": len(crashed),
        "extra": budget_used(trials) - n_trials,  # trials beyond n_trials (a dead trial's retry replaces it)
        "killed after": killed_at or -1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--postgres", default=os.environ.get("TUNER_TEST_POSTGRES_URL"))
    parser.add_argument(
        "--compare", action="store_true", help="also run plain Optuna workers (MaxTrialsCallback, no budget gate)"
    )
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        url, name, n, mode, barrier = args.worker
        worker(url, name, int(n), plain=mode == "plain", barrier=Path(barrier) if barrier else None)
        return
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        storages = {"SQLite WAL": f"sqlite:///{tmp / 'stress.db'}", "journal file": f"journal:///{tmp / 'stress.log'}"}
        if args.postgres:
            storages["PostgreSQL"] = args.postgres
        print(
            f"{args.workers} workers, {args.trials} trials of {STEPS} reports each, one worker SIGKILLed "
            f"after a third of the trials; heartbeat {HEARTBEAT_S} s, grace period {GRACE_S} s"
        )
        for label, url in storages.items():
            for plain in (False, True) if args.compare else (False,):
                figures = run_storage(label, url, args.trials, args.workers, tmp, plain)
                print(
                    f"{label + (' (plain)' if plain else ''):21s} "
                    + "  ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()),
                    flush=True,
                )


if __name__ == "__main__":
    main()
