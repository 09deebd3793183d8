"""Measure parallel workers on one study and the tuner sweeper's slots, in one run (real processes, SQLite).

    python scripts/measure_multirun.py [--trials 12] [--workers 1 2 3]

1. Parallel workers (``python -m tuner -m hydra/launcher=joblib '+worker=range(N)'``) for each N: wall time,
   trials in storage (n_trials plus at most N - 1), repeated numbers or params, FAIL and RUNNING trials,
   and the wall-time ratio against one worker.
2. The sweeper with two slots on short and long jobs: the measured wall time against what batches of two
   would have taken with the same job durations (each batch waits for its longest job).

Ratios only: the machine's load changes absolute times.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna


def run(args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=dict(os.environ))
    if result.returncode != 0:
        sys.exit(result.stdout + result.stderr)
    return time.perf_counter() - start


def workers(n: int, n_trials: int, root: Path) -> tuple[float, list[optuna.trial.FrozenTrial]]:
    work = root / f"workers{n}"
    work.mkdir()
    url = f"sqlite:///{work / 'study.db'}"
    wall = run(
        [
            sys.executable,
            "-m",
            "tuner",
            "-m",
            "hydra/launcher=joblib",
            f"hydra.launcher.n_jobs={n}",
            f"+worker=range({n})",
            "data=digits",
            "trainer.epochs=3",
            "pruner=none",
            "study.name=w",
            f"study.n_trials={n_trials}",
            f"study.storage={url}",
            f"hydra.sweep.dir={work / 'multirun'}",
        ],
        work,
    )
    return wall, optuna.load_study(study_name="w", storage=url).trials


def slots(root: Path) -> tuple[float, list[float]]:
    work = root / "slots"
    work.mkdir()
    url = f"sqlite:///{work / 'study.db'}"
    run(
        [
            sys.executable,
            "-m",
            "tuner.train",
            "-m",
            "hydra/sweeper=tuner",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            "data=digits",
            "pruner=none",
            "study.n_trials=10",
            f"study.storage={url}",
            f"hydra.sweep.dir={work / 'multirun'}",
            "trainer.epochs=choice(1, 60)",
            "optimizer.lr=tag(log, interval(1e-2, 0.3))",
        ],
        work,
    )
    trials = optuna.load_study(study_name="digits-mlp", storage=url).trials
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    durations = [t.duration.total_seconds() for t in trials if t.duration]
    return (max(ends) - min(starts)).total_seconds(), durations


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    opts = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(f"parallel workers on one study, study.n_trials={opts.trials}, digits, 3 epochs")
        print("workers  wall_s  vs_1  trials  extra  dup_numbers  dup_params  fail  running")
        base = None
        for n in opts.workers:
            wall, trials = workers(n, opts.trials, root)
            base = base or wall
            numbers = [t.number for t in trials]
            params = {tuple(sorted(t.params.items())) for t in trials}
            states = [t.state.name for t in trials]
            print(
                f"{n:7d}  {wall:6.1f}  {base / wall:4.2f}  {len(trials):6d}  {len(trials) - opts.trials:5d}  "
                f"{len(numbers) - len(set(numbers)):11d}  {len(trials) - len(params):10d}  "
                f"{states.count('FAIL'):4d}  {states.count('RUNNING'):7d}"
            )
        span, durations = slots(root)
        batched = sum(max(durations[i : i + 2]) for i in range(0, len(durations), 2))
        print("\nsweeper, 2 slots, 10 trials, epochs choice(1, 60) (trials 0 and 1 include the workers' start-up)")
        print(
            f"measured span {span:.1f} s; batches of 2 with the same durations: {batched:.1f} s "
            f"(ratio {batched / span:.2f})"
        )


if __name__ == "__main__":
    main()
