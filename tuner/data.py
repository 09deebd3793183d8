"""Datasets as ready tensors: train, validation and test splits, normalized, on one device.

Every source ends in the same pipeline (``_split_and_normalize``): the official test set (or a seeded,
stratified 20% carved off when there is none), an optional stratified ``train_subset``, a stratified
validation split, and one global mean/std computed on the training part only.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from tuner.config import ConfigError, DataConfig

__all__ = [
    "CHECKSUMS",
    "MIRRORS",
    "SYSTEM_DIRS",
    "Splits",
    "SplitsCache",
    "download_folder",
    "load_splits",
    "source_key",
]

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# Where downloads come from; a module-level dict so a mirror (or a test server) can replace it.
MIRRORS: dict[str, str] = {
    "fashion_mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
}
# MD5 of each downloaded .gz file as the mirrors serve it. Debian's dataset-fashion-mnist recompresses the
# files (different .gz bytes, identical content), so files found on disk are not checked against these.
CHECKSUMS: dict[str, dict[str, str]] = {
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
}
# Folders that system packages install the files into, searched after data.root.
SYSTEM_DIRS: dict[str, tuple[str, ...]] = {
    "fashion_mnist": ("/usr/share/datasets/fashion-mnist",),  # apt-get install dataset-fashion-mnist
    "mnist": (),
}
_TITLES = {"fashion_mnist": "Fashion-MNIST", "mnist": "MNIST"}
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DIGIT_CLASSES = tuple(str(d) for d in range(10))
# Sources without an official test set give up this fraction of their samples to one.
TEST_FRACTION = 0.2
_DOWNLOAD_TIMEOUT_S = 30.0
_CHUNK = 1 << 16


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
        return (self.x_train, self.y_train, self.x_val, self.y_val, self.x_test, self.y_test)

    def to(self, device: torch.device | str) -> Splits:
        """Return a copy with every tensor on ``device``."""
        return replace(
            self,
            x_train=self.x_train.to(device),
            y_train=self.y_train.to(device),
            x_val=self.x_val.to(device),
            y_val=self.y_val.to(device),
            x_test=self.x_test.to(device),
            y_test=self.y_test.to(device),
        )


class _Source(NamedTuple):
    """A dataset as read: float32 samples with their per-sample shape, int64 labels in 0..C-1."""

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    classes: tuple[str, ...]


def source_key(cfg: DataConfig) -> tuple[tuple[str, object], ...]:
    """The fields that decide what ``load_splits`` returns: all but ``batch_size``, for caching."""
    return tuple((f.name, getattr(cfg, f.name)) for f in fields(cfg) if f.name != "batch_size")


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
    """Read or generate the data set named by ``cfg.name`` and split and normalize it (on the CPU)."""
    if cfg.name not in _LOADERS:
        raise ConfigError(f"data.name must be one of {', '.join(_LOADERS)}, but got {cfg.name!r}.")
    return _split_and_normalize(_LOADERS[cfg.name](cfg), cfg)


def _split_and_normalize(source: _Source, cfg: DataConfig) -> Splits:
    x, y = source.x, source.y
    if source.x_test is None or source.y_test is None:
        # The set itself is too small or has a class with one sample: point at where the set came from.
        key, value = ("data.path", cfg.path) if cfg.name == "npz" else ("data.name", cfg.name)
        keep, test = _stratified(y, size=TEST_FRACTION, seed=cfg.seed, key=key, value=value)
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
            subset, _ = _stratified(
                y,
                size=len(y) - cfg.train_subset,
                seed=cfg.seed,
                key="data.train_subset",
                value=cfg.train_subset,
            )
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
    try:
        kept, taken = train_test_split(np.arange(len(y)), test_size=size, stratify=y, random_state=seed)
    except ValueError as error:  # too few samples for every class to appear on both sides
        raise ConfigError(
            f"{key} must leave at least one sample of each class on both sides of a stratified split of "
            f"{len(y)} samples, but got {value!r}: {error}"
        ) from None
    return np.asarray(kept), np.asarray(taken)


# --- IDX files: Fashion-MNIST and MNIST --------------------------------------------------------------------


def _load_idx_set(cfg: DataConfig) -> _Source:
    folder = _find_or_download(cfg)
    arrays = {name: _read_idx(_existing(folder, name)) for name in IDX_FILES}
    x, y, x_test, y_test = (arrays[name] for name in IDX_FILES)
    for images, labels, stem in ((x, y, "train"), (x_test, y_test, "t10k")):
        path = folder / f"{stem}-images-idx3-ubyte"
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ConfigError(
                f"data.root must hold matching IDX image and label files, but {path}[.gz] has shape "
                f"{images.shape} and its labels file has shape {labels.shape}."
            )
        if labels.size and labels.max() >= 10:
            raise ConfigError(f"data.root must hold labels 0..9, but {folder} has label {labels.max()}.")
    classes = FASHION_CLASSES if cfg.name == "fashion_mnist" else DIGIT_CLASSES
    return _Source(
        x=_pixels(x),
        y=y.astype(np.int64),
        x_test=_pixels(x_test),
        y_test=y_test.astype(np.int64),
        classes=classes,
    )


def _pixels(images: np.ndarray) -> np.ndarray:
    """uint8 images (N, H, W) as float32 in [0, 1] with one channel: (N, 1, H, W)."""
    return (images.astype(np.float32) / np.float32(255.0))[:, None]


def _existing(folder: Path, name: str) -> Path:
    """The raw file if present, else its .gz."""
    raw = folder / name
    return raw if raw.is_file() else folder / f"{name}.gz"


def _missing(folder: Path) -> list[str]:
    return [n for n in IDX_FILES if not (folder / n).is_file() and not (folder / f"{n}.gz").is_file()]


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file of unsigned bytes (raw or gzip), checking its magic number and size."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError) as error:
        raise ConfigError(f"{path} is not a readable IDX file ({error}); delete it and get it again.") from None
    expected_ndim = 3 if "images" in path.name else 1
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or data[3] != expected_ndim:
        raise ConfigError(
            f"{path} is not an IDX file of unsigned bytes with {expected_ndim} dimension(s): its magic "
            f"number is {data[:4].hex() or 'missing'}, expected 0000080{expected_ndim}. Delete it and get it "
            f"again."
        )
    header = 4 + 4 * expected_ndim
    shape = (
        tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=expected_ndim, offset=4))
        if (len(data) >= header)
        else ()
    )
    if not shape or len(data) - header != int(np.prod(shape)):
        raise ConfigError(
            f"{path} is truncated or corrupt: its header says shape {shape} but it holds "
            f"{len(data) - header} bytes of data. Delete it and get it again."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _folders(cfg: DataConfig) -> tuple[Path, list[Path]]:
    """Where a download goes (data.root, else the user cache) and the folders searched, in order."""
    default = Path("~/.cache/tuner").expanduser() / cfg.name
    target = Path(cfg.root).expanduser() if cfg.root is not None else default
    searched = [target] if cfg.root is not None else []
    searched += [Path(d) for d in SYSTEM_DIRS.get(cfg.name, ())]
    if cfg.root is None:
        searched.append(default)  # where an earlier run with data.root=null downloaded them
    return target, searched


def download_folder(cfg: DataConfig) -> Path | None:
    """The folder a run would download ``cfg``'s files into, or ``None`` when it downloads nothing."""
    if cfg.name not in MIRRORS or not cfg.download:
        return None
    target, searched = _folders(cfg)
    return None if any(not _missing(folder) for folder in searched) else target


def _find_or_download(cfg: DataConfig) -> Path:
    """The first folder holding all four IDX files, downloading them into data.root when allowed."""
    target, searched = _folders(cfg)
    for folder in searched:
        if not _missing(folder):
            return folder
    problem = "data.download is false, so nothing was downloaded."
    if cfg.download:
        made = _created_by(target)
        try:
            _download(cfg.name, target, _missing(target))
            return target
        except OSError as error:  # offline, refused, DNS failure, HTTP error, unwritable folder
            problem = f"Downloading from {MIRRORS[cfg.name]} into {target} failed: {error}."
        finally:
            if _missing(target):
                _remove_empty(made)
    title = _TITLES[cfg.name]
    how = "apt-get install dataset-fashion-mnist, or " if cfg.name == "fashion_mnist" else ""
    raise ConfigError(
        f"data.root must be a folder holding the {title} files {', '.join(IDX_FILES)} (each raw or .gz), "
        f"but got {cfg.root!r} and none of the folders looked in has all four: "
        f"{', '.join(str(p) for p in searched)}. {problem} To get them: {how}run once with network access "
        f"and data.download=true, or put the four files in data.root."
    )


def _created_by(target: Path) -> list[Path]:
    """The folders that making ``target`` would create, deepest first."""
    made: list[Path] = []
    folder = target.absolute()
    while not folder.exists() and folder != folder.parent:
        made.append(folder)
        folder = folder.parent
    return made


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed download created, deepest first, as long as they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (a file that did arrive), or never made
            return


def _download(name: str, target: Path, files: list[str]) -> None:
    """Fetch each missing ``<file>.gz`` into ``target``, renamed into place only once its MD5 matches."""
    from tqdm import tqdm

    target.mkdir(parents=True, exist_ok=True)
    for file in files:
        gz = f"{file}.gz"
        url = MIRRORS[name] + gz
        fd, part = tempfile.mkstemp(dir=target, prefix=f".{gz}.", suffix=".part")
        try:
            md5 = hashlib.md5()
            with (
                os.fdopen(fd, "wb") as out,
                urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response,
            ):
                total = int(response.headers.get("Content-Length", 0)) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=gz) as progress:
                    while chunk := response.read(_CHUNK):
                        out.write(chunk)
                        md5.update(chunk)
                        progress.update(len(chunk))
            expected = CHECKSUMS[name][gz]
            if md5.hexdigest() != expected:
                raise ConfigError(
                    f"data.root={str(target)!r}: the file downloaded from {url} has MD5 "
                    f"{md5.hexdigest()}, not {expected}, so it was deleted. Retry, or put the four "
                    f"{_TITLES[name]} files in data.root."
                )
            os.replace(part, target / gz)
        finally:
            if os.path.exists(part):
                os.unlink(part)


# --- Other sources ---------------------------------------------------------------------------------------


def _load_digits(cfg: DataConfig) -> _Source:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (np.asarray(digits.images, dtype=np.float32) / np.float32(16.0))[:, None]  # pixels are 0..16
    return _Source(x=x, y=np.asarray(digits.target, dtype=np.int64), x_test=None, y_test=None, classes=DIGIT_CLASSES)


def _load_mnist1d(cfg: DataConfig) -> _Source:
    # Never call mnist1d's get_dataset: it downloads a pickle. make_dataset generates the same kind of data.
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = cfg.num_samples
    args.seed = cfg.seed
    # make_dataset reseeds Python's and NumPy's global generators; put them back so loading data does
    # not change what the caller's own randomness produces.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)

    def signals(a: np.ndarray) -> np.ndarray:
        return np.asarray(a, dtype=np.float32)[:, None]  # one channel: (N, 1, 40)

    return _Source(
        x=signals(data["x"]),
        y=np.asarray(data["y"], dtype=np.int64),
        x_test=signals(data["x_test"]),
        y_test=np.asarray(data["y_test"], dtype=np.int64),
        classes=DIGIT_CLASSES,
    )


def _load_npz(cfg: DataConfig) -> _Source:
    if cfg.path is None:
        raise ConfigError("data.path must be the path of an .npz file when data.name is npz, but got None.")
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise ConfigError(f"data.path must be an existing .npz file, but got {cfg.path!r}.")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # an .npz is a zip archive; NumPy calls anything else "pickled data"
        raise ConfigError(
            f"data.path must be an .npz file (a zip archive that numpy.savez writes), but {cfg.path!r} is not one."
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: np.asarray(archive[key]) for key in archive.files}
    except (OSError, ValueError, EOFError) as error:
        raise ConfigError(f"data.path must be a readable .npz file, but {cfg.path!r} is not: {error}") from None

    def bad(what: str) -> ConfigError:
        return ConfigError(f"data.path={cfg.path!r}: {what}")

    missing = [k for k in ("x_train", "y_train") if k not in arrays]
    if missing:
        raise bad(
            f"the file must hold arrays x_train and y_train, but {', '.join(missing)} is missing "
            f"(it holds {', '.join(sorted(arrays)) or 'nothing'})."
        )
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise bad("the file must hold both x_test and y_test or neither, but it holds only one of them.")
    splits = ["train", "test"] if "x_test" in arrays else ["train"]
    for split in splits:
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
        classes=tuple(str(v) for v in values.tolist()),
    )


_LOADERS: dict[str, Callable[[DataConfig], _Source]] = {
    "fashion_mnist": _load_idx_set,
    "mnist": _load_idx_set,
    "digits": _load_digits,
    "mnist1d": _load_mnist1d,
    "npz": _load_npz,
}
