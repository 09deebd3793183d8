"""Where a babysat trial starts (tuner.babysit): its config, and a parent's checkpoint, curve and seed, if any.

A new run trains the composed config; a fork (``babysit.fork``) starts from a babysat trial's checkpoint, with
its optimizer, scheduler and batch order; a continued best trial (``babysit.from_best``) from a tuned study's best
model, with a new optimizer. Both keep their parent's model and data and take the command line's optimizer and
trainer settings on top.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from tuner.babysitter import Model, checkpoints
from tuner.config import TRIAL_SECTIONS, ConfigError, RunConfig, get_path, set_path
from tuner.definition import CONTENT_KEY, DEFINITION_ATTR, FREE, definition
from tuner.schema import BabysitConfig

__all__ = ["BABYSIT_ATTR", "Origin", "build_model_state", "find_origin", "run_key"]

log = logging.getLogger("tuner")

BABYSIT_ATTR = "babysit"  # on the study: it holds babysat trials, not a search (python -m tuner refuses it)


@dataclass
class Origin:
    """Where a trial starts: its config sections, and a parent's checkpoint, curve and seed, if any."""

    sections: dict[str, Any]
    seed: int
    parent: dict[str, Any] | None = None
    payload: dict[str, Any] | None = None  # the parent's checkpoint (a fork's with its training state)
    curve: dict[int, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    content: str | None = None  # the parent study's data fingerprint
    overrides: list[str] = field(default_factory=list)  # optimizer keys set on top of the parent's


def _inherit(
    sections: dict[str, Any], run: RunConfig, changed: list[str], what: str
) -> tuple[dict[str, Any], list[str]]:
    """A parent's sections with the command line's optimizer and trainer settings; any other change is an error."""
    out, overrides = sections, []
    for key in changed:
        if "." not in key:  # a group chosen on the command line (data=digits): the same _target_ is the same choice
            key = f"{key}._target_"
        now, before = get_path(run.raw, key, None), get_path(sections, key, None)
        if key.startswith("optimizer.") or key == "trainer.epochs" or key in FREE:
            out = set_path(out, {key: now})
            overrides += [key] if key.startswith("optimizer.") else []
        elif now != before:
            raise ConfigError(
                f"{key}={now!r}: a {what} keeps its parent's {key}={before!r} (it may change optimizer.* and "
                "trainer.epochs); babysit another config without babysit.fork or babysit.from_best."
            )
    return out, overrides


def _from_fork(run: RunConfig, section: BabysitConfig, storage: BaseStorage, changed: list[str]) -> Origin:
    assert section.fork is not None
    folder = Path(section.dir) / f"trial-{section.fork}"
    saved = checkpoints(folder)
    epoch = section.fork_epoch if section.fork_epoch is not None else max(saved, default=None)
    if epoch not in saved:
        listed = ", ".join(map(str, sorted(saved))) or "none"
        raise ConfigError(
            f"babysit.fork={section.fork} babysit.fork_epoch={section.fork_epoch}: no such checkpoint in {folder} "
            f"(its epochs: {listed})."
        )
    payload = torch.load(saved[epoch], map_location="cpu", weights_only=True)
    if (payload["meta"].get("study"), payload["meta"].get("trial")) != (section.study, section.fork):
        raise ConfigError(
            f"babysit.fork={section.fork}: {saved[epoch]} is a checkpoint of study {payload['meta'].get('study')!r} "
            f"trial {payload['meta'].get('trial')}, not of {section.study!r} trial {section.fork}."
        )
    state = payload["babysit"]
    try:
        study_id = storage.get_study_id_from_name(section.study)
        parent = storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id, section.fork))
    except KeyError:  # checkpoints whose study or trial the storage no longer has
        raise ConfigError(
            f"babysit.fork={section.fork}: babysit.study={section.study!r} has no trial {section.fork} in this "
            "storage, though its checkpoints are in babysit.dir."
        ) from None
    sections = set_path(state["config"], {f"optimizer.{k}": v for k, v in state["settings"].items()})
    sections, overrides = _inherit(sections, run, changed, "fork")
    return Origin(
        sections=sections,
        seed=int(parent.user_attrs.get("seed", run.study.seed)),
        parent={"study": section.study, "trial": section.fork, "epoch": epoch},
        payload=payload,
        curve={int(h["epoch"]): h["val_accuracy"] for h in state["history"]},
        history=list(state["history"]),
        overrides=overrides,
    )


def _from_best(run: RunConfig, storage: BaseStorage, changed: list[str]) -> Origin:
    from tuner.artifacts import artifact_store, restore_checkpoint
    from tuner.space import values_from_params
    from tuner.stored import load_existing_study, study_params

    source = load_existing_study(run, storage)
    stored = source.user_attrs.get("config")
    if source.user_attrs.get(BABYSIT_ATTR) or not isinstance(stored, dict):
        raise ConfigError(f"study.name={run.study.name!r} is not a study python -m tuner wrote: no best to continue.")
    if not source.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise ConfigError(f"study.name={run.study.name!r} has no completed trial yet: no best to continue.")
    best = source.best_trial
    sections = {k: stored[k] for k in TRIAL_SECTIONS}
    sections = set_path(sections, values_from_params(study_params(source), best.params))
    sections, overrides = _inherit(sections, run, changed, "continued best trial")
    path = Path(run.study.output_dir) / "best_model.pt"
    payload = torch.load(path, map_location="cpu", weights_only=True) if path.is_file() else None
    if payload is None or payload["meta"].get("trial") != best.number:  # another worker's lesser best landed last
        with tempfile.TemporaryDirectory() as tmp:
            fetched = Path(tmp) / "best_model.pt"
            if not restore_checkpoint(best, storage, artifact_store(run.study), fetched):
                raise ConfigError(f"study.name={run.study.name!r}: best trial {best.number}'s model is not saved.")
            payload = torch.load(fetched, map_location="cpu", weights_only=True)
    definition_attr = source.user_attrs.get(DEFINITION_ATTR) or {}
    return Origin(
        sections=sections,
        seed=int(best.user_attrs.get("seed", run.study.seed)),
        parent={"study": source.study_name, "trial": best.number, "epoch": max(best.intermediate_values)},
        payload=payload,
        curve=dict(best.intermediate_values),
        content=definition_attr.get(CONTENT_KEY),
        overrides=overrides,
    )


def run_key(origin: Origin) -> str:
    """The command a trial answers: its parent and every setting that defines it but trainer.epochs (which a
    rerun may raise) and where it runs (``tuner.definition.FREE``)."""
    defined = {k: v for k, v in definition(origin.sections, [], None).items() if k != "trainer.epochs"}
    text = json.dumps({"parent": origin.parent, "config": defined}, sort_keys=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def build_model_state(
    origin: Origin, cfg: Any, splits: Any, device: torch.device, folder: Path, owner: tuple[str, int]
) -> Model:
    """The model and optimizer as the trial stands: its own last checkpoint, else its parent's, else new;
    ``owner`` is the (study, trial) the folder's checkpoints must belong to."""
    from tuner.model import build_model
    from tuner.optim import build_optimizer
    from tuner.steering import set_setting

    torch.manual_seed(origin.seed)  # the initial weights of a new model
    module = build_model(cfg.model, splits.input_shape, splits.num_classes).to(device)
    optimizer, scheduler = build_optimizer(module.parameters(), cfg.optimizer, device=device)
    model = Model(cfg, module, optimizer, scheduler, torch.Generator().manual_seed(origin.seed))
    own = checkpoints(folder)
    payload: dict[str, Any] | None = origin.payload
    if own:
        payload = torch.load(own[max(own)], map_location=device, weights_only=True)
        meta = payload["meta"]
        if (meta.get("study"), meta.get("trial")) != owner:
            raise ConfigError(
                f"babysit.dir={str(folder.parent)!r} holds the checkpoints of study {meta.get('study')!r} trial "
                f"{meta.get('trial')}, not of {owner[0]!r} trial {owner[1]}: give each babysit study a babysit.dir "
                "of its own (the default, tuner_runs/${babysit.study})."
            )
    if payload is None:
        return model
    module.load_state_dict(payload["state_dict"])
    state = payload.get("babysit")
    if state is None:  # a tuned trial's best model: a new optimizer, its decay and batch order where it stopped
        epochs = int(origin.parent["epoch"]) if origin.parent else 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "scheduler.step() before optimizer.step()": on purpose
            for _ in range(epochs):
                scheduler.step()
                torch.randperm(len(splits.x_train), generator=model.generator)
        model.epoch = epochs
    else:
        parent_name = state["config"]["optimizer"]["name"]
        if parent_name == cfg.optimizer.name:
            optimizer.load_state_dict(state["optimizer"])
        else:
            log.info(
                "optimizer.name=%r: the fork starts a new optimizer (its parent's was %r)",
                cfg.optimizer.name,
                parent_name,
            )
        scheduler.load_state_dict(state["scheduler"])
        model.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        model.epoch, model.history = int(state["epoch"]), list(state["history"])
        model.events_seen = int(state["events_seen"]) if own else 0
    if not own:  # what the command line changes on top of the parent's settings
        for key in origin.overrides:
            leaf = key.split(".", 1)[1]
            if leaf != "name":
                set_setting(optimizer, scheduler, cfg.optimizer.name, leaf, float(get_path(origin.sections, key)))
    return model


def find_origin(run: RunConfig, section: BabysitConfig, storage: BaseStorage, changed: list[str]) -> Origin:
    if section.fork is not None and section.from_best:
        raise ConfigError(f"babysit.fork={section.fork} and babysit.from_best=true: choose one.")
    if section.fork_epoch is not None and section.fork is None:
        raise ConfigError(f"babysit.fork_epoch={section.fork_epoch} needs babysit.fork (the trial to fork).")
    if section.from_best:
        return _from_best(run, storage, changed)
    if section.fork is not None:
        return _from_fork(run, section, storage, changed)
    seed = run.trial.trainer.seed if run.trial.trainer.seed is not None else run.study.seed
    return Origin(sections={k: run.raw[k] for k in TRIAL_SECTIONS}, seed=seed)
