"""The schema (``tuner.schema``) in Hydra's ConfigStore, and the composed config checked once, into typed settings.

``conf/config.yaml`` extends the stored ``tuner_schema``: the YAML files only choose and override values.
"""

from __future__ import annotations

import difflib
import inspect
import re
from collections.abc import Mapping
from dataclasses import field, make_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from tuner.schema import (
    KINDS,
    BabysitConfig,
    ConfigError,
    DashboardConfig,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    PluginConfig,
    RefineConfig,
    ReportConfig,
    RunConfig,
    SteerConfig,
    StudyConfig,
    TrainerConfig,
    TrialConfig,
    check_section,
    locate,
    schema_fields,
    short_name,
)

__all__ = [
    "SETTINGS",
    "TRIAL_SECTIONS",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PluginConfig",
    "RunConfig",
    "StudyConfig",
    "TrialConfig",
    "check_target",
    "composition_error",
    "get_path",
    "parse_command_section",
    "parse_run",
    "parse_trial",
    "set_path",
]

# The sections a trial's parameters may change; study-level keys are fixed for a whole study.
TRIAL_SECTIONS = ("model", "data", "optimizer", "trainer")
# The composed config's sections, in order: the schema class that declares every key, or None for a node that an
# option file fills (model, sampler, pruner: _target_ and its parameters; space: read by tuner.space).
SCHEMA: dict[str, type | None] = {
    "study": StudyConfig,
    "optimizer": OptimizerConfig,
    "trainer": TrainerConfig,
    "model": None,
    "data": DataConfig,  # and the loader's own keys (check_target)
    "space": None,
    "sampler": None,
    "pruner": None,
    "dashboard": DashboardConfig,
    "report": ReportConfig,
    "refine": RefineConfig,
    "babysit": BabysitConfig,
    "steer": SteerConfig,
}
SECTIONS: dict[str, type] = {name: cls for name, cls in SCHEMA.items() if cls is not None}

# study.name's default, ${data.name}-${tuner_model:${model}}, for any model config, tuner's or a user's.
OmegaConf.register_new_resolver("tuner_model", lambda model: short_name(model.get("_target_", "model")), replace=True)
OmegaConf.register_new_resolver("tuner_name", short_name, replace=True)


def _data_node() -> Any:
    """``data``'s schema node: the keys every data set shares, and room for its loader's own keys (``options``)."""
    node = make_dataclass(
        "DataSchema",
        [
            (key, kind | None if optional else kind, field(default=MISSING if key == "_target_" else f.default))
            for key, (kind, optional, f) in schema_fields(DataConfig).items()
        ],
    )
    open_node = OmegaConf.structured(node)
    OmegaConf.set_struct(open_node, False)  # data.root, data.num_samples, ...: checked against the loader
    return open_node


def _node(cls: type | None) -> Any:
    if cls is None:
        return field(default=MISSING)
    return field(default_factory=_data_node if cls is DataConfig else cls)


TunerConfig = make_dataclass("TunerConfig", [(name, Any, _node(cls)) for name, cls in SCHEMA.items()])
ConfigStore.instance().store(name="tuner_schema", node=TunerConfig)

# Every key some part of tuner reads, by section; anything else is a typo (``+trainer.epoch``) that would otherwise
# be ignored. ``None``: checked where it is read: model, data, sampler and pruner against their ``_target_``'s
# parameters (``check_target``), space by tuner.space, hydra by Hydra.
SETTINGS: dict[str, tuple[str, ...] | None] = {
    **{name: tuple(schema_fields(cls)) if cls not in (None, DataConfig) else None for name, cls in SCHEMA.items()},
    "tuner": ("trial",),  # the tuner sweeper's +tuner.trial=N (tuner.handoff)
    "hydra": None,
}


def _unknown(key: str, value: Any, known: tuple[str, ...], prefix: str, what: str = "a tuner setting") -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = (
        f"did you mean {prefix}{close[0]}?"
        if close
        else f"{prefix.rstrip('.') or 'tuner'} reads {', '.join(known) or 'no other keys'}"
    )
    return f"{prefix}{key} is not {what} ({hint}), but got {prefix}{key}={value!r}."


def check_known_keys(raw: Mapping[str, Any]) -> None:
    """Refuse any key that no part of tuner reads, naming it and the closest known key."""
    problems: list[str] = []
    for name, value in raw.items():
        if name not in SETTINGS:
            problems.append(_unknown(str(name), value, tuple(SETTINGS), ""))
            continue
        known = SETTINGS[name]
        if known is not None and isinstance(value, Mapping):
            problems += [_unknown(str(k), v, known, f"{name}.") for k, v in value.items() if k not in known]
    if problems:
        raise ConfigError(" ".join(problems))


_MISSING = object()


def get_path(raw: Mapping[str, Any], path: str, default: Any = _MISSING) -> Any:
    """Return the value at a dotted path such as ``optimizer.lr``."""
    node: Any = raw
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if default is _MISSING:
                raise KeyError(path)
            return default
        node = node[part]
    return node


def set_path(raw: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` with each dotted path in ``values`` set. Only the mappings along those paths are copied, not the
    whole config: this runs for every sampled value, and a deep copy is a noticeable share of a short trial."""
    out: dict[str, Any] = dict(raw)
    copied: set[tuple[str, ...]] = set()
    for path, value in values.items():
        *parents, leaf = path.split(".")
        node = out
        for depth, part in enumerate(parents, start=1):
            if tuple(parents[:depth]) not in copied:
                node[part] = dict(node[part])
                copied.add(tuple(parents[:depth]))
            node = node[part]
        node[leaf] = value
    return out


def _section(raw: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = raw.get(name)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name} must be a mapping of settings, but got {value!r}.")
    return value


# The sizes of tuner's own models are counts: at least 1 (a user's model checks its own arguments).
_BUILTIN_COUNTS = ("hidden_units", "num_layers", "channels", "kernel_size")
_ANNOTATED = {"int": int, "bool": bool, "float": float}  # a parameter's annotation, checked as the schema's types


def check_target(
    section: str, values: Mapping[str, Any], *, given: tuple[str, ...] = (), shared: tuple[str, ...] = ()
) -> tuple[str, dict[str, Any]]:
    """``<section>._target_`` importable and callable with the names tuner ``given`` (each required when it
    takes no ``**kwargs``) and each other key of the section but the ``shared`` settings, each value of the type
    its parameter is annotated with: ``(target, options)``. Nothing is built here."""
    target = values.get("_target_")
    if not isinstance(target, str) or not target:
        raise ConfigError(f"{section}._target_ must be the dotted name of a class or function, but got {target!r}.")
    try:
        built = locate(target)
    except Exception as err:  # ImportError, AttributeError, or the module's own error on import
        raise ConfigError(f"{section}._target_={target!r} cannot be imported ({err}).") from None
    if section == "model" and inspect.isclass(built):
        module_types = [f"{c.__module__}.{c.__qualname__}" for c in built.__mro__]
        if "torch.nn.modules.module.Module" not in module_types:
            raise ConfigError(f"model._target_={target!r} is a class but not a torch.nn.Module.")
    if not callable(built):
        raise ConfigError(f"{section}._target_={target!r} is not a class or a function.")
    try:
        signature = inspect.signature(built)
    except (TypeError, ValueError):  # a builtin without one
        raise ConfigError(f"{section}._target_={target!r} has no signature to check its keys against.") from None
    params = signature.parameters
    open_ended = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
    if section == "model" and not open_ended and not set(given) <= set(params):
        raise ConfigError(
            f"model._target_={target!r} must take {' and '.join(given)}, but its signature is {signature}."
        )
    options = {str(k): v for k, v in values.items() if k != "_target_" and k not in shared}
    for name, p in params.items():
        plain = p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in ("self", *given)
        if plain and p.default is p.empty and options.get(name) is None:
            raise ConfigError(f"{section}.{name} must be set ({target} has no default), but got {options.get(name)!r}.")
    known = tuple(dict.fromkeys([*shared, *(k for k in params if k not in ("self", *given))]))
    for key, value in options.items():
        if key not in params:
            if not open_ended:
                what = f"a parameter of {target}" if not shared else f"a data setting or a parameter of {target}"
                raise ConfigError(_unknown(key, value, known, f"{section}.", what))
            continue
        annotation = params[key].annotation
        kind = _ANNOTATED.get(annotation if isinstance(annotation, str) else getattr(annotation, "__name__", ""))
        if kind is not None and not KINDS[kind][1](value):
            raise ConfigError(f"{section}.{key} must be {KINDS[kind][0]}, but got {value!r}.")
        if target.startswith("tuner.model.") and key in _BUILTIN_COUNTS and value < 1:
            raise ConfigError(f"{section}.{key} must be an integer >= 1, but got {value!r}.")
    return target, options


def parse_trial(raw: Mapping[str, Any]) -> TrialConfig:
    """Check the sections a trial trains with and return them typed; a key tuner does not read is an error."""
    check_known_keys(raw)
    target, options = check_target("model", _section(raw, "model"), given=("input_shape", "num_classes"))
    data = _section(raw, "data")
    shared = tuple(k for k in schema_fields(DataConfig) if k != "_target_")
    loader, loader_options = check_target("data", data, given=("seed",), shared=shared)
    return TrialConfig(
        model=ModelConfig(target=target, options=options),
        data=check_section(DataConfig, "data", data, target=loader, options=loader_options),
        optimizer=check_section(OptimizerConfig, "optimizer", _section(raw, "optimizer")),
        trainer=check_section(TrainerConfig, "trainer", _section(raw, "trainer")),
    )


def parse_run(raw: Mapping[str, Any]) -> RunConfig:
    """Check the whole composed config (without the search space, see ``tuner.space``)."""
    study = check_section(StudyConfig, "study", _section(raw, "study"))
    trial = parse_trial(raw)
    # Read by their commands: a bad value stops every command alike.
    for name in ("dashboard", "report", "refine", "babysit", "steer"):
        parse_command_section(raw, name)
    plugins = [PluginConfig(*check_target(group, _section(raw, group))) for group in ("sampler", "pruner")]
    return RunConfig(
        study=study,
        sampler=plugins[0],
        pruner=plugins[1],
        trial=trial,
        raw=dict(raw),
    )


def parse_command_section(raw: Mapping[str, Any], name: str) -> Any:
    """A command's section (``dashboard``, ``report``, ``refine``, ``babysit``, ``steer``), checked (the command that
    reads it calls this)."""
    return check_section(SECTIONS[name], name, raw.get(name) or {})


def composition_error(err: BaseException) -> ConfigError | None:
    """A value that Hydra could not put into the schema (``study.n_trials=abc``, ``trainer.epoch=3``) as the same
    one line that a value tuner refuses gives; ``None`` for any other error."""
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else err
    if not isinstance(cause, OmegaConfBaseException) or not cause.full_key:
        return None
    section, _, key = str(cause.full_key).partition(".")
    declared = schema_fields(SECTIONS[section]) if section in SECTIONS else {}
    if isinstance(cause, ValidationError) and key in declared:
        kind, optional, f = declared[key]
        try:
            check_section(SECTIONS[section], section, {key: cause.value})
        except ConfigError as refused:
            return refused
        expected = (f.metadata.get("expected") or f"a value of type {kind.__name__}") + (" or null" if optional else "")
        return ConfigError(f"{cause.full_key} must be {expected}, but got {cause.value!r}.")
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and declared:
        typed = re.search(r"use \+\S+?=(.*)$", str(err), re.MULTILINE)
        return ConfigError(_unknown(key, typed.group(1) if typed else None, tuple(declared), f"{section}."))
    return None
