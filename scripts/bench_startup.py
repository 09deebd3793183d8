"""How long CPU workers take to start and train their first trial: fresh interpreters against forks of
multiprocessing's forkserver (``tuner.workers``, which forks CPU workers and starts CUDA ones fresh).

Each measurement runs in a new Python process, as one ``python -m tuner`` run starts its workers once: from the
first ``ProcessTrainer.start`` to the end of each worker's first trial (digits, one epoch). The two ways alternate
over rounds, in the same run. Prints the medians and their ratio.

    python scripts/bench_startup.py                 # 5 rounds, 2 workers: about a minute on 2 CPU cores
    python scripts/bench_startup.py --rounds 9 --workers 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time

from bench_pack import _cfg

from tuner.data import load_splits
from tuner.trainer import TrainJob
from tuner.workers import ProcessTrainer

WAYS = {"fresh interpreters": False, "forkserver": True}


def one(fork: bool, workers: int) -> float:
    """Seconds until ``workers`` new workers have each trained one trial."""
    cfg = _cfg("data=digits", "trainer.epochs=1", "trainer.device=cpu")
    splits = load_splits(cfg.data)
    start = time.perf_counter()
    trainers = [ProcessTrainer(1, fork=fork) for _ in range(workers)]

    def train(trainer: ProcessTrainer) -> None:
        job = TrainJob(cfg, seed=0, device="cpu")
        trainer.fit(job, splits, on_setup=lambda s: None, on_epoch=lambda m: None, keep_model=lambda: False)

    threads = [threading.Thread(target=train, args=(t,)) for t in trainers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    for trainer in trainers:
        trainer.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--one", choices=sorted(WAYS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(WAYS[args.one], args.workers)))
        return
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    for r in range(args.rounds):
        for way in list(WAYS) if r % 2 == 0 else list(WAYS)[::-1]:  # alternate which goes first
            command = [sys.executable, __file__, "--one", way, "--workers", str(args.workers)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            seconds[way].append(json.loads(done.stdout.splitlines()[-1]))
    print(f"{args.workers} workers, start to first trial done, median of {args.rounds} rounds:")
    medians = {way: statistics.median(values) for way, values in seconds.items()}
    for way, values in seconds.items():
        print(f"  {way:20s} {medians[way]:6.2f} s   ({' '.join(f'{v:.2f}' for v in values)})")
    print(f"  fresh / forkserver   {medians['fresh interpreters'] / medians['forkserver']:6.2f}x")


if __name__ == "__main__":
    main()
