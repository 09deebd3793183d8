from __future__ import annotations

import gzip
import hashlib
import http.server
import os
import socket
import struct
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import torch
from sklearn.datasets import load_digits

from tests.conftest import compose_raw
from tuner import datasets as data
from tuner.config import parse_trial
from tuner.data import Splits, load_splits, source_key
from tuner.schema import ConfigError, DataConfig

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"
FASHION_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist


def _need_fashion_mnist() -> None:
    """Skip without Debian's dataset-fashion-mnist (the README's set-up does not install it); under CI, where
    .ci/run installs it, fail instead of hiding the test."""
    if Path(FASHION_SYSTEM_DIR).is_dir():
        return
    reason = f"{FASHION_SYSTEM_DIR} is missing: apt-get install dataset-fashion-mnist (.ci/run installs it)"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


_SHARED = {f.name for f in fields(DataConfig)}


def _cfg(name: str, **overrides: Any) -> DataConfig:
    """tuner's loader ``name`` as a data config names it: the shared settings, and the loader's own options."""
    options = {k: v for k, v in overrides.items() if k not in _SHARED}
    if name in ("fashion_mnist", "mnist"):
        options = {"root": None, "download": False, **options}
    shared = {k: v for k, v in overrides.items() if k in _SHARED}
    return DataConfig(target=f"tuner.datasets.{name}", options=options, name=name, **shared)


def _raw(splits: Splits, x: torch.Tensor) -> np.ndarray:
    """Undo the normalization."""
    return (x * splits.std + splits.mean).numpy()


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _small_idx_set(*, n_train: int = 100, n_test: int = 30, seed: int = 0) -> dict[str, np.ndarray]:
    """Four tiny arrays in the official layout: uint8 28x28 images, labels 0..9 balanced."""
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.permutation(np.arange(n_test) % 10).astype(np.uint8),
    }


def _write_idx_set(folder: Path, arrays: dict[str, np.ndarray], *, gz: tuple[str, ...]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        if name in gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(_idx(array)))
        else:
            (folder / name).write_bytes(_idx(array))


# --- digits: the split pipeline on a bundled, offline set ----------------------------------------------


def test_digits_splits_partition_the_data_with_configured_sizes() -> None:
    splits = load_splits(_cfg("digits", val_fraction=0.2))

    assert splits.input_shape == (1, 8, 8)
    assert splits.classes == tuple(str(d) for d in range(10))
    assert splits.num_classes == 10
    for x, y in (
        (splits.x_train, splits.y_train),
        (splits.x_val, splits.y_val),
        (splits.x_test, splits.y_test),
    ):
        assert x.dtype == torch.float32
        assert y.dtype == torch.int64
        assert x.shape[1:] == (1, 8, 8)
        assert len(x) == len(y)
    assert len(splits.x_test) == 360  # ceil(0.2 * 1797)
    assert len(splits.x_val) == 288  # ceil(0.2 * 1437)
    assert len(splits.x_train) == 1797 - 360 - 288
    # Every original image lands in exactly one split, with its own label.
    x_all = np.concatenate([_raw(splits, x) for x in (splits.x_train, splits.x_val, splits.x_test)])
    y_all = torch.cat([splits.y_train, splits.y_val, splits.y_test]).numpy()
    got = np.column_stack([np.rint(x_all.reshape(len(x_all), -1) * 16), y_all]).astype(int)
    digits = load_digits()
    want = np.column_stack([digits.data, digits.target]).astype(int)
    assert Counter(map(tuple, got.tolist())) == Counter(map(tuple, want.tolist()))


def test_digits_validation_split_is_stratified() -> None:
    splits = load_splits(_cfg("digits", val_fraction=0.2))

    train = np.bincount(splits.y_train.numpy(), minlength=10) / len(splits.y_train)
    val = np.bincount(splits.y_val.numpy(), minlength=10) / len(splits.y_val)
    test = np.bincount(splits.y_test.numpy(), minlength=10) / len(splits.y_test)
    assert np.abs(val - train).max() < 0.01
    assert np.abs(test - train).max() < 0.01


def test_digits_normalized_with_training_statistics_only() -> None:
    splits = load_splits(_cfg("digits"))

    assert abs(float(splits.x_train.mean())) < 1e-5
    assert abs(float(splits.x_train.std()) - 1.0) < 1e-3
    # Pixels were scaled to [0, 1] before normalizing, and val/test use the training mean and std.
    for x in (splits.x_train, splits.x_val, splits.x_test):
        raw = _raw(splits, x)
        assert raw.min() >= -1e-5
        assert raw.max() <= 1 + 1e-5


def test_digits_same_seed_same_splits_other_seed_other_splits() -> None:
    a = load_splits(_cfg("digits", seed=3))
    b = load_splits(_cfg("digits", seed=3))
    c = load_splits(_cfg("digits", seed=4))

    assert torch.equal(a.x_train, b.x_train)
    assert torch.equal(a.y_val, b.y_val)
    assert torch.equal(a.x_test, b.x_test)
    assert not torch.equal(a.x_val, c.x_val)
    assert not torch.equal(a.x_test, c.x_test)


def test_train_subset_is_stratified_and_keeps_the_test_split() -> None:
    full = load_splits(_cfg("digits"))
    sub = load_splits(_cfg("digits", train_subset=500))

    assert len(sub.x_train) + len(sub.x_val) == 500
    assert len(sub.x_val) == 50
    counts = np.bincount(torch.cat([sub.y_train, sub.y_val]).numpy(), minlength=10)
    assert counts.min() >= 48
    assert counts.max() <= 52
    assert np.allclose(_raw(sub, sub.x_test), _raw(full, full.x_test), atol=1e-5)


def test_train_subset_larger_than_available_names_the_key_and_count() -> None:
    with pytest.raises(ConfigError, match=r"data\.train_subset") as error:
        load_splits(_cfg("digits", train_subset=5000))
    assert "5000" in str(error.value)
    assert "1437" in str(error.value)


def test_validation_too_small_for_every_class_names_val_fraction() -> None:
    with pytest.raises(ConfigError, match=r"data\.val_fraction must leave at least one sample of each class"):
        load_splits(_cfg("digits", train_subset=30, val_fraction=0.1))  # 3 validation samples, 10 classes


def test_source_key_ignores_batch_size_only() -> None:
    cfg = _cfg("digits")

    assert source_key(cfg) == source_key(replace(cfg, batch_size=7))
    assert source_key(cfg) != source_key(replace(cfg, seed=1))
    assert {name for name, _ in source_key(cfg)} == {f.name for f in fields(DataConfig)} - {"batch_size"}


def test_splits_to_moves_every_tensor_and_keeps_the_original() -> None:
    splits = load_splits(_cfg("digits"))
    moved = splits.to("meta")

    tensors = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
    assert all(getattr(moved, t).device.type == "meta" for t in tensors)
    assert all(getattr(splits, t).device.type == "cpu" for t in tensors)
    assert moved.x_train.shape == splits.x_train.shape
    assert moved.classes == splits.classes


# --- mnist1d --------------------------------------------------------------------------------------------


def test_mnist1d_is_generated_offline_with_its_own_test_split(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(self: socket.socket, address: object) -> None:
        raise OSError(f"network used: {address}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    np.random.seed(123)
    expected_draw = np.random.rand()
    np.random.seed(123)

    splits = load_splits(_cfg("mnist1d", num_samples=1000, val_fraction=0.2, seed=5))

    assert np.random.rand() == expected_draw  # the caller's global NumPy stream is left as it was
    assert splits.input_shape == (1, 40)
    assert splits.num_classes == 10
    assert splits.classes[0] == "0"
    assert len(splits.x_test) == 200  # make_dataset's own 80/20 split
    assert len(splits.x_train) + len(splits.x_val) == 800
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = 1000, 5
    assert np.array_equal(splits.y_test.numpy(), make_dataset(args)["y_test"])


def test_mnist1d_is_generated_once_per_seed_and_version_then_read_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.metadata

    import mnist1d.data

    from tuner.datasets import mnist1d as load_mnist1d

    monkeypatch.setenv("HOME", str(tmp_path))  # the cache is ~/.cache/tuner/mnist1d
    first = load_mnist1d(num_samples=500, seed=3)
    assert list((tmp_path / ".cache" / "tuner" / "mnist1d").rglob("output.pkl"))

    def generated(*args: object) -> None:
        raise AssertionError("generated again")

    monkeypatch.setattr(mnist1d.data, "make_dataset", generated)
    again = load_mnist1d(num_samples=500, seed=3)  # read back: the generator is not called
    assert again["classes"] == first["classes"]
    for key in ("x_train", "y_train", "x_test", "y_test"):
        assert again[key].dtype == first[key].dtype and np.array_equal(again[key], first[key])
    with pytest.raises(AssertionError, match="generated again"):
        load_mnist1d(num_samples=500, seed=4)  # another seed is another set
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.9" if name == "mnist1d" else real_version(name))
    with pytest.raises(AssertionError, match="generated again"):
        load_mnist1d(num_samples=500, seed=3)  # another generator may make other signals


def test_mnist1d_without_a_cache_folder_is_generated_each_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tuner.datasets import mnist1d

    home = tmp_path / "home"
    home.write_text("a file, so no ~/.cache folder can be made under it")
    monkeypatch.setenv("HOME", str(home))
    for _ in range(2):
        assert mnist1d(num_samples=100, seed=1)["x_train"].shape == (80, 1, 40)


# --- IDX files: Fashion-MNIST and MNIST ------------------------------------------------------------------


@pytest.mark.slow
def test_fashion_mnist_loads_from_the_debian_package(tmp_path: Path) -> None:
    _need_fashion_mnist()
    splits = load_splits(_cfg("fashion_mnist", root=str(tmp_path / "empty"), train_subset=2000))

    assert splits.input_shape == (1, 28, 28)
    assert splits.num_classes == 10
    assert splits.classes[:2] == ("T-shirt/top", "Trouser")
    assert splits.classes[-1] == "Ankle boot"
    assert len(splits.x_test) == 10000
    assert len(splits.y_test) == 10000
    assert len(splits.x_train) + len(splits.x_val) == 2000
    assert np.bincount(splits.y_test.numpy()).tolist() == [1000] * 10
    assert 0.25 < splits.mean < 0.32  # Fashion-MNIST's pixel mean is about 0.286


def test_idx_files_in_root_load_raw_or_gzipped(tmp_path: Path) -> None:
    arrays = _small_idx_set()
    _write_idx_set(tmp_path, arrays, gz=("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))

    splits = load_splits(_cfg("mnist", root=str(tmp_path)))

    assert splits.classes == tuple(str(d) for d in range(10))
    assert len(splits.x_train) + len(splits.x_val) == 100
    assert np.array_equal(splits.y_test.numpy(), arrays["t10k-labels-idx1-ubyte"])
    expected = arrays["t10k-images-idx3-ubyte"][:, None] / 255.0
    assert np.allclose(_raw(splits, splits.x_test), expected, atol=1e-5)


def test_root_is_searched_before_the_system_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, system = tmp_path / "root", tmp_path / "system"
    _write_idx_set(root, _small_idx_set(n_test=20), gz=())
    _write_idx_set(system, _small_idx_set(n_test=30), gz=())
    monkeypatch.setitem(data.SYSTEM_DIRS, "fashion_mnist", (str(system),))

    assert len(load_splits(_cfg("fashion_mnist", root=str(root))).x_test) == 20
    # An empty root falls through to the system folder.
    assert len(load_splits(_cfg("fashion_mnist", root=str(tmp_path / "empty"))).x_test) == 30


def test_corrupt_idx_file_error_names_the_file(tmp_path: Path) -> None:
    _write_idx_set(tmp_path, _small_idx_set(), gz=("t10k-images-idx3-ubyte",))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x03garbage")
    with pytest.raises(ConfigError, match="train-labels-idx1-ubyte is not an IDX file"):
        load_splits(_cfg("mnist", root=str(tmp_path)))

    _write_idx_set(tmp_path, _small_idx_set(), gz=("t10k-images-idx3-ubyte",))
    gz = tmp_path / "t10k-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:200])  # cut short, as by an interrupted copy
    with pytest.raises(ConfigError, match=r"t10k-images-idx3-ubyte\.gz"):
        load_splits(_cfg("mnist", root=str(tmp_path)))


# --- Downloads, against a real HTTP server on the loopback interface -------------------------------------


class _Mirror:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.requests: list[str] = []
        mirror = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                mirror.requests.append(self.path)
                super().do_GET()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(folder)))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def md5s(self) -> dict[str, str]:
        return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in self.folder.glob("*.gz")}


@pytest.fixture
def mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[_Mirror]:
    """A mirror serving four small gzipped IDX files, set as the MNIST download source with their MD5s."""
    served = tmp_path / "served"
    arrays = _small_idx_set(seed=1)
    _write_idx_set(served, arrays, gz=tuple(arrays))
    server = _Mirror(served)
    server.thread.start()
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setitem(data.MIRRORS, "mnist", server.url)
    monkeypatch.setitem(data.CHECKSUMS, "mnist", server.md5s())
    yield server
    server.server.shutdown()
    server.server.server_close()


def test_download_fetches_checked_files_into_root(tmp_path: Path, mirror: _Mirror) -> None:
    root = tmp_path / "root"

    splits = load_splits(_cfg("mnist", root=str(root), download=True))

    assert sorted(p.name for p in root.iterdir()) == sorted(f"{n}.gz" for n in data.IDX_FILES)
    assert all((root / name).read_bytes() == (mirror.folder / name).read_bytes() for name in mirror.md5s())
    assert len(splits.x_test) == 30
    # A second load finds the files and does not download again.
    before = len(mirror.requests)
    load_splits(_cfg("mnist", root=str(root), download=True))
    assert len(mirror.requests) == before == 4


def test_download_with_null_root_goes_to_the_user_cache(
    tmp_path: Path, mirror: _Mirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    load_splits(_cfg("mnist", root=None, download=True))

    cache = tmp_path / "home" / ".cache" / "tuner" / "mnist"
    assert len(list(cache.glob("*.gz"))) == 4


def test_download_checksum_mismatch_leaves_no_file(
    tmp_path: Path, mirror: _Mirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    bad = {**data.CHECKSUMS["mnist"], "train-images-idx3-ubyte.gz": "0" * 32}
    monkeypatch.setitem(data.CHECKSUMS, "mnist", bad)

    with pytest.raises(ConfigError, match=r"has MD5 [0-9a-f]{32}, not 0{32}, so it was deleted"):
        load_splits(_cfg("mnist", root=str(root), download=True))

    assert not root.exists()  # train-images is fetched first: nothing, not even a .part file or the folder


def _refused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_mirror_error_names_root_and_every_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = tmp_path / "system"
    monkeypatch.setitem(data.SYSTEM_DIRS, "fashion_mnist", (str(system),))
    monkeypatch.setitem(data.MIRRORS, "fashion_mnist", f"http://127.0.0.1:{_refused_port()}/")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    root = tmp_path / "root"

    with pytest.raises(ConfigError) as error:
        load_splits(_cfg("fashion_mnist", root=str(root), download=True))

    message = str(error.value)
    assert "data.root must be a folder holding the Fashion-MNIST files" in message
    assert repr(str(root)) in message
    assert str(system) in message
    assert "failed" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "data.download=true" in message
    assert not list(root.glob("*.gz"))
    assert not list(root.glob(".*.part"))


@pytest.mark.parametrize("root", ["new/root", "existing"])
def test_failed_download_leaves_no_folder_it_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, root: str) -> None:
    monkeypatch.setitem(data.SYSTEM_DIRS, "fashion_mnist", ())
    monkeypatch.setitem(data.MIRRORS, "fashion_mnist", f"http://127.0.0.1:{_refused_port()}/")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    (tmp_path / "existing").mkdir()
    before = sorted(tmp_path.rglob("*"))

    with pytest.raises(ConfigError, match="failed"):
        load_splits(_cfg("fashion_mnist", root=str(tmp_path / root), download=True))

    assert sorted(tmp_path.rglob("*")) == before  # the folders it made are gone, the user's own folder stays


def test_download_disabled_and_files_missing_does_not_touch_the_network(tmp_path: Path, mirror: _Mirror) -> None:
    root = tmp_path / "root"

    with pytest.raises(ConfigError, match=r"data\.download is false") as error:
        load_splits(_cfg("mnist", root=str(root), download=False))

    assert str(root) in str(error.value)
    assert "put the four files in data.root" in str(error.value)
    assert mirror.requests == []


# --- npz: the user's own arrays --------------------------------------------------------------------------


def test_npz_round_trips_user_arrays_with_arbitrary_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = np.array([3, 7, 11])
    x_train, y_train = rng.normal(size=(90, 5)), np.repeat(labels, 30)
    x_test, y_test = rng.normal(size=(12, 5)), np.repeat(labels, 4)
    path = tmp_path / "mine.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)

    splits = load_splits(_cfg("npz", path=str(path)))

    assert splits.input_shape == (5,)
    assert splits.classes == ("3", "7", "11")
    assert splits.num_classes == 3
    assert np.array_equal(splits.y_test.numpy(), np.repeat([0, 1, 2], 4))
    assert np.allclose(_raw(splits, splits.x_test), x_test, atol=1e-5)
    assert len(splits.x_train) + len(splits.x_val) == 90
    assert len(splits.x_val) == 9


def test_npz_without_test_arrays_holds_out_a_fifth(tmp_path: Path) -> None:
    path = tmp_path / "train_only.npz"
    np.savez(path, x_train=np.arange(200 * 4, dtype=np.float32).reshape(200, 4), y_train=np.arange(200) % 2)

    splits = load_splits(_cfg("npz", path=str(path)))

    assert len(splits.x_test) == 40
    assert np.bincount(splits.y_test.numpy()).tolist() == [20, 20]


def test_npz_errors_name_data_path_and_the_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, x_train=np.zeros((10, 3)))
    with pytest.raises(ConfigError, match=r"data\.path=.*bad\.npz.*y_train is missing"):
        load_splits(_cfg("npz", path=str(path)))

    np.savez(path, x_train=np.zeros((10, 3)), y_train=np.zeros(10))
    with pytest.raises(ConfigError, match=r"data\.path=.*y_train must be a 1-D array of integer labels"):
        load_splits(_cfg("npz", path=str(path)))

    np.savez(path, x_train=np.zeros((10, 3)), y_train=np.zeros(9, dtype=int))
    with pytest.raises(ConfigError, match=r"x_train has 10 samples but y_train has 9"):
        load_splits(_cfg("npz", path=str(path)))

    missing = str(tmp_path / "nowhere.npz")
    with pytest.raises(ConfigError, match=rf"data\.path must be an existing \.npz file, but got '{missing}'"):
        load_splits(_cfg("npz", path=missing))

    for not_an_archive in (b"x_train,y_train\n1,2\n", np.zeros(3).tobytes(), b""):  # text, a raw .npy body, empty
        path.write_bytes(not_an_archive)
        with pytest.raises(ConfigError) as info:
            load_splits(_cfg("npz", path=str(path)))
        assert "is not one" in str(info.value) and "pickled" not in str(info.value)


# --- conf/data -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["fashion_mnist", "mnist", "digits", "mnist1d", "npz"])
def test_conf_data_options_name_their_loader_and_take_the_shared_defaults(option: str) -> None:
    extra = ["data.path=x.npz"] if option == "npz" else []
    cfg = parse_trial(compose_raw(f"data={option}", *extra)).data

    assert cfg.target == f"tuner.datasets.{option}" and cfg.name == option
    assert (cfg.seed, cfg.batch_size) == (0, 128)
    assert cfg.options.get("root") == (f"~/.cache/tuner/{option}" if option in ("fashion_mnist", "mnist") else None)


# --- a user's own loader: data._target_ -----------------------------------------------------------------

LOADERS = """
import numpy as np
import torch


def blobs(n: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3 * 10  # labels 0, 10, 20: any integers
    x = rng.normal(size=(n, 4)).astype(np.float32) + y[:, None] / 10
    return torch.from_numpy(x), torch.from_numpy(y)


def with_test():
    x = np.arange(400, dtype=np.float64).reshape(100, 4)
    return {"x_train": x, "y_train": np.arange(100) % 2, "x_test": x[:10], "y_test": np.arange(10) % 2,
            "classes": ["cat", "dog"]}


def nan():
    return np.full((10, 2), np.nan), np.arange(10) % 2


def text():
    return "x_train.csv"


def broken(path: str):
    raise FileNotFoundError(f"no such file: {path}")
"""


@pytest.fixture
def loaders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "myloaders.py").write_text(LOADERS, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "myloaders"


def test_a_users_loader_goes_through_the_same_splits_and_normalization(loaders: str) -> None:
    cfg = DataConfig(target=f"{loaders}.blobs", options={"n": 300}, name="blobs", val_fraction=0.2, seed=4)

    splits = load_splits(cfg)

    assert splits.classes == ("0", "10", "20") and splits.num_classes == 3 and splits.input_shape == (4,)
    assert len(splits.x_test) == 60 and len(splits.x_val) == 48 and len(splits.x_train) == 192  # 20%, then 20%
    assert np.bincount(splits.y_val.numpy()).tolist() == [16, 16, 16]  # stratified
    assert abs(float(splits.x_train.mean())) < 1e-5 and abs(float(splits.x_train.std()) - 1) < 1e-2
    again = load_splits(replace(cfg, seed=5))  # data.seed reaches the loader (it takes seed) and the splits
    assert not torch.equal(again.x_test, splits.x_test)


def test_a_users_loader_with_a_test_split_and_class_names(loaders: str) -> None:
    splits = load_splits(DataConfig(target=f"{loaders}.with_test", name="pets"))

    assert splits.classes == ("cat", "dog") and len(splits.x_test) == 10
    assert len(splits.x_train) + len(splits.x_val) == 100


@pytest.mark.parametrize(
    ("loader", "options", "message"),
    [
        ("nan", {}, "data._target_='myloaders.nan': x_train must hold only finite numbers, but it has NaN"),
        ("text", {}, "data._target_='myloaders.text': the loader must return x_train and y_train (and optionally"),
        ("broken", {"path": "a.csv"}, "data._target_='myloaders.broken' failed to load: FileNotFoundError: no such"),
        ("nothing", {}, "data._target_='myloaders.nothing' cannot be imported (module 'myloaders' has no attribute"),
    ],
)
def test_a_users_loader_problems_name_the_key_and_value(
    loaders: str, loader: str, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_splits(DataConfig(target=f"{loaders}.{loader}", options=options, name="mine"))
    assert str(info.value).startswith(message)


README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_data_example() -> tuple[str, str, str]:
    """The README's own-data example: (my_conf/data/blobs.yaml, mydata.py, the command)."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("# my_conf/data/blobs.yaml"))
    column = lines[start].index("# mydata.py")
    block = lines[start + 1 : lines.index("", start)]
    config = "\n".join(line[:column].strip() for line in block if line[:column].strip())
    code = "\n".join(line[column + 2 :] for line in block)
    command = next(line.strip() for line in lines[start:] if line.strip().startswith("python -m tuner"))
    return config + "\n", code + "\n", command.split("#")[0].strip()


@pytest.mark.slow
def test_readme_a_users_own_data_is_tuned_reported_and_kept_as_one_experiment(tmp_path: Path) -> None:
    config, code, command = _readme_data_example()
    (tmp_path / "mydata.py").write_text(code, encoding="utf-8")
    (tmp_path / "my_conf" / "data").mkdir(parents=True)
    (tmp_path / "my_conf" / "data" / "blobs.yaml").write_text(config, encoding="utf-8")
    args = command.replace("$PWD", str(tmp_path)).split()[3:]  # after "python -m tuner"
    short = ["study.n_trials=2", "trainer.epochs=2", "trainer.workers=1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}

    def run(module: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", module, *args, *short, *extra],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )

    for module in ("tuner", "tuner.report"):
        done = run(module)
        assert done.returncode == 0, done.stdout + done.stderr
    study = optuna.load_study(study_name="blobs-mlp", storage=f"sqlite:///{tmp_path / 'tuner.db'}")
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert study.user_attrs["definition"]["data.content"].startswith("sha256:")
    assert study.user_attrs["test_accuracy"]["samples"] == 120  # a stratified 20% of n: 600

    other = run("tuner", "data.n=300", "study.n_trials=3")  # other data under the same study name
    assert other.returncode == 2 and "other data is another experiment" in other.stderr + other.stdout
    bad = run("tuner", "data._target_=mydata.nothing")
    assert bad.returncode == 2 and "data._target_='mydata.nothing' cannot be imported" in bad.stderr + bad.stdout
