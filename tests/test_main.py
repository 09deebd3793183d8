"""``python -m tuner`` as a user runs it: real processes, real SQLite files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import optuna
import pytest

from tests.conftest import run_with_read_only
from tuner.__main__ import without_entries

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data=digits", "study.n_trials=3", "trainer.epochs=2"]


def run_tuner(
    tmp_path: Path,
    *overrides: str,
    module: str = "tuner",
    env: dict[str, str] | None = None,
    python: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    args = [
        *(python or [sys.executable, "-m", module]),
        f"study.storage=sqlite:///{tmp_path / 'study.db'}",
        f"study.output_dir={tmp_path / 'out'}",
        *overrides,
    ]
    return subprocess.run(
        args, cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}
    )


@pytest.mark.slow
def test_main_runs_a_study_and_prints_a_readable_summary(tmp_path: Path) -> None:
    result = run_tuner(tmp_path, *SMALL)
    assert result.returncode == 0, result.stderr
    out = result.stdout + result.stderr
    for line in (
        "best trial",
        "test_accuracy",
        "dashboard             optuna-dashboard sqlite:///",
        "trials                3 (",
    ):
        assert line in out
    assert out.count("trial 0 ") == 1  # one line per trial, not duplicated by Optuna's own logger
    assert "alembic" not in out.lower() and "Traceback" not in out
    # The database file alone holds the study once the command is over: no write-ahead log is left beside it.
    assert not list(tmp_path.glob("study.db-*"))
    study = optuna.load_study(study_name="digits-mlp", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert len(study.trials) == 3
    assert (tmp_path / "out" / "best_model.pt").exists()
    assert list((tmp_path / "outputs" / "digits-mlp").glob("*/tuner.log"))  # Hydra's job log, named "tuner"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=transformer"], "Could not find 'model/transformer'"),
        (["space.optimizer.lr.low=2.0"], "space.optimizer.lr.low must be below space.optimizer.lr.high"),
        (["space.optimizer.lr.low=0"], "space.optimizer.lr.low must be > 0 with log: true, but got 0"),
        (["space.optimizer.momentum.high=1.5"], "space.optimizer.momentum: reverse_log bounds must lie in (0, 1)"),
        (
            ["+space.optimizer.nesterov={type: categorical, choices: [true, false]}"],
            "space.optimizer.nesterov names the config path 'optimizer.nesterov'",
        ),
        (["space.model.hidden_units.type=float"], "space.model.hidden_units gives model.hidden_units the value"),
        (["study.n_trials=0"], "study.n_trials must be an integer >= 1, but got 0."),
        (["study.storage=mysql+nodriver://x"], "study.storage="),
        (["study.storage=::bad::"], "study.storage must be a database URL"),
        (["study.storage=sqlite:///missing/dir/t.db"], "the folder 'missing/dir' does not exist"),
        (["data=mnist", "data.root=./nowhere", "data.download=false"], "data.root"),
        (["data=npz", "data.path=./nowhere.npz"], "data.path"),
        (["data._target_=nowhere.load"], "data._target_='nowhere.load' cannot be imported (No module named 'nowhere')"),
        (["sampler._target_=optuna.samplers.NoSuch"], "sampler._target_='optuna.samplers.NoSuch' cannot be imported"),
        (["+pruner.n_startup=3"], "pruner.n_startup is not a parameter of optuna.pruners.MedianPruner (did you mean"),
        (["study.n_trials=abc"], "study.n_trials must be an integer >= 1, but got 'abc'."),
        (["trainer.epoch=3"], "trainer.epoch is not a tuner setting (did you mean trainer.epochs?), but got trainer"),
    ],
)
def test_main_bad_input_stops_with_one_clear_message(tmp_path: Path, overrides: list[str], message: str) -> None:
    args = [a for a in SMALL if not any(a.split("=")[0] == o.split("=")[0] for o in overrides)]
    result = run_tuner(tmp_path, *args, *overrides)
    out = result.stdout + result.stderr
    assert result.returncode != 0
    assert message in out, out
    assert "Traceback" not in out
    assert not (tmp_path / "study.db").exists(), "bad input must not create the storage"


@pytest.mark.slow
@pytest.mark.parametrize("module", ["tuner.report", "tuner.refine", "tuner.dashboard", "tuner.train"])
def test_main_every_command_shares_the_entry_path_and_its_one_line_errors(tmp_path: Path, module: str) -> None:
    for override, message in (
        ("study.n_trials=abc", "study.n_trials must be an integer >= 1, but got 'abc'."),
        ("+trainer.epoch=3", "trainer.epoch is not a tuner setting (did you mean trainer.epochs?)"),
    ):
        result = subprocess.run(
            [sys.executable, "-m", module, f"study.storage=sqlite:///{tmp_path / 'study.db'}", override],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        out = result.stdout + result.stderr
        assert result.returncode == 2 and message in out and "Traceback" not in out, out


@pytest.mark.slow
def test_main_bad_input_leaves_an_existing_study_unchanged(tmp_path: Path) -> None:
    assert run_tuner(tmp_path, *SMALL).returncode == 0
    before = len(optuna.load_study(study_name="digits-mlp", storage=f"sqlite:///{tmp_path / 'study.db'}").trials)
    result = run_tuner(tmp_path, *SMALL, "space.optimizer.lr.low=0")
    assert result.returncode == 2
    after = optuna.load_study(study_name="digits-mlp", storage=f"sqlite:///{tmp_path / 'study.db'}").trials
    assert len(after) == before


@pytest.mark.slow
def test_main_wheel_install_finds_its_config_from_another_directory(
    tmp_path: Path, installed_wheel: tuple[Path, Path]
) -> None:
    wheel, site = installed_wheel
    names = zipfile.ZipFile(wheel).namelist()
    assert "tuner/conf/config.yaml" in names and "tuner/conf/space/default.yaml" in names
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {"PYTHONPATH": str(site)}
    where = subprocess.run(
        [sys.executable, "-c", "import tuner; print(tuner.__file__)"],
        cwd=work,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )
    assert where.stdout.startswith(str(site))
    for python in ([sys.executable, "-m", "tuner"], [sys.executable, str(site / "bin" / "tuner")]):
        result = run_tuner(work, *SMALL, "study.n_trials=1", python=python, env=env)
        assert result.returncode == 0, result.stderr
    assert len(optuna.load_study(study_name="digits-mlp", storage=f"sqlite:///{work / 'study.db'}").trials) == 1


@pytest.mark.slow
@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("optimizer:\n  lr: {type: float, low: 1.0e-4, high: 1.0\n", "line 3: while parsing a flow mapping, expected"),
        (
            "optimizer:\n  lr: {type: float, low: 1.0e-4, high: 1.0}\n  lr: {type: int, low: 1, high: 2}\n",
            "line 3: while constructing a mapping, found duplicate key lr",
        ),
        ("optimizer: [lr\n", "line 2: while parsing a flow sequence"),
    ],
)
def test_main_a_broken_space_file_is_one_line_naming_the_file(tmp_path: Path, text: str, shown: str) -> None:
    (tmp_path / "my_conf" / "space").mkdir(parents=True)
    (tmp_path / "my_conf" / "space" / "mine.yaml").write_text(text)
    result = run_tuner(tmp_path, *SMALL, f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "space=mine")

    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert f"error: {tmp_path / 'my_conf' / 'space' / 'mine.yaml'}, {shown}" in out
    assert "Traceback" not in out and not (tmp_path / "study.db").exists()


@pytest.mark.slow
def test_main_the_default_run_in_a_read_only_folder_is_one_line(tmp_path: Path) -> None:
    done = run_with_read_only(tmp_path, [sys.executable, "-m", "tuner", *SMALL])
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "error: Read-only file system: " in out and "(run from a folder tuner can write to" in out
    assert "Traceback" not in out


def _catches_sigterm(pid: int) -> bool:
    """Whether the process has installed a SIGTERM handler (Python itself installs none): tuner's start-up
    handlers are then in place, and a signal from here on is tuner's to handle, not the interpreter's."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


@pytest.mark.slow
@pytest.mark.parametrize(("delay", "sig"), [(0.0, signal.SIGINT), (0.3, signal.SIGTERM), (1.0, signal.SIGINT)])
def test_main_a_signal_during_start_up_is_one_line(tmp_path: Path, delay: float, sig: signal.Signals) -> None:
    # From the first line of tuner's entry point: importing Hydra and torch, composing, opening the storage.
    # Epochs enough that the run is still going at the latest moment (the signal must not come after it).
    args = [
        sys.executable,
        "-m",
        "tuner",
        *SMALL,
        "trainer.epochs=50",
        f"study.storage=sqlite:///{tmp_path / 'study.db'}",
    ]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not _catches_sigterm(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(delay)
    proc.send_signal(sig)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == (143 if sig == signal.SIGTERM else 130), out
    assert f"interrupted by {sig.name}" in out and "Traceback" not in out


@pytest.mark.slow
def test_main_a_value_on_the_command_line_wins_over_the_space(tmp_path: Path) -> None:
    fixed = {"optimizer.lr": 0.5, "data.batch_size": 1024, "model.num_layers": 1}  # space=default samples all three
    result = run_tuner(tmp_path, *SMALL, "trainer.epochs=1", *(f"{path}={value}" for path, value in fixed.items()))

    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    study = optuna.load_study(study_name="digits-mlp", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert len(study.trials) == 3
    for path, value in fixed.items():
        assert f"{path}={value!r} is set on the command line: it is not searched (space.{path} left out)" in out
        assert all(path not in t.params for t in study.trials)
        assert study.user_attrs["definition"][path] == str(value)  # the study records the fixed value
        assert f"space.{path}" not in study.user_attrs["definition"]


def test_main_without_entries_drops_given_paths_and_empty_sections() -> None:
    space = {
        "optimizer": {"lr": {"type": "float", "low": 0.1, "high": 1.0}},
        "model": {"hidden_units": {"type": "int", "low": 1, "high": 4}},
    }
    out, removed = without_entries(space, ["optimizer.lr", "optimizer.momentum", "data.batch_size"])
    assert removed == ["optimizer.lr"]
    assert out == {"model": {"hidden_units": {"type": "int", "low": 1, "high": 4}}}
    assert "lr" in space["optimizer"]  # the original is left as it was
