"""Surviving a long study: Ctrl-C and SIGTERM at safe points, and a stop when recent trials all fail alike."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # not at run time: a worker process imports this module (tuner.workers) and must not load Optuna
    import optuna
    from optuna.storages import BaseStorage
    from optuna.trial import FrozenTrial

log = logging.getLogger("tuner")

__all__ = [
    "FailureStreak",
    "FailureStreakError",
    "Interrupted",
    "beating",
    "check_interrupt",
    "error_reason",
    "interruptible",
    "interrupts_allowed",
    "interrupts_deferred",
]


def error_reason(err: BaseException) -> str:
    """``<Type>: <first line of the message>``, as stored in a failed trial's ``fail_reason``."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:500] if lines else ''}".rstrip(": ")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM. A KeyboardInterrupt, so tuner.loop ends the running trial as FAIL and re-raises it."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


class _SignalState:
    """May a signal interrupt the main thread now (``allowed``), or is one waiting (``pending``)?"""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.allowed = False
        self.pending: str | None = None


_state = _SignalState()


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into ``Interrupted`` (naming the signal) while the study runs: at once inside
    ``interrupts_allowed`` (training, loading data), elsewhere (ask, tell, storage writes, saving the best model)
    at the next ``check_interrupt``, so that no trial is left half-told. A second signal interrupts at once."""

    def handler(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if _state.allowed or _state.pending is not None:
            _state.allowed, _state.pending = False, None
            raise Interrupted(name)
        _state.pending = name

    _state.reset()
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _state.reset()


def check_interrupt() -> None:
    """A safe point: raise the signal that came while it could not interrupt (main thread only)."""
    if _in_main_thread() and _state.pending is not None:
        name, _state.pending = _state.pending, None
        raise Interrupted(name)


@contextlib.contextmanager
def interrupts_allowed() -> Iterator[None]:
    """Let a signal interrupt this block at once (after raising one that waits). A no-op off the main thread."""
    if not _in_main_thread():
        yield
        return
    check_interrupt()
    previous, _state.allowed = _state.allowed, True
    try:
        yield
    finally:
        _state.allowed = previous and _state.allowed


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Inside ``interrupts_allowed``: a block a signal must not cut short (a storage write); raises it after."""
    if not _in_main_thread():
        yield
        return
    previous, _state.allowed = _state.allowed, False
    try:
        yield
    finally:
        _state.allowed = previous
    if previous:
        check_interrupt()


class FailureStreakError(RuntimeError):
    """The study stopped because every recent trial failed with the same error type."""


class FailureStreak:
    """Called with each told trial: set ``message``, and the workers stop, when the last ``limit`` finished
    trials (all workers) failed with one error type: a broken setup (a missing file, a model too big for the
    GPU), not a trial's own failure (a diverging learning rate)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.message: str | None = None

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        from optuna.trial import TrialState  # loaded by now: the study calls this

        if self.message is not None or self.limit is None or trial.state != TrialState.FAIL:
            return
        finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
        recent = sorted(finished, key=lambda t: (t.datetime_complete is None, t.datetime_complete, t.number))
        recent = recent[-self.limit :]
        reasons = [str(t.user_attrs.get("fail_reason", "")) for t in recent if t.state == TrialState.FAIL]
        kinds = {reason.split(":")[0] for reason in reasons}
        if len(recent) == self.limit and len(reasons) == self.limit and len(kinds) == 1 and "" not in kinds:
            self.message = (
                f"stopped: the last {self.limit} trials all failed with {kinds.pop()} "
                f"(study.max_failure_streak={self.limit}); last error: {reasons[-1]}"
            )


@contextlib.contextmanager
def beating(storage: BaseStorage, ids: Callable[[], list[int]], interval: int | None) -> Iterator[None]:
    """Record the heartbeat of each trial id in ``ids()`` now and every ``interval`` seconds until the block ends,
    so that another worker can tell a dead worker's trials (no heartbeat for the grace period) from live ones."""
    record = getattr(storage, "record_heartbeat", None)  # RDBStorage's and tuner's journal's; in memory: none
    if interval is None or record is None:
        yield
        return
    stop = threading.Event()

    def beat_once() -> None:
        for trial_id in ids():  # the caller's ids() must be safe to call from the beating thread
            try:
                record(trial_id)
            except Exception:  # a busy database: the next beat comes within the grace period
                log.debug("heartbeat of trial id %d failed", trial_id, exc_info=True)

    def beat() -> None:
        while not stop.wait(interval):
            beat_once()

    # The first beat before the block: a worker killed as its trial starts must leave a trial that can go stale
    # (Optuna never fails a RUNNING trial that has no heartbeat at all).
    beat_once()
    thread = threading.Thread(target=beat, name="tuner-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
