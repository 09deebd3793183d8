"""``python -m tuner.report`` on a study tuner wrote: what it prints, the folder it writes, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest

from tuner.report import build_figures
from tuner.stored import study_params


def run_report(cwd: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tuner.report", *overrides], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_report_prints_importances_and_writes_an_html_folder(
    digits_study: tuple[list[str], Any], tmp_path: Path
) -> None:
    overrides, study = digits_study
    result = run_report(tmp_path, *overrides, f"report.dir={tmp_path / 'rep'}")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"best trial            #{study.best_trial.number}" in out
    assert "PED-ANOVA (sorts)" in out and "fANOVA" in out and "lesson's tier" in out
    assert f"report: {tmp_path / 'rep' / 'index.html'}" in out
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == [
        "importances.json",
        "index.html",
        "plotly.min.js",
        "summary.txt",
    ]
    page = (tmp_path / "rep" / "index.html").read_text()
    for title in (
        "Optimization history",
        "Learning curves (pruned trials grey, dotted)",
        "val_accuracy vs learning rate",
        "Slice plots (log axes for log and reverse-log params)",
        "Parallel coordinates",
        "Importance (PED-ANOVA)",
    ):
        assert f"<h2>{title}</h2>" in page
    assert page.count("Plotly.newPlot") == 6 and "src='plotly.min.js'" in page  # opens offline
    stored = json.loads((tmp_path / "rep" / "importances.json").read_text())
    assert stored["sorted_by"] == "ped_anova"
    assert set(stored["importances"]) == {"ped_anova", "fanova", "mean_decrease_impurity"}
    assert "optimizer.lr" in stored["importances"]["ped_anova"]
    assert sum(stored["importances"]["ped_anova"].values()) == pytest.approx(1.0)


def test_report_slice_axes_are_log_for_log_and_reverse_log_params(digits_study: tuple[list[str], Any]) -> None:
    _, study = digits_study
    figures = build_figures(study, study_params(study), "ped_anova")
    layout = figures["Slice plots (log axes for log and reverse-log params)"].layout
    axes = {layout[k].title.text: layout[k].type for k in layout if k.startswith("xaxis") and layout[k].title.text}
    assert axes["optimizer.lr"] == "log" and axes["model.hidden_units"] == "log"
    reverse = [name for name in axes if name.startswith("1-optimizer.")]  # 1 - beta, as sampled
    assert reverse and all(axes[name] == "log" for name in reverse)
    assert axes["model.num_layers"] != "log"


def test_report_learning_curves_tell_pruned_from_complete(digits_study: tuple[list[str], Any]) -> None:
    _, study = digits_study
    figure = build_figures(study, study_params(study), "ped_anova")["Learning curves (pruned trials grey, dotted)"]
    styles = {(t.name, t.line.dash) for t in figure.data}
    assert styles == {("complete", "solid"), ("pruned", "dot")}
    pruned = study.get_trials(states=(optuna.trial.TrialState.PRUNED,))
    assert sum(t.name == "pruned" for t in figure.data) == len(pruned) > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "message"),
    [("nope", "study.name='nope' is not in sqlite:///"), ("empty", "study.name='empty' has no trials yet")],
)
def test_report_bad_study_is_one_clear_error_and_writes_nothing(tmp_path: Path, name: str, message: str) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(study_name="empty", storage=url)
    result = run_report(tmp_path, f"study.storage={url}", f"study.name={name}", f"report.dir={tmp_path / 'rep'}")
    assert result.returncode == 2
    assert message in result.stdout + result.stderr and "Traceback" not in result.stderr
    if name == "nope":
        assert "(its studies: 'empty')" in result.stdout + result.stderr
    assert not (tmp_path / "rep").exists()
    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["empty"]


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["taken", "taken/report"])
def test_report_dir_with_a_file_in_the_way_is_one_error_before_any_work(
    digits_study: tuple[list[str], Any], tmp_path: Path, folder: str
) -> None:
    overrides, _ = digits_study
    (tmp_path / "taken").write_text("a file")
    result = run_report(tmp_path, *overrides, f"report.dir={tmp_path / folder}")
    out = (result.stdout + result.stderr).strip()
    assert result.returncode == 2, out
    assert len(out.splitlines()) == 1 and "Traceback" not in out
    assert f"report.dir={str(tmp_path / folder)!r} must be a folder tuner can write into (or create)" in out
    assert (tmp_path / "taken").read_text() == "a file"


@pytest.mark.slow
def test_report_works_on_a_study_that_is_still_running(digits_study: tuple[list[str], Any], tmp_path: Path) -> None:
    overrides, study = digits_study
    url = f"sqlite:///{tmp_path / 'live.db'}"
    live = optuna.create_study(study_name="digits-mlp", storage=url, direction="maximize")
    live.add_trials(study.trials)  # a copy, so the shared study stays as it is
    running = live.ask({name: dist for name, dist in study.best_trial.distributions.items()})
    running.report(0.5, 1)  # a worker is mid-trial: one epoch reported, no result yet
    copied = [o for o in overrides if not o.startswith("study.storage=")]
    result = run_report(tmp_path, *copied, f"study.storage={url}", f"report.dir={tmp_path / 'rep'}")
    assert result.returncode == 0, result.stderr
    assert "1 running" in result.stdout.lower(), result.stdout
    assert (tmp_path / "rep" / "index.html").exists()
    assert optuna.load_study(study_name="digits-mlp", storage=url).trials[-1].state == optuna.trial.TrialState.RUNNING
