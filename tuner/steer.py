"""``python -m tuner.steer <the babysit command's overrides> steer.lr=0.01``: set a running babysat trial's values
from a terminal, as the dashboard's form does, and wait for the job to apply or reject them (tuner.steering).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from tuner.__main__ import cli, command
from tuner.config import ConfigError, parse_command_section, parse_run

__all__ = ["main", "steer"]

_VALUES = ("lr", "momentum", "beta1", "beta2", "weight_decay")


def _requests(section: Any) -> dict[str, Any]:
    out = {f"set:optimizer.{k}": getattr(section, k) for k in _VALUES if getattr(section, k) is not None}
    if section.stop:
        out["set:stop"] = True
    if not out:
        raise ConfigError(
            "python -m tuner.steer sets nothing: give steer.lr, steer.momentum, steer.beta1, steer.beta2, "
            "steer.weight_decay or steer.stop=true."
        )
    return out


def steer(raw: dict[str, Any]) -> None:
    """Write the ``set:`` keys on the trial, then print what the job did with each, or that it has not yet."""
    from optuna.trial import TrialState

    from tuner.origin import BABYSIT_ATTR
    from tuner.secrets import safe_url
    from tuner.steering import EVENTS_ATTR, set_value
    from tuner.stored import open_existing_storage, study_names

    run = parse_run(raw)
    section = parse_command_section(raw, "steer")
    name = parse_command_section(raw, "babysit").study
    requests = _requests(section)
    storage = open_existing_storage(run.study.storage)
    url = safe_url(run.study.storage)
    if name not in study_names(storage):
        raise ConfigError(f"babysit.study={name!r} is not in {url}: start it with python -m tuner.babysit first.")
    study_id = storage.get_study_id_from_name(name)
    if not storage.get_study_user_attrs(study_id).get(BABYSIT_ATTR):
        raise ConfigError(f"babysit.study={name!r} in {url} is not a babysit study: only babysat trials are steered.")
    trials = storage.get_all_trials(study_id, deepcopy=False)
    running = [t.number for t in trials if t.state == TrialState.RUNNING]
    number = section.trial if section.trial is not None else running[0] if len(running) == 1 else None
    if number is None or number >= len(trials):
        listed = ", ".join(map(str, running)) or "none"
        raise ConfigError(f"steer.trial={section.trial}: name one running trial of {name!r} (running: {listed}).")
    trial = trials[number]
    if trial.state != TrialState.RUNNING:
        raise ConfigError(
            f"steer.trial={number}: trial {number} of {name!r} is {trial.state.name}; fork it instead: "
            f"python -m tuner.babysit <its overrides> babysit.fork={number}"
        )
    before = len(trial.user_attrs.get(EVENTS_ATTR) or [])
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
    for key, value in requests.items():
        storage.set_trial_user_attr(trial_id, key, set_value(value))
    print(f"sent to trial {number} of {name}: {', '.join(f'{k}={v!r}' for k, v in requests.items())}", flush=True)
    wanted, deadline = {k.removeprefix("set:") for k in requests}, time.monotonic() + section.wait
    while True:
        now = storage.get_trial(trial_id)
        events = [e for e in (now.user_attrs.get(EVENTS_ATTR) or [])[before:] if e.get("source") == "terminal"]
        answered = [e for e in events if e.get("key") in wanted]
        if {e["key"] for e in answered} >= wanted or now.state.is_finished() or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for e in answered:
        if e.get("applied"):
            print(f"applied after epoch {e['epoch']}: {e['key']} {e['old']} -> {e['new']}")
        else:
            print(f"rejected after epoch {e['epoch']}: {e['key']}={e['new']!r}: {e.get('reason')}")
    waiting = wanted - {e["key"] for e in answered}
    if waiting:
        print(
            f"not applied yet: {', '.join(sorted(waiting))} (the job applies them at its next epoch boundary; "
            "a job that is not running applies them when the same babysit command resumes it)"
        )
    if any(not e.get("applied") for e in answered):
        sys.exit(1)


main = command(steer)

if __name__ == "__main__":
    cli(main)
