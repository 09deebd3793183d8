"""Hand a running trial to another process: the one place that rebuilds ``optuna.trial.Trial`` from storage.

The sweeper asks and tells each trial; its job, in another process, reports and asks ``should_prune()``.
Optuna has no public call for that: ``optuna.trial.Trial(study, trial_id)`` works on an RDB storage (optuna
5.0.0) but is "not recommended", so it lives here only, with tests/test_handoff.py to catch a change. The pruner
is not stored with the study: the job loads it as the sweeper does. Once told, the trial raises
``optuna.exceptions.UpdateFinishedTrialError``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.storages import BaseStorage

__all__ = ["TrialHandle", "rebuild_trial"]


@dataclass(frozen=True)
class TrialHandle:
    """What a job needs to find its trial: the study's name and the trial's number in that study."""

    study: str
    trial: int

    def overrides(self) -> list[str]:
        """Hydra overrides that carry the handle to a job (read back by ``from_config``)."""
        # A quoted Hydra value: study names may hold commas and equals signs (tuner.multirun names do).
        quoted = self.study.replace("\\", "\\\\").replace("'", "\\'")
        return [f"study.name='{quoted}'", f"+tuner.trial={self.trial}"]

    @classmethod
    def from_config(cls, raw: Mapping[str, Any]) -> TrialHandle | None:
        """The handle in a job's composed config, or ``None`` when the job is not one of a sweeper's trials."""
        section = raw.get("tuner")
        if not isinstance(section, Mapping) or "trial" not in section:
            return None
        number = section["trial"]
        if isinstance(number, bool) or not isinstance(number, int):
            raise ValueError(f"tuner.trial must be a trial number, but got {number!r}.")
        return cls(study=str(raw["study"]["name"]), trial=number)


def rebuild_trial(
    storage: BaseStorage, handle: TrialHandle, *, pruner: optuna.pruners.BasePruner
) -> optuna.trial.Trial:
    """The live trial another process asked for, able to ``report``, ``should_prune`` and set user attributes."""
    study = optuna.load_study(study_name=handle.study, storage=storage, pruner=pruner)
    # Found by (study, number), so a job can never report into another study's trial.
    study_id = storage.get_study_id_from_name(handle.study)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, handle.trial)
    return optuna.trial.Trial(study, trial_id)
