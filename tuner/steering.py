"""Steering a babysat trial: what a person may set on its running trial, and how the job applies it.

optuna-dashboard's user-attribute form (``register_user_attr_form_widgets``) writes every widget's key on submit:
``set:optimizer.lr`` and the other text fields as typed ("" when left empty), ``set:stop`` as the chosen value.
``python -m tuner.steer`` writes the same keys as ``{"value": ..., "source": "terminal"}``. At each epoch boundary
the job reads them, checks each value with the schema's own rules, applies it to the optimizer or records why not
in ``babysit_events``, and empties the key so that the same value sent again is a new request. The stop choice at
"keep training" asks nothing: it is neither a request nor emptied.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch
from optuna.storages import BaseStorage
from torch.optim.lr_scheduler import LRScheduler

from tuner.schema import ConfigError, OptimizerConfig, check_section

__all__ = [
    "EVENTS_ATTR",
    "SET_PREFIX",
    "STOP_KEY",
    "Request",
    "apply_request",
    "clear_requests",
    "current_settings",
    "pending_requests",
    "register_widgets",
    "replay",
    "set_setting",
    "set_value",
    "steerable",
]

SET_PREFIX = "set:"
STOP_KEY = "set:stop"
EVENTS_ATTR = "babysit_events"
# What each optimizer lets a person change while it trains (RMSprop's squared-gradient average is beta2).
_STEERABLE = {
    "sgd": ("lr", "momentum", "weight_decay"),
    "adam": ("lr", "beta1", "beta2", "weight_decay"),
    "rmsprop": ("lr", "momentum", "beta2", "weight_decay"),
}
_HELP = {
    "lr": "a positive number, from the next epoch on (the lr decay continues from it)",
    "momentum": "in [0, 1)",
    "beta1": "Adam's first-moment average, in [0, 1)",
    "beta2": "the squared-gradient average, in [0, 1)",
    "weight_decay": "a number >= 0",
}
_NO = ("", "0", "0.0", "false", "no", "keep", "keep training")


def steerable(optimizer: str) -> tuple[str, ...]:
    return _STEERABLE[optimizer]


def register_widgets(study: optuna.Study, optimizer: str) -> None:
    """The dashboard's form on each running trial of the study: a text field per value, and stop."""
    import optuna_dashboard  # slow to import: only once the babysit study is open

    widgets: list[Any] = [
        optuna_dashboard.TextInputWidget(
            description=f"optimizer.{key}: {_HELP[key]}; empty keeps it",
            user_attr_key=f"set:optimizer.{key}",
            optional=True,
        )
        for key in steerable(optimizer)
    ]
    widgets.append(
        optuna_dashboard.ChoiceWidget(
            choices=["keep training", "stop after this epoch"],
            values=[0, 1],
            description="stop: the trial ends COMPLETE with its last epoch's value",
            user_attr_key=STOP_KEY,
        )
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna_dashboard.register_user_attr_form_widgets(study, widgets)


def set_value(value: Any) -> dict[str, Any]:
    """What ``python -m tuner.steer`` writes under a ``set:`` key: the value as typed, and where it came from."""
    return {"value": value, "source": "terminal"}


@dataclass(frozen=True)
class Request:
    key: str  # the user attribute: set:optimizer.lr, set:stop
    value: Any  # as written: a dashboard's text is a string
    source: str  # dashboard or terminal
    raw: Any = field(default=None, compare=False, repr=False)  # the user attribute as read: emptied only if unchanged

    @property
    def name(self) -> str:  # optimizer.lr, stop
        return self.key[len(SET_PREFIX) :]

    @property
    def stops(self) -> bool:
        return str(self.value).strip().lower() not in _NO


def pending_requests(user_attrs: Mapping[str, Any]) -> list[Request]:
    """The ``set:`` keys that ask something, in a fixed order (stop last: the other values are recorded first)."""
    out = []
    for key, raw in sorted(user_attrs.items(), key=lambda kv: (kv[0] == STOP_KEY, kv[0])):
        if not key.startswith(SET_PREFIX):
            continue
        value, source = raw, "dashboard"
        if isinstance(raw, Mapping) and raw.get("source") == "terminal":
            value, source = raw.get("value"), "terminal"
        if value is None or value == "":
            continue
        request = Request(key, value, source, raw)
        if key == STOP_KEY and not request.stops:
            continue  # every dashboard submission writes the choice; "keep training" is no request
        out.append(request)
    return out


def clear_requests(storage: BaseStorage, trial_id: int, requests: list[Request]) -> None:
    """Empty the keys of ``requests`` that still hold what was read; one written again since waits for the next read.

    Optuna has no compare-and-set on a user attribute: a value written between the read here and the write after it
    is still emptied unread, a window of one storage round trip instead of the whole boundary.
    """
    now = storage.get_trial(trial_id).user_attrs
    for request in requests:
        if now.get(request.key) == request.raw:
            storage.set_trial_user_attr(trial_id, request.key, "")


def current_settings(optimizer: torch.optim.Optimizer, name: str) -> dict[str, float]:
    """The values a person may change, as the optimizer holds them now."""
    group = optimizer.param_groups[0]
    out = {"lr": float(group["lr"]), "weight_decay": float(group["weight_decay"])}
    if name in ("sgd", "rmsprop"):
        out["momentum"] = float(group["momentum"])
    if name == "adam":
        out["beta1"], out["beta2"] = (float(b) for b in group["betas"])
    if name == "rmsprop":
        out["beta2"] = float(group["alpha"])
    return out


def _checked(key: str, value: Any) -> float:
    """``value`` as a number within ``optimizer.<key>``'s rule; raises ``ConfigError`` saying why not."""
    number = value
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise ConfigError(f"optimizer.{key} must be a number, but got {value!r}.") from None
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise ConfigError(f"optimizer.{key} must be a number, but got {value!r}.")
    if not math.isfinite(number):
        raise ConfigError(f"optimizer.{key} must be a finite number, but got {value!r}.")
    return float(getattr(check_section(OptimizerConfig, "optimizer", {key: number}), key))


def set_setting(optimizer: torch.optim.Optimizer, scheduler: LRScheduler, name: str, key: str, value: float) -> None:
    """Set ``optimizer.<key>`` on a built optimizer (``lr_decay`` lives in the scheduler's lambda: not here)."""
    for i, group in enumerate(optimizer.param_groups):
        if key == "lr_decay":
            return
        if key == "lr":
            # The decay goes on from the new value: the scheduler's base lr scales with it.
            scheduler.base_lrs[i] *= value / group["lr"]
            group["lr"] = value
        elif key == "beta1":
            group["betas"] = (value, group["betas"][1])
        elif key == "beta2" and name == "adam":
            group["betas"] = (group["betas"][0], value)
        elif key == "beta2":
            group["alpha"] = value
        else:
            group[key] = value


def apply_request(
    request: Request, optimizer: torch.optim.Optimizer, scheduler: LRScheduler, name: str, *, epoch: int
) -> dict[str, Any]:
    """Apply one request to the optimizer (not ``stop``) and return its event: ``applied``, or why not."""
    event: dict[str, Any] = {"epoch": epoch, "key": request.name, "source": request.source}
    section, _, key = request.name.partition(".")
    settings = current_settings(optimizer, name)
    if section != "optimizer" or key not in steerable(name):
        allowed = ", ".join(f"set:optimizer.{k}" for k in steerable(name))
        reason = f"{request.key} cannot be set on a {name} run (it takes {allowed} and set:stop)"
        return {**event, "old": None, "new": request.value, "applied": False, "reason": reason}
    event["old"] = settings[key]
    try:
        value = _checked(key, request.value)
    except ConfigError as err:
        return {**event, "new": request.value, "applied": False, "reason": str(err)}
    set_setting(optimizer, scheduler, name, key, value)
    return {**event, "new": value, "applied": True}


def replay(event: Mapping[str, Any], optimizer: torch.optim.Optimizer, scheduler: LRScheduler, name: str) -> None:
    """Apply a recorded event again (a run resumed from the checkpoint before it)."""
    section, _, key = str(event["key"]).partition(".")
    if event.get("applied") and section == "optimizer":
        set_setting(optimizer, scheduler, name, key, float(event["new"]))
