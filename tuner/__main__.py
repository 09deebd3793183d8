"""``python -m tuner``: the Hydra entry point. ``DictConfig`` stops here; ``tuner.tune`` does the work."""

from __future__ import annotations

import signal
import sys


def _stop_during_start_up(signum: int, frame: object) -> None:
    # Ctrl-C while the imports below run, before cli() installs its own handling: nothing is written yet.
    name = signal.Signals(signum).name
    sys.stderr.write(f"interrupted by {name} during start-up; nothing was written\n")
    raise SystemExit(143 if name == "SIGTERM" else 130)


_SIGNALS = (signal.SIGINT, signal.SIGTERM)
if __name__ == "__main__":
    for _sig in _SIGNALS:
        signal.signal(_sig, _stop_during_start_up)

import atexit  # noqa: E402  (after the start-up handlers above)
import copy  # noqa: E402
import functools  # noqa: E402
import gc  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
from collections.abc import Callable, Iterable, Mapping  # noqa: E402
from pathlib import Path  # noqa: E402
from types import ModuleType  # noqa: E402
from typing import Any, TypeVar  # noqa: E402

import hydra  # noqa: E402
import yaml  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.core.override_parser.overrides_parser import OverridesParser  # noqa: E402
from hydra.errors import HydraException  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

from tuner.config import TRIAL_SECTIONS, ConfigError, composition_error, get_path, parse_run  # noqa: E402
from tuner.multirun import jobs_at_once, keep_summary_in_job_log, name_suffix, storage_url, write_job_record  # noqa: E402
from tuner.secrets import mask_password_in_files, mask_passwords_in_logs, mask_streams, remember  # noqa: E402

log = logging.getLogger("tuner")


def config_dir() -> str:
    """The config tree: inside the package when installed from a wheel, beside it in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"tuner's config tree (conf/config.yaml) is missing beside {here}")


def to_container(cfg: DictConfig) -> dict[str, Any]:
    try:
        raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        raise ConfigError(str(err).splitlines()[0] + f" (key: {getattr(err, 'full_key', '?')})") from None
    assert isinstance(raw, dict)
    raw.pop("hydra", None)
    out: dict[str, Any] = {str(k): v for k, v in raw.items()}
    # A setting given on the command line wins over the search space: that key is not searched.
    out["space"], fixed = without_entries(out.get("space"), set_on_command_line())
    for path in fixed:
        shown = get_path(out, path)
        log.info("%s=%r is set on the command line: it is not searched (space.%s left out)", path, shown, path)
    return out


def set_on_command_line() -> list[str]:
    """The trial settings (``optimizer.lr``, ``model.num_layers``, ...) this command's overrides set to one value."""
    if not HydraConfig.initialized():
        return []
    overrides = OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task))
    return [
        o.key_or_group
        for o in overrides
        if not (o.is_sweep_override() or o.is_delete()) and o.key_or_group.split(".")[0] in TRIAL_SECTIONS
    ]


def without_entries(space: Mapping[str, Any] | None, paths: Iterable[str]) -> tuple[dict[str, Any], list[str]]:
    """``space`` less the entries for ``paths`` (settings given explicitly, which then are not searched), and the
    paths it held among them. Sections left empty go too."""
    out: dict[str, Any] = copy.deepcopy(dict(space or {}))
    removed: list[str] = []
    for path in paths:
        *parents, leaf = path.split(".")
        chain = [out]
        for part in parents:
            node = chain[-1].get(part)
            if not isinstance(node, dict) or "type" in node:
                break
            chain.append(node)
        else:
            if isinstance(chain[-1].get(leaf), dict) and "type" in chain[-1][leaf]:
                del chain[-1][leaf]
                removed.append(path)
                for parent, part in zip(reversed(chain[:-1]), reversed(parents), strict=True):
                    if not parent[part]:
                        del parent[part]
    return out, removed


def mask_saved_password(cfg: DictConfig) -> None:
    """Hydra saved the command line, storage password included: under <run dir>/.hydra, and in a multirun
    also as <sweep dir>/multirun.yaml. Mask it there, first thing in every job."""
    url = storage_url(cfg)  # resolved: a password from ${oc.env:...} is masked too
    mask_passwords_in_logs(url)  # Hydra set up this job's logging afresh
    if url is None:
        return
    hydra_cfg = HydraConfig.get()
    saved: list[Path] = []
    if hydra_cfg.output_subdir is not None:
        saved += Path(hydra_cfg.runtime.output_dir, hydra_cfg.output_subdir).glob("*.yaml")
    if hydra_cfg.mode == RunMode.MULTIRUN:
        saved.append(Path(hydra_cfg.sweep.dir, "multirun.yaml"))
    mask_password_in_files(url, [p for p in saved if p.is_file()])


def urls_on_command_line(args: list[str]) -> list[str]:
    """The URLs among the values of Hydra overrides (``key=value``), as typed and as Hydra reads them
    (quotes and escapes undone, each value of a sweep, ``${oc.env:...}`` resolved)."""
    parser = OverridesParser.create()
    urls: list[str] = []
    for arg in args:
        if "://" not in arg or "=" not in arg:
            continue
        urls.append(arg.partition("=")[2])
        try:
            override = parser.parse_override(arg)
            values = list(override.sweep_iterator()) if override.is_discrete_sweep() else [override.value()]
        except Exception:  # not an override Hydra can read: Hydra says so itself, through the masked stderr
            continue
        for value in values:
            text = str(getattr(value, "text", value))  # a QuotedString's text
            if "${" in text:
                try:
                    text = str(OmegaConf.create({"value": text}).value)
                except Exception:  # an interpolation of another key: the job resolves and masks it
                    continue
            urls.append(text)
    return urls


_Result = TypeVar("_Result")


def command(work: Callable[[dict[str, Any]], _Result]) -> Callable[[], _Result]:
    """The one entry path of tuner's commands (``tuner``, ``tuner.report``, ``tuner.refine``, ``tuner.dashboard``,
    ``tuner.train``): Hydra composes conf/ and the overrides (``cli`` makes its errors one line), the job's study is
    named, passwords are masked, the config is checked (``parse_run``), and ``work`` gets the plain dict. Bad input
    (``ConfigError``) is one line and exit 2, a study stopped by failing trials one line and exit 1."""

    @hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
    @functools.wraps(work)
    def entry(cfg: DictConfig) -> _Result:
        from tuner.faults import FailureStreakError

        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:  # name the job's study from its overrides (tuner.multirun)
            keep_summary_in_job_log()
            suffix = name_suffix(list(hydra_cfg.overrides.task))
            if suffix:
                cfg.study.name = f"{cfg.study.name}{suffix}"
        mask_saved_password(cfg)
        try:
            raw = to_container(cfg)
            parse_run(raw)  # the same checks before any command does its work
            return work(raw)
        except ConfigError as err:
            log.error("%s", err)  # one clear line and a non-zero exit; no traceback for bad input
            sys.exit(2)
        except FailureStreakError as err:
            log.error("%s", err)
            sys.exit(1)

    @functools.wraps(entry)
    def masked() -> _Result:
        # Hydra prints --cfg job, --cfg hydra and its errors before tuner's code runs: mask the command line's
        # passwords from its first line on (the job masks the composed config's, mask_saved_password).
        for url in urls_on_command_line(sys.argv[1:]):
            remember(url)
        mask_streams()
        return entry()

    return masked


def _import_tune() -> ModuleType:
    """``tuner.tune``, imported once the config is composed (it imports torch). torch's import runs Python code
    from C++ (pybind11), where a KeyboardInterrupt aborts the interpreter (exit -6): a signal waits for its end."""
    held: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: held.append(signum)) for sig in _SIGNALS}
    try:
        import tuner.tune
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if held:
        raise KeyboardInterrupt(signal.Signals(held[0]).name)
    return tuner.tune


def _tune(raw: dict[str, Any]) -> float | None:
    module = _import_tune()
    prepare, tune = module.prepare, module.tune

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        run, params = prepare(raw)
        # The jobs of a multirun that run at once share the cores (trainer.workers=auto).
        summary = tune(run, params, processes=jobs_at_once(hydra_cfg.launcher.get("n_jobs", 1)) if multirun else 1)
    except KeyboardInterrupt as err:
        name = str(err) or "SIGINT"  # tuner.faults.Interrupted carries the signal's name
        log.error(
            "interrupted by %s: finished trials are saved and a trial it stopped is queued again; "
            "run the same command again to continue the study",
            name,
        )
        sys.exit(143 if name == "SIGTERM" else 130)
    if multirun:
        write_job_record(str(hydra_cfg.runtime.output_dir), study=run.study.name, storage=run.study.storage)
    return summary.best_value


main = command(_tune)


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt("SIGTERM")


def input_error(err: BaseException) -> str | None:
    """What the user did, in a line, for an error Hydra meets before tuner's code runs (a config file that is no
    YAML, a duplicate key, an override it cannot apply, a folder it cannot write); ``None`` for anything else."""
    refused = composition_error(err)  # a value the schema cannot hold: worded as tuner's own checks word it
    if refused is not None:
        return str(refused)
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        context = f"{err.context}, " if err.context else ""
        return f"{mark.name}, line {mark.line + 1}: {context}{err.problem}"
    if isinstance(err, yaml.YAMLError | HydraException | OmegaConfBaseException):
        return str(err).strip()
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, OSError):  # logging wraps its file's OSError in a ValueError
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError) and cause.filename is not None:
        return f"{cause.strerror}: {cause.filename!s} (run from a folder tuner can write to, or set hydra.run.dir)"
    return None


def _end_quickly() -> None:
    # Python's shutdown searches every object left for reference cycles, and torch's are millions (a second of CPU).
    # The command is over: close the storages' connections, then exempt what is left from that search.
    from tuner.storage import close_storages

    close_storages()
    gc.freeze()


def _ignore_signals() -> None:
    for sig in _SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def cli(entry: Callable[[], object] = main) -> None:
    """Run a command's ``entry`` (default: ``python -m tuner``): what the user did, or a signal outside the study, ends
    the run with one message and a non-zero exit, never a traceback."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _sigterm)
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra raises its errors here instead of printing tracebacks
    atexit.register(_end_quickly)
    try:
        entry()
        # The run is complete. Python's shutdown resets its own handlers to the default (killed by the signal),
        # but keeps an ignored signal ignored.
        _ignore_signals()
    except KeyboardInterrupt as err:
        _ignore_signals()  # a second Ctrl-C while the run ends changes nothing
        name = str(err) or "SIGINT"
        print(f"interrupted by {name}; run the same command again to continue the study", file=sys.stderr)
        # Not sys.exit: an interrupt that landed inside an extension's start-up code (torch's) marks the interpreter,
        # which then ends itself by SIGINT (-2) whatever code is asked for. Nothing is left to write.
        _end_quickly()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(143 if name == "SIGTERM" else 130)
    except Exception as err:
        message = input_error(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
