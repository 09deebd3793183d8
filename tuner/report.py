"""``python -m tuner.report``: what mattered in a study (running or finished), printed and as ``report.dir``:
``index.html`` (Optuna's plotly figures and tuner's own) with ``plotly.min.js`` beside it so it opens offline,
``summary.txt`` and ``importances.json``.
"""

from __future__ import annotations

import html
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import optuna
import plotly.graph_objects as go
from optuna.trial import TrialState
from plotly.offline import get_plotlyjs

from tuner.__main__ import cli, command
from tuner.config import ConfigError, parse_command_section, parse_run
from tuner.importance import EVALUATOR_TITLES, EVALUATORS, LESSON_ORDER, make_evaluator, param_importances, tier_of
from tuner.plots import babysit_curves, learning_curves, value_vs_param
from tuner.space import Param, values_from_params
from tuner.summary import count_states, fmt, rows_table

__all__ = ["build_figures", "main"]

log = logging.getLogger("tuner")


def summary_text(study: optuna.Study, params: list[Param], storage: str) -> str:
    trials = study.get_trials(deepcopy=False)
    states = ", ".join(f"{n} {state.lower()}" for state, n in count_states(study).items())
    rows = [("study", study.study_name), ("storage", storage), ("trials", f"{len(trials)} ({states})")]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        rows += [
            ("best trial", f"#{best.number}"),
            (study.metric_names[0] if study.metric_names else "value", fmt(best.value)),
        ]
        test = study.user_attrs.get("test_accuracy")
        if isinstance(test, dict) and test.get("trial") == best.number:
            rows.append(("test_accuracy", f"{test['value']:.4f} ({test['samples']} held-out samples)"))
        rows += [(f"  {k}", fmt(v)) for k, v in values_from_params(params, best.params).items()]
    else:
        rows.append(("best trial", "none completed yet"))
    return rows_table(rows)


def importance_table(importances: dict[str, dict[str, float]], primary: str) -> str:
    names = list(importances[primary]) or sorted({n for imp in importances.values() for n in imp})
    columns = [primary, *(e for e in importances if e != primary)]
    head = ["rank", "parameter", *(EVALUATOR_TITLES[e] + (" (sorts)" if e == primary else "") for e in columns)]
    head.append("lesson's tier")
    rows = [head]
    for rank, name in enumerate(names, start=1):
        cells = [f"{importances[e][name]:.3f}" if name in importances[e] else "-" for e in columns]
        rows.append([str(rank), name, *cells, str(tier_of(name) or "-")])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def build_figures(study: optuna.Study, params: list[Param], evaluator: str) -> dict[str, go.Figure]:
    """The report's figures by title. Optuna's slice plot already puts log-scaled params on a log axis, and a
    reverse-log param is stored as ``1-<path>`` with a log distribution, so its panel shows 1 - beta on a log axis."""
    vis = optuna.visualization
    figures: dict[str, go.Figure] = {"Optimization history": vis.plot_optimization_history(study)}
    figures["Learning curves (pruned trials grey, dotted)"] = learning_curves(study)
    for param in params:
        if param.path == "optimizer.lr":
            figures["val_accuracy vs learning rate"] = value_vs_param(study, param)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if complete:
        figures["Slice plots (log axes for log and reverse-log params)"] = vis.plot_slice(study)
        figures["Parallel coordinates"] = vis.plot_parallel_coordinate(study)
    if len(complete) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PED-ANOVA's per-param "few trials" warnings; the table says n
            figures[f"Importance ({EVALUATOR_TITLES[evaluator]})"] = vis.plot_param_importances(
                study, evaluator=make_evaluator(evaluator)
            )
    return figures


def babysit_text(study: optuna.Study, storage: str) -> str:
    """A babysit study's trials (how each started and ended) and every change a person made, in order."""
    rows = [("study", f"{study.study_name} (babysat trials)"), ("storage", storage)]
    events = []
    for t in study.get_trials(deepcopy=False):
        parent = t.user_attrs.get("babysit_parent")
        origin = f", from {parent['study']} #{parent['trial']} at epoch {parent['epoch']}" if parent else ""
        value = fmt(t.value) if t.value is not None else "-"
        rows.append(
            (
                f"trial {t.number}",
                f"{t.state.name.lower()}, {t.user_attrs.get('epochs_run', 0)} epochs, val_accuracy {value}{origin}",
            )
        )
        for e in t.user_attrs.get("babysit_events") or []:
            done = f"{e['old']} -> {e['new']}" if e.get("applied") else f"{e['new']!r} rejected: {e.get('reason')}"
            events.append(f"trial {t.number} after epoch {e['epoch']}: {e['key']} {done} ({e['source']})")
    return rows_table(rows) + "\n\nchanges\n" + ("\n".join(events) or "none")


def write_report(study: optuna.Study, params: list[Param], folder: Path, *, storage: str, evaluator: str) -> str:
    """Compute everything first, then write the folder; returns the summary and the importance table."""
    if not study.get_trials(deepcopy=False):
        raise ConfigError(f"study.name={study.study_name!r} has no trials yet: nothing to report.")
    if study.user_attrs.get("babysit"):  # no search to rank: the curves with their changes (tuner.babysit)
        summary, table, importances = babysit_text(study, storage), "", {}
        figures = {"Babysat runs, with the changes marked": babysit_curves(study)}
    else:
        summary = summary_text(study, params, storage)
        # {evaluator: {param: importance}}, each highest first; empty where too few trials to say
        importances = {name: param_importances(study, name) for name in EVALUATORS}
        table = importance_table(importances, evaluator)
        figures = build_figures(study, params, evaluator)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plotly.min.js").write_text(get_plotlyjs(), encoding="utf-8")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>tuner report: {html.escape(study.study_name)}</title>",
        "<script src='plotly.min.js'></script>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:1200px} pre{background:#f4f4f4;padding:1em}</style>",
        f"</head><body><h1>Study {html.escape(study.study_name)}</h1>",
        f"<pre>{html.escape(summary)}</pre>",
    ]
    if importances:
        parts += [
            f"<h2>What mattered</h2><pre>{html.escape(table)}</pre>",
            f"<p>Sorted by {EVALUATOR_TITLES[evaluator]} (Optuna 5's default is PED-ANOVA); evaluators can "
            f"disagree, so all three are shown; '-': not ranked by that evaluator (fANOVA and MDI leave out params "
            f"missing from some completed trials, such as momentum for SGD only). The lesson's order: "
            f"{html.escape(LESSON_ORDER)}.</p>",
        ]
    for title, fig in figures.items():
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=False))
    parts.append("</body></html>")
    (folder / "index.html").write_text("\n".join(parts), encoding="utf-8")
    (folder / "summary.txt").write_text(summary + "\n\n" + table + "\n", encoding="utf-8")
    (folder / "importances.json").write_text(
        json.dumps({"sorted_by": evaluator, "importances": importances}, indent=2), encoding="utf-8"
    )
    return f"{summary}\n\nparameter importance\n{table}" if importances else summary


def report(raw: dict[str, Any]) -> None:
    """``python -m tuner.report``: write the report of ``study.name`` and print its summary."""
    from tuner.paths import check_folder
    from tuner.secrets import safe_url
    from tuner.stored import check_experiment, load_existing_study, study_params

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run = parse_run(raw)
    section = parse_command_section(raw, "report")
    folder, evaluator = Path(section.dir), section.evaluator
    make_evaluator(evaluator)  # an unknown report.evaluator stops here, before the study is read
    check_folder("report.dir", folder)
    study = load_existing_study(run)
    check_experiment(study, run)
    text = write_report(study, study_params(study), folder, storage=safe_url(run.study.storage), evaluator=evaluator)
    print(f"{text}\n\nreport: {folder / 'index.html'}", flush=True)


main = command(report)

if __name__ == "__main__":
    cli(main)
