"""Does the shared trial budget (``study.n_trials`` across workers, tuner/budget.py) slow a long study down?

In one process, two SQLite studies of instant trials (one float param, 5 reported epochs, one user
attribute: the storage work of a short tuner trial) are run side by side in blocks: one asks each trial
through ``tuner.budget.Budget`` (the study's lock and the count, as tuner's workers do), one with a plain
``study.ask()``. Prints milliseconds per trial of each, block by block, and their ratio: a budget check that
read every trial would grow with the study.

    python scripts/bench_budget.py                  # 6 blocks of 200 trials, about a minute
    python scripts/bench_budget.py --blocks 3 --block 100
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import optuna

from tuner.budget import Budget
from tuner.storage import make_storage, study_lock


def _objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", 0.0, 1.0)
    for epoch in range(1, 6):
        trial.report(x, epoch)
    trial.set_user_attr("train_loss", 1.0 - x)
    return x


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--block", type=int, default=200, help="trials per block")
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="tuner-bench-budget-") as tmp:
        urls = {name: f"sqlite:///{Path(tmp) / name}.db" for name in ("budget", "plain")}
        studies = {
            name: optuna.create_study(storage=make_storage(url, heartbeat_interval=None), study_name=name)
            for name, url in urls.items()
        }
        budget = Budget(10**9, lambda: study_lock(urls["budget"], "budget"))
        asks = {"budget": budget.ask, "plain": lambda study: study.ask()}
        print("trials   budget ms/trial   plain ms/trial   budget/plain")
        for block in range(1, args.blocks + 1):
            ms = {}
            for name, study in studies.items():
                start = time.perf_counter()
                for _ in range(args.block):
                    trial = asks[name](study)
                    study.tell(trial, _objective(trial))
                ms[name] = (time.perf_counter() - start) / args.block * 1e3
            ratio = ms["budget"] / ms["plain"]
            print(f"{block * args.block:6d}   {ms['budget']:15.1f}   {ms['plain']:14.1f}   {ratio:12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
