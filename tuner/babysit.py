"""``python -m tuner.babysit``: train one model as one trial of a babysit study, watched and steered live.

The composed config's values train as a trial of ``babysit.study``; ``babysit.fork=N`` starts a new trial from
trial N's checkpoint (at ``babysit.fork_epoch``), ``babysit.from_best=true`` from ``study.name``'s best model.
Each trial records which command it answers (``babysit_run``): the same command again resumes that trial from
its last checkpoint, so an interrupted run stays one trial with one curve. Epochs: ``tuner.babysitter``.
"""

from __future__ import annotations

import fcntl
import logging
import sys
import warnings
from pathlib import Path
from typing import IO, Any

import optuna
import torch
from optuna.storages import BaseStorage

from tuner.__main__ import cli, command, set_on_command_line
from tuner.babysitter import STATUS_ATTR, Babysitter, checkpoints
from tuner.config import ConfigError, RunConfig, get_path, parse_command_section, parse_run
from tuner.definition import CONTENT_KEY, data_content
from tuner.faults import Interrupted, error_reason, interruptible, interrupts_allowed, interrupts_deferred
from tuner.origin import BABYSIT_ATTR, Origin, build_model_state, find_origin, run_key
from tuner.schema import BabysitConfig
from tuner.summary import fmt, rows_table

__all__ = ["BABYSIT_ATTR", "PARENT_ATTR", "RUN_ATTR", "babysit", "main"]

log = logging.getLogger("tuner")

CONTENT_ATTR = "data_content"  # on the study: the data every trial trains on (tuner.definition.data_content)
RUN_ATTR = "babysit_run"  # on a trial: the command it answers
CONFIG_ATTR = "babysit_config"  # on a trial: model, data, optimizer and trainer as it started
PARENT_ATTR = "babysit_parent"  # on a trial: {"study", "trial", "epoch"} it started from


def _open_babysit_study(run: RunConfig, name: str, storage: BaseStorage, content: str) -> optuna.Study:
    from tuner.secrets import safe_url

    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True)
    attrs, url = study.user_attrs, safe_url(run.study.storage)
    if not attrs.get(BABYSIT_ATTR):
        if study.get_trials(deepcopy=False) or "config" in attrs:
            raise ConfigError(f"babysit.study={name!r} in {url} is a tuning study, not a babysit study: use another.")
        study.set_user_attr(BABYSIT_ATTR, True)
        study.set_user_attr(CONTENT_ATTR, content)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(["val_accuracy"])
    elif attrs.get(CONTENT_ATTR) != content:
        raise ConfigError(
            f"babysit.study={name!r} in {url} babysits other data ({CONTENT_KEY}: {attrs.get(CONTENT_ATTR)} -> "
            f"{content}): other data is another experiment, use another babysit.study."
        )
    return study


def _lock(folder: Path, number: int, study: str) -> IO[str]:
    """Hold the trial's lock file while this process trains it (the kernel drops it when the process dies)."""
    folder.mkdir(parents=True, exist_ok=True)
    handle = (folder / ".lock").open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(f"trial {number} of babysit study {study!r} is being trained by another process.") from None
    return handle


def _claim(study: optuna.Study, storage: BaseStorage, origin: Origin, key: str, folder: Path) -> tuple[int, Any]:
    """The trial this command answers: found (to resume or report) or asked now; with its lock when running."""
    mine = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(RUN_ATTR) == key]
    if mine:
        found = mine[-1].number
        held = None if mine[-1].state.is_finished() else _lock(folder / f"trial-{found}", found, study.study_name)
        return found, held
    number = study.ask().number
    trial_id = storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)
    held = _lock(folder / f"trial-{number}", number, study.study_name)
    attrs = {RUN_ATTR: key, CONFIG_ATTR: origin.sections, "seed": origin.seed, STATUS_ATTR: "training"}
    if origin.parent is not None:
        attrs[PARENT_ATTR] = origin.parent
        attrs["history"] = [h for h in origin.history if h["epoch"] <= origin.parent["epoch"]]
    for name, value in attrs.items():
        storage.set_trial_user_attr(trial_id, name, value)
    for step, value in sorted(origin.curve.items()):  # the parent's curve up to where this trial starts
        if origin.parent is not None and step <= origin.parent["epoch"]:
            storage.set_trial_intermediate_value(trial_id, step, value)
    return number, held


def babysit(raw: dict[str, Any], changed: list[str] | None = None) -> None:
    """``python -m tuner.babysit``: train (or resume) the trial this command answers, until its epochs or stop.
    ``changed``: the settings the command line gives (a fork or a continued best trial takes them on)."""
    from tuner.paths import check_folder
    from tuner.storage import check_storage_url

    run = parse_run(raw)
    section = parse_command_section(raw, "babysit")
    check_storage_url(run.study.storage)
    check_folder("babysit.dir", section.dir)
    changed = set_on_command_line() if changed is None else changed
    for key in ("trainer.workers", "trainer.pack"):
        if key in changed:
            raise ConfigError(
                f"{key}={get_path(raw, key)!r}: python -m tuner.babysit trains one model in this process; leave "
                f"{key} out."
            )
    with interruptible():
        _babysit(run, section, changed)


def _babysit(run: RunConfig, section: BabysitConfig, changed: list[str]) -> None:
    from tuner.config import parse_trial
    from tuner.data import SplitsCache
    from tuner.secrets import safe_url
    from tuner.steering import EVENTS_ATTR, register_widgets
    from tuner.storage import make_storage, study_lock
    from tuner.trainer import resolve_device
    from tuner.tune import quiet_libraries

    quiet_libraries()
    storage = make_storage(run.study.storage)  # no heartbeats: a babysat trial is resumed, never failed for silence
    origin = find_origin(run, section, storage, changed)
    cfg = parse_trial({**run.raw, **origin.sections})
    if origin.parent is not None and cfg.trainer.epochs <= origin.parent["epoch"]:
        raise ConfigError(
            f"trainer.epochs={cfg.trainer.epochs}: it starts at epoch {origin.parent['epoch']} of "
            f"{origin.parent['study']} trial {origin.parent['trial']}; set trainer.epochs above that to train on."
        )
    if cfg.trainer.threads is not None:
        torch.set_num_threads(cfg.trainer.threads)
    try:
        device = resolve_device(cfg.trainer.device)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    with interrupts_allowed():
        splits = SplitsCache().get(cfg.data, device)  # before the storage is written: missing data leaves nothing
    content = data_content(splits.arrays())
    if origin.content is not None and origin.content != content:
        raise ConfigError(f"study.name={run.study.name!r} was tuned on other data ({origin.content} -> {content}).")
    with study_lock(run.study.storage, section.study):
        study = _open_babysit_study(run, section.study, storage, content)
        number, held = _claim(study, storage, origin, run_key(origin), Path(section.dir))
    trial = study.get_trials(deepcopy=False)[number]
    folder = Path(section.dir) / f"trial-{number}"
    if held is None:
        log.info(
            "babysit study %r trial %d is already %s (val_accuracy %s): fork it to train on: python -m tuner.babysit "
            "<the same overrides> babysit.fork=%d trainer.epochs=<more>",
            section.study,
            number,
            trial.state.name,
            fmt(trial.value),
            number,
        )
        return
    register_widgets(study, cfg.optimizer.name)
    model = build_model_state(origin, cfg, splits, device, folder, (section.study, number))
    log.info(
        "babysit study %r in %s: trial %d %s at epoch %d of %d; steer it from the dashboard (python -m "
        "tuner.dashboard <the same overrides>) or python -m tuner.steer <the same overrides> steer.lr=...",
        section.study,
        safe_url(run.study.storage),
        number,
        "resumes" if checkpoints(folder) else "starts",
        model.epoch,
        cfg.trainer.epochs,
    )
    sitter = Babysitter(
        study, storage, number, model, splits, folder=folder, keep=section.keep_checkpoints, stored=origin.sections
    )
    try:
        state = sitter.run()
    except Interrupted as err:
        with interrupts_deferred():
            status = f"interrupted by {err.signal_name} after epoch {model.epoch}"
            storage.set_trial_user_attr(sitter.trial_id, STATUS_ATTR, status)
        log.error("%s: run the same command again to continue from its checkpoint", status)
        sys.exit(143 if err.signal_name == "SIGTERM" else 130)
    except Exception as err:  # the trial stays RUNNING: the same command continues it once the cause is mended
        storage.set_trial_user_attr(sitter.trial_id, STATUS_ATTR, f"{error_reason(err)} after epoch {model.epoch}")
        raise
    final = storage.get_trial(sitter.trial_id)
    events = final.user_attrs.get(EVENTS_ATTR) or []
    rows = [
        ("babysit study", section.study),
        ("trial", f"#{number} {state.name}"),
        ("epochs", str(model.epoch)),
        ("val_accuracy", fmt(final.value) if final.value is not None else str(final.user_attrs.get("fail_reason"))),
        ("test_accuracy", fmt(final.user_attrs.get("test_accuracy"))),
        (
            "changes",
            f"{sum(bool(e.get('applied')) for e in events)} applied, "
            f"{sum(not e.get('applied') for e in events)} rejected",
        ),
        ("checkpoints", str(folder)),
        ("fork it", f"python -m tuner.babysit <the same overrides> babysit.fork={number} babysit.fork_epoch=<N> ..."),
    ]
    log.info("babysat\n%s", rows_table(rows))


main = command(babysit)

if __name__ == "__main__":
    cli(main)
