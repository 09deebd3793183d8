"""How much faster is a pack of K members (tuner/pack.py) than K trials trained one after another?

In one process and one torch thread, for each model and batch size, the script interleaves rounds of: one
trial trained alone (``tuner.trainer.fit``) and packs of K = 1, 2, 4, 8, 16 members of the same shape with
mixed optimizers. Prints milliseconds per member-epoch and the speed-up over alone (medians over rounds).

    python scripts/bench_pack.py                              # MNIST-1D, mlp and cnn, batch sizes 32 and 128
    python scripts/bench_pack.py --models mlp --batch-sizes 64 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tuner.__main__ import config_dir
from tuner.config import parse_trial
from tuner.data import load_splits
from tuner.pack import Member, Pack
from tuner.schema import TrialConfig
from tuner.trainer import TrainJob, fit

OPTIMIZERS = ["optimizer.name=sgd", "optimizer.name=adam"]


def _cfg(*overrides: str) -> TrialConfig:
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        raw = OmegaConf.to_container(compose(config_name="config", overrides=list(overrides)), resolve=True)
    return parse_trial(raw)  # type: ignore[arg-type]


def _alone(cfg: TrialConfig, splits, epochs: int) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fit(TrainJob(cfg, 1, "cpu"), splits, on_setup=lambda s: None, on_epoch=lambda m: None)
    return (time.perf_counter() - start) / epochs


def _packed(cfgs: list[TrialConfig], splits, epochs: int) -> float:  # type: ignore[no-untyped-def]
    pack = Pack(splits.input_shape, splits.num_classes, torch.device("cpu"))
    pack.change(join=[Member(i, cfg, i) for i, cfg in enumerate(cfgs)])
    start = time.perf_counter()
    for _ in range(epochs):
        pack.train_epoch(splits.x_train, splits.y_train, splits.x_val, splits.y_val, batch_size=cfgs[0].data.batch_size)
    return (time.perf_counter() - start) / epochs / len(cfgs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data", default="mnist1d")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 128])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 2, 4, 8, 16], help="pack sizes K")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as one worker process of trainer.workers=auto
    print(f"torch {torch.__version__}, {args.data}, {args.epochs} epochs, medians of {args.rounds} rounds")
    print("model  batch  K   ms/member-epoch  alone ms/epoch  speed-up")
    for model in args.models:
        for batch in args.batch_sizes:
            base = (
                f"data={args.data}",
                f"model={model}",
                f"data.batch_size={batch}",
                "trainer.device=cpu",
                f"trainer.epochs={args.epochs}",
            )
            cfgs = [_cfg(*base, OPTIMIZERS[i % 2], f"optimizer.lr={0.001 * (i + 1)}") for i in range(max(args.sizes))]
            splits = load_splits(cfgs[0].data)
            _alone(cfgs[0], splits, args.epochs)  # warm-up
            alone, packed = [], {k: [] for k in args.sizes}  # type: ignore[var-annotated]
            for _ in range(args.rounds):
                alone.append(_alone(cfgs[0], splits, args.epochs))
                for k in args.sizes:
                    packed[k].append(_packed(cfgs[:k], splits, args.epochs))
            reference = statistics.median(alone)
            for k in args.sizes:
                per = statistics.median(packed[k])
                row = f"{model:5s}  {batch:5d}  {k:2d}  {per * 1000:15.1f}  {reference * 1000:14.1f}"
                print(f"{row}  {reference / per:7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
