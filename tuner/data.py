"""Data sets as ready tensors: train, validation and test splits, normalized, on one device.

``data._target_`` names a loader (``tuner.datasets``, or a user's) called with the data section's other keys, and
``seed=data.seed`` when it takes one. It returns ``x_train``, ``y_train`` (integer labels) and optionally ``x_test``,
``y_test`` as a mapping (which may name the ``classes``) or a tuple in that order. Every source gets the same checks
and the same splits: a test set (20% carved off when it has none), ``train_subset``, a validation split (each
stratified and seeded), and one mean/std from the training part only.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, NamedTuple

import numpy as np
import torch

from tuner.schema import ConfigError, DataConfig, locate

__all__ = ["Splits", "SplitsCache", "load_splits", "source_key"]

# Sources without a test set of their own give up this fraction of their samples to one.
TEST_FRACTION = 0.2
_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
_TENSORS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors with == has no single truth value
class Splits:
    """Normalized tensors for the three splits, shaped ``(N, *input_shape)``, labels as int64 indices."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    input_shape: tuple[int, ...]
    num_classes: int
    classes: tuple[str, ...]
    # Applied as x = (raw - mean) / std; image pixels are scaled to [0, 1] before that.
    mean: float
    std: float

    def arrays(self) -> tuple[torch.Tensor, ...]:
        """The six tensors, in a fixed order (``tuner.definition.data_content`` fingerprints them)."""
        return tuple(getattr(self, name) for name in _TENSORS)

    def to(self, device: torch.device | str) -> Splits:
        return replace(self, **{name: getattr(self, name).to(device) for name in _TENSORS})


class _Source(NamedTuple):
    """A data set as checked: float32 samples with their per-sample shape, int64 labels in 0..C-1."""

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    classes: tuple[str, ...]


def source_key(cfg: DataConfig) -> tuple[tuple[str, object], ...]:
    """The fields that decide what ``load_splits`` returns: all but ``batch_size``, for caching."""
    key = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "batch_size"}
    key["options"] = json.dumps(cfg.options, sort_keys=True, default=str)
    return tuple(key.items())


class SplitsCache:
    """Each data set loaded once per process and device, for every trial that trains on it."""

    def __init__(self) -> None:
        self._splits: dict[tuple[object, ...], Splits] = {}

    def get(self, cfg: DataConfig, device: torch.device) -> Splits:
        key = (source_key(cfg), str(device))
        if key not in self._splits:
            self._splits[key] = load_splits(cfg).to(device)
        return self._splits[key]


def load_splits(cfg: DataConfig) -> Splits:
    """Call ``data._target_``, check what it returned, and split and normalize it (on the CPU)."""
    try:
        loader = locate(cfg.target)
    except Exception as err:
        raise ConfigError(f"data._target_={cfg.target!r} cannot be imported ({err}).") from None
    takes_seed = "seed" in inspect.signature(loader).parameters
    try:
        loaded = loader(**cfg.options, **({"seed": cfg.seed} if takes_seed else {}))
    except ConfigError:
        raise
    except Exception as err:  # the user's loader failed: say which loader and why, in a line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"data._target_={cfg.target!r} failed to load: {type(err).__name__}: {reason}") from None
    return _split_and_normalize(_checked(loaded, cfg), cfg)


def _where(cfg: DataConfig) -> tuple[str, object]:
    """The key that names where a data set came from: its file when it has one, else its loader."""
    return ("data.path", cfg.options["path"]) if "path" in cfg.options else ("data._target_", cfg.target)


def _array(value: Any) -> np.ndarray:
    return np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)


def _checked(loaded: Any, cfg: DataConfig) -> _Source:
    """What a loader returned, checked and with its labels as 0..C-1 (sorted order of the labels it used)."""
    key, value = _where(cfg)

    def bad(what: str) -> ConfigError:
        return ConfigError(f"{key}={value!r}: {what}")

    if isinstance(loaded, Sequence) and not isinstance(loaded, str) and len(loaded) in (2, 4):
        loaded = dict(zip(_ARRAYS, loaded, strict=False))
    if not isinstance(loaded, Mapping):
        raise bad(
            f"the loader must return x_train and y_train (and optionally x_test, y_test) as a mapping or a tuple, "
            f"but returned {type(loaded).__name__}."
        )
    arrays = {k: _array(loaded[k]) for k in _ARRAYS if k in loaded}
    missing = [k for k in ("x_train", "y_train") if k not in arrays]
    if missing:
        raise bad(
            f"the data must hold arrays x_train and y_train, but {', '.join(missing)} is missing "
            f"(it holds {', '.join(sorted(loaded)) or 'nothing'})."
        )
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise bad("the data must hold both x_test and y_test or neither, but it holds only one of them.")
    for split in ["train", "test"] if "x_test" in arrays else ["train"]:
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim < 2 or not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
            raise bad(
                f"x_{split} must be a real-valued array shaped (N, ...), but has dtype {x.dtype} and shape {x.shape}."
            )
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise bad(
                f"y_{split} must be a 1-D array of integer labels, but has dtype {y.dtype} and shape "
                f"{y.shape} (convert float labels with y.astype(int))."
            )
        if len(x) != len(y):
            raise bad(f"x_{split} has {len(x)} samples but y_{split} has {len(y)}; they must match.")
        if not np.isfinite(x).all():
            raise bad(f"x_{split} must hold only finite numbers, but it has NaN or infinite values.")
    x, y = arrays["x_train"], arrays["y_train"]
    values = np.unique(y)
    if len(values) < 2:
        raise bad(f"y_train must hold at least two classes, but holds only {values.tolist()}.")
    names = loaded.get("classes")
    if names is not None and (values.min() < 0 or values.max() >= len(names)):
        raise bad(f"y_train must hold labels 0..{len(names) - 1} (one per class name), but holds {values.tolist()}.")
    x_test = y_test = None
    if "x_test" in arrays:
        x_test, raw_test = arrays["x_test"], arrays["y_test"]
        if x_test.shape[1:] != x.shape[1:]:
            raise bad(f"x_test samples are shaped {x_test.shape[1:]} but x_train samples {x.shape[1:]}.")
        unknown = np.setdiff1d(raw_test, values)
        if unknown.size:
            raise bad(f"y_test has labels that y_train lacks: {unknown[:10].tolist()}.")
        y_test = np.searchsorted(values, raw_test).astype(np.int64)
        x_test = x_test.astype(np.float32)
    return _Source(
        x=x.astype(np.float32),
        y=np.searchsorted(values, y).astype(np.int64),  # arbitrary integer labels -> 0..C-1, sorted order
        x_test=x_test,
        y_test=y_test,
        classes=tuple(str(v) if names is None else str(names[v]) for v in values.tolist()),
    )


def _split_and_normalize(source: _Source, cfg: DataConfig) -> Splits:
    x, y = source.x, source.y
    if source.x_test is None or source.y_test is None:
        # The set itself is too small or has a class with one sample: point at where the set came from.
        keep, test = _stratified(y, size=TEST_FRACTION, seed=cfg.seed, key=_where(cfg)[0], value=_where(cfg)[1])
        x_test, y_test = x[test], y[test]
        x, y = x[keep], y[keep]
    else:
        x_test, y_test = source.x_test, source.y_test
    if cfg.train_subset is not None:
        if cfg.train_subset > len(y):
            raise ConfigError(
                f"data.train_subset must be at most the {len(y)} training samples available in {cfg.name}, "
                f"but got {cfg.train_subset}."
            )
        if cfg.train_subset < len(y):
            kept, n = len(y) - cfg.train_subset, cfg.train_subset
            subset, _ = _stratified(y, size=kept, seed=cfg.seed, key="data.train_subset", value=n)
            x, y = x[subset], y[subset]
    train, val = _stratified(y, size=cfg.val_fraction, seed=cfg.seed, key="data.val_fraction", value=cfg.val_fraction)
    x_train, y_train, x_val, y_val = x[train], y[train], x[val], y[val]

    mean = float(x_train.mean(dtype=np.float64))
    std = float(x_train.std(dtype=np.float64))
    std = std if std > 0.0 else 1.0  # constant inputs: centre them, don't divide by zero

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray((a - np.float32(mean)) / np.float32(std), dtype=np.float32))

    return Splits(
        x_train=tensor(x_train),
        y_train=torch.from_numpy(y_train.astype(np.int64)),
        x_val=tensor(x_val),
        y_val=torch.from_numpy(y_val.astype(np.int64)),
        x_test=tensor(x_test),
        y_test=torch.from_numpy(y_test.astype(np.int64)),
        input_shape=tuple(int(d) for d in x_train.shape[1:]),
        num_classes=len(source.classes),
        classes=source.classes,
        mean=mean,
        std=std,
    )


def _stratified(y: np.ndarray, *, size: float, seed: int, key: str, value: object) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, stratified split of the indices of ``y`` into (kept, taken).

    ``size`` is what is taken: a fraction when a float, a number of samples when an int (as in sklearn).
    """
    from sklearn.model_selection import train_test_split  # ~1 s to import: only where a data set is split

    try:
        kept, taken = train_test_split(np.arange(len(y)), test_size=size, stratify=y, random_state=seed)
    except ValueError as error:  # too few samples for every class to appear on both sides
        raise ConfigError(
            f"{key} must leave at least one sample of each class on both sides of a stratified split of "
            f"{len(y)} samples, but got {value!r}: {error}"
        ) from None
    return np.asarray(kept), np.asarray(taken)
