"""``hydra/sweeper=tuner``: each Hydra job is one trial of one Optuna study, and jobs can be pruned.

The sweeper asks and tells the trials; each job (``python -m tuner.train``) gets its values and its trial's
identity as overrides, rebuilds the live trial (``tuner.handoff``) and reports each epoch. Hydra's sweep grammar
becomes a ``space`` (docs/architecture.md has the table), or the ``space`` group is used when there is no sweep.
Hydra's ``Launcher.launch`` blocks until a whole batch ends, so each of the ``n_jobs`` slots is a thread that
launches batches of one (hydra-core 1.3.8, hydra-joblib-launcher 1.2.0).
"""

from __future__ import annotations

import logging
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, QuotedString, RangeSweep
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf, open_dict

from tuner.__main__ import to_container
from tuner.config import ConfigError, RunConfig
from tuner.data import load_splits
from tuner.definition import data_content, definition
from tuner.handoff import TrialHandle
from tuner.multirun import format_table, jobs_at_once, storage_url, study_row
from tuner.secrets import mask_passwords_in_logs, safe_url
from tuner.space import Param, describe, suggest
from tuner.storage import make_storage
from tuner.study import finished_trials, open_study
from tuner.summary import count_states, trial_line
from tuner.trainer import TrainingDiverged

__all__ = ["SweepPlan", "encode_value", "plan_sweep", "run_sweep", "space_from_overrides", "sweep_or_exit"]

log = logging.getLogger("tuner")

_TAGS = ("log", "reverse_log")


def _plain(value: Any) -> Any:
    return value.text if isinstance(value, QuotedString) else value


def _sweep_entry(override: Override) -> dict[str, Any]:
    """One ``tuner.space`` entry for one sweep override (the key is checked against the config later)."""
    key = override.key_or_group
    sweep = override.value()
    tags = set(getattr(sweep, "tags", set()))
    unknown = sorted(tags - set(_TAGS))
    if unknown:
        raise ConfigError(f"{key}: unknown tag {unknown}; the tuner sweeper knows {', '.join(_TAGS)}.")
    if tags and not isinstance(sweep, IntervalSweep):
        raise ConfigError(f"{key}: tags ({', '.join(sorted(tags))}) apply to interval(...) only, but got {sweep}.")
    if isinstance(sweep, IntervalSweep):
        start, end = sweep.start, sweep.end
        # Hydra's interval() gives floats; int(interval(...)) casts both ends to int.
        entry: dict[str, Any] = {
            "type": "int" if isinstance(start, int) and isinstance(end, int) else "float",
            "low": start,
            "high": end,
        }
        for tag in tags:
            entry[tag] = True
        return entry
    if isinstance(sweep, RangeSweep):
        values = [_plain(v) for v in override.sweep_iterator()]
        if not values:
            raise ConfigError(f"{key}: {override.get_value_element_as_str()} holds no values.")
        numbers = (sweep.start, sweep.stop, sweep.step)
        if sweep.shuffle or len(values) == 1 or any(isinstance(n, float) for n in numbers):
            return {"type": "categorical", "choices": values}
        # range(a, b, step) excludes b, as in Hydra's basic sweeper: the int distribution ends at the last value.
        return {"type": "int", "low": min(values), "high": max(values), "step": abs(int(sweep.step))}
    if isinstance(sweep, ChoiceSweep):
        return {"type": "categorical", "choices": [_plain(v) for v in sweep.list]}
    raise ConfigError(f"{key}: the tuner sweeper cannot search {override.get_value_element_as_str()!r}.")


def space_from_overrides(overrides: list[Override]) -> tuple[dict[str, Any], list[str]]:
    """Split parsed overrides into a ``tuner.space`` mapping (the sweeps) and the fixed overrides for every job."""
    space: dict[str, Any] = {}
    fixed: list[str] = []
    for override in overrides:
        if override.is_sweep_override():
            space[override.key_or_group] = _sweep_entry(override)
        else:
            fixed.append(f"{override.get_key_element()}={override.get_value_element_as_str()}")
    return space, fixed


def encode_value(value: Any) -> str:
    """A sampled value as a Hydra override value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass(frozen=True)
class SweepPlan:
    """The checked study settings, search space and fixed overrides of one sweep."""

    run: RunConfig
    params: list[Param]
    raw: dict[str, Any]  # the jobs' common config, with the search space as ``space``
    fixed: list[str]  # the command line's overrides that are not sweeps, passed to every job


def plan_sweep(hydra_context: HydraContext, config: DictConfig, arguments: list[str]) -> SweepPlan:
    """Compose the jobs' common config and the search space; raises ``ConfigError`` on bad input."""
    from tuner.tune import prepare  # torch is imported only once the sweep is known to be valid

    parser = OverridesParser.create(config_loader=hydra_context.config_loader)
    space, fixed = space_from_overrides(parser.parse_overrides(arguments))
    job_cfg = hydra_context.config_loader.load_sweep_config(master_config=config, sweep_overrides=list(fixed))
    with open_dict(job_cfg):
        del job_cfg["hydra"]  # its job fields (hydra.job.num, ...) are set only per job
    raw = to_container(job_cfg)
    if space:
        raw["space"] = space  # sweeps on the command line replace the space config group
    run, params = prepare(raw)
    if run.trial.trainer.pack not in (1, None):  # each job trains one trial: nothing to pack it with (auto: 1)
        raise ConfigError(
            f"trainer.pack={raw['trainer']['pack']} packs the trials of python -m tuner; a sweeper job trains one "
            "trial: leave trainer.pack at auto or 1 with hydra/sweeper=tuner."
        )
    return SweepPlan(run, params, raw, fixed)


def _slots(config: DictConfig, requested: int | None) -> int:
    target = str(OmegaConf.select(config, "hydra.launcher._target_", default=""))
    if target.endswith("BasicLauncher"):
        return 1  # runs jobs in this process, one at a time
    if requested is not None:
        return max(1, requested)
    return jobs_at_once(OmegaConf.select(config, "hydra.launcher.n_jobs", default=1))


def run_sweep(plan: SweepPlan, launcher: Launcher, config: DictConfig, *, n_jobs: int | None) -> dict[str, int]:
    """Ask, launch and tell until the study holds ``study.n_trials`` finished trials; return the state counts."""
    run = plan.run
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # The same check as python -m tuner: a stored study is one experiment (tuner.definition).
    defined = definition(plan.raw, plan.params, data_content(load_splits(run.trial.data).arrays()))
    study = open_study(run, make_storage(run.study.storage), defined=defined)
    remaining = max(run.study.n_trials - finished_trials(study), 0)
    slots = min(_slots(config, n_jobs), max(remaining, 1))
    log.info(
        "study %r in %s: %d finished trials, %d to run in %d slot(s)\n  %s",
        study.study_name,
        safe_url(run.study.storage),
        finished_trials(study),
        remaining,
        slots,
        "\n  ".join(describe(p) for p in plan.params),
    )
    lock = threading.Lock()
    asked = 0
    errors: list[BaseException] = []

    def next_trial() -> tuple[optuna.Trial, list[str]] | None:
        nonlocal asked
        with lock:  # one sampler, one ask at a time
            if asked >= remaining or errors:
                return None
            asked += 1
            trial = study.ask()
            values = suggest(trial, plan.params, plan.raw)
        handle = TrialHandle(study=study.study_name, trial=trial.number)
        values_overrides = [f"{path}={encode_value(v)}" for path, v in values.items()]
        return trial, [*plan.fixed, *values_overrides, *handle.overrides()]

    def tell(trial: optuna.Trial, ret: Any) -> None:
        try:
            value = ret.return_value  # re-raises the job's exception
        except TrainingDiverged as err:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            log.warning("trial %d failed: %s", trial.number, err)
        except Exception as err:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            errors.append(err)  # like study.optimize: an unexpected error stops the sweep
        else:
            if isinstance(value, optuna.TrialPruned):  # tuner.train returns, not raises, its pruning
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                study.tell(trial, float(value))
        frozen = study.get_trials(deepcopy=False)[trial.number]  # study.trials deep-copies every trial
        try:
            best: optuna.trial.FrozenTrial | None = study.best_trial
        except ValueError:
            best = None
        log.info(trial_line(frozen, best))

    def slot() -> None:
        while (job := next_trial()) is not None:
            trial, overrides = job
            try:
                (ret,) = launcher.launch([overrides], initial_job_idx=trial.number)
            except BaseException as err:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                errors.append(err)
                return
            tell(trial, ret)

    with ThreadPoolExecutor(max_workers=slots, thread_name_prefix="tuner-slot") as pool:
        futures = [pool.submit(slot) for _ in range(slots)]
        try:
            for future in futures:
                future.result()
        except KeyboardInterrupt:  # Ctrl-C reaches this thread only: let the slots stop after their jobs
            errors.append(KeyboardInterrupt())
            log.error("interrupted: waiting for the running jobs; run the same command again to continue")
            raise
    if errors:
        raise errors[0]
    return count_states(study)


def sweep_or_exit(
    hydra_context: HydraContext, config: DictConfig, launcher: Launcher, arguments: list[str], *, n_jobs: int | None
) -> dict[str, int]:
    """The sweeper's body: one clear line and exit 2 on bad input, nothing written to storage."""
    # The launcher logs each job's overrides, the storage URL among them.
    mask_passwords_in_logs(storage_url(config))
    try:
        plan = plan_sweep(hydra_context, config, arguments)
        states = run_sweep(plan, launcher, config, n_jobs=n_jobs)
    except ConfigError as err:
        log.error("%s", err)
        sys.exit(2)
    score_sweep(plan)
    log.info("%s", format_table([study_row(plan.run.study.name, plan.run.study.storage)]))
    return states


def score_sweep(plan: SweepPlan) -> None:
    """Score the study's best trial on the test split once, as ``python -m tuner`` does at its end."""
    from tuner.objective import Objective
    from tuner.tune import score_best

    storage = make_storage(plan.run.study.storage)
    study = optuna.load_study(study_name=plan.run.study.name, storage=storage)
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return
    # The jobs (tuner.train) save each new best where this objective looks for it.
    objective = Objective(plan.run, plan.params, best_model_path=Path(plan.run.study.output_dir) / "best_model.pt")
    scored = score_best(study, storage, objective)
    if scored is not None:
        log.info("best trial %d: test_accuracy %.4f on %d test samples", study.best_trial.number, *scored)
