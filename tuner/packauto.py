"""``trainer.pack=auto`` (the default): how many trials of each shape a device trains at once, from a short probe.

The probe trains a sampled shape on the device of its packs for a few dozen steps: alone as tuner.trainer does
(``K=1``), then stacked as a pack of 2, 4, 8 and 16 (tuner.pack), until the rate stops growing or memory runs out;
each rate is member-steps per second, the best of two timings. A pack pays only where it trains each member
``GAIN`` times faster than one alone: on this project's 2-core CPU, the whole default study was no faster at 1.84x
per member (docs/benchmarks.md, "Packs": the storage work and fewer pruned trials eat the rest).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import time
from typing import TYPE_CHECKING, Any

import torch

from tuner.data import Splits
from tuner.model import build_model
from tuner.optim import build_optimizer
from tuner.pack import Member, Pack
from tuner.schema import TrialConfig
from tuner.trainer import TrainingDiverged, TrainJob, release_memory, train_epoch

if TYPE_CHECKING:
    import optuna

__all__ = [
    "AUTO_ATTR",
    "CANDIDATES",
    "GAIN",
    "MIN_SHAPES",
    "PROBE_SHARE",
    "SHAPE_TRIALS",
    "AutoPack",
    "choose",
    "probe",
    "shape_key",
]

AUTO_ATTR = "pack_auto"  # on the study: the probe's rates and the size it chose
CANDIDATES = (2, 4, 8, 16)
_ACCELERATOR = (*CANDIDATES, 32, 64)  # a GPU's step is launch-bound far longer
GAIN = 2.0
MIN_SHAPES = 6  # a study of n trials packs at most n / (SHAPE_TRIALS x this) trials at once: it tries that many shapes
SHAPE_TRIALS = 2  # a pack takes this many times its size of trials (its freed places refilled), then a new shape
PROBE_SHARE = 0.05  # of a slot's time, at most, spent probing new shapes: the probe must not slow the study
_STEPS, _REPEATS, _MIN_TIME = 4, 2, 0.02
_SLOW = 0.4  # seconds of probing after which no larger pack is tried (the probe's cost)

log = logging.getLogger("tuner")


def _timed(run: Any) -> float:
    """Seconds per ``run()``, over as many runs as fill ``_MIN_TIME``: one short run is mostly the clock's noise."""
    runs, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < _MIN_TIME:
        run()
        runs += 1
    return elapsed / runs


def _pack_epoch(
    k: int, cfg: TrialConfig, splits: Splits, device: torch.device, x: torch.Tensor, y: torch.Tensor
) -> Any:
    pack = Pack(splits.input_shape, splits.num_classes, device)
    pack.change(join=[Member(key=i, cfg=cfg, seed=0) for i in range(k)])  # one seed: the model is built once
    few = splits.x_val[:2], splits.y_val[:2]  # the pack's epoch ends in an evaluation: keep it negligible
    return lambda: pack.train_epoch(x, y, *few, batch_size=cfg.data.batch_size, bf16=cfg.trainer.bf16)


def probe(cfg: TrialConfig, splits: Splits, device: torch.device, most: int | None = None) -> dict[int, float]:
    """Member-steps per second by pack size (up to ``most``) on ``device``, for ``cfg``'s model and batch size: each
    the best of ``_REPEATS`` timings taken in turns across the sizes, so that a passing load slows them alike."""
    # A sampled learning rate may diverge, and the step costs the same at any: the probe trains at a small one.
    cfg = dataclasses.replace(cfg, optimizer=dataclasses.replace(cfg.optimizer, lr=1e-4))
    batch = cfg.data.batch_size
    n = min(len(splits.x_train), batch * _STEPS)
    x, y = splits.x_train[:n], splits.y_train[:n]
    steps = sum(1 for s in range(0, n, batch) if n - s >= 2)
    torch.manual_seed(0)
    model = build_model(cfg.model, splits.input_shape, splits.num_classes).to(device)
    optimizer, _ = build_optimizer(model.parameters(), cfg.optimizer, device=device)
    generator = torch.Generator().manual_seed(0)
    runs: dict[int, Any] = {
        1: lambda: train_epoch(
            model, optimizer, x, y, epoch=1, batch_size=batch, generator=generator, bf16=cfg.trainer.bf16
        )
    }
    best: dict[int, float] = {}
    start = time.perf_counter()
    sizes = [k for k in (CANDIDATES if device.type == "cpu" else _ACCELERATOR) if most is None or k <= most]
    try:
        for k in (1, *sizes):  # the first round: warm each size up, stop past the peak or the time allowed
            try:
                runs[k] = runs.get(k) or _pack_epoch(k, cfg, splits, device, x, y)
                runs[k]()  # allocates and warms the kernels: not timed
            except torch.OutOfMemoryError:
                runs.pop(k)
                release_memory()
                break  # bounded by the device's memory
            best[k] = _timed(runs[k])
            rates = {j: j * steps / t for j, t in best.items()}
            # Past the peak (after K=2, whose single timing is too noisy to stop on), or the time allowed.
            if (k > 2 and rates[k] < rates[k // 2]) or time.perf_counter() - start > _SLOW:
                break
        for _ in range(_REPEATS - 1):
            for k in best:
                best[k] = min(best[k], _timed(runs[k]))
    except TrainingDiverged:  # the composed config's own settings diverge: no rate to compare packs with
        return {1: 0.0}
    return {k: k * steps / t for k, t in best.items()}


def choose(rates: dict[int, float], most: int | None = None) -> int:
    """1 unless some pack of at most ``most`` trains each member ``GAIN`` times faster; then the smallest within 10%
    of the best."""
    rates = {k: r for k, r in rates.items() if most is None or k <= most}
    best = max(rates, key=lambda k: rates[k])
    if rates[1] <= 0 or rates[best] < GAIN * rates[1]:
        return 1
    return min(k for k, rate in rates.items() if rate >= 0.9 * rates[best])


def shape_key(job: TrainJob) -> str:
    """What a pack's members share, as the study's record names it."""
    cfg = job.cfg
    shape = {"device": torch.device(job.device).type, "model": {"_target_": cfg.model.target, **cfg.model.options},
             "batch_size": cfg.data.batch_size, "bf16": cfg.trainer.bf16}  # fmt: skip
    return json.dumps(shape, sort_keys=True)


def _distance(a: dict[str, Any], b: dict[str, Any]) -> float:
    """How far apart two shapes are: the log ratio of each size (width, depth), if nothing else differs."""
    model_a, model_b = a["model"], b["model"]
    same = a.keys() == b.keys() and all(a[k] == b[k] for k in a if k != "model")
    if not same or model_a.keys() != model_b.keys():
        return math.inf
    total = 0.0
    for key, value in model_a.items():
        other = model_b[key]
        if isinstance(value, int | float) and isinstance(other, int | float) and value > 0 and other > 0:
            total += abs(math.log(value / other))
        elif value != other:
            return math.inf
    return total


class AutoPack:
    """``trainer.pack=auto`` for one study in this process: each shape's pack size, from a probe of that shape on
    the device (``probe``, run where its packs train), stored on the study as ``pack_auto`` so that a resumed
    study packs as it began. A slot probes while its probes took at most ``PROBE_SHARE`` of its time; past that a
    shape takes the choice of the nearest shape probed (the same model, batch size and device), else 1. Packs of a
    study of ``n_trials`` hold at most ``most`` members, so that it still tries ``MIN_SHAPES`` shapes."""

    def __init__(self, study: optuna.Study, n_trials: int | None = None) -> None:
        self.study = study
        # Packs share their shape: K <= n / (SHAPE_TRIALS x MIN_SHAPES), so that the study still tries that many.
        self.most = None if n_trials is None else max(1, n_trials // (SHAPE_TRIALS * MIN_SHAPES))
        stored = study.user_attrs.get(AUTO_ATTR)
        self.records: dict[str, dict[str, Any]] = {  # by shape (an older tuner kept one record for the study)
            k: v
            for k, v in (stored if isinstance(stored, dict) else {}).items()
            if k.startswith("{") and isinstance(v, dict)
        }
        self._lock = threading.Lock()  # the slots' threads share the records

    def known(self, job: TrainJob) -> int | None:
        return self._chosen(shape_key(job))

    def _chosen(self, key: str) -> int | None:
        """The size for a recorded shape, from its rates (a resumed study may have another ``study.n_trials``)."""
        record = self.records.get(key)
        if not isinstance(record, dict) or not isinstance(record.get("member_steps_per_s"), dict):
            return None
        return choose({int(k): float(r) for k, r in record["member_steps_per_s"].items()}, self.most)

    def nearest(self, job: TrainJob) -> int:
        shape = json.loads(shape_key(job))
        distances = {key: _distance(shape, json.loads(key)) for key in list(self.records)}
        close = [key for key, d in distances.items() if math.isfinite(d) and self._chosen(key) is not None]
        if not close:
            return 1
        return self._chosen(min(close, key=lambda k: (distances[k], self._chosen(k) or 1))) or 1

    def record(self, job: TrainJob, rates: dict[int, float]) -> int:
        chosen = choose(rates, self.most)
        with self._lock:
            self.records[shape_key(job)] = {
                "member_steps_per_s": {str(k): round(r, 1) for k, r in rates.items()},
                "chosen": chosen,
            }
            self.study.set_user_attr(AUTO_ATTR, dict(self.records))
        shown = ", ".join(f"K={k} {r / rates[1]:.2f}x" for k, r in rates.items()) if rates.get(1) else "diverged"
        log.info("trainer.pack=auto: %d for %s (against one alone: %s)", chosen, shape_key(job), shown)
        return chosen
