"""Surviving a long study: heartbeat settings, Ctrl-C and SIGTERM, the trial budget shared by many workers,
and stopping when every recent trial fails the same way."""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Callable, Iterator
from types import FrameType

import optuna
from optuna.trial import FrozenTrial, TrialState

from tuner.study import FINISHED

__all__ = [
    "FailureStreak",
    "FailureStreakError",
    "Interrupted",
    "StopWhen",
    "error_reason",
    "interruptible",
]


def error_reason(err: BaseException) -> str:
    """``<Type>: <first line of the message>``, as stored in a failed trial's ``fail_reason``."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:500] if lines else ''}".rstrip(": ")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM. A KeyboardInterrupt, so Optuna ends the running trial as FAIL and re-raises it."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


def _not_an_interrupt(record: logging.LogRecord) -> bool:
    # Optuna logs the trial a KeyboardInterrupt ended as a failure, with a traceback; the user pressed
    # Ctrl-C and gets tuner's one-line message instead (the trial's fail_reason keeps the signal).
    return not (record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt)) and not (
        record.getMessage().endswith("failed with value None.") and _interrupting
    )


_interrupting = False


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Turn SIGINT and SIGTERM into ``Interrupted`` (naming the signal) while the study runs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        global _interrupting
        _interrupting = True
        raise Interrupted(signal.Signals(signum).name)

    global _interrupting
    _interrupting = False
    optuna_log = logging.getLogger("optuna.study._optimize")  # the logger of Optuna's "Trial N failed" lines
    optuna_log.addFilter(_not_an_interrupt)
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        optuna_log.removeFilter(_not_an_interrupt)


class StopWhen:
    """Optuna callback: stop this worker after its trial once ``should_stop()`` (another worker failed)."""

    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self.should_stop = should_stop

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.should_stop():
            study.stop()


class FailureStreakError(RuntimeError):
    """The study stopped because every recent trial failed with the same error type."""


class FailureStreak:
    """Optuna callback: stop when the last ``limit`` finished trials (all workers) failed with one error type.

    A trial that fails for a reason of its own (a diverging learning rate) leaves the study going; a
    broken setup that fails every trial (a missing file, a model too big for the GPU) stops it early.
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.message: str | None = None

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.message is not None:  # another worker of this process saw the streak: stop this one too
            study.stop()
            return
        if self.limit is None or trial.state != TrialState.FAIL:
            return
        finished = study.get_trials(deepcopy=False, states=FINISHED)
        recent = sorted(finished, key=lambda t: (t.datetime_complete is None, t.datetime_complete, t.number))
        recent = recent[-self.limit :]
        reasons = [str(t.user_attrs.get("fail_reason", "")) for t in recent if t.state == TrialState.FAIL]
        kinds = {reason.split(":")[0] for reason in reasons}
        if len(recent) == self.limit and len(reasons) == self.limit and len(kinds) == 1 and "" not in kinds:
            self.message = (
                f"stopped: the last {self.limit} trials all failed with {kinds.pop()} "
                f"(study.max_failure_streak={self.limit}); last error: {reasons[-1]}"
            )
            study.stop()
