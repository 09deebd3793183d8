"""Plotly figures for the dashboard and the report: unlike Optuna's ``plot_intermediate_values`` and slice plot,
they tell pruned trials from completed ones and show accuracy against the learning rate on a log axis.
"""

from __future__ import annotations

import warnings

import optuna
import plotly.graph_objects as go
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from tuner.space import Param

__all__ = [
    "BABYSIT_PLOT",
    "babysit_curves",
    "learning_curves",
    "save_babysit_plot",
    "save_dashboard_plots",
    "value_vs_param",
]

_STYLE = {
    TrialState.COMPLETE: {"color": "#1f77b4", "symbol": "circle", "dash": "solid", "width": 1.5},
    TrialState.PRUNED: {"color": "#b0b0b0", "symbol": "x", "dash": "dot", "width": 1.0},
    TrialState.RUNNING: {"color": "#2ca02c", "symbol": "diamond", "dash": "dash", "width": 1.0},
}


BABYSIT_PLOT = "babysit-curves"


def _last_value(trial: FrozenTrial) -> float | None:
    if trial.value is not None:
        return trial.value
    if trial.intermediate_values:
        return trial.intermediate_values[max(trial.intermediate_values)]
    return None


def value_vs_param(study: optuna.Study, param: Param) -> go.Figure:
    """val_accuracy against one param; pruned trials at their last reported value. Log axis for log params,
    and for reverse-log params the axis is 1 - value on a log scale (the scale they are sampled in)."""
    dist = param.distribution
    log = param.reverse_log or (isinstance(dist, (FloatDistribution, IntDistribution)) and dist.log)
    label = f"1 - {param.path}" if param.reverse_log else param.path
    fig = go.Figure()
    for state in (TrialState.COMPLETE, TrialState.PRUNED):
        trials = [t for t in study.get_trials(deepcopy=False, states=(state,)) if param.name in t.params]
        points = [(t.params[param.name], _last_value(t), t.number) for t in trials if _last_value(t) is not None]
        style = _STYLE[state]
        fig.add_trace(
            go.Scatter(
                x=[p[0] for p in points],
                y=[p[1] for p in points],
                text=[f"trial {p[2]}" for p in points],
                mode="markers",
                name=f"{state.name.lower()} ({len(points)})",
                marker={"color": style["color"], "symbol": style["symbol"], "size": 9},
            )
        )
    fig.update_layout(
        title=f"val_accuracy vs {label}",
        xaxis={"title": {"text": label}, "type": "log" if log else "-"},
        yaxis={"title": {"text": "val_accuracy (pruned: last reported)"}},
    )
    return fig


def learning_curves(study: optuna.Study) -> go.Figure:
    """val_accuracy per epoch for every trial: completed in colour, pruned grey and dotted, running dashed."""
    fig = go.Figure()
    shown: set[TrialState] = set()
    for trial in study.get_trials(deepcopy=False, states=tuple(_STYLE)):
        if not trial.intermediate_values:
            continue
        style = _STYLE[trial.state]
        steps = sorted(trial.intermediate_values)
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=[trial.intermediate_values[s] for s in steps],
                mode="lines+markers",
                name=trial.state.name.lower(),
                legendgroup=trial.state.name,
                showlegend=trial.state not in shown,
                text=f"trial {trial.number}",
                line={"color": style["color"], "dash": style["dash"], "width": style["width"]},
                marker={"symbol": style["symbol"], "size": 5},
            )
        )
        shown.add(trial.state)
    fig.update_layout(
        title="Learning curves: val_accuracy per epoch (pruned trials grey, dotted)",
        xaxis={"title": {"text": "epoch"}, "dtick": 1},
        yaxis={"title": {"text": "val_accuracy"}},
    )
    return fig


def save_dashboard_plots(study: optuna.Study, params: list[Param]) -> list[str]:
    """Store the custom figures on the study, where optuna-dashboard shows them; returns their ids."""
    import optuna_dashboard  # slow to import: only once a study has run

    figures = {"learning-curves-by-state": learning_curves(study)}
    for param in params:
        if param.path == "optimizer.lr":
            figures["val-accuracy-vs-learning-rate"] = value_vs_param(study, param)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return [
            optuna_dashboard.save_plotly_graph_object(study, fig, graph_object_id=key) for key, fig in figures.items()
        ]


def _change_text(event: dict[str, object]) -> str:
    if event.get("applied"):
        return f"{event['key']} {event['old']} -> {event['new']} ({event['source']})"
    return f"rejected {event['key']}={event['new']!r} ({event['source']}): {event.get('reason')}"


def babysit_curves(study: optuna.Study) -> go.Figure:
    """Each babysat trial's val_accuracy per epoch (a fork drawn from its parent's epoch on), with its changes
    marked where they took effect: stars for applied values, crosses for rejected ones."""
    fig = go.Figure()
    for trial in study.get_trials(deepcopy=False):
        values = trial.intermediate_values
        parent = trial.user_attrs.get("babysit_parent") or {}
        first = int(parent.get("epoch", 0)) if parent.get("study") == study.study_name else 0
        steps = [s for s in sorted(values) if s >= first]
        if not steps:
            continue
        label = f"trial {trial.number} ({trial.state.name.lower()})"
        if parent:
            label += f", from {parent.get('study')} #{parent.get('trial')} at epoch {parent.get('epoch')}"
        fig.add_trace(go.Scatter(x=steps, y=[values[s] for s in steps], mode="lines+markers", name=label))
        events = [e for e in trial.user_attrs.get("babysit_events") or [] if isinstance(e, dict)]
        for applied in (True, False):
            marked = [e for e in events if bool(e.get("applied")) == applied and int(e["epoch"]) in values]
            if marked:
                fig.add_trace(
                    go.Scatter(
                        x=[int(e["epoch"]) for e in marked],
                        y=[values[int(e["epoch"])] for e in marked],
                        mode="markers",
                        name=f"trial {trial.number}: {'changes' if applied else 'rejected'}",
                        text=[_change_text(e) for e in marked],
                        hoverinfo="text",
                        marker={"symbol": "star" if applied else "x", "size": 14, "color": None if applied else "red"},
                    )
                )
    fig.update_layout(
        title="Babysat runs: val_accuracy per epoch, changes marked after the epoch they follow",
        xaxis={"title": {"text": "epoch"}},
        yaxis={"title": {"text": "val_accuracy"}},
    )
    return fig


def save_babysit_plot(study: optuna.Study) -> None:
    """Store ``babysit_curves`` on the study, where optuna-dashboard shows it (replacing the last one)."""
    import optuna_dashboard

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna_dashboard.save_plotly_graph_object(study, babysit_curves(study), graph_object_id=BABYSIT_PLOT)
