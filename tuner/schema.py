"""The config's schema: each section's keys, types, defaults and allowed values, declared once.

``tuner.config`` stores them in Hydra's ConfigStore (``conf/*.yaml`` override their defaults) and checks a composed
config with ``check_section``. Nothing here imports Hydra, OmegaConf or Optuna: a training worker imports this module.
"""

from __future__ import annotations

import importlib
import math
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar, get_type_hints

__all__ = [
    "KINDS",
    "BabysitConfig",
    "ConfigError",
    "DashboardConfig",
    "DataConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PluginConfig",
    "RefineConfig",
    "ReportConfig",
    "RunConfig",
    "SteerConfig",
    "StudyConfig",
    "TrainerConfig",
    "TrialConfig",
    "check_section",
    "locate",
    "schema_fields",
    "short_name",
]


class ConfigError(ValueError):
    """Bad user input. The message names the config key and shows the value."""


def _rule(expected: str, ok: Callable[[Any], bool] = lambda v: True, **more: Any) -> dict[str, Any]:
    return {"expected": expected, "ok": ok, **more}


def count(minimum: int) -> dict[str, Any]:
    return _rule(f"an integer >= {minimum}", lambda v: v >= minimum)


def number(low: float, high: float | None = None, *, open_low: bool = False, open_high: bool = False) -> dict[str, Any]:
    lo, hi = "(" if open_low else "[", ")" if open_high or high is None else "]"
    expected = f"a number in {lo}{low:g}, {'inf' if high is None else f'{high:g}'}{hi}"

    def ok(v: float) -> bool:
        above = v > low or (not open_low and v == low)
        return above and (math.isfinite(v) if high is None else v < high or (not open_high and v == high))

    return _rule(expected, ok)


def choice(*choices: str) -> dict[str, Any]:
    return _rule(f"one of {', '.join(choices)}", lambda v: v in choices)


def setting(default: Any, rule: dict[str, Any] | None = None) -> Any:
    """A dataclass field: its default and what values it allows (``check_section`` applies the rule)."""
    return field(default=default, metadata=rule or {})


def _device(value: str) -> bool:
    kind, _, index = value.partition(":")
    return kind in ("auto", "cpu", "cuda", "mps") and (not index or (kind == "cuda" and index.isdigit()))


# A study's name is also a folder name (study.output_dir, report.dir): one path component, short enough for any
# file system once tuner adds its suffixes (-fine, -big).
MAX_STUDY_NAME = 200
_ONE_FOLDER = "a name without '/' or '\\' that does not start with '.'"


@dataclass
class StudyConfig:
    name: str = setting(
        "${data.name}-${tuner_model:${model}}",  # tuner_model: the last part of model._target_
        _rule(_ONE_FOLDER, lambda v: "/" not in v and "\\" not in v and not v.startswith("."), longest=MAX_STUDY_NAME),
    )
    n_trials: int = setting(50, count(1))  # the total the study should reach; rerunning continues to it
    timeout: float | None = setting(None, number(0.0, open_low=True))  # seconds for this run
    direction: str = setting("maximize", choice("maximize", "minimize"))  # of val_accuracy
    storage: str = "sqlite:///tuner.db"
    seed: int = setting(0, count(0))
    output_dir: str = "tuner_runs/${study.name}"  # best_model.pt lands here
    # None: beside a SQLite file (tuner.db -> tuner_artifacts/), else ./tuner_artifacts; one folder for every
    # study in a storage, as optuna-dashboard --artifact-dir wants (tuner.artifacts.artifact_dir)
    artifact_dir: str | None = None
    # Seconds between a running trial's heartbeats; a trial silent for grace_period is a dead worker's: FAIL,
    # then retried. None turns heartbeats off.
    heartbeat_interval: int | None = setting(60, count(1))
    grace_period: int | None = setting(None, count(1))  # None: 2 x heartbeat_interval
    max_retry: int | None = setting(3, count(0))  # times a dead worker's trial is queued again
    max_failure_streak: int | None = setting(5, count(1))  # recent trials failing alike: stop
    accept_changes: bool = False  # a stored study takes this run's changed settings (tuner.definition), not data


@dataclass
class OptimizerConfig:
    name: str = setting("sgd", choice("sgd", "adam", "rmsprop"))  # sgd with momentum
    lr: float = setting(0.05, number(0.0, open_low=True))
    momentum: float = setting(0.9, number(0.0, 1.0, open_high=True))
    beta1: float = setting(0.9, number(0.0, 1.0, open_high=True))  # Adam
    beta2: float = setting(0.999, number(0.0, 1.0, open_high=True))  # Adam; RMSprop's squared-gradient average
    eps: float = setting(1.0e-8, number(0.0, open_low=True))
    weight_decay: float = setting(0.0, number(0.0))
    lr_decay: float = setting(0.0, number(0.0))  # per epoch: lr / (1 + lr_decay * epoch)


@dataclass
class TrainerConfig:
    epochs: int = setting(10, count(1))
    device: str = setting("auto", _rule("auto, cpu, cuda, cuda:N or mps", _device))  # auto: CUDA when present
    bf16: bool = True  # autocast on CUDA only
    seed: int | None = None  # None: a distinct seed per trial, recorded on the trial
    eval_batch_size: int = setting(2048, count(1))
    # Torch CPU threads; None keeps torch's default. Small models are per-op bound, so more threads per model
    # only wait on each other (docs/benchmarks.md).
    threads: int | None = setting(1, count(1))
    # Trials trained at once, each in its own process: auto (None once checked) = one per CPU core (at most 8)
    # on CPU, 1 on CUDA (tuner.workers.resolve_workers); 1 trains in this process.
    workers: Any = setting(  # noqa: RUF009 (Any: a string or a number; the rule checks it)
        "auto",
        _rule(
            "auto or an integer >= 1",
            lambda v: v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
            convert=lambda v: None if v == "auto" else v,
        ),
    )
    # Trials each worker trains at once as one stacked model (tuner.pack); 1: one at a time; auto (None once
    # checked): per sampled shape, from a throughput probe on the device (tuner.packauto).
    pack: Any = setting(  # noqa: RUF009 (Any: a string or a number; the rule checks it)
        "auto",
        _rule(
            "auto or an integer >= 1",
            lambda v: v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
            convert=lambda v: None if v == "auto" else v,
        ),
    )


def short_name(target: str) -> str:
    """A ``_target_``'s short name, for study names: its last part (``tuner.model.mlp`` -> mlp)."""
    return str(target).rsplit(".", 1)[-1].lower()


@dataclass
class ModelConfig:
    """``model._target_`` (an ``nn.Module`` class or a function that builds one) and its other keys (``options``)."""

    target: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return short_name(self.target)


@dataclass
class DataConfig:
    """``data._target_`` (a loader), its own keys (``options``), and the settings every data set shares."""

    target: str = field(default="", metadata={"key": "_target_"})
    options: dict[str, Any] = field(default_factory=dict, metadata={"key": None})  # the loader's keyword arguments
    name: str = "${tuner_name:${data._target_}}"  # the last part of data._target_ (mnist1d, digits, ...)
    batch_size: int = setting(128, count(2))  # BatchNorm needs at least two samples for batch statistics
    val_fraction: float = setting(0.1, number(0.0, 1.0, open_low=True, open_high=True))  # stratified, of train
    train_subset: int | None = setting(None, count(2))  # a stratified subset of the training samples
    seed: int = setting(0, count(0))  # the test, subset and validation splits; NumPy takes no negative seed


@dataclass
class PluginConfig:
    """A sampler or pruner: ``_target_`` (an Optuna class, or any callable that returns one) and its options."""

    target: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.target.rsplit(".", 1)[-1]


@dataclass
class DashboardConfig:  # python -m tuner.dashboard
    # optuna-dashboard has no authentication: keep it on loopback, reach it with ssh -L
    host: str = setting("127.0.0.1", _rule("a host name or address such as 127.0.0.1"))
    port: int = setting(8080, _rule("an integer in [1, 65535]", lambda v: 0 < v < 65536))


@dataclass
class ReportConfig:  # python -m tuner.report
    dir: str = setting("${study.output_dir}/report", _rule("a folder path"))
    evaluator: str = "ped_anova"  # Optuna 5's default; also fanova, mean_decrease_impurity (they can disagree)


@dataclass
class RefineConfig:  # python -m tuner.refine: narrow study.name's space around its best trials
    top_k: int = setting(5, count(1))  # the span of the top 5 completed trials (of at least 2 * top_k)
    margin: float = setting(0.1, _rule("a number in (0, 1]", lambda v: 0 < v <= 1))  # of the parent's width
    name: str = setting("${study.name}-fine", _rule("a non-empty study name"))
    space_dir: str = setting("tuner_spaces", _rule("a folder path"))  # writes <space_dir>/space/<name>.yaml
    enqueue: bool = True  # start the new study with the parent's top_k configurations
    n_trials: int = setting("${study.n_trials}", count(1))
    run: bool = True  # false: write the space and create the study, train nothing


@dataclass
class BabysitConfig:  # python -m tuner.babysit: one model trained and steered (tuner.babysit)
    study: str = setting(
        "${study.name}-babysit",
        _rule(_ONE_FOLDER, lambda v: "/" not in v and "\\" not in v and not v.startswith("."), longest=MAX_STUDY_NAME),
    )
    dir: str = setting("tuner_runs/${babysit.study}", _rule("a folder path"))  # <dir>/trial-<n>/epoch-<N>.pt
    fork: int | None = setting(None, count(0))  # a babysat trial's number: start a new trial from its checkpoint
    fork_epoch: int | None = setting(None, count(1))  # the fork's epoch; None: the parent's last checkpoint
    from_best: bool = False  # continue study.name's best trial from its saved model
    keep_checkpoints: int | None = setting(None, count(1))  # the last N epochs' checkpoints; None: every epoch


@dataclass
class SteerConfig:  # python -m tuner.steer: set a running babysat trial's values from a terminal
    # Any: passed on as typed; the training job checks each value and records a rejected one with its reason.
    lr: Any = None
    momentum: Any = None
    beta1: Any = None
    beta2: Any = None
    weight_decay: Any = None
    stop: bool = False
    trial: int | None = setting(None, count(0))  # None: the babysit study's one running trial
    wait: float = setting(60.0, number(0.0))  # seconds to wait for the job to apply or reject the values


@dataclass
class TrialConfig:
    """Everything one trial trains with: what the search space may change."""

    model: ModelConfig
    data: DataConfig
    optimizer: OptimizerConfig
    trainer: TrainerConfig


@dataclass
class RunConfig:
    """The whole run: the study-level settings, the base trial settings and the raw dict."""

    study: StudyConfig
    sampler: PluginConfig
    pruner: PluginConfig
    trial: TrialConfig
    raw: dict[str, Any]


# Each type a schema key may have: how a message names it, and the test a value must pass.
KINDS: dict[Any, tuple[str, Callable[[Any], bool]]] = {
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)),
    bool: ("true or false", lambda v: isinstance(v, bool)),
    str: ("a non-empty string", lambda v: isinstance(v, str) and bool(v)),
}
_Section = TypeVar("_Section")


def schema_fields(cls: type) -> dict[str, tuple[Any, bool, Any]]:
    """``{config key: (type, optional, dataclass field)}`` for the keys a section's schema declares."""
    hints = get_type_hints(cls)
    out = {}
    for f in fields(cls):
        key = f.metadata.get("key", f.name)
        if key is None:
            continue
        kind = hints[f.name]
        args = kind.__args__ if isinstance(kind, types.UnionType) else (kind,)
        out[key] = (next(a for a in args if a is not type(None)), type(None) in args, f)
    return out


def check_section(cls: type[_Section], section: str, values: Mapping[str, Any], **extra: Any) -> _Section:
    """``values`` (one config section) as ``cls``: each key of the schema of the declared type and within its rule,
    a missing one at its default; raises ``ConfigError`` naming the key and showing the value."""
    kwargs: dict[str, Any] = dict(extra)
    for key, (kind, optional, f) in schema_fields(cls).items():
        rule = f.metadata
        if key not in values:
            if "convert" in rule:
                kwargs[f.name] = rule["convert"](f.default)
            continue
        value = values[key]
        if value is None and optional:
            kwargs[f.name] = None
            continue
        name, is_kind = KINDS.get(kind, ("", lambda v: True))
        expected = (rule.get("expected") or name) + (" or null" if optional else "")
        if not is_kind(value) or not rule.get("ok", lambda v: True)(value):
            raise ConfigError(f"{section}.{key} must be {expected}, but got {value!r}.")
        longest = rule.get("longest")
        if longest is not None and len(value) > longest:
            shown = f"{value[:40]}... ({len(value)} characters)"
            raise ConfigError(f"{section}.{key} must be at most {longest} characters, but got {shown!r}.")
        value = float(value) if kind is float else value
        kwargs[f.name] = rule["convert"](value) if "convert" in rule else value
    return cls(**kwargs)


def locate(target: str) -> Any:
    """The object a dotted ``_target_`` names (``package.module.name``, or a name inside a class); raises
    ``ImportError`` or ``AttributeError`` when there is none."""
    parts = target.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError as err:
            if split == 1 or not (err.name and target.startswith(err.name)):
                raise
            continue
        for part in parts[split:]:
            obj = getattr(obj, part)
        return obj
    raise ImportError(f"no module named {target!r}")
