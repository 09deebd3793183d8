"""Every folder a run writes is checked before the first trial, and the check creates nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import compose_raw, run_with_read_only
from tuner.config import ConfigError
from tuner.tune import prepare


def _overrides(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "data=digits",
        f"study.storage=sqlite:///{tmp_path / 'study.db'}",
        f"study.output_dir={tmp_path / 'out'}",
        *extra,
    ]


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.slow
def test_paths_output_dir_that_is_a_file_stops_the_run_before_any_trial(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("not a folder")
    result = subprocess.run(
        [sys.executable, "-m", "tuner", *_overrides(tmp_path), "study.n_trials=2", "trainer.epochs=1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = (result.stdout + result.stderr).strip()
    assert result.returncode == 2, out
    assert len(out.splitlines()) == 1 and "Traceback" not in out
    assert f"study.output_dir={str(tmp_path / 'out')!r} must be a folder tuner can write into" in out
    assert "is a file, not a folder" in out
    assert not (tmp_path / "study.db").exists()  # no study, no trial spent on the budget


@pytest.mark.parametrize(
    ("file", "extra", "message"),
    [
        ("out", [], "study.output_dir='{tmp}/out' must be a folder tuner can write into (or create), but it is a file"),
        (
            "f",
            ["study.output_dir={tmp}/f/runs/x"],
            "study.output_dir='{tmp}/f/runs/x' must be a folder tuner can write into (or create), but its nearest "
            "existing parent '{tmp}/f' is a file, not a folder.",
        ),
        ("art", ["study.artifact_dir={tmp}/art"], "study.artifact_dir='{tmp}/art' must be a folder"),
        ("study_artifacts", [], "study.artifact_dir=null (so '{tmp}/study_artifacts') must be a folder"),
        (
            "cache",
            ["data=mnist", "data.root={tmp}/cache/mnist"],
            "data.root='{tmp}/cache/mnist' must be a folder tuner can write into (or create), but its nearest "
            "existing parent '{tmp}/cache' is a file",
        ),
        (
            "home/.cache",
            ["data=fashion_mnist", "data.root=null"],
            "data.root=None (downloading into '{tmp}/home/.cache/tuner/fashion_mnist') must be a folder",
        ),
    ],
)
def test_paths_a_file_in_the_way_names_the_key_and_the_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, file: str, extra: list[str], message: str
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr("tuner.datasets.SYSTEM_DIRS", {"fashion_mnist": (), "mnist": ()})  # no installed copy
    (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / file).write_text("a file")
    before = _listing(tmp_path)
    with pytest.raises(ConfigError) as info:
        prepare(compose_raw(*_overrides(tmp_path), *(e.format(tmp=tmp_path) for e in extra)))
    assert message.format(tmp=tmp_path) in str(info.value)
    assert _listing(tmp_path) == before


def test_paths_folders_yet_to_be_made_pass_and_none_is_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tuner.datasets.SYSTEM_DIRS", {"fashion_mnist": (), "mnist": ()})
    run, _ = prepare(
        compose_raw(
            *_overrides(tmp_path, f"study.output_dir={tmp_path / 'a' / 'b' / 'out'}"),
            f"study.artifact_dir={tmp_path / 'c' / 'artifacts'}",
            "data=mnist",
            f"data.root={tmp_path / 'd' / 'mnist'}",
        )
    )
    assert run.study.output_dir == str(tmp_path / "a" / "b" / "out")
    assert _listing(tmp_path) == []


def test_paths_data_root_is_not_checked_when_nothing_is_downloaded(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("a file")
    # mnist1d is generated, and mnist with data.download=false only reads (its loader says where it looked).
    for data in (["data=mnist1d"], ["data=mnist", "data.download=false", f"data.root={tmp_path / 'f' / 'x'}"]):
        prepare(compose_raw(*_overrides(tmp_path), *data))


@pytest.mark.slow
@pytest.mark.parametrize("key", ["study.output_dir", "study.artifact_dir"])
def test_paths_a_read_only_folder_is_refused_before_any_trial(tmp_path: Path, key: str) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    command = [sys.executable, "-m", "tuner", *_overrides(tmp_path), f"{key}={locked / 'sub'}", "study.n_trials=1"]
    done = run_with_read_only(locked, [*command, f"hydra.run.dir={tmp_path / 'hydra'}"])
    out = (done.stdout + done.stderr).strip()
    assert done.returncode == 2, out
    assert len(out.splitlines()) == 1 and f"{key}=" in out and "is read-only for this user" in out
    assert list(locked.iterdir()) == [] and not (tmp_path / "study.db").exists()
