from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import compose_raw
from tuner.checkpoint import load_model
from tuner.config import ConfigError, ModelConfig, parse_trial
from tuner.model import build_model, count_parameters, predict_proba
from tuner.tune import prepare, tune


def _cfg(name: str = "mlp", *, batch_norm: bool = True, layers: int = 2) -> ModelConfig:
    if name == "softmax":
        return ModelConfig(target="tuner.model.softmax", options={})
    options = {"hidden_units": 16, "num_layers": layers, "batch_norm": batch_norm}
    if name == "cnn":
        options.update(channels=4, kernel_size=3)
    return ModelConfig(target=f"tuner.model.{name}", options=options)


def test_model_mlp_linear_has_no_bias_before_batchnorm() -> None:
    model = build_model(_cfg(), (1, 8, 8), 10)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(norms) == 2
    # BatchNorm's beta replaces the bias of the layer it normalizes; only the output layer keeps one.
    assert [lin.bias is None for lin in linears] == [True, True, False]


def test_model_batch_norm_false_gives_same_network_with_biases() -> None:
    with_bn = build_model(_cfg(), (64,), 10)
    without = build_model(_cfg(batch_norm=False), (64,), 10)
    assert not any(isinstance(m, nn.BatchNorm1d) for m in without.modules())
    assert all(m.bias is not None for m in without.modules() if isinstance(m, nn.Linear))
    # Same widths: BatchNorm adds gamma and beta (2 x 16 per layer) and drops the biases (16 per layer).
    assert count_parameters(with_bn) - count_parameters(without) == 2 * (2 * 16 - 16)


def test_model_batchnorm_train_and_eval_outputs_differ_and_eval_uses_running_stats() -> None:
    torch.manual_seed(0)
    model = build_model(_cfg(layers=1), (5,), 3)
    x = torch.randn(64, 5) * 3 + 2
    model.train()
    for _ in range(50):  # fill the running averages with this distribution
        model(x)
    train_out = model(x)
    model.eval()
    eval_out = model(x)
    assert not torch.allclose(train_out, eval_out, atol=1e-4)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm1d))
    z = model[1](model[0](x))  # Flatten -> Linear: the z that BatchNorm normalizes
    expected = (z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    assert torch.allclose(bn(z), expected, atol=1e-5)
    # In eval mode a single sample works (running statistics, not batch statistics).
    assert model(x[:1]).shape == (1, 3)


def test_model_softmax_of_logits_sums_to_one() -> None:
    model = build_model(_cfg("softmax"), (1, 28, 28), 10)
    probs = predict_proba(model, torch.randn(32, 1, 28, 28))
    assert probs.shape == (32, 10)
    assert torch.allclose(probs.sum(dim=1), torch.ones(32), atol=1e-6)
    assert (probs >= 0).all()
    assert len([m for m in model.modules() if isinstance(m, nn.Linear)]) == 1


def test_model_cross_entropy_gradient_is_softmax_minus_one_hot() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 4, requires_grad=True)
    y = torch.tensor([0, 3, 1, 2, 3, 0])
    F.cross_entropy(logits, y, reduction="sum").backward()
    # The lesson's dZ = y_hat - y for a softmax output with cross-entropy loss.
    expected = torch.softmax(logits.detach(), dim=1) - F.one_hot(y, 4).float()
    assert logits.grad is not None
    assert torch.allclose(logits.grad, expected, atol=1e-6)


@pytest.mark.parametrize(("shape", "conv"), [((1, 28, 28), nn.Conv2d), ((1, 8, 8), nn.Conv2d), ((1, 40), nn.Conv1d)])
def test_model_cnn_works_on_images_and_signals(shape: tuple[int, ...], conv: type[nn.Module]) -> None:
    model = build_model(_cfg("cnn", layers=3), shape, 10)
    assert any(isinstance(m, conv) for m in model.modules())
    assert all(m.bias is None for m in model.modules() if isinstance(m, conv))
    assert model(torch.randn(4, *shape)).shape == (4, 10)


def test_model_cnn_rejects_flat_inputs() -> None:
    with pytest.raises(ValueError, match="model._target_='tuner.model.cnn' needs"):
        build_model(_cfg("cnn"), (64,), 10)


def not_a_model(input_shape: tuple[int, ...], num_classes: int) -> str:
    return "a string"


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("nosuch.Model", "model._target_='nosuch.Model' cannot be imported (No module named 'nosuch')."),
        ("collections.OrderedDict", "model._target_='collections.OrderedDict' is a class but not a torch.nn.Module."),
        ("math.prod", "model._target_='math.prod' must take input_shape and num_classes, but its signature is"),
        ("", "model._target_ must be the dotted name of a class or function, but got ''."),
    ],
)
def test_model_a_bad_target_is_one_line_naming_it(target: str, message: str) -> None:
    raw = compose_raw("model=softmax")
    raw["model"]["_target_"] = target
    with pytest.raises(ConfigError) as info:
        parse_trial(raw)
    assert str(info.value).startswith(message)


def test_model_a_factory_that_returns_no_module_stops_before_training(tmp_path: Path) -> None:
    raw = compose_raw("model=softmax", "data=digits", f"study.storage=sqlite:///{tmp_path / 's.db'}")
    raw["model"]["_target_"] = "tests.test_model.not_a_model"
    with pytest.raises(ConfigError, match=r"model._target_='tests.test_model.not_a_model' returned str, not a"):
        tune(*prepare(raw))
    assert not (tmp_path / "s.db").exists()


TINY = """
import math

from torch import nn


class TinyNet(nn.Module):
    def __init__(self, input_shape, num_classes, width):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.BatchNorm1d(width),
                                 nn.ReLU(), nn.Linear(width, num_classes))

    def forward(self, x):
        return self.net(x)
"""


@pytest.mark.slow
def test_model_a_users_own_model_is_tuned_saved_reported_and_reloaded(tmp_path: Path) -> None:
    (tmp_path / "mymodels.py").write_text(TINY)
    (tmp_path / "my_conf" / "model").mkdir(parents=True)
    (tmp_path / "my_conf" / "model" / "tiny.yaml").write_text("_target_: mymodels.TinyNet\nwidth: 16\n")
    # The README's command, with a short study.
    overrides = [
        f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]",
        "model=tiny",
        "data=digits",
        "space=lr",
        "+space.model.width={type: int, low: 8, high: 64, log: true}",
        "study.n_trials=4",
        "trainer.epochs=2",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    for module in ("tuner", "tuner.report"):
        done = subprocess.run(
            [sys.executable, "-m", module, *overrides], cwd=tmp_path, capture_output=True, text=True, env=env
        )
        assert done.returncode == 0, done.stdout + done.stderr
    study = optuna.load_study(study_name="digits-tinynet", storage=f"sqlite:///{tmp_path / 'tuner.db'}")
    assert len(study.trials) == 4 and all(8 <= t.params["model.width"] <= 64 for t in study.trials)
    assert not any("pack_size" in t.user_attrs for t in study.trials)  # not stackable: one at a time, as pack=1
    assert (tmp_path / "tuner_runs" / "digits-tinynet" / "report" / "index.html").is_file()

    sys.path.insert(0, str(tmp_path))
    try:
        model, info = load_model(tmp_path / "tuner_runs" / "digits-tinynet" / "best_model.pt")
    finally:
        sys.path.remove(str(tmp_path))
    assert type(model).__name__ == "TinyNet" and info["model"]["width"] == study.best_trial.params["model.width"]
    assert predict_proba(model, torch.randn(5, 1, 8, 8)).shape == (5, 10)
