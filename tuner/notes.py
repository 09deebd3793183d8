"""The study's note in optuna-dashboard (markdown): what was run when it starts, what came out when it ends."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from tuner.config import RunConfig
from tuner.importance import EVALUATOR_TITLES, LESSON_ORDER, param_importances, tier_of
from tuner.secrets import mask_password, safe_url
from tuner.space import Param, describe_range, values_from_params
from tuner.summary import count_states, fmt

__all__ = ["REFINED_FROM_ATTR", "command_line", "end_note", "write_end_note", "write_start_note"]

# Study user attr set by tuner.refine: {"study", "top_k", "completed", "space_file", "changes": [[path, before, after]]}
REFINED_FROM_ATTR = "refined_from"
RESULTS_HEADING = "## Results"
NOTE_HEADING = "# Study `"  # how tuner's notes begin; a note that begins otherwise was written by a person
KEPT_HEADING = "## Your earlier note"


def command_line(argv: list[str] | None = None) -> str:
    """This process's command as a user typed it: ``python -m tuner ...`` rather than a path to ``__main__.py``."""
    argv = list(sys.argv if argv is None else argv)
    first = Path(argv[0]) if argv else Path("python")
    if first.name == "__main__.py" and first.parent.name == "tuner":
        return shlex.join(["python", "-m", "tuner", *argv[1:]])
    if first.suffix == ".py" and first.parent.name == "tuner":
        return shlex.join(["python", "-m", f"tuner.{first.stem}", *argv[1:]])
    return shlex.join([first.name, *argv[1:]])


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|")


def space_rows(params: list[Param]) -> list[tuple[str, str, str]]:
    """(config path, range, condition) per param, each range in the values the config receives."""
    rows = []
    for p in params:
        stored = f" (stored as `{p.name}`)" if p.name != p.path else ""
        rows.append((p.path, describe_range(p) + stored, "; ".join(f"{k} in {list(v)}" for k, v in p.when.items())))
    return rows


def _plugin(name: str, options: dict[str, Any]) -> str:
    return name + (f" ({', '.join(f'{k}={v}' for k, v in options.items())})" if options else "")


def start_note(run: RunConfig, params: list[Param], *, command: str, refined_from: dict[str, Any] | None = None) -> str:
    t, s = run.trial, run.study
    model = _plugin(t.model.target, t.model.options)
    lines = [
        f"{NOTE_HEADING}{s.name}`",
        "",
        f"Run started {time.strftime('%Y-%m-%d %H:%M:%S %Z')} with:",
        "",
        f"```\n{command}\n```",
        "",
        "| setting | value |",
        "|---|---|",
        f"| data set | {t.data.name} (batch {t.data.batch_size}, val fraction {t.data.val_fraction:g}, "
        f"train subset {t.data.train_subset or 'all'}) |",
        f"| model | {_cell(model)} |",
        f"| optimizer | {t.optimizer.name}, lr {t.optimizer.lr:g} (base values; the space below overrides) |",
        f"| training | {t.trainer.epochs} epochs per trial, device {t.trainer.device} |",
        f"| sampler | {_cell(_plugin(run.sampler.name, {**run.sampler.options, 'seed': s.seed}))} |",
        f"| pruner | {_cell(_plugin(run.pruner.name, run.pruner.options))} |",
        f"| objective | {s.direction} val_accuracy, {s.n_trials} trials in total |",
        f"| storage | {_cell(safe_url(s.storage))} |",
        "",
        "## Search space",
        "",
        "| parameter | range | sampled when |",
        "|---|---|---|",
        *(f"| `{p}` | {_cell(r)} | {_cell(w) or 'always'} |" for p, r, w in space_rows(params)),
    ]
    if not params:
        lines.append("| (none: every trial uses the base config) | | |")
    if refined_from:
        lines += [
            "",
            "## Refined from",
            "",
            f"Narrowed from study `{refined_from['study']}` around its top {refined_from['top_k']} of "
            f"{refined_from['completed']} completed trials (space file `{refined_from['space_file']}`).",
            "",
            "| parameter | parent's range | this study's range |",
            "|---|---|---|",
            *(f"| `{p}` | {_cell(before)} | {_cell(after)} |" for p, before, after in refined_from["changes"]),
        ]
    lines += ["", RESULTS_HEADING, "", "_The run is in progress: this section is written when it ends._"]
    return "\n".join(lines) + "\n"


def end_note(study: optuna.Study, params: list[Param], *, evaluator: str = "ped_anova") -> str:
    """The Results section: best trial, counts by state, importance beside the lesson's priority list."""
    states = ", ".join(f"{n} {state.lower()}" for state, n in count_states(study).items())
    lines = [RESULTS_HEADING, "", f"Run ended {time.strftime('%Y-%m-%d %H:%M:%S %Z')}. Trials: {states}.", ""]
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return "\n".join([*lines, "No trial completed."]) + "\n"
    best = study.best_trial
    lines += [f"**Best trial: #{best.number}**, val_accuracy {best.value:.4f}."]
    test = study.user_attrs.get("test_accuracy")
    if isinstance(test, dict) and test.get("trial") == best.number:
        lines[-1] += f" Test accuracy {test['value']:.4f} on {test['samples']} held-out samples (scored once)."
    lines += ["", "| parameter | value |", "|---|---|"]
    lines += [f"| `{k}` | {_cell(fmt(v))} |" for k, v in values_from_params(params, best.params).items()]
    importances = param_importances(study, evaluator)
    title = EVALUATOR_TITLES.get(evaluator, evaluator)
    lines += ["", f"### What mattered ({title} importance over {len(complete)} completed trials)", ""]
    if not importances:
        lines.append("Too few completed trials to rank the parameters.")
    else:
        lines += ["| rank | parameter | importance | lesson's tier |", "|---|---|---|---|"]
        lines += [
            f"| {rank} | `{name}` | {value:.3f} | {tier_of(name) or '-'} |"
            for rank, (name, value) in enumerate(importances.items(), start=1)
        ]
        left_out = [p.name for p in params if p.name not in importances]
        if left_out:
            lines += [
                "",
                "Not ranked (not in every completed trial, or fixed): " + ", ".join(f"`{n}`" for n in left_out),
            ]
    lines += [
        "",
        f"The lesson's priority list (tier 1 first): {LESSON_ORDER}. Other evaluators can rank differently: "
        "`python -m tuner.report report.evaluator=fanova`.",
    ]
    return "\n".join(lines) + "\n"


def write_start_note(study: optuna.Study, run: RunConfig, params: list[Param]) -> str:
    refined = study.user_attrs.get(REFINED_FROM_ATTR)
    note = start_note(
        run,
        params,
        # Each argument masked before shlex quotes it, which can split a password that holds a quote.
        command=command_line([mask_password(arg, run.study.storage) for arg in sys.argv]),
        refined_from=refined if isinstance(refined, dict) else None,
    )
    import optuna_dashboard  # slow to import: only when a study is open, not on every start-up

    earlier = optuna_dashboard.get_note(study)
    if earlier.strip() and not earlier.startswith(NOTE_HEADING):
        # A note a person wrote in the dashboard: keep it, below what tuner writes.
        note = note.replace(RESULTS_HEADING, f"{KEPT_HEADING}\n\n{earlier.strip()}\n\n{RESULTS_HEADING}", 1)
    elif KEPT_HEADING in earlier:
        kept = earlier.split(KEPT_HEADING, 1)[1].split(RESULTS_HEADING, 1)[0]
        note = note.replace(RESULTS_HEADING, f"{KEPT_HEADING}{kept}{RESULTS_HEADING}", 1)
    optuna_dashboard.save_note(study, note)
    return note


def write_end_note(study: optuna.Study, params: list[Param]) -> str:
    """Replace the note's Results section, keeping what the start note said."""
    import optuna_dashboard

    head = optuna_dashboard.get_note(study).split(RESULTS_HEADING, 1)[0]
    note = head + end_note(study, params)
    optuna_dashboard.save_note(study, note)
    return note
