"""tuner's built-in data sets, for ``data._target_``: Fashion-MNIST and MNIST from IDX files (found on disk or
downloaded, MD5-checked), scikit-learn's digits, generated MNIST-1D and a user's ``.npz`` file. Each returns the
arrays as read; ``tuner.data.load_splits`` checks, splits and normalizes them.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import random
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from tuner.schema import ConfigError, DataConfig

__all__ = ["digits", "download_folder", "fashion_mnist", "mnist", "mnist1d", "npz"]

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
MNIST1D_CACHE = "~/.cache/tuner/mnist1d"  # generated MNIST-1D sets (tuner.datasets.mnist1d)
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
_DOWNLOAD_TIMEOUT_S = 30.0
_CHUNK = 1 << 16


def fashion_mnist(root: str | None = "~/.cache/tuner/fashion_mnist", download: bool = True) -> dict[str, Any]:
    """Fashion-MNIST's official 60k/10k split, from ``root``, Debian's package folder, or downloaded into root."""
    return _load_idx_set("fashion_mnist", root, download)


def mnist(root: str | None = "~/.cache/tuner/mnist", download: bool = True) -> dict[str, Any]:
    """MNIST's official 60k/10k split, from ``root`` or downloaded into it."""
    return _load_idx_set("mnist", root, download)


def download_folder(cfg: DataConfig) -> Path | None:
    """The folder a run would download ``cfg``'s files into, or ``None`` when it downloads nothing."""
    loader = {f"tuner.datasets.{name}": name for name in MIRRORS}.get(cfg.target)
    if loader is None or not cfg.options.get("download", True):
        return None
    target, searched = _folders(loader, cfg.options.get("root", f"~/.cache/tuner/{loader}"))
    return None if any(not _missing(folder) for folder in searched) else target


def _load_idx_set(name: str, root: str | None, download: bool) -> dict[str, Any]:
    folder = _find_or_download(name, root, download)
    # Each file raw if present, else its .gz; counts and labels: tuner.data checks them
    x, y, x_test, y_test = (_read_idx(folder / f if (folder / f).is_file() else folder / f"{f}.gz") for f in IDX_FILES)
    classes = FASHION_CLASSES if name == "fashion_mnist" else DIGIT_CLASSES
    return {"x_train": _pixels(x), "y_train": y, "x_test": _pixels(x_test), "y_test": y_test, "classes": classes}


def _pixels(images: np.ndarray) -> np.ndarray:
    """uint8 images (N, H, W) as float32 in [0, 1] with one channel: (N, 1, H, W)."""
    return (images.astype(np.float32) / np.float32(255.0))[:, None]


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
    dims = np.frombuffer(data, dtype=">u4", count=expected_ndim, offset=4) if len(data) >= header else ()
    shape = tuple(int(d) for d in dims)
    if not shape or len(data) - header != int(np.prod(shape)):
        raise ConfigError(
            f"{path} is truncated or corrupt: its header says shape {shape} but it holds "
            f"{len(data) - header} bytes of data. Delete it and get it again."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _folders(name: str, root: str | None) -> tuple[Path, list[Path]]:
    """Where a download goes (data.root, else the user cache) and the folders searched, in order."""
    default = Path("~/.cache/tuner").expanduser() / name
    target = Path(root).expanduser() if root is not None else default
    searched = [target] if root is not None else []
    searched += [Path(d) for d in SYSTEM_DIRS.get(name, ())]
    if root is None:
        searched.append(default)  # where an earlier run with data.root=null downloaded them
    return target, searched


def _find_or_download(name: str, root: str | None, download: bool) -> Path:
    """The first folder holding all four IDX files, downloading them into data.root when allowed."""
    target, searched = _folders(name, root)
    for folder in searched:
        if not _missing(folder):
            return folder
    problem = "data.download is false, so nothing was downloaded."
    if download:
        # The folders that making target creates, deepest first: a failed download removes them while empty.
        made = [p for p in (target.absolute(), *target.absolute().parents) if not p.exists()]
        try:
            _download(name, target, _missing(target))
            return target
        except OSError as error:  # offline, refused, DNS failure, HTTP error, unwritable folder
            problem = f"Downloading from {MIRRORS[name]} into {target} failed: {error}."
        finally:
            if _missing(target):
                for folder in made:
                    try:
                        folder.rmdir()
                    except OSError:  # not empty (a file that did arrive), or never made
                        break
    title = _TITLES[name]
    how = "apt-get install dataset-fashion-mnist, or " if name == "fashion_mnist" else ""
    raise ConfigError(
        f"data.root must be a folder holding the {title} files {', '.join(IDX_FILES)} (each raw or .gz), "
        f"but got {root!r} and none of the folders looked in has all four: "
        f"{', '.join(str(p) for p in searched)}. {problem} To get them: {how}run once with network access "
        f"and data.download=true, or put the four files in data.root."
    )


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


def digits() -> dict[str, Any]:
    """scikit-learn's bundled 8x8 digits (1797 images, no test split of their own)."""
    from tuner._compat import sklearn_digits_table

    table_path = sklearn_digits_table()
    if table_path is not None:  # the table load_digits reads, read as it does
        table = np.loadtxt(table_path, delimiter=",", dtype=np.float32)
        images, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    else:
        from sklearn.datasets import load_digits

        loaded = load_digits()
        images, target = loaded.images, loaded.target
    x = (np.asarray(images, dtype=np.float32) / np.float32(16.0))[:, None]  # pixels are 0..16
    return {"x_train": x, "y_train": target, "classes": DIGIT_CLASSES}


def mnist1d(num_samples: int = 5000, seed: int = 0) -> dict[str, Any]:
    """MNIST-1D signals generated offline (``seed``: data.seed), with the generator's own 80/20 test split. Each
    (num_samples, seed, mnist1d version) is generated once and kept in ~/.cache/tuner/mnist1d: generating takes
    seconds, and the tuner process and every worker process load the set."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 10:
        raise ConfigError(f"data.num_samples must be an integer >= 10, but got {num_samples!r}.")
    from importlib.metadata import version

    from joblib import Memory  # scikit-learn's disk cache: it writes atomically, so processes can share it

    generator = version("mnist1d")
    try:
        cached = Memory(Path(MNIST1D_CACHE).expanduser(), verbose=0).cache(_mnist1d_signals)
    except (OSError, RuntimeError):  # no cache folder to be had (RuntimeError: no home folder): generate each time
        return _mnist1d_signals(num_samples, seed, generator)
    return cached(num_samples, seed, generator)


def _mnist1d_signals(num_samples: int, seed: int, generator: str) -> dict[str, Any]:
    """``generator`` (mnist1d's version) is part of the cache key only."""
    # Never call mnist1d's get_dataset: it downloads a pickle. make_dataset generates the same kind of data.
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
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

    return {
        "x_train": signals(data["x"]),
        "y_train": np.asarray(data["y"], dtype=np.int64),
        "x_test": signals(data["x_test"]),
        "y_test": np.asarray(data["y_test"], dtype=np.int64),
        "classes": DIGIT_CLASSES,
    }


def npz(path: str) -> dict[str, Any]:
    """A user's arrays: an ``.npz`` holding x_train and y_train, optionally x_test and y_test."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"data.path must be an existing .npz file, but got {path!r}.")
    with open(file, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # an .npz is a zip archive; NumPy calls anything else "pickled data"
        raise ConfigError(
            f"data.path must be an .npz file (a zip archive that numpy.savez writes), but {path!r} is not one."
        )
    try:
        with np.load(file, allow_pickle=False) as archive:
            return {key: np.asarray(archive[key]) for key in archive.files}
    except (OSError, ValueError, EOFError) as error:
        raise ConfigError(f"data.path must be a readable .npz file, but {path!r} is not: {error}") from None
