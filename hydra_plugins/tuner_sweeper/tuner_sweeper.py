"""Registers ``hydra/sweeper=tuner``. Hydra imports every module under ``hydra_plugins`` at start-up,
so this one stays light: the work (and Optuna, torch) is imported only when a sweep runs.

No ``from __future__ import annotations`` here: Hydra's plugin scanner runs this module before it is in
``sys.modules``, where dataclasses cannot resolve string annotations, and OmegaConf reads the real types.
"""

from dataclasses import dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class TunerSweeperConf:
    _target_: str = "hydra_plugins.tuner_sweeper.tuner_sweeper.TunerSweeper"
    # Trials at once; null: the launcher's n_jobs (joblib), 1 with the basic launcher. The study, its
    # storage, sampler, pruner and n_trials come from tuner's own config (study.*, sampler=, pruner=).
    n_jobs: Optional[int] = None  # noqa: UP045 (OmegaConf reads this annotation)


ConfigStore.instance().store(group="hydra/sweeper", name="tuner", node=TunerSweeperConf, provider="tuner")


class TunerSweeper(Sweeper):
    # Set by setup, which Hydra calls before sweep.
    hydra_context: HydraContext
    config: DictConfig
    launcher: Launcher

    def __init__(self, n_jobs: int | None = None) -> None:
        self.n_jobs = n_jobs

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> Any:
        from tuner.sweeper import sweep_or_exit

        return sweep_or_exit(self.hydra_context, self.config, self.launcher, list(arguments), n_jobs=self.n_jobs)
