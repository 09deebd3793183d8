"""``python -m tuner.train``: one job of ``hydra/sweeper=tuner`` trains the trial its config names (its values as
overrides, its identity as ``study.name`` and ``+tuner.trial``, see ``tuner.handoff``); the sweeper tells the result.
"""

from __future__ import annotations

import logging
from pathlib import Path

import optuna
from hydra.core.plugins import Plugins

from hydra_plugins.tuner_sweeper.tuner_sweeper import TunerSweeper
from tuner.__main__ import cli, command
from tuner.config import ConfigError
from tuner.handoff import TrialHandle, rebuild_trial

__all__ = ["main", "train_trial"]

log = logging.getLogger("tuner")

# Hydra finds plugins by walking the hydra_plugins folders; an editable install (pip install -e) puts ours
# behind an import hook that walk does not see. Importing it stores hydra/sweeper=tuner; registering
# makes it instantiable (Plugins.register, hydra-core 1.3.8). A wheel install finds it either way.
Plugins.instance().register(TunerSweeper)


def train_trial(raw: dict[str, object]) -> float | optuna.TrialPruned:
    """Train the trial named in ``raw``: its val_accuracy, or the ``TrialPruned`` it raised, returned because Hydra
    prints "Error executing job" for every job that raises (the sweeper reads the return value either way)."""
    from tuner.objective import Objective  # torch is imported only once the config is composed
    from tuner.plugins import make_pruner
    from tuner.storage import make_storage
    from tuner.tune import prepare

    try:
        handle = TrialHandle.from_config(raw)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if handle is None:
        raise ConfigError(
            "python -m tuner.train trains the trials of the tuner sweeper: run it as "
            "python -m tuner.train -m hydra/sweeper=tuner 'optimizer.lr=tag(log, interval(1e-4, 1))' ..."
        )
    job_raw = {k: v for k, v in raw.items() if k != "tuner"}
    run, _ = prepare(job_raw)
    # The values are already in the config (the sweeper's overrides): the objective samples nothing.
    objective = Objective(run, [], best_model_path=Path(run.study.output_dir) / "best_model.pt")
    trial = rebuild_trial(make_storage(run.study.storage), handle, pruner=make_pruner(run.pruner))
    try:
        return objective(trial)
    except optuna.TrialPruned as pruned:
        return pruned


main = command(train_trial)

if __name__ == "__main__":
    cli(main)
