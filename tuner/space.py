"""The search space as data, mirroring the config it changes: a node with a ``type`` key is an entry::

    optimizer:
      lr:       {type: float, low: 1.0e-4, high: 1.0, log: true}          # alpha = 10^r, r in [-4, 0]
      momentum: {type: float, low: 0.9, high: 0.999, reverse_log: true,   # beta = 1 - 10^r, r in [-3, -1]
                 when: {optimizer.name: sgd}}

Optuna has no reverse-log distribution (optuna#5959), so a ``reverse_log`` entry is stored as ``1-<path>``,
log-uniform over ``1 - high`` to ``1 - low``, and the value used as the user attribute ``<path>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from tuner.config import TRIAL_SECTIONS, ConfigError, get_path, parse_trial, set_path

__all__ = [
    "Param",
    "describe",
    "describe_range",
    "entry_param",
    "parse_space",
    "suggest",
    "values_from_params",
]
_MISSING_PATH = object()
_ENTRY_KEYS = {"type", "low", "high", "log", "step", "reverse_log", "choices", "when"}
_TYPES = ("float", "int", "categorical")
REVERSE_PREFIX = "1-"


@dataclass(frozen=True)
class Param:
    """One searched config path and the Optuna distribution it is sampled from."""

    path: str
    distribution: BaseDistribution
    reverse_log: bool = False
    # Sample only when every listed config path holds one of the listed values.
    when: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The parameter's name in Optuna's storage (and so in the dashboard)."""
        return REVERSE_PREFIX + self.path if self.reverse_log else self.path

    def value(self, sampled: Any) -> Any:
        """The config value used for a value sampled from ``distribution``."""
        return 1.0 - sampled if self.reverse_log else sampled

    def active(self, raw: Mapping[str, Any]) -> bool:
        return all(get_path(raw, path, None) in allowed for path, allowed in self.when.items())


def _flatten(node: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Mapping[str, Any]]]:
    entries: list[tuple[str, Mapping[str, Any]]] = []
    for key, value in node.items():
        path = f"{prefix}{key}"
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"space.{path} must be an entry such as {{type: float, low: ..., high: ...}}, but got {value!r}."
            )
        if "type" in value:
            entries.append((path, value))
        else:
            entries.extend(_flatten(value, path + "."))
    return entries


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, but got {value!r}.")
    return float(value)


def _distribution(key: str, entry: Mapping[str, Any]) -> tuple[BaseDistribution, bool]:
    unknown = sorted(set(entry) - _ENTRY_KEYS)
    if unknown:
        raise ConfigError(f"{key} has unknown keys {unknown}; allowed: {sorted(_ENTRY_KEYS)}.")
    kind = entry["type"]
    if kind not in _TYPES:
        raise ConfigError(f"{key}.type must be one of {', '.join(_TYPES)}, but got {kind!r}.")
    if kind == "categorical":
        choices = entry.get("choices")
        if not isinstance(choices, (list, tuple)) or not choices:
            raise ConfigError(f"{key}.choices must be a non-empty list, but got {choices!r}.")
        for choice in choices:
            if choice is not None and not isinstance(choice, (bool, int, float, str)):
                raise ConfigError(f"{key}.choices may hold numbers, strings, booleans or null, but got {choice!r}.")
        extra = sorted(set(entry) & {"low", "high", "log", "step", "reverse_log"})
        if extra:
            raise ConfigError(f"{key} is categorical and takes no {extra}; give choices only.")
        return CategoricalDistribution(tuple(choices)), False
    if "choices" in entry:
        raise ConfigError(f"{key} is {kind} and takes low/high, not choices.")
    for bound in ("low", "high"):
        if bound not in entry:
            raise ConfigError(f"{key}.{bound} is missing: a {kind} entry needs low and high.")
    low, high = _number(f"{key}.low", entry["low"]), _number(f"{key}.high", entry["high"])
    log, reverse = entry.get("log", False), entry.get("reverse_log", False)
    step = entry.get("step")
    for flag, flag_value in (("log", log), ("reverse_log", reverse)):
        if not isinstance(flag_value, bool):
            raise ConfigError(f"{key}.{flag} must be true or false, but got {flag_value!r}.")
    if not low < high:
        raise ConfigError(f"{key}.low must be below {key}.high, but got low={entry['low']!r}, high={entry['high']!r}.")
    if sum((log, reverse, step is not None)) > 1:
        raise ConfigError(f"{key} may set only one of log, reverse_log and step.")
    if log and low <= 0:
        raise ConfigError(f"{key}.low must be > 0 with log: true, but got {entry['low']!r}.")
    if step is not None and _number(f"{key}.step", step) <= 0:
        raise ConfigError(f"{key}.step must be > 0, but got {step!r}.")
    if kind == "int":
        if reverse:
            raise ConfigError(f"{key}: reverse_log is for floats close to 1, not for type int.")
        for bound in ("low", "high"):
            if isinstance(entry[bound], float) and not entry[bound].is_integer():
                raise ConfigError(f"{key}.{bound} must be an integer for type int, but got {entry[bound]!r}.")
        return IntDistribution(int(low), int(high), log=log, step=int(step or 1)), False
    if reverse:
        if not (0 < low < 1 and 0 < high < 1):
            raise ConfigError(
                f"{key}: reverse_log bounds must lie in (0, 1), but got low={entry['low']!r}, high={entry['high']!r}."
            )
        # beta = 1 - 10^r: sample 1 - beta log-uniformly, so each decade toward 1 gets as many trials.
        # Rounded to 12 digits so 1 - 0.999 is stored as 0.001, not 0.0010000000000000009.
        return FloatDistribution(round(1.0 - high, 12), round(1.0 - low, 12), log=True), True
    return FloatDistribution(low, high, log=log, step=None if step is None else float(step)), False


def _condition(key: str, when: Any) -> dict[str, tuple[Any, ...]]:
    if when is None:
        return {}
    if not isinstance(when, Mapping) or not when:
        raise ConfigError(
            f"{key}.when must map config paths to values, e.g. {{optimizer.name: adam}}, but got {when!r}."
        )
    return {str(path): tuple(v) if isinstance(v, (list, tuple)) else (v,) for path, v in when.items()}


def _check_values(key: str, param: Param, raw: Mapping[str, Any]) -> None:
    """Apply each end of the range to the config and check the result, so bad bounds fail before training."""
    dist = param.distribution
    if isinstance(dist, CategoricalDistribution):
        samples: tuple[Any, ...] = dist.choices
    else:
        assert isinstance(dist, (FloatDistribution, IntDistribution))
        samples = (dist.low, dist.high)
    current = get_path(raw, param.path)
    for sample in samples:
        value = param.value(sample)
        if isinstance(current, bool) != isinstance(value, bool) or (
            isinstance(current, int) and not isinstance(current, bool) and isinstance(value, float)
        ):
            raise ConfigError(
                f"{key} gives {param.path} the value {value!r}, but {param.path} holds "
                f"{type(current).__name__} values (now {current!r}): check the entry's type."
            )
        try:
            parse_trial(set_path(raw, {param.path: value}))
        except ConfigError as err:
            raise ConfigError(f"{key} allows a value that the config rejects: {err}") from None


def parse_space(space: Mapping[str, Any] | None, raw: Mapping[str, Any]) -> list[Param]:
    """Read and check a space against the composed config ``raw``; unconditional entries come first, so
    conditions can depend on sampled values."""
    params: list[Param] = []
    entries = _flatten(space or {})
    searched = {path for path, _ in entries}
    for path, entry in entries:
        key = f"space.{path}"
        if path.split(".")[0] not in TRIAL_SECTIONS:
            raise ConfigError(
                f"{key}: only {', '.join(TRIAL_SECTIONS)} settings can be searched, but got the path {path!r}."
            )
        when = _condition(key, entry.get("when"))
        if _never_active(when, searched, raw):
            _check_condition(path, when, [], raw)  # a typo is still an error, as for an entry that stays
            continue  # conditioned on settings this run fixes otherwise (another model): not part of this search
        try:
            current = get_path(raw, path)
        except KeyError:
            raise ConfigError(f"{key} names the config path {path!r}, which is not in the composed config.") from None
        if isinstance(current, Mapping):
            raise ConfigError(f"{key} names {path!r}, a config section, not a single setting.")
        distribution, reverse = _distribution(key, entry)
        for cond_path in when:
            if get_path(raw, cond_path, _MISSING_PATH) is _MISSING_PATH:
                raise ConfigError(f"{key}.when names {cond_path!r}, which is not in the composed config.")
        param = Param(path=path, distribution=distribution, reverse_log=reverse, when=when)
        _check_values(key, param, raw)
        params.append(param)
    for param in params:
        _check_condition(param.path, param.when, params, raw)
    return sorted(params, key=lambda p: bool(p.when))


def _never_active(when: Mapping[str, tuple[Any, ...]], searched: set[str], raw: Mapping[str, Any]) -> bool:
    """A condition on settings that no entry searches, which the config does not meet: the entry never samples."""
    fixed = [path for path in when if path not in searched and get_path(raw, path, _MISSING_PATH) is not _MISSING_PATH]
    return any(get_path(raw, path) not in when[path] for path in fixed)


def _refusal(raw: Mapping[str, Any], path: str, value: Any) -> str | None:
    """Why no run could give ``path`` the value ``value``; ``None`` when some run could."""
    current = get_path(raw, path)
    if isinstance(current, bool) == isinstance(value, bool) and value == current:  # a flag's true is not 1
        return None
    if path.split(".")[0] not in TRIAL_SECTIONS:
        return f"{path} is not a setting that a trial changes"
    # Another model takes other keys: it can be named if a model section of its own would accept it.
    changed = {"model": {"_target_": value}} if path == "model._target_" else {path: value}
    try:
        parse_trial(set_path(raw, changed))
    except ConfigError as err:
        return str(err).rstrip(".")
    return None


def _check_condition(
    entry: str, when: Mapping[str, tuple[Any, ...]], params: list[Param], raw: Mapping[str, Any]
) -> None:
    """Refuse a ``when`` value its key can never take (a typo such as ``sgdd``), which would leave the entry
    unsampled. A value only this run never gives is fine: one space file serves runs that fix it differently."""
    for path, allowed in when.items():
        for value in allowed:
            refusal = _refusal(raw, path, value)
            if refusal is None:
                continue
            current = get_path(raw, path)
            now = "true or false" if isinstance(current, bool) else f"{current!r} (its config value)"
            takes = [now, *(f"a value in {describe_range(p)} (space.{p.path})" for p in params if p.path == path)]
            raise ConfigError(
                f"space.{entry}.when gives {path} the value {value!r}, which it can never take ({refusal}); "
                f"here it takes {' or '.join(takes)}."
            )


def _suggest_one(trial: optuna.Trial, name: str, dist: BaseDistribution) -> Any:
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, log=dist.log, step=dist.step)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, log=dist.log, step=dist.step)
    assert isinstance(dist, CategoricalDistribution)
    return trial.suggest_categorical(name, dist.choices)


def suggest(trial: optuna.Trial, params: list[Param], raw: Mapping[str, Any]) -> dict[str, Any]:
    """Sample the active params: ``{config path: value used}``; reverse-log values also as user attributes."""
    values: dict[str, Any] = {}
    current = dict(raw)
    for param in params:
        if not param.active(current):
            continue
        value = param.value(_suggest_one(trial, param.name, param.distribution))
        if param.reverse_log:
            trial.set_user_attr(param.path, value)
        values[param.path] = value
        current = set_path(current, {param.path: value})
    return values


def describe_range(param: Param) -> str:
    """A param's range in the values the config receives, and its scale: ``[0.0001, 1] log``,
    ``[0.9, 0.999] log(1 - value)``, ``[1, 3] step 2``, ``{sgd, adam}``. Every command that shows a range uses this."""
    dist = param.distribution
    if isinstance(dist, CategoricalDistribution):
        return "{" + ", ".join(str(c) for c in dist.choices) + "}"
    assert isinstance(dist, (FloatDistribution, IntDistribution))
    if param.reverse_log:
        return f"[{1 - dist.high:.6g}, {1 - dist.low:.6g}] log(1 - value)"
    scale = " log" if dist.log else (f" step {dist.step:g}" if dist.step not in (None, 1) else "")
    return f"[{dist.low:g}, {dist.high:g}]{scale}"


def describe(param: Param) -> str:
    """A param in a line: its path, range and condition."""
    return f"{param.path}: {describe_range(param)}" + "".join(f" when {p} in {list(v)}" for p, v in param.when.items())


def entry_param(path: str, entry: Mapping[str, Any]) -> Param:
    """The param a space entry (``{type: float, low: ..., high: ...}``) at ``path`` defines."""
    distribution, reverse = _distribution(f"space.{path}", entry)
    return Param(path=path, distribution=distribution, reverse_log=reverse)


def values_from_params(params: list[Param], sampled: Mapping[str, Any]) -> dict[str, Any]:
    """``{config path: value used}`` for a finished trial's stored params (its ``FrozenTrial.params``)."""
    return {p.path: p.value(sampled[p.name]) for p in params if p.name in sampled}
