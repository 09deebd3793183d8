"""``python -m tuner -m ...``: sweeps of studies and parallel workers on one study, as real processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from tests.conftest import SECRETS, Secret, leaks_in_files, postgres_dump
from tuner.multirun import JOB_RECORD, format_table, name_suffix, write_job_record
from tuner.workers import MAX_AUTO_WORKERS

SMALL = ["data=digits", "study.n_trials=2"]


def run_multirun(
    tmp_path: Path, *overrides: str, module: str = "tuner", storage: str | None = None
) -> subprocess.CompletedProcess[str]:
    args = [
        sys.executable,
        "-m",
        module,
        "-m",
        f"study.storage={storage or 'sqlite:///' + str(tmp_path / 'study.db')}",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        *overrides,
    ]
    return subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=dict(os.environ))


def studies(tmp_path: Path) -> dict[str, list[optuna.trial.FrozenTrial]]:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    return {
        s.study_name: optuna.load_study(study_name=s.study_name, storage=url).trials
        for s in optuna.get_all_study_summaries(url)
    }


def test_multirun_name_suffix_keeps_what_changes_training() -> None:
    assert name_suffix(["model=cnn", "data=digits"]) == ""
    assert name_suffix(["trainer.epochs=2", "optimizer.name=adam", "data=digits"]) == (
        ",optimizer.name=adam,trainer.epochs=2"
    )
    assert name_suffix(["study.n_trials=9", "study.storage=sqlite:///a.db", "trainer.device=cpu"]) == ""
    assert name_suffix(["trainer.workers=2", "trainer.threads=1"]) == ""
    assert name_suffix(["study.seed=1", "space=lr", "hydra.launcher.n_jobs=4"]) == ",space=lr,study.seed=1"


def test_multirun_explicit_study_name_wins() -> None:
    assert name_suffix(["study.name=mine", "trainer.epochs=2"]) is None


def test_multirun_format_table_has_one_row_per_study() -> None:
    rows = [
        {"study": "digits-mlp", "best": 0.9, "test": 0.85, "states": {"COMPLETE": 2, "PRUNED": 1}},
        {"study": "digits-cnn", "best": None, "test": None, "states": {"FAIL": 1}},
    ]
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["study", "best", "val_accuracy", "test_accuracy", "trials"]
    assert lines[1].split() == ["digits-mlp", "0.9000", "0.8500", "3", "(2", "complete,", "1", "pruned)"]
    assert lines[2].split() == ["digits-cnn", "-", "-", "1", "(1", "fail)"]


def test_multirun_job_record_keeps_no_password(tmp_path: Path) -> None:
    write_job_record(tmp_path, study="s", storage="postgresql://alice:Pw-9d1e@db.example/optuna")
    text = (tmp_path / JOB_RECORD).read_text()
    assert "Pw-9d1e" not in text and "postgresql://alice:***@db.example/optuna" in text


@pytest.mark.slow
@pytest.mark.parametrize("secret", [SECRETS["hydra-escaped"]], ids=["escaped"])  # the others: tests/test_faults.py
def test_multirun_on_postgresql_leaves_no_password_on_disk_and_still_tables_its_studies(
    tmp_path: Path, postgres_url: str, secret: Secret
) -> None:
    result = run_multirun(tmp_path, *SMALL, "model=mlp,softmax", storage=secret.override(postgres_url))
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    # multirun.yaml, each job's .hydra/*.yaml, tuner.log and study.json; the launcher's "#0 : ..." lines.
    assert leaks_in_files(tmp_path, secret) == {} and secret.leaks(out) == []
    assert secret.leaks(postgres_dump(postgres_url)) == []
    # The launcher writes the ':' of an override value as '\:'.
    assert re.search(r"#0 : .*study\.storage=postgresql\\?://tuner\\?:\*\*\*@127\.0\.0\.1", out), out
    table = out[out.index("2 studies in postgresql://tuner:***@") :]
    for name in ("digits-mlp", "digits-softmax"):
        (line,) = [line for line in table.splitlines() if line.startswith(name + " ")]
        assert line.endswith("2 (2 complete)")


@pytest.mark.slow
def test_multirun_runs_one_named_study_per_combination_and_one_table(tmp_path: Path) -> None:
    result = run_multirun(tmp_path, *SMALL, "model=mlp,softmax", "trainer.epochs=1,2")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    expected = {f"digits-{m},trainer.epochs={e}" for m in ("mlp", "softmax") for e in (1, 2)}
    found = studies(tmp_path)
    assert set(found) == expected
    assert all(len(trials) == 2 for trials in found.values())
    table = out[out.index("4 studies in sqlite:///") :]
    for name in expected:
        (line,) = [line for line in table.splitlines() if line.startswith(name + " ")]
        assert line.endswith("2 (2 complete)")
    assert "Traceback" not in out
    assert "test_accuracy         " not in out  # each job's summary went to its own log only
    assert len(list((tmp_path / "multirun").glob("*/tuner.log"))) == 4
    assert "study finished" in (tmp_path / "multirun" / "0" / "tuner.log").read_text()


@pytest.mark.slow
def test_multirun_parallel_jobs_run_their_own_studies_and_share_the_cores(tmp_path: Path) -> None:
    n_trials, jobs = 3, 2
    result = run_multirun(
        tmp_path,
        "hydra/launcher=joblib",
        f"hydra.launcher.n_jobs={jobs}",
        "optimizer.name=sgd,adam",
        "data=digits",
        "trainer.epochs=2",
        f"study.n_trials={n_trials}",
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    found = studies(tmp_path)
    assert set(found) == {f"digits-mlp,optimizer.name={o},trainer.epochs=2" for o in ("sgd", "adam")}
    assert all(len(trials) == n_trials for trials in found.values())  # study.n_trials exactly, in each
    # trainer.workers=auto: the jobs that run at once share the cores instead of each taking all of them.
    share = max(1, min(len(os.sched_getaffinity(0)) // jobs, MAX_AUTO_WORKERS))
    expected = "training in this process" if share == 1 else f"{share} worker processes"
    for job in range(jobs):
        assert expected in (tmp_path / "multirun" / str(job) / "tuner.log").read_text()
