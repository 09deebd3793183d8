"""Coarse to fine: ``tuner.refine`` on a synthetic study with a known best region, and as a user runs it."""

from __future__ import annotations

import math
import shlex
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import optuna_dashboard
import pytest
import yaml
from optuna.trial import TrialState

from tests.conftest import compose_raw
from tuner.config import get_path
from tuner.refine import Change, narrow, space_yaml
from tuner.space import parse_space, suggest


def _score(v: dict[str, Any]) -> float:
    """Best at sgd, lr 1e-2, momentum 0.99, 128 hidden units, batch 64; the other params do not matter."""
    score = -10.0 * (v["optimizer.name"] != "sgd") - 10.0 * (v["data.batch_size"] != 64)
    score -= (math.log10(v["optimizer.lr"]) + 2) ** 2 + math.log2(v["model.hidden_units"] / 128) ** 2 / 4
    if "optimizer.momentum" in v:
        score -= (math.log10(1 - v["optimizer.momentum"]) + 2) ** 2
    return score


def test_refine_narrows_each_param_in_its_own_scale_around_the_known_best() -> None:
    raw = compose_raw("data=digits")
    params = parse_space(raw["space"], raw)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(200):
        trial = study.ask()
        study.tell(trial, _score(suggest(trial, params, raw)))
    top = sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.value or 0, reverse=True)[:5]
    entries = {p.path: get_path(raw["space"], p.path) for p in params}
    space, changes = narrow(params, entries, top, margin=0.1)

    assert space["optimizer"]["name"]["choices"] == ["sgd"] and space["data"]["batch_size"]["choices"] == [64]
    lr = space["optimizer"]["lr"]
    assert lr["log"] is True and lr["low"] < 1e-2 < lr["high"]
    top_lr = [t.params["optimizer.lr"] for t in top]
    # The top trials' span widened by 10% of the parent's 4 decades (0.4 decade) per side, rounded outward.
    assert math.log10(min(top_lr)) - 0.41 < math.log10(lr["low"]) <= math.log10(min(top_lr)) - 0.39
    assert math.log10(max(top_lr)) + 0.39 <= math.log10(lr["high"]) < math.log10(max(top_lr)) + 0.41
    momentum = space["optimizer"]["momentum"]  # reverse-log: narrowed on log(1 - beta), written as beta
    assert momentum["reverse_log"] is True and momentum["low"] < 0.99 < momentum["high"]
    assert math.log10(1 - momentum["low"]) - math.log10(1 - momentum["high"]) < 1.5  # parent: 2 decades
    assert momentum["when"] == {"optimizer.name": ["sgd", "rmsprop"]}
    assert space["optimizer"]["beta1"] == entries["optimizer.beta1"]  # Adam's: no top trial sampled it
    units = space["model"]["hidden_units"]
    assert isinstance(units["low"], int) and units["low"] <= 128 <= units["high"] and units["high"] - units["low"] < 480

    text = space_yaml(space, changes, ["refined for a test"])
    assert "  lr: {type: float, low: " in text and "# parent: [0.0001, 1] log" in text
    refined = {p.name: p for p in parse_space(yaml.safe_load(text), raw)}  # the written file is a valid space
    for trial in top:  # so the parent's top trials can be enqueued as warm starts
        for name, value in trial.params.items():
            dist = refined[name].distribution
            assert dist._contains(dist.to_internal_repr(value)), (name, value, dist)
    assert Change("data.batch_size", "{32, 64, 128, 256}", "{64}") in changes


def _copy_study(overrides: list[str], tmp_path: Path) -> list[str]:
    """The session's digits study in a storage of this test's own, with the parent's best model beside it."""
    source = next(o for o in overrides if o.startswith("study.storage=")).split("sqlite:///", 1)[1]
    with sqlite3.connect(source) as src, sqlite3.connect(tmp_path / "study.db") as dst:
        src.backup(dst)
    out = next(o for o in overrides if o.startswith("study.output_dir=")).split("=", 1)[1]
    (tmp_path / "out").mkdir()
    shutil.copy(Path(out) / "best_model.pt", tmp_path / "out" / "best_model.pt")
    keep = [o for o in overrides if not o.startswith(("study.storage=", "study.output_dir="))]
    return [*keep, f"study.storage=sqlite:///{tmp_path / 'study.db'}", f"study.output_dir={tmp_path / 'out'}"]


def _run(module: str, cwd: Path, *args: str, python: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [*(python or [sys.executable, "-m", module]), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_refine_starts_a_warm_started_child_study_and_its_command_continues_it(
    digits_study: tuple[list[str], Any], tmp_path: Path
) -> None:
    overrides = _copy_study(digits_study[0], tmp_path)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    parent = optuna.load_study(study_name="digits-mlp", storage=url)
    completed = sorted(parent.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.value or 0, reverse=True)
    k = len(completed) // 2
    assert k >= 1
    parent_model = (tmp_path / "out" / "best_model.pt").read_bytes()
    result = _run(
        "tuner.refine", tmp_path, *overrides, f"refine.top_k={k}", "refine.n_trials=3", f"refine.space_dir={tmp_path}"
    )
    assert result.returncode == 0, result.stderr
    space_file = tmp_path / "space" / "digits-mlp-fine.yaml"
    assert f"space written to {space_file}" in result.stdout
    child = optuna.load_study(study_name="digits-mlp-fine", storage=url)
    assert len(child.trials) == 3
    assert [t.params for t in child.trials[:k]] == [t.params for t in completed[:k]]
    assert [t.user_attrs["warm_start"] for t in child.trials[:k]] == [f"digits-mlp#{t.number}" for t in completed[:k]]
    refined = {p.name: p.distribution for p in parse_space(yaml.safe_load(space_file.read_text()), compose_raw())}
    for trial in child.trials:
        assert trial.distributions.items() <= refined.items()  # every child trial sampled the narrowed space
    assert child.user_attrs["refined_from"]["study"] == "digits-mlp"
    note = optuna_dashboard.get_note(child)
    assert "## Refined from" in note and f"Narrowed from study `digits-mlp` around its top {k} of" in note
    assert "| `optimizer.lr` | [0.0001, 1] log |" in note
    assert (tmp_path / "out" / "best_model.pt").read_bytes() == parent_model  # the parent's model is untouched
    assert (tmp_path / "out" / "digits-mlp-fine" / "best_model.pt").exists()

    # The printed command (plus the parent's overrides) continues the child study from the YAML file.
    line = next(x for x in result.stdout.splitlines() if x.startswith("continue it with: "))
    command = shlex.split(line.removeprefix("continue it with: ").removesuffix(" <the parent's other overrides>"))
    assert command[:3] == ["python", "-m", "tuner"]
    again = _run(
        "tuner",
        tmp_path,
        *command[3:],
        *overrides[:-1],
        "study.n_trials=4",
        python=[sys.executable, "-m", "tuner"],
    )
    assert again.returncode == 0, again.stderr
    assert len(optuna.load_study(study_name="digits-mlp-fine", storage=url).trials) == 4


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["refine.top_k=50"], "completed trial(s); refine.top_k=50 needs at least 100"),
        (["study.name=nope"], "study.name='nope' is not in sqlite:///"),
        (["refine.name=digits-mlp", "refine.top_k=1"], "refine.name='digits-mlp' is already a study"),
        (["refine.margin=0"], "refine.margin must be a number in (0, 1], but got 0."),
    ],
)
def test_refine_bad_input_is_one_clear_error_and_changes_nothing(
    digits_study: tuple[list[str], Any], tmp_path: Path, args: list[str], message: str
) -> None:
    overrides = _copy_study(digits_study[0], tmp_path)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    before = [(s.study_name, s.n_trials) for s in optuna.get_all_study_summaries(url)]
    result = _run("tuner.refine", tmp_path, *overrides, f"refine.space_dir={tmp_path / 'spaces'}", *args)
    assert result.returncode == 2
    assert message in result.stdout + result.stderr and "Traceback" not in result.stderr
    assert [(s.study_name, s.n_trials) for s in optuna.get_all_study_summaries(url)] == before
    assert not (tmp_path / "spaces").exists()


@pytest.mark.slow
def test_refine_space_dir_that_is_a_file_is_one_error_and_changes_nothing(
    digits_study: tuple[list[str], Any], tmp_path: Path
) -> None:
    overrides = _copy_study(digits_study[0], tmp_path)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    before = [(s.study_name, s.n_trials) for s in optuna.get_all_study_summaries(url)]
    (tmp_path / "spaces").write_text("a file")
    result = _run("tuner.refine", tmp_path, *overrides, "refine.top_k=1", f"refine.space_dir={tmp_path / 'spaces'}")
    assert result.returncode == 2
    assert f"refine.space_dir={str(tmp_path / 'spaces')!r} must be a folder tuner can write into" in (
        result.stdout + result.stderr
    )
    assert "Traceback" not in result.stderr
    assert [(s.study_name, s.n_trials) for s in optuna.get_all_study_summaries(url)] == before


@pytest.mark.slow
def test_refine_run_false_creates_the_child_with_warm_starts_waiting_and_trains_nothing(
    digits_study: tuple[list[str], Any], tmp_path: Path
) -> None:
    overrides = _copy_study(digits_study[0], tmp_path)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    result = _run(
        "tuner.refine",
        tmp_path,
        *overrides,
        "refine.top_k=1",
        "refine.run=false",
        "refine.name=zoom",
        f"refine.space_dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr
    child = optuna.load_study(study_name="zoom", storage=url)
    assert [t.state for t in child.trials] == [TrialState.WAITING]
    assert child.trials[0].user_attrs["warm_start"] == f"digits-mlp#{digits_study[1].best_trial.number}"
    assert "## Refined from" in optuna_dashboard.get_note(child)
    assert (tmp_path / "space" / "zoom.yaml").is_file()
    assert not (tmp_path / "out" / "zoom").exists()  # nothing trained
