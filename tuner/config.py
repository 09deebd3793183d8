"""Typed settings: the plain dict that Hydra composed, checked once, as frozen dataclasses.

``DictConfig`` stops at the entry point (``tuner.__main__``); everything below takes these.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from hydra.utils import get_object
from omegaconf import OmegaConf

__all__ = [
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PluginConfig",
    "RunConfig",
    "StudyConfig",
    "TrainerConfig",
    "TrialConfig",
    "check_known_keys",
    "get_path",
    "parse_run",
    "parse_trial",
    "set_path",
]

DATASETS = ("fashion_mnist", "mnist", "digits", "mnist1d", "npz")
OPTIMIZERS = ("sgd", "adam", "rmsprop")
DIRECTIONS = ("maximize", "minimize")
# The sections a trial's parameters may change; study-level keys are fixed for a whole study.
TRIAL_SECTIONS = ("model", "data", "optimizer", "trainer")


class ConfigError(ValueError):
    """Bad user input. The message names the config key and shows the value."""


@dataclass(frozen=True)
class StudyConfig:
    name: str
    n_trials: int
    timeout: float | None
    direction: str
    storage: str
    seed: int
    output_dir: str
    heartbeat_interval: int | None  # seconds between a running trial's heartbeats; None turns them off
    grace_period: int | None  # seconds without a heartbeat before a trial counts as dead; None: 2x interval
    max_retry: int | None  # how often a dead worker's trial is queued again; None: always
    max_failure_streak: int | None  # stop when this many recent trials all failed with one error type
    artifact_dir: str | None = None  # None: see tuner.artifacts.artifact_dir
    accept_changes: bool = False  # add trials of a changed definition to a stored study (tuner.definition)


@dataclass(frozen=True)
class PluginConfig:
    """A sampler or pruner: the option name and the keyword arguments for its Optuna class."""

    name: str
    options: dict[str, Any]


@dataclass(frozen=True)
class ModelConfig:
    """``model._target_`` (a ``torch.nn.Module`` class, or a function that builds one) and the section's other
    keys, which ``tuner.model.build_model`` passes to it with ``input_shape`` and ``num_classes``."""

    target: str
    options: dict[str, Any]

    @property
    def name(self) -> str:
        return model_name(self.target)


def model_name(target: str) -> str:
    """A model's short name, for study names: the last part of its ``_target_`` (``tuner.model.mlp`` -> mlp)."""
    return str(target).rsplit(".", 1)[-1].lower()


# study.name's default, ${data.name}-${tuner_model:${model}}, for any model config, tuner's or a user's.
OmegaConf.register_new_resolver(
    "tuner_model", lambda model: model_name(model.get("_target_", "model")), replace=True
)


@dataclass(frozen=True)
class DataConfig:
    name: str
    root: str | None
    path: str | None
    download: bool
    batch_size: int
    val_fraction: float
    train_subset: int | None
    num_samples: int
    seed: int


@dataclass(frozen=True)
class OptimizerConfig:
    name: str
    lr: float
    momentum: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    lr_decay: float


@dataclass(frozen=True)
class TrainerConfig:
    epochs: int
    device: str
    bf16: bool
    seed: int | None
    eval_batch_size: int
    threads: int | None
    workers: int | None  # None: auto (tuner.workers.resolve_workers)


@dataclass(frozen=True)
class TrialConfig:
    """Everything one trial trains with: what the search space may change."""

    model: ModelConfig
    data: DataConfig
    optimizer: OptimizerConfig
    trainer: TrainerConfig


@dataclass(frozen=True)
class RunConfig:
    """The whole run: the study-level settings, the base trial settings and the raw dict."""

    study: StudyConfig
    sampler: PluginConfig
    pruner: PluginConfig
    trial: TrialConfig
    raw: dict[str, Any]


def _names(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


# Every key some part of tuner reads, by section; anything else in the composed config is a typo (``+trainer.epoch``)
# that would otherwise be ignored. ``None``: checked where it is read: space by tuner.space, sampler and pruner as
# the keyword arguments of their Optuna class (tuner.study), hydra by Hydra; worker is free (a joblib multirun's
# ``+worker=range(4)`` only makes the jobs differ).
SETTINGS: dict[str, tuple[str, ...] | None] = {
    "study": _names(StudyConfig),
    "optimizer": _names(OptimizerConfig),
    "trainer": _names(TrainerConfig),
    "model": None,  # the parameters of model._target_ (parse_trial)
    "data": _names(DataConfig),
    "space": None,
    "sampler": None,
    "pruner": None,
    "dashboard": ("host", "port"),  # tuner.dashboard.parse_dashboard
    "report": ("dir", "evaluator"),  # tuner.report.parse_report
    "refine": ("top_k", "margin", "name", "space_dir", "enqueue", "n_trials", "run"),  # tuner.refine.RefineConfig
    "tuner": ("trial",),  # the tuner sweeper's +tuner.trial=N (tuner.handoff)
    "worker": None,
    "hydra": None,
}


def _unknown(key: str, value: Any, known: tuple[str, ...], prefix: str) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {prefix}{close[0]}?" if close else f"{prefix.rstrip('.') or 'tuner'} reads {', '.join(known)}"
    return f"{prefix}{key} is not a tuner setting ({hint}), but got {prefix}{key}={value!r}."


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
    """Return ``raw`` with each dotted path in ``values`` set; ``raw`` itself is left as it was.

    Only the mappings along the set paths are copied; the rest is shared with ``raw``: this runs for every
    sampled value, and a deep copy of the whole config each time is a noticeable share of a short trial.
    """
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


class _Section:
    """Reads one config section, naming the full key in every error."""

    def __init__(self, raw: Mapping[str, Any], name: str) -> None:
        value = raw.get(name)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{name} must be a mapping of settings, but got {value!r}.")
        self.values = value
        self.name = name

    def _get(self, key: str) -> Any:
        if key not in self.values:
            raise ConfigError(f"{self.name}.{key} is missing from the config.")
        return self.values[key]

    def fail(self, key: str, expected: str, value: Any) -> ConfigError:
        return ConfigError(f"{self.name}.{key} must be {expected}, but got {value!r}.")

    def integer(self, key: str, *, minimum: int | None = None, optional: bool = False) -> Any:
        value = self._get(key)
        if value is None and optional:
            return None
        expected = "an integer" + (f" >= {minimum}" if minimum is not None else "")
        if optional:
            expected += " or null"
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, expected, value)
        if minimum is not None and value < minimum:
            raise self.fail(key, expected, value)
        return value

    def number(
        self,
        key: str,
        *,
        low: float | None = None,
        high: float | None = None,
        open_low: bool = False,
        open_high: bool = False,
        optional: bool = False,
    ) -> Any:
        value = self._get(key)
        if value is None and optional:
            return None
        lo = "(" if open_low or low is None else "["
        hi = ")" if open_high or high is None else "]"
        expected = "a number"
        if low is not None or high is not None:
            expected += f" in {lo}{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}{hi}"
        if optional:
            expected += " or null"
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:  # NaN != NaN
            raise self.fail(key, expected, value)
        if low is not None and (value < low or (open_low and value == low)):
            raise self.fail(key, expected, value)
        if high is not None and (value > high or (open_high and value == high)):
            raise self.fail(key, expected, value)
        return float(value)

    def text(self, key: str, *, choices: tuple[str, ...] | None = None, optional: bool = False) -> Any:
        value = self._get(key)
        if value is None and optional:
            return None
        if not isinstance(value, str) or (choices is not None and value not in choices):
            expected = f"one of {', '.join(choices)}" if choices else "a non-empty string"
            raise self.fail(key, expected, value)
        if not value:
            raise self.fail(key, "a non-empty string", value)
        return value

    def flag(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            raise self.fail(key, "true or false", value)
        return value


def _device(section: _Section) -> str:
    value = section.text("device")
    kind, _, index = value.partition(":")
    if kind not in ("auto", "cpu", "cuda", "mps") or (index and (kind != "cuda" or not index.isdigit())):
        raise section.fail("device", "auto, cpu, cuda, cuda:N or mps", value)
    return value


def _workers(section: _Section) -> int | None:
    value = section._get("workers")
    if value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise section.fail("workers", "auto or an integer >= 1", value)
    return value


# The sizes of tuner's own models are counts: at least 1 (a user's model checks its own arguments).
_BUILTIN_COUNTS = ("hidden_units", "num_layers", "channels", "kernel_size")
_EXPECTED = {"int": "an integer", "bool": "true or false", "float": "a number"}


def _model(m: _Section) -> ModelConfig:
    """``model._target_`` importable, callable with ``input_shape``, ``num_classes`` and each other key of the
    section, each value of the type its parameter is annotated with; nothing is built here."""
    target = m.values.get("_target_")
    if not isinstance(target, str) or not target:
        raise m.fail("_target_", "a torch.nn.Module class or a function that builds one (e.g. tuner.model.mlp)", target)
    try:
        built = get_object(target)
    except Exception as err:  # Hydra wraps ImportError and AttributeError alike
        reason = str(err.__cause__ or err).strip().splitlines()[0]
        raise ConfigError(f"model._target_={target!r} cannot be imported ({reason}).") from None
    module_types = [f"{c.__module__}.{c.__qualname__}" for c in getattr(built, "__mro__", ())]
    if inspect.isclass(built) and "torch.nn.modules.module.Module" not in module_types:
        raise ConfigError(f"model._target_={target!r} is a class but not a torch.nn.Module.")
    if not callable(built):
        raise ConfigError(f"model._target_={target!r} is not a class or a function.")
    signature = inspect.signature(built)
    params = signature.parameters
    open_ended = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not open_ended and not {"input_shape", "num_classes"} <= set(params):
        raise ConfigError(
            f"model._target_={target!r} must take input_shape and num_classes, but its signature is {signature}."
        )
    options = {str(k): v for k, v in m.values.items() if k != "_target_"}
    known = tuple(k for k in params if k not in ("self", "input_shape", "num_classes"))
    for key, value in options.items():
        if key not in params:
            if not open_ended:
                unknown = _unknown(key, value, known, "model.")
                raise ConfigError(unknown.replace("a tuner setting", f"a parameter of {target}"))
            continue
        annotation = params[key].annotation
        kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
        wrong = (
            (kind == "bool" and not isinstance(value, bool))
            or (kind == "int" and (isinstance(value, bool) or not isinstance(value, int)))
            or (kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))))
        )
        if wrong:
            raise m.fail(key, _EXPECTED[kind], value)
        if target.startswith("tuner.model.") and key in _BUILTIN_COUNTS and value < 1:
            raise m.fail(key, "an integer >= 1", value)
    return ModelConfig(target=target, options=options)


def parse_trial(raw: Mapping[str, Any]) -> TrialConfig:
    """Check the sections a trial trains with and return them typed; a key tuner does not read is an error."""
    check_known_keys(raw)
    model = _model(_Section(raw, "model"))
    d = _Section(raw, "data")
    data = DataConfig(
        name=d.text("name", choices=DATASETS),
        root=d.text("root", optional=True),
        path=d.text("path", optional=True),
        download=d.flag("download"),
        # BatchNorm needs at least two samples to compute batch statistics.
        batch_size=d.integer("batch_size", minimum=2),
        val_fraction=d.number("val_fraction", low=0.0, high=1.0, open_low=True, open_high=True),
        train_subset=d.integer("train_subset", minimum=2, optional=True),
        num_samples=d.integer("num_samples", minimum=10),
        seed=d.integer("seed", minimum=0),  # NumPy's generators take no negative seed
    )
    if data.name == "npz" and data.path is None:
        raise d.fail("path", "the path of an .npz file when data.name is npz", None)
    o = _Section(raw, "optimizer")
    optimizer = OptimizerConfig(
        name=o.text("name", choices=OPTIMIZERS),
        lr=o.number("lr", low=0.0, open_low=True),
        momentum=o.number("momentum", low=0.0, high=1.0, open_high=True),
        beta1=o.number("beta1", low=0.0, high=1.0, open_high=True),
        beta2=o.number("beta2", low=0.0, high=1.0, open_high=True),
        eps=o.number("eps", low=0.0, open_low=True),
        weight_decay=o.number("weight_decay", low=0.0),
        lr_decay=o.number("lr_decay", low=0.0),
    )
    t = _Section(raw, "trainer")
    trainer = TrainerConfig(
        epochs=t.integer("epochs", minimum=1),
        device=_device(t),
        bf16=t.flag("bf16"),
        seed=t.integer("seed", optional=True),
        eval_batch_size=t.integer("eval_batch_size", minimum=1),
        threads=t.integer("threads", minimum=1, optional=True),
        workers=_workers(t),
    )
    return TrialConfig(model=model, data=data, optimizer=optimizer, trainer=trainer)


def _plugin(raw: Mapping[str, Any], group: str) -> PluginConfig:
    section = _Section(raw, group)
    options = {k: v for k, v in section.values.items() if k != "name"}
    return PluginConfig(name=section.text("name"), options=options)


# A study's name is also a folder name (study.output_dir, report.dir): one path component, short enough for any
# file system once tuner adds its suffixes (-fine, -big).
MAX_STUDY_NAME = 200


def _study_name(section: _Section) -> str:
    name: str = section.text("name")
    if len(name) > MAX_STUDY_NAME:
        raise section.fail("name", f"at most {MAX_STUDY_NAME} characters", f"{name[:40]}... ({len(name)} characters)")
    if "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise section.fail("name", "a name without '/' or '\\' that does not start with '.'", name)
    return name


def parse_run(raw: Mapping[str, Any]) -> RunConfig:
    """Check the whole composed config (without the search space, see ``tuner.space``)."""
    s = _Section(raw, "study")
    storage = s.text("storage")
    study = StudyConfig(
        name=_study_name(s),
        n_trials=s.integer("n_trials", minimum=1),
        timeout=s.number("timeout", low=0.0, open_low=True, optional=True),
        direction=s.text("direction", choices=DIRECTIONS),
        storage=storage,
        seed=s.integer("seed", minimum=0),
        output_dir=s.text("output_dir"),
        heartbeat_interval=s.integer("heartbeat_interval", minimum=1, optional=True),
        grace_period=s.integer("grace_period", minimum=1, optional=True),
        max_retry=s.integer("max_retry", minimum=0, optional=True),
        max_failure_streak=s.integer("max_failure_streak", minimum=1, optional=True),
        artifact_dir=s.text("artifact_dir", optional=True),
        accept_changes=s.flag("accept_changes"),
    )
    return RunConfig(
        study=study,
        sampler=_plugin(raw, "sampler"),
        pruner=_plugin(raw, "pruner"),
        trial=parse_trial(raw),
        raw=dict(raw),
    )
