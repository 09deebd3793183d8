from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tuner.config import ModelConfig
from tuner.model import build_model, count_parameters, predict_proba


def _cfg(name: str = "mlp", *, batch_norm: bool = True, layers: int = 2) -> ModelConfig:
    return ModelConfig(name=name, hidden_units=16, num_layers=layers, batch_norm=batch_norm, channels=4, kernel_size=3)


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
    with pytest.raises(ValueError, match="model.name='cnn' needs"):
        build_model(_cfg("cnn"), (64,), 10)
