from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest

from tests.conftest import compose_raw
from tuner.config import ConfigError
from tuner.definition import CHANGES_ATTR, DEFINITION_ATTR, check_definition, definition, differences
from tuner.space import parse_space
from tuner.tune import prepare, tune


def _base(tmp_path: Path) -> list[str]:
    return [
        "data=digits",
        "study.name=exp",
        f"study.storage=sqlite:///{tmp_path / 'study.db'}",
        f"study.output_dir={tmp_path / 'out'}",
        "study.n_trials=2",
        "trainer.epochs=1",
        "trainer.workers=1",
        "pruner=none",
    ]


def _run(*overrides: str) -> None:
    tune(*prepare(compose_raw(*overrides)))


def _stored(tmp_path: Path) -> optuna.Study:
    return optuna.load_study(study_name="exp", storage=f"sqlite:///{tmp_path / 'study.db'}")


def _snapshot(study: optuna.Study) -> tuple[int, dict[str, object]]:
    return len(study.get_trials()), dict(study.user_attrs)


def test_definition_puts_searched_paths_as_space_entries_and_leaves_out_where_to_run() -> None:
    raw = compose_raw("space=lr")
    defined = definition(raw, parse_space(raw["space"], raw), "sha256:x")

    assert defined["space.optimizer.lr"] == "float [0.0001, 1.0] log"
    assert "optimizer.lr" not in defined  # its config value is never used: the space samples it
    assert defined["optimizer.momentum"] == "0.9"
    assert defined["trainer.epochs"] == "10" and defined["data.content"] == "sha256:x"
    assert not {"trainer.device", "trainer.workers", "trainer.threads", "data.root", "study.n_trials"} & set(defined)


def test_definition_of_a_reverse_log_entry_shows_the_used_range() -> None:
    raw = compose_raw()
    defined = definition(raw, parse_space(raw["space"], raw), None)
    assert defined["space.optimizer.momentum"].startswith("float [0.9")
    assert "reverse_log when optimizer.name in ['sgd', 'rmsprop']" in defined["space.optimizer.momentum"]


def test_differences_name_each_key_and_skip_ignored_prefixes() -> None:
    stored = {"a.x": "1", "space.lr": "float [1, 2]", "b": "2"}
    now = {"a.x": "3", "space.lr": "float [1, 3]", "c": "4"}
    assert differences(stored, now) == {
        "a.x": ("1", "3"),
        "b": ("2", "(absent)"),
        "c": ("(absent)", "4"),
        "space.lr": ("float [1, 2]", "float [1, 3]"),
    }
    assert set(differences(stored, now, ignore=["space"])) == {"a.x", "b", "c"}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "named"),
    [
        (["space=lr"], "space.optimizer.name: one of ['sgd', 'adam'] -> (absent)"),
        (["space.optimizer.lr.low=1e-3"], "space.optimizer.lr: float [0.0001, 1.0] log -> float [0.001, 1.0] log"),
        (["model=cnn"], 'model._target_: "tuner.model.mlp" -> "tuner.model.cnn"'),
        (["trainer.epochs=2"], "trainer.epochs: 1 -> 2"),
        (["data.val_fraction=0.3"], "data.val_fraction: 0.2 -> 0.3"),
        (["pruner=median"], 'pruner._target_: "optuna.pruners.NopPruner" -> "optuna.pruners.MedianPruner"'),
        (["optimizer.weight_decay=0.01"], "optimizer.weight_decay: 0.0 -> 0.01"),
    ],
)
def test_a_changed_definition_stops_before_anything_is_written(tmp_path: Path, change: list[str], named: str) -> None:
    _run(*_base(tmp_path))
    before = _snapshot(_stored(tmp_path))

    with pytest.raises(ConfigError) as info:
        _run(*_base(tmp_path), *change, "study.n_trials=4")

    message = str(info.value)
    assert named in message and message.startswith("study 'exp' in sqlite:")
    # A change of the data's splits is another experiment; any other change may be accepted explicitly.
    data = named.startswith("data.")
    assert ("other data is another experiment" in message) == data
    assert ("study.accept_changes=true" in message) == (not data)
    assert _snapshot(_stored(tmp_path)) == before


def test_other_data_of_the_same_shape_is_refused_and_keeps_the_test_accuracy(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 1, 8, 8)).astype(np.float32), np.arange(300) % 10
    path = tmp_path / "mine.npz"
    np.savez(path, x_train=x, y_train=y)
    base = [*_base(tmp_path), "data=npz", f"data.path={path}", "data.val_fraction=0.2"]
    _run(*base)
    before = _snapshot(_stored(tmp_path))
    assert "test_accuracy" in before[1]

    np.savez(path, x_train=x[::-1].copy(), y_train=y)  # the same file name, other content
    with pytest.raises(ConfigError, match=r"data\.content: sha256:\w+ -> sha256:\w+.*other data is another"):
        _run(*base, "study.accept_changes=true")  # a data change is never accepted
    assert _snapshot(_stored(tmp_path)) == before


@pytest.mark.slow
def test_other_data_set_of_another_shape_is_refused_before_training(tmp_path: Path) -> None:
    _run(*_base(tmp_path))
    before = _snapshot(_stored(tmp_path))
    with pytest.raises(ConfigError, match=r'data\.name: "digits" -> "mnist1d"'):
        _run(*_base(tmp_path), "data=mnist1d", "study.n_trials=3")
    assert _snapshot(_stored(tmp_path)) == before


@pytest.mark.slow
@pytest.mark.parametrize(
    "free",
    [
        ["study.n_trials=3"],
        ["study.n_trials=3", "study.timeout=600", "trainer.threads=2", "trainer.eval_batch_size=64"],
        ["study.n_trials=3", "trainer.device=cpu", "study.heartbeat_interval=5", "study.max_retry=1"],
    ],
)
def test_where_and_how_long_to_run_may_change(tmp_path: Path, free: list[str]) -> None:
    _run(*_base(tmp_path))
    _run(*_base(tmp_path), *free)
    assert len(_stored(tmp_path).get_trials()) == 3


@pytest.mark.slow
def test_accept_changes_adds_the_trials_and_records_the_change(tmp_path: Path) -> None:
    _run(*_base(tmp_path))
    _run(*_base(tmp_path), "trainer.epochs=2", "study.n_trials=3", "study.accept_changes=true")

    study = _stored(tmp_path)
    assert len(study.get_trials()) == 3
    (change,) = study.user_attrs[CHANGES_ATTR]
    assert change["changes"] == {"trainer.epochs": ["1", "2"]}
    assert study.user_attrs[DEFINITION_ATTR]["trainer.epochs"] == "2"
    # The accepted definition is now the study's: the same command runs without the flag.
    _run(*_base(tmp_path), "trainer.epochs=2", "study.n_trials=4")
    assert len(_stored(tmp_path).get_trials()) == 4


@pytest.mark.slow
def test_a_study_whose_data_keys_were_named_otherwise_takes_accept_changes_when_its_data_is_the_same() -> None:
    raw = compose_raw("data=digits")
    now = definition(raw, parse_space(raw["space"], raw), "sha256:0123")
    # As a tuner before the schema stored it: no data._target_, every data set with data.num_samples.
    earlier = {k: v for k, v in now.items() if k != "data._target_"} | {"data.num_samples": "5000"}
    study = optuna.create_study()
    study.set_user_attr(DEFINITION_ATTR, earlier)

    with pytest.raises(ConfigError, match=r"data.num_samples: 5000 -> \(absent\).*or study.accept_changes=true"):
        check_definition(study, now, url="memory")
    check_definition(study, now, url="memory", accept=True)
    assert study.user_attrs[DEFINITION_ATTR] == now and len(study.user_attrs[CHANGES_ATTR]) == 1
    with pytest.raises(ConfigError, match="other data is another experiment"):  # a changed fingerprint is other data
        check_definition(study, {**now, "data.content": "sha256:4567"}, url="memory", accept=True)


def test_a_study_from_an_earlier_tuner_is_checked_against_its_stored_config(tmp_path: Path) -> None:
    _run(*_base(tmp_path))
    _stored(tmp_path).set_user_attr(DEFINITION_ATTR, None)  # as an earlier tuner left it: the config only
    with pytest.raises(ConfigError, match="trainer.epochs: 1 -> 3"):
        _run(*_base(tmp_path), "trainer.epochs=3", "study.n_trials=3")
    _run(*_base(tmp_path), "study.n_trials=3")
    assert _stored(tmp_path).user_attrs[DEFINITION_ATTR]["data.content"].startswith("sha256:")


def _command(tmp_path: Path, module: str, *overrides: str) -> subprocess.CompletedProcess[str]:
    flags = ["-m"] if "hydra/sweeper=tuner" in overrides else []  # Hydra's flags come before the overrides
    args = [sys.executable, "-m", module, *flags, *_base(tmp_path), f"hydra.run.dir={tmp_path / 'hydra'}", *overrides]
    return subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module", "extra"),
    [
        ("tuner.report", []),
        ("tuner.refine", ["refine.top_k=1"]),
        ("tuner.train", ["hydra/sweeper=tuner", "hydra.sweep.dir=multirun", "study.n_trials=3"]),
    ],
)
def test_report_refine_and_the_sweeper_refuse_another_experiment(tmp_path: Path, module: str, extra: list[str]) -> None:
    _run(*_base(tmp_path))
    before = _snapshot(_stored(tmp_path))

    done = _command(tmp_path, module, "trainer.epochs=2", *extra)

    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "study 'exp'" in out and "trainer.epochs: 1 -> 2" in out and "Traceback" not in out
    assert _snapshot(_stored(tmp_path)) == before


@pytest.mark.slow
def test_processes_started_together_on_a_stored_study_draw_distinct_trials(tmp_path: Path) -> None:
    _run(*_base(tmp_path))  # an existing study: every process sees the same trials when it starts
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tuner", *_base(tmp_path), "study.n_trials=11", f"hydra.run.dir={tmp_path}/{i}"],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i in range(3)
    ]
    assert [p.wait(timeout=600) for p in procs] == [0, 0, 0]
    _run(*_base(tmp_path), "study.n_trials=14")  # and a rerun of one of them
    trials = _stored(tmp_path).get_trials()
    assert len(trials) == 14
    drawn = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(drawn)) == 14
    assert _stored(tmp_path).user_attrs["sampler_streams"] == 5
