"""Trials per minute of tuner's trainer against the approach of Optuna's official PyTorch example.

In one process, per data set, rounds alternate four variants over the same sampled trials (tuner's
sampler draws them once per round and every variant's trial k gets the k-th draw, so it has the same
parameters, seed, initial weights and batches everywhere), data split, pruner, epochs and device, so
machine noise hits all alike:

- ``reference``: Optuna's ``examples/pytorch/pytorch_simple.py`` written out below: per trial a
  ``DataLoader(dataset, shuffle=True)`` (per-sample decoding and indexing, default collate; the shuffle
  seeded per trial as tuner's, see ``_loaders``), a plain
  ``torch.optim`` optimizer from ``getattr(optim, name)``, validation through a DataLoader each epoch,
  ``trial.report`` + ``trial.should_prune`` per epoch; one trial after another, one torch thread;
- ``reference_mt``: the same with torch's default thread count (every core), as the example runs when
  nobody sets it. Each round's ratios take the faster of the two references;
- ``memory``: tuner's real ``Objective`` and ``run_workers`` with in-memory storage, training in
  ``trainer.workers=auto`` worker processes (one per core, ``--threads`` torch threads each), as
  ``python -m tuner`` does by default;
- ``sqlite``: the same with ``tuner.storage.make_storage`` on a fresh SQLite file.

Usage::

    python scripts/bench.py                      # 3 data sets x 3 rounds, under ~10 minutes on 2 CPU cores
    python scripts/bench.py --quick              # a smoke run, under ~2 minutes
    python scripts/bench.py --datasets digits --trials 20 --epochs 8 --rounds 3 --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import optuna
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from torch import optim
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset, RandomSampler, TensorDataset

from tuner.__main__ import config_dir
from tuner.budget import Budget
from tuner.config import OptimizerConfig, RunConfig, TrialConfig
from tuner.data import Splits
from tuner.model import build_model
from tuner.objective import Objective, trial_seed
from tuner.parallel import run_workers
from tuner.plugins import make_pruner, make_sampler
from tuner.space import Param, suggest
from tuner.storage import make_storage, study_lock
from tuner.tune import prepare
from tuner.workers import ProcessTrainer, resolve_workers

VARIANTS = ("reference", "reference_mt", "memory", "sqlite")
REFERENCES = ("reference", "reference_mt")
DATASETS = ("digits", "mnist1d", "fashion_mnist")
# Per data set: the overrides that pick it. A 6000-sample stratified subset of Fashion-MNIST's 60k keeps a
# reference trial near a few seconds on 2 cores; the files come from /usr/share/datasets/fashion-mnist.
DATA_OVERRIDES: dict[str, tuple[str, ...]] = {
    "digits": ("data=digits",),
    "mnist1d": ("data=mnist1d",),
    "fashion_mnist": ("data=fashion_mnist", "data.train_subset=6000", "data.download=false"),
}
# The search space both sides sample: tuner's default space (optimizer sgd/adam, lr, momentum, Adam's
# betas and eps, lr decay, hidden units, layers, batch size), not the example's own smaller one, because
# it is what a tuner user runs. The reference applies every sampled value the way tuner does (momentum,
# betas, eps, the per-epoch lr decay), so equal parameters mean equal training and the accuracy columns
# compare implementations, not search spaces.
SPACE = "default"
# Torch's names for the optimizers that tuner's config names in lower case.
TORCH_OPTIMIZERS = {"sgd": "SGD", "adam": "Adam", "rmsprop": "RMSprop"}
# The default run: rounds per data set, and trials per round: the default study's 50 where a round is short
# (a 16-trial round makes per-study costs such as the ~3 new-best artifact uploads weigh ~3x more than in
# the default study), 16 on the Fashion-MNIST subset; about 10 minutes in all on 2 cores.
FULL = {"rounds": 3}
FULL_TRIALS = {"digits": 50, "mnist1d": 50, "fashion_mnist": 16}
QUICK = {"trials": 4, "rounds": 2, "epochs": 3}


# --- The reference: Optuna's PyTorch example, over tuner's data, model and search space -----------------------


def _optimizer_kwargs(cfg: OptimizerConfig) -> dict[str, Any]:
    """The sampled values that tuner passes to the same torch optimizer (no fused kernels here)."""
    if cfg.name == "sgd":
        return {"momentum": cfg.momentum, "weight_decay": cfg.weight_decay}
    if cfg.name == "adam":
        return {"betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    return {"alpha": cfg.beta2, "eps": cfg.eps, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay}


class ExampleDataset(Dataset[tuple[torch.Tensor, int]]):
    """What the example's ``datasets.FashionMNIST(..., transform=transforms.ToTensor())`` does per sample.

    torchvision is not installed beside this torch, so its ``__getitem__`` is written out: a uint8 array
    becomes a PIL image, ``ToTensor`` turns it into a float tensor in [0, 1], then the same normalization
    as tuner's (so both sides see identical inputs). Sets that are not 8-bit images (mnist1d, digits'
    0-16 pixels) go through ``torch.as_tensor`` per sample instead of PIL.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, mean: float, std: float) -> None:
        raw = (x * std + mean).numpy()  # undo tuner's normalization: the [0, 1] values the files hold
        self.images = len(x.shape) == 4 and x.shape[1] == 1 and x.shape[2] >= 28
        self.raw = np.rint(raw[:, 0] * 255).astype(np.uint8) if self.images else raw.astype(np.float32)
        self.targets = y.tolist()
        self.shape = tuple(x.shape[1:])
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.images:
            pic = Image.fromarray(self.raw[i], mode="L")
            t = torch.from_numpy(np.array(pic, np.uint8, copy=True)).view(self.shape).float().div(255)
        else:
            t = torch.as_tensor(self.raw[i]).view(self.shape)
        return (t - self.mean) / self.std, self.targets[i]


def _loaders(splits: Splits, batch_size: int, kind: str, seed: int) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """What the example's ``get_mnist`` returns, built anew each trial.

    The example's ``shuffle=True`` is a ``RandomSampler``; here it gets the trial's seed instead of drawing
    from the global RNG. It then draws ``torch.randperm(n, generator)`` each epoch, exactly as tuner's
    trainer does with the same seed, so both sides train on identical batches from identical initial
    weights, and the accuracy columns differ by implementation (fused optimizer kernels, summation order),
    not by luck of the shuffle.

    ``kind="example"``: per-sample decoding and transform, as the example's torchvision dataset does.
    ``kind="tensor"``: a TensorDataset over tensors already normalized in memory (per-sample indexing and
    default collate without the decoding), a reference faster than the example itself.
    """
    train: Dataset[Any]
    valid: Dataset[Any]
    if kind == "example":
        train = ExampleDataset(splits.x_train, splits.y_train, splits.mean, splits.std)
        valid = ExampleDataset(splits.x_val, splits.y_val, splits.mean, splits.std)
    else:
        train, valid = TensorDataset(splits.x_train, splits.y_train), TensorDataset(splits.x_val, splits.y_val)
    # BatchNorm cannot train on a one-sample batch; tuner skips such a last batch, the reference drops it.
    drop_last = len(splits.y_train) % batch_size == 1
    return (
        # The generator goes to the sampler only: DataLoader draws a worker seed from its own generator each
        # epoch, which would shift the sampler's stream.
        DataLoader(
            train,
            batch_size=batch_size,
            sampler=RandomSampler(train, generator=torch.Generator().manual_seed(seed)),
            drop_last=drop_last,
        ),
        DataLoader(valid, batch_size=batch_size),  # the example shuffles this one too; the order changes nothing
    )


def _with_values(base: TrialConfig, values: dict[str, Any]) -> TrialConfig:
    """``base`` with each sampled ``section.key`` set: the values used as the example uses its suggestions,
    without tuner's deep copy and re-validation of the whole config (which tuner's side pays)."""
    changes: dict[str, dict[str, Any]] = {}
    for path, value in values.items():
        section, key = path.split(".", 1)
        changes.setdefault(section, {})[key] = value
    return TrialConfig(
        model=replace(base.model, options={**base.model.options, **changes.get("model", {})}),
        data=replace(base.data, **changes.get("data", {})),
        optimizer=replace(base.optimizer, **changes.get("optimizer", {})),
        trainer=replace(base.trainer, **changes.get("trainer", {})),
    )


class ReferenceObjective:
    """``pytorch_simple.py``'s ``objective``: same steps, tuner's model, data and sampled configuration."""

    def __init__(self, run: RunConfig, params: list[Param], splits: Splits, *, kind: str) -> None:
        self.run, self.params, self.splits, self.kind = run, params, splits, kind

    def __call__(self, trial: optuna.Trial) -> float:
        cfg = _with_values(self.run.trial, suggest(trial, self.params, self.run.raw))
        seed = trial_seed(self.run.study.seed, trial.number)
        torch.manual_seed(seed)  # tuner's initial weights per trial
        splits = self.splits
        model = build_model(cfg.model, splits.input_shape, splits.num_classes)
        name = TORCH_OPTIMIZERS[cfg.optimizer.name]
        optimizer = getattr(optim, name)(model.parameters(), lr=cfg.optimizer.lr, **_optimizer_kwargs(cfg.optimizer))
        decay = cfg.optimizer.lr_decay
        scheduler = LambdaLR(optimizer, lambda epoch: 1.0 / (1.0 + decay * epoch))
        train_loader, valid_loader = _loaders(splits, cfg.data.batch_size, self.kind, seed)

        accuracy = 0.0
        for epoch in range(1, cfg.trainer.epochs + 1):  # 1-based, as tuner reports, so the pruner sees the same steps
            model.train()
            for data, target in train_loader:
                optimizer.zero_grad()
                loss = F.cross_entropy(model(data), target)
                loss.backward()
                optimizer.step()
            scheduler.step()

            model.eval()
            correct = 0
            with torch.no_grad():
                for data, target in valid_loader:
                    pred = model(data).argmax(dim=1)
                    correct += int(pred.eq(target).sum().item())
            accuracy = correct / len(splits.y_val)

            trial.report(accuracy, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
        return accuracy


# --- Running the variants -------------------------------------------------------------------------------------


@dataclass
class Result:
    dataset: str
    variant: str
    round: int
    sampler_seed: int
    trials: int
    seconds: float  # wall clock
    cpu_seconds: float  # this process's CPU time: less sensitive to other jobs on a shared box (1 thread)
    states: dict[str, int]
    best_value: float | None
    params: list[dict[str, Any]]
    values: list[float | None]  # per trial number: its value if it completed
    durations: list[float]  # per trial number: seconds from start to finish
    epochs: list[int]  # per trial number: epochs it trained (reported)

    @property
    def per_minute(self) -> float:
        return 60.0 * self.trials / self.seconds

    @property
    def per_cpu_minute(self) -> float:
        return 60.0 * self.trials / self.cpu_seconds


def compose_raw(overrides: list[str]) -> dict[str, Any]:
    """The plain dict that ``python -m tuner <overrides>`` works from."""
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    raw = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(raw, dict)
    return cast(dict[str, Any], raw)


def sample_plan(run: RunConfig, params: list[Param], seed: int, trials: int) -> list[dict[str, Any]]:
    """The round's trials: ``trials`` draws of tuner's sampler (seeded) over the space, untrained."""
    study = optuna.create_study(sampler=make_sampler(run.sampler, seed=seed))
    plan = []
    for _ in range(trials):
        trial = study.ask()
        suggest(trial, params, run.raw)
        study.tell(trial, 0.0)
        plan.append(dict(trial.params))
    return plan


class PlanSampler(optuna.samplers.BaseSampler):
    """Gives trial k the plan's k-th parameters, whichever worker runs it.

    Not ``enqueue_trial``: a queue of 50 WAITING trials makes Optuna's cached SQLite storage read every
    one of them back at each ``ask``, a cost no real study has.
    """

    def __init__(self, plan: list[dict[str, Any]]) -> None:
        self.plan = plan

    def infer_relative_search_space(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
        return {}

    def sample_relative(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial, search_space: dict[str, Any]
    ) -> dict[str, Any]:
        return {}

    def sample_independent(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial, name: str, distribution: Any
    ) -> Any:
        return self.plan[trial.number][name]


def _new_study(run: RunConfig, storage: optuna.storages.BaseStorage, plan: list[dict[str, Any]]) -> optuna.Study:
    return optuna.create_study(
        storage=storage,
        sampler=PlanSampler(plan),
        pruner=make_pruner(run.pruner),
        direction=optuna.study.StudyDirection[run.study.direction.upper()],
    )


def _cpu_seconds(pids: list[int]) -> float:
    """CPU time of this process plus the live worker processes ``pids`` (utime + stime from /proc)."""
    total = time.process_time()
    ticks = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def _result(dataset: str, variant: str, rnd: int, seed: int, wall: float, cpu: float, study: optuna.Study) -> Result:
    trials = study.get_trials(deepcopy=False)
    states: dict[str, int] = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    complete = [t.value for t in trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    return Result(
        dataset,
        variant,
        rnd,
        seed,
        len(trials),
        wall,
        cpu,
        states,
        max(complete) if complete else None,
        [dict(t.params) for t in trials],
        [t.value if t.state == optuna.trial.TrialState.COMPLETE else None for t in trials],
        [_seconds(t) for t in trials],
        [len(t.intermediate_values) for t in trials],
    )


def _seconds(trial: optuna.trial.FrozenTrial) -> float:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return 0.0
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def trials_per_round(dataset: str, args: argparse.Namespace) -> int:
    return int(args.trials) if args.trials is not None else FULL_TRIALS[dataset]


def bench_dataset(dataset: str, args: argparse.Namespace, workdir: Path) -> list[Result]:
    overrides = [
        *DATA_OVERRIDES[dataset],
        f"space={SPACE}",
        "sampler=random",
        "pruner=median",
        "trainer.device=cpu",
        f"trainer.threads={args.threads}",
        f"study.output_dir={workdir / dataset}",
        f"study.storage=sqlite:///{workdir / dataset}.db",
    ]
    if args.epochs is not None:
        overrides.append(f"trainer.epochs={args.epochs}")
    run, params = prepare(compose_raw(overrides))
    cpu = torch.device("cpu")
    memory_objective = Objective(run, params, best_model_path=workdir / dataset / "memory" / "best_model.pt")
    sqlite_objective = Objective(run, params, best_model_path=workdir / dataset / "sqlite" / "best_model.pt")
    # Load the data before any clock starts; both sides train on these same CPU tensors.
    splits = memory_objective.splits(run.trial.data, cpu)
    sqlite_objective.splits(run.trial.data, cpu)
    reference = ReferenceObjective(run, params, splits, kind=args.reference)
    print(
        f"{dataset}: {len(splits.y_train)} train / {len(splits.y_val)} val samples, input {splits.input_shape}, "
        f"{run.trial.trainer.epochs} epochs, {trials_per_round(dataset, args)} trials x {args.rounds} rounds",
        flush=True,
    )

    workers = resolve_workers(run.trial.trainer.workers, args.threads, cpu)
    # One worker process per worker thread, kept across rounds (started during the warm-up, as a study's are
    # before its first trial); each trains with --threads torch threads.
    trainers = [ProcessTrainer(args.threads) for _ in range(workers)] if workers > 1 else []
    tuner_objectives = {  # one worker trains in this process, as tuner.tune does
        "memory": [memory_objective.for_worker(t) for t in trainers] or [memory_objective],
        "sqlite": [sqlite_objective.for_worker(t) for t in trainers] or [sqlite_objective],
    }
    print(f"  tuner: {workers} worker process(es) x {args.threads} torch thread(s)", flush=True)

    def one(variant: str, rnd: int, seed: int, trials: int) -> Result:
        plan = sample_plan(run, params, seed, trials)
        storage: optuna.storages.BaseStorage = optuna.storages.InMemoryStorage()
        lock = threading.Lock()
        budget = Budget(trials, lambda: lock)  # parallel workers stop at exactly the round's trials
        if variant == "sqlite":
            db = workdir / f"{dataset}-{rnd}-{seed}.db"
            db.unlink(missing_ok=True)
            storage = make_storage(f"sqlite:///{db}")
            budget = Budget(trials, lambda: study_lock(f"sqlite:///{db}", study.study_name))
        study = _new_study(run, storage, plan)
        if variant in REFERENCES:
            torch.set_num_threads(args.threads if variant == "reference" else args.default_threads)
            start, cpu_start = time.perf_counter(), _cpu_seconds([])
            study.optimize(reference, n_trials=trials)
            wall, cpu_s = time.perf_counter() - start, _cpu_seconds([]) - cpu_start
            torch.set_num_threads(args.threads)
        else:
            objectives = tuner_objectives[variant]
            studies = [
                optuna.load_study(
                    study_name=study.study_name,
                    storage=storage,
                    sampler=PlanSampler(plan),
                    pruner=make_pruner(run.pruner),
                )
                for _ in objectives
            ]
            pids = [t.pid for t in trainers if t.pid is not None]
            start, cpu_start = time.perf_counter(), _cpu_seconds(pids)
            # The budget ends it, as in tune(); heartbeats as python -m tuner sends them on SQLite.
            interval = run.study.heartbeat_interval if variant == "sqlite" else None
            run_workers(studies, objectives, storage=storage, budget=budget, heartbeat_interval=interval)
            wall = time.perf_counter() - start
            cpu_s = _cpu_seconds([t.pid for t in trainers if t.pid is not None]) - cpu_start
        return _result(dataset, variant, rnd, seed, wall, cpu_s, study)

    # Warm-up, untimed: first-call costs (torch._dynamo's import on the first optimizer, SQLite schema, allocator,
    # the worker processes' start and data) land on no variant.
    for variant in VARIANTS:
        one(variant, -1, args.seed + 10_000, 2 * workers)

    results: list[Result] = []
    try:
        for rnd in range(args.rounds):
            seed = args.seed + rnd  # a new sample of the space each round, the same one for every variant
            # Rotate the order each round, so no variant always runs right after the same other one.
            k = rnd % len(VARIANTS)
            for variant in VARIANTS[k:] + VARIANTS[:k]:
                r = one(variant, rnd, seed, trials_per_round(dataset, args))
                results.append(r)
                best = "-" if r.best_value is None else f"{r.best_value:.4f}"
                print(
                    f"  round {rnd} {variant:12s} {r.seconds:6.1f} s {r.per_minute:6.1f}/min  "
                    f"cpu {r.cpu_seconds:6.1f} s {r.per_cpu_minute:6.1f}/cpu-min  "
                    f"load {os.getloadavg()[0]:4.1f}  best {best}  {r.states}",
                    flush=True,
                )
    finally:
        for trainer in trainers:
            trainer.close()
    return results


# --- Summary ------------------------------------------------------------------------------------------------


def _rates(by: dict[str, list[Result]], rate: Callable[[Result], float]) -> dict[str, float]:
    """Medians over rounds; the ratios and the SQLite overhead are paired per round (same sampled trials).

    Per round the baseline is the faster reference (one torch thread, or torch's default).
    """
    ref = [max(pair, key=rate) for pair in zip(by["reference"], by["reference_mt"], strict=True)]
    mem, sql = by["memory"], by["sqlite"]
    return {
        "reference": statistics.median(rate(r) for r in by["reference"]),
        "reference_mt": statistics.median(rate(r) for r in by["reference_mt"]),
        "memory": statistics.median(rate(r) for r in mem),
        "sqlite": statistics.median(rate(r) for r in sql),
        "memory_over_reference": statistics.median(rate(m) / rate(r) for m, r in zip(mem, ref, strict=True)),
        "sqlite_over_reference": statistics.median(rate(s) / rate(r) for s, r in zip(sql, ref, strict=True)),
        "sqlite_overhead_pct": 100 * statistics.median(rate(m) / rate(s) - 1 for s, m in zip(sql, mem, strict=True)),
    }


def summarize(dataset: str, results: list[Result]) -> dict[str, Any]:
    by = {
        v: sorted((r for r in results if r.dataset == dataset and r.variant == v), key=lambda r: r.round)
        for v in VARIANTS
    }

    def best(rs: list[Result]) -> float | None:
        values = [r.best_value for r in rs if r.best_value is not None]
        return max(values) if values else None

    ref, mem = by["reference"], by["memory"]
    return {
        "dataset": dataset,
        "rounds": len(ref),
        "trials_per_round": ref[0].trials if ref else 0,
        "wall": _rates(by, lambda r: r.per_minute),
        "cpu": _rates(by, lambda r: r.per_cpu_minute),
        "best_value": {v: best(rs) for v, rs in by.items()},
        # Epochs trained per second, SQLite against memory, paired per round: what storage costs, apart from the
        # pruning races of two workers, which can end the same trials at other epochs on the two sides.
        "sqlite_overhead_per_epoch_pct": 100
        * statistics.median(
            (sum(m.epochs) / m.seconds) / (sum(s.epochs) / s.seconds) - 1
            for s, m in zip(by["sqlite"], by["memory"], strict=True)
        ),
        "epochs_per_round": {v: [sum(r.epochs) for r in by[v]] for v in ("memory", "sqlite")},
        # Per round, each variant's best on the same sampled trials: a fairer view than one maximum.
        "best_per_round": {v: [r.best_value for r in rs] for v, rs in by.items()},
        # The check that makes the accuracy columns comparable: every variant tried the same parameters.
        "same_sampled_params": all(
            all(r.params == rounds[0].params for r in rounds) for rounds in zip(*by.values(), strict=True)
        ),
        "states": {v: _sum_states(rs) for v, rs in by.items()},
        "paired": paired_accuracy(ref, mem),
        "by_cost": speedup_by_cost(ref, mem),
    }


def speedup_by_cost(ref: list[Result], mem: list[Result], groups: int = 4) -> list[float]:
    """reference/tuner time over the same trials, in quartiles of the reference's seconds per epoch.

    Cheap trials (small models) are bound by per-sample and per-op overhead, which tuner removes;
    costly ones by matrix work, which is the same on both sides in fp32 on one CPU core.
    """
    per_epoch = sorted(
        (r_s / max(epochs, 1), r_s, m_s)
        for a, b in zip(ref, mem, strict=True)
        for r_s, m_s, epochs in zip(a.durations, b.durations, a.epochs, strict=True)
    )
    size = max(len(per_epoch) // groups, 1)
    chunks = [per_epoch[i : i + size] for i in range(0, len(per_epoch), size)][:groups]
    return [sum(r for _, r, _ in c) / sum(m for _, _, m in c) for c in chunks if c]


def paired_accuracy(ref: list[Result], mem: list[Result]) -> dict[str, float | int]:
    """tuner minus reference, trial by trial, over the trials that completed on both sides.

    Both sides train one trial from the same parameters, initial weights and batch order, so a difference
    is the implementations' (fused kernels, summation order) as amplified by training; a best-of-n
    maximum alone cannot tell that apart from luck. "Equal" here: the mean is within two standard errors of 0.
    """
    diffs = [
        m - r
        for a, b in zip(ref, mem, strict=True)
        for r, m in zip(a.values, b.values, strict=True)
        if r is not None and m is not None
    ]
    n = len(diffs)
    mean = statistics.fmean(diffs) if diffs else 0.0
    se = statistics.stdev(diffs) / n**0.5 if n > 1 else 0.0
    return {
        "n": n,
        "mean": mean,
        "se": se,
        "better": sum(d > 0 for d in diffs),
        "same": sum(d == 0 for d in diffs),
        "worse": sum(d < 0 for d in diffs),
    }


def _sum_states(results: list[Result]) -> dict[str, int]:
    total: dict[str, int] = {}
    for r in results:
        for k, n in r.states.items():
            total[k] = total.get(k, 0) + n
    return total


def format_table(rows: list[dict[str, Any]], clock: str) -> str:
    unit = "/min" if clock == "wall" else "/cpu-min"
    head = (
        "data set",
        f"ref{unit}",
        f"ref_mt{unit}",
        f"mem{unit}",
        f"sqlite{unit}",
        "mem/ref",
        "sqlite/ref",
        "sqlite +%",
        "best ref",
        "best ref_mt",
        "best mem",
        "best sqlite",
    )

    def acc(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    body = []
    for row in rows:
        t, bv = row[clock], row["best_value"]
        body.append(
            (
                row["dataset"],
                f"{t['reference']:.1f}",
                f"{t['reference_mt']:.1f}",
                f"{t['memory']:.1f}",
                f"{t['sqlite']:.1f}",
                f"{t['memory_over_reference']:.2f}x",
                f"{t['sqlite_over_reference']:.2f}x",
                f"{t['sqlite_overhead_pct']:+.1f}",
                acc(bv["reference"]),
                acc(bv["reference_mt"]),
                acc(bv["memory"]),
                acc(bv["sqlite"]),
            )
        )
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)), " | ".join("-" * w for w in widths)]
    lines += [" | ".join(c.rjust(w) for c, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join("| " + line + " |" for line in lines)


def _load(load: tuple[float, ...]) -> str:
    return "/".join(f"{x:.1f}" for x in load)


def machine() -> dict[str, Any]:
    load = os.getloadavg()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "optuna": optuna.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "loadavg_at_end": load,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    quick = f"{QUICK['trials']} trials x {QUICK['rounds']} rounds, {QUICK['epochs']} epochs"
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {quick}")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument(
        "--trials",
        type=int,
        default=None,
        help="trials per variant per round (default: "
        + ", ".join(f"{d} {n}" for d, n in FULL_TRIALS.items())
        + f"; --quick {QUICK['trials']})",
    )
    parser.add_argument("--rounds", type=int, default=None, help=f"rounds per data set (default {FULL['rounds']})")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per trial (default: trainer.epochs in conf/)")
    # 1: on a loaded machine, torch threads of one small model wait for a descheduled peer (OpenMP), so more
    # threads per model are slower, not faster.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, the same for both sides")
    parser.add_argument(
        "--reference",
        choices=("example", "tensor"),
        default="example",
        help="example: per-sample decoding as the example's torchvision dataset (default); "
        "tensor: a TensorDataset over normalized tensors, a reference faster than the example",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampler seed of round 0; round r uses seed + r")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here as JSON")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    if args.trials is None and args.quick:
        args.trials = QUICK["trials"]
    args.rounds = args.rounds if args.rounds is not None else preset["rounds"]
    if args.epochs is None and args.quick:
        args.epochs = QUICK["epochs"]
    for name in ("trials", "rounds", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, but got {getattr(args, name)}.")
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be at least 1, but got {args.epochs}.")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    args.default_threads = torch.get_num_threads()  # torch's own choice: reference_mt runs with it
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    load_start = os.getloadavg()
    rows: list[dict[str, Any]] = []
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="tuner-bench-") as tmp:
        for dataset in args.datasets:
            found = bench_dataset(dataset, args, Path(tmp))
            results += found
            rows.append(summarize(dataset, found))
    info = machine()
    tables = {clock: format_table(rows, clock) for clock in ("wall", "cpu")}
    print(
        f"\nWall clock (trials per minute), medians of {args.rounds} rounds; mem/ref, sqlite/ref and sqlite +% are "
        "paired per round, against the round's faster reference:"
    )
    print(tables["wall"])
    print("\nCPU time of this process and tuner's worker processes (trials per CPU-minute, all cores summed):")
    print(tables["cpu"])
    print("\nSQLite over memory per epoch trained (median of rounds; epochs memory/SQLite per round, which pruning")
    print("races between two workers can make differ):")
    for row in rows:
        epochs = row["epochs_per_round"]
        pairs = " ".join(f"{m}/{q}" for m, q in zip(epochs["memory"], epochs["sqlite"], strict=True))
        print(f"  {row['dataset']:14s} {row['sqlite_overhead_per_epoch_pct']:+.1f}%  ({pairs})")
    print("\nbest val accuracy per round (" + " / ".join(VARIANTS) + "):")
    for row in rows:
        per = row["best_per_round"]
        cells = (
            "/".join("-" if v is None else f"{v:.4f}" for v in vals)
            for vals in zip(*(per[v] for v in VARIANTS), strict=True)
        )
        print(f"  {row['dataset']:14s} " + "  ".join(cells))
    print("\nval accuracy, tuner (memory) minus reference, per trial completed on both sides:")
    for row in rows:
        p = row["paired"]
        verdict = "equal" if abs(p["mean"]) <= 2 * p["se"] else ("better" if p["mean"] > 0 else "worse")
        print(
            f"  {row['dataset']:14s} {p['mean']:+.4f} +- {p['se']:.4f} (mean +- standard error, n={p['n']}): "
            f"{verdict}; tuner higher in {p['better']}, same in {p['same']}, lower in {p['worse']}"
        )
    print("\nreference (1 thread) / tuner (memory) seconds per trial on the same trials, each trial timed on its own")
    print("(tuner's workers train side by side), by quartile of the reference's seconds per epoch")
    print("(cheapest first: overhead-bound small models ... costliest: matrix-bound large models):")
    for row in rows:
        print(f"  {row['dataset']:14s} " + "  ".join(f"{x:.2f}x" for x in row["by_cost"]))
    same = all(row["same_sampled_params"] for row in rows)
    print(
        f"\nreference data path: {args.reference}; same sampled parameters on all sides: {same}; "
        f"threads={args.threads} (reference_mt: {args.default_threads}); "
        f"{time.perf_counter() - start:.0f} s in all; load average {_load(load_start)} at start, "
        f"{_load(info['loadavg_at_end'])} at end; {info['cpu_count']} CPUs"
    )
    if args.json is not None:
        payload = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": {**info, "loadavg_at_start": load_start},
            "summary": rows,
            "runs": [asdict(r) for r in results],
            "tables": tables,
        }
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
