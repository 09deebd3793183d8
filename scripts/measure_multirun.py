"""Measure the tuner sweeper's slots (``hydra/sweeper=tuner``, real processes, SQLite).

    python scripts/measure_multirun.py

The sweeper with two slots on short and long jobs: the measured wall time against what batches of two
would have taken with the same job durations (each batch waits for its longest job), as Hydra's other
sweepers launch them. A ratio only: the machine's load changes absolute times.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna


def run(args: list[str], cwd: Path) -> None:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=dict(os.environ))
    if result.returncode != 0:
        sys.exit(result.stdout + result.stderr)


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
    argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None).parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        span, durations = slots(Path(tmp))
    batched = sum(max(durations[i : i + 2]) for i in range(0, len(durations), 2))
    print("sweeper, 2 slots, 10 trials, epochs choice(1, 60) (trials 0 and 1 include the workers' start-up)")
    print(f"measured span {span:.1f} s; batches of 2 with the same durations: {batched:.1f} s", end=" ")
    print(f"(ratio {batched / span:.2f})")


if __name__ == "__main__":
    main()
