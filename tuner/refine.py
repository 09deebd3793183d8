"""``python -m tuner.refine``: coarse to fine. Narrow a finished study's (``study.name``) space around its top
``refine.top_k`` trials into a space YAML, and create, warm-start and run the child study.
"""

from __future__ import annotations

import logging
import math
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from tuner.__main__ import cli, command
from tuner.config import ConfigError, get_path, parse_command_section, parse_run, set_path
from tuner.space import Param, describe_range, entry_param, parse_space

__all__ = ["Change", "main", "narrow", "refine", "space_yaml"]

log = logging.getLogger("tuner")
# Bounds are rounded outward to this many significant digits, so the YAML reads like a person wrote it.
SIGNIFICANT = 3


@dataclass(frozen=True)
class Change:
    path: str
    before: str
    after: str


def _round_out(x: float, *, down: bool) -> float:
    """``x`` rounded to SIGNIFICANT digits, toward -inf (``down``) or +inf."""
    if x == 0:
        return 0.0
    exponent = math.floor(math.log10(abs(x))) - SIGNIFICANT + 1
    scaled = round(x / 10**exponent, 6)  # 123.0000001 is 123, not 124
    scaled = math.floor(scaled) if down else math.ceil(scaled)
    return float(f"{scaled * 10**exponent:.12g}")


def _narrow_numeric(param: Param, values: list[float], margin: float) -> tuple[float, float]:
    """The new (low, high) in sampled values: the span of ``values`` in the param's scale, widened by
    ``margin`` of the parent's width per side, rounded outward, clipped to the parent's range."""
    dist = param.distribution
    assert isinstance(dist, (FloatDistribution, IntDistribution))
    to_scale = math.log10 if dist.log else float
    from_scale = (lambda v: 10**v) if dist.log else float
    pad = margin * (to_scale(dist.high) - to_scale(dist.low))
    low = max(dist.low, from_scale(to_scale(min(values)) - pad))
    high = min(dist.high, from_scale(to_scale(max(values)) + pad))
    if dist.step is not None:  # snap outward to the parent's grid
        step = dist.step
        low = dist.low + math.floor((low - dist.low) / step + 1e-9) * step
        high = dist.low + math.ceil((high - dist.low) / step - 1e-9) * step
    if isinstance(dist, IntDistribution):
        if low == high:  # an int range needs two values: take one step toward the side with room
            high, low = (high + dist.step, low) if high + dist.step <= dist.high else (high, low - dist.step)
        return int(low), int(min(high, dist.high))
    if dist.step is not None:
        return float(f"{low:.12g}"), float(f"{min(high, dist.high):.12g}")
    return max(dist.low, _round_out(low, down=True)), min(dist.high, _round_out(high, down=False))


def narrow(
    params: Sequence[Param], entries: Mapping[str, Mapping[str, Any]], top: Sequence[FrozenTrial], *, margin: float
) -> tuple[dict[str, Any], list[Change]]:
    """The refined space (a tree like conf/space/*.yaml) and each param's change; ``entries`` are the parent's
    space entries by config path, and each new entry keeps its ``when``."""
    space: dict[str, Any] = {}
    changes = []
    for param in params:
        entry = dict(entries[param.path])
        values = [t.params[param.name] for t in top if param.name in t.params]
        dist = param.distribution
        if not values:
            new = entry
        elif isinstance(dist, CategoricalDistribution):
            new = {"type": "categorical", "choices": [c for c in dist.choices if c in values]}
        else:
            low, high = _narrow_numeric(param, values, margin)
            if param.reverse_log:  # the sampled value is 1 - beta: turn the bounds back into beta's
                new = {"type": "float", "low": round(1 - high, 12), "high": round(1 - low, 12), "reverse_log": True}
            else:
                new = {"type": entry["type"], "low": low, "high": high}
                for key in ("log", "step"):
                    if key in entry:
                        new[key] = entry[key]
        if "when" in entry:
            new["when"] = entry["when"]
        node = space
        *parents, leaf = param.path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = new
        after = describe_range(entry_param(param.path, new)) if values else "unchanged: no top trial sampled it"
        changes.append(Change(param.path, describe_range(param), after))
    return space, changes


def space_yaml(space: Mapping[str, Any], changes: Sequence[Change], header: Sequence[str]) -> str:
    """The refined space as YAML a person can read and edit: one flow-style entry per line, the parent's
    range as a comment beside it."""
    before = {c.path: c.before for c in changes}
    lines = [f"# {h}" if h else "#" for h in header]

    def emit(node: Mapping[str, Any], prefix: str, indent: int) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, Mapping) and "type" in value:
                flow = yaml.safe_dump(dict(value), default_flow_style=True, sort_keys=False, width=10_000).strip()
                lines.append(f"{'  ' * indent}{key}: {flow}  # parent: {before.get(path, '?')}")
            else:
                lines.append(f"{'  ' * indent}{key}:")
                emit(value, path + ".", indent + 1)

    emit(space, "", 0)
    return "\n".join(lines) + "\n"


def _top_trials(study: optuna.Study, k: int) -> tuple[list[FrozenTrial], int]:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    reverse = study.direction == optuna.study.StudyDirection.MAXIMIZE
    ranked = sorted(complete, key=lambda t: (t.value if reverse else -t.value, -t.number), reverse=True)  # type: ignore[operator]
    return ranked[:k], len(complete)


def _child_output_dir(output_dir: str, parent: str, child: str) -> str:
    path = Path(output_dir)
    return str(path.with_name(child) if path.name == parent else path / child)


def refine(raw: dict[str, Any]) -> None:
    """``python -m tuner.refine``: write the narrowed space, create the child study and run it."""
    from tuner.data import load_splits
    from tuner.definition import data_content
    from tuner.notes import REFINED_FROM_ATTR, write_start_note
    from tuner.paths import check_folder
    from tuner.secrets import safe_url
    from tuner.stored import check_experiment, load_existing_study, open_existing_storage, study_names
    from tuner.study import open_study
    from tuner.tune import prepare, tune

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    run = parse_run(raw)
    opts = parse_command_section(raw, "refine")
    check_folder("refine.space_dir", opts.space_dir)
    storage = open_existing_storage(run.study.storage)
    parent = load_existing_study(run, storage)
    check_experiment(parent, run, content=data_content(load_splits(run.trial.data).arrays()))
    stored = parent.user_attrs.get("config")
    if not isinstance(stored, dict) or not isinstance(stored.get("space"), dict) or not stored["space"]:
        raise ConfigError(
            f"study.name={parent.study_name!r} has no search space stored with it: refine needs a study "
            "that python -m tuner wrote with at least one searched param."
        )
    params = parse_space(stored["space"], stored)
    top, completed = _top_trials(parent, opts.top_k)
    if completed < 2 * opts.top_k:
        raise ConfigError(
            f"study.name={parent.study_name!r} has {completed} completed trial(s); refine.top_k={opts.top_k} "
            f"needs at least {2 * opts.top_k} (the top {opts.top_k} must be picked from twice as many). "
            "Run more trials or lower refine.top_k."
        )
    if opts.name in study_names(storage):
        raise ConfigError(
            f"refine.name={opts.name!r} is already a study in {safe_url(run.study.storage)}: continue it with "
            "python -m tuner study.name=... (the command refine printed), or pick another refine.name."
        )
    running = len(parent.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
    entries = {p.path: get_path(stored["space"], p.path) for p in params}
    space, changes = narrow(params, entries, top, margin=opts.margin)
    child_raw = set_path(
        {**raw, "space": space},
        {
            "study.name": opts.name,
            "study.n_trials": opts.n_trials,
            "study.output_dir": _child_output_dir(run.study.output_dir, parent.study_name, opts.name),
        },
    )
    child_run, child_params = prepare(child_raw)
    if running:
        log.warning(
            "study %r still has %d running trial(s): refining from its completed ones", parent.study_name, running
        )

    space_dir = Path(opts.space_dir).resolve()
    space_file = space_dir / "space" / f"{opts.name}.yaml"
    values = [t.value for t in top]
    command = (
        shlex.join(
            [
                "python",
                "-m",
                "tuner",
                f"hydra.searchpath=[file://{space_dir}]",
                f"space={opts.name}",
                f"study.name={opts.name}",
                f"study.output_dir={child_run.study.output_dir}",
            ]
        )
        + " <the parent's other overrides>"
    )
    header = [
        f"Search space refined from study {parent.study_name!r} in {safe_url(run.study.storage)}:",
        f"the top {len(top)} of {completed} completed trials (val_accuracy {min(values):.4f} .. {max(values):.4f}).",  # type: ignore[type-var]
        "Each range is their span in the param's own scale (log for log params, log(1 - value) for reverse_log",
        f"ones), widened by refine.margin={opts.margin:g} of the parent's width on each side, rounded outward to",
        f"{SIGNIFICANT} significant digits and kept inside the parent's range; categoricals keep the choices the",
        "top trials used. Edit freely, then run it with:",
        f"  {command}",
        "",
    ]
    space_file.parent.mkdir(parents=True, exist_ok=True)
    space_file.write_text(space_yaml(space, changes, header), encoding="utf-8")

    child = open_study(child_run, storage)
    child.set_user_attr(
        REFINED_FROM_ATTR,
        {
            "study": parent.study_name,
            "top_k": len(top),
            "completed": completed,
            "space_file": str(space_file),
            "changes": [[c.path, c.before, c.after] for c in changes],
        },
    )
    if opts.enqueue:
        for trial in top:
            child.enqueue_trial(trial.params, user_attrs={"warm_start": f"{parent.study_name}#{trial.number}"})
    write_start_note(child, child_run, child_params)
    width = max(len(c.path) for c in changes)
    print(f"refined {parent.study_name!r} -> {opts.name!r}; space written to {space_file}", flush=True)
    print("\n".join(f"  {c.path.ljust(width)}  {c.before}  ->  {c.after}" for c in changes), flush=True)
    print(f"continue it with: {command}", flush=True)
    if opts.run:
        tune(child_run, child_params)


main = command(refine)

if __name__ == "__main__":
    cli(main)
