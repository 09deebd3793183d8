"""Two small models trained side by side: in two threads of one process, or in two processes.

The reference is the same two trainings one after the other in one thread, in the same run. Why
``tuner.workers`` trains in processes: a small model's step is mostly per-op overhead, partly under the
GIL, so two threads barely overlap, and one model with two torch threads is no faster either.

Usage::

    python scripts/bench_workers.py            # about a minute on 2 CPU cores
    python scripts/bench_workers.py --steps 100
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import threading
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# (hidden units, batch size): the default space's small and large corners on 64-pixel digits.
SHAPES = ((64, 32), (64, 128), (256, 32), (256, 128), (512, 32), (512, 128))


def train(width: int, batch: int, steps: int, threads: int = 1) -> None:
    """``steps`` Adam steps of a 2-layer BatchNorm MLP on 64 inputs, as tuner's default model on digits."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, width, bias=False),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, width, bias=False),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Linear(width, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), fused=True)
    x, y = torch.randn(batch, 64), torch.randint(0, 10, (batch,))
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def one_after_the_other(width: int, batch: int, steps: int, threads: int) -> float:
    start = time.perf_counter()
    train(width, batch, steps, threads)
    train(width, batch, steps, threads)
    torch.set_num_threads(1)
    return time.perf_counter() - start


def side_by_side(kind: str, width: int, batch: int, steps: int) -> float:
    """Seconds for two trainings at once; a process's start-up (torch's import) and exit are not counted."""
    if kind == "threads":
        workers = [threading.Thread(target=train, args=(width, batch, steps)) for _ in range(2)]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return time.perf_counter() - start
    ctx = multiprocessing.get_context("spawn")  # as tuner's workers: a fresh interpreter each
    ready, go, done = ctx.Barrier(3), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_after, args=(ready, go, done, width, batch, steps)) for _ in range(2)]
    for p in procs:
        p.start()
    ready.wait()  # both have imported torch and warmed up
    start = time.perf_counter()
    go.set()
    for _ in procs:
        done.get()  # until both finished training; a spawned interpreter's exit is not training
    elapsed = time.perf_counter() - start
    for p in procs:
        p.join()
    return elapsed


def _after(ready: Any, go: Any, done: Any, width: int, batch: int, steps: int) -> None:
    train(width, batch, 5)  # warm up
    ready.wait()
    go.wait()
    train(width, batch, steps)
    done.put(True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per training")
    parser.add_argument("--shapes", type=int, default=len(SHAPES), help="the first N of the (hidden, batch) shapes")
    args = parser.parse_args(argv)
    print(f"{'hidden':>6} {'batch':>5} {'1 after 1 (s)':>13} {'2 threads':>10} {'2 procs':>8} {'2 torch threads':>16}")
    ratios: dict[str, list[float]] = {"threads": [], "processes": [], "torch2": []}
    for width, batch in SHAPES[: args.shapes]:
        train(width, batch, 20)
        sequential = one_after_the_other(width, batch, args.steps, 1)
        threads = side_by_side("threads", width, batch, args.steps)
        processes = side_by_side("processes", width, batch, args.steps)
        torch2 = one_after_the_other(width, batch, args.steps, 2)
        for key, value in (("threads", threads), ("processes", processes), ("torch2", torch2)):
            ratios[key].append(sequential / value)
        print(
            f"{width:>6} {batch:>5} {sequential:>13.2f} {sequential / threads:>9.2f}x {sequential / processes:>7.2f}x "
            f"{sequential / torch2:>15.2f}x",
            flush=True,
        )
    print(
        "speed-up over one after the other, min-max: "
        + ", ".join(f"{k} {min(v):.2f}-{max(v):.2f}x" for k, v in ratios.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
