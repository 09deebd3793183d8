"""Which hyperparameters mattered: Optuna's importance evaluators, set beside the lesson's priority list."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import optuna
from optuna.trial import TrialState

from tuner.config import ConfigError
from tuner.space import REVERSE_PREFIX

if TYPE_CHECKING:  # optuna.importance imports scikit-learn (over a second): only once importances are computed
    from optuna.importance import BaseImportanceEvaluator

__all__ = ["EVALUATORS", "EVALUATOR_TITLES", "LESSON_ORDER", "make_evaluator", "param_importances", "tier_of"]

# Optuna 5's get_param_importances defaults to PED-ANOVA; fANOVA and MDI can rank the same trials differently.
EVALUATORS: dict[str, str] = {  # report.evaluator -> the class in optuna.importance
    "ped_anova": "PedAnovaImportanceEvaluator",
    "fanova": "FanovaImportanceEvaluator",
    "mean_decrease_impurity": "MeanDecreaseImpurityImportanceEvaluator",
}
EVALUATOR_TITLES = {"ped_anova": "PED-ANOVA", "fanova": "fANOVA", "mean_decrease_impurity": "mean decrease impurity"}

# The lesson's order for tuning: 1 first, 4 rarely.
LESSON_TIER: dict[str, int] = {
    "optimizer.lr": 1,
    "optimizer.momentum": 2,
    "model.hidden_units": 2,
    "data.batch_size": 2,
    "model.num_layers": 3,
    "optimizer.lr_decay": 3,
    "optimizer.beta1": 4,
    "optimizer.beta2": 4,
    "optimizer.eps": 4,
}
LESSON_ORDER = (
    "learning rate first; then momentum, hidden units, mini-batch size; then layers and learning-rate decay; "
    "Adam's beta1, beta2, eps last"
)


def tier_of(name: str) -> int | None:
    """The lesson's tier for a stored param name (``1-optimizer.momentum`` is ``optimizer.momentum``)."""
    return LESSON_TIER.get(name.removeprefix(REVERSE_PREFIX))


def make_evaluator(name: str, *, seed: int = 0) -> BaseImportanceEvaluator:
    if name not in EVALUATORS:
        raise ConfigError(f"report.evaluator must be one of {', '.join(EVALUATORS)}, but got {name!r}.")
    import optuna.importance

    cls = getattr(optuna.importance, EVALUATORS[name])
    evaluator: BaseImportanceEvaluator = cls() if name == "ped_anova" else cls(seed=seed)
    return evaluator


def param_importances(study: optuna.Study, evaluator: str = "ped_anova", *, seed: int = 0) -> dict[str, float]:
    """Importances by stored param name, highest first; empty when too few trials to say."""
    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) < 2:
        return {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            # PED-ANOVA warns per param when a quantile holds < 2 trials: normal in a small study.
            warnings.filterwarnings("ignore", message="Some regimes for parameter")
            chosen = make_evaluator(evaluator, seed=seed)  # imports optuna.importance
            return dict(optuna.importance.get_param_importances(study, evaluator=chosen))
    except (ValueError, RuntimeError):  # e.g. no param common to all completed trials, or all values equal
        return {}
