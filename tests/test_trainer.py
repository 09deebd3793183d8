from __future__ import annotations

import pytest
import torch

from tuner.config import ModelConfig, OptimizerConfig
from tuner.model import build_model
from tuner.optim import build_optimizer
from tuner.trainer import EpochMetrics, TrainingDiverged, evaluate, resolve_device, train


def _problem(n: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 6, generator=g) + y[:, None].float() * 1.5  # separable blobs
    return x, y


def _setup(lr: float = 0.1, lr_decay: float = 0.0) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    torch.manual_seed(0)
    model = build_model(ModelConfig("tuner.model.mlp", {"hidden_units": 32, "num_layers": 2}), (6,), 3)
    opt, sched = build_optimizer(
        model.parameters(), OptimizerConfig("sgd", lr, 0.9, 0.9, 0.999, 1e-8, 0.0, lr_decay), device=torch.device("cpu")
    )
    return model, opt, sched


def test_trainer_learns_and_reports_each_epoch() -> None:
    x, y = _problem()
    model, opt, sched = _setup()
    seen: list[EpochMetrics] = []
    history = train(
        model, opt, sched, x[:300], y[:300], x[300:], y[300:], epochs=5, batch_size=32, seed=0, on_epoch=seen.append
    )
    assert [m.epoch for m in seen] == [1, 2, 3, 4, 5]
    assert history == seen
    assert history[-1].val_accuracy > 0.9
    assert history[-1].train_loss < history[0].train_loss


def test_trainer_is_reproducible_for_a_seed() -> None:
    x, y = _problem()
    runs = []
    for _ in range(2):
        model, opt, sched = _setup()
        runs.append(train(model, opt, sched, x[:300], y[:300], x[300:], y[300:], epochs=2, batch_size=32, seed=7))
    assert [m.val_loss for m in runs[0]] == [m.val_loss for m in runs[1]]


def test_trainer_lr_decays_per_epoch() -> None:
    x, y = _problem()
    model, opt, sched = _setup(lr=0.1, lr_decay=1.0)
    history = train(model, opt, sched, x[:300], y[:300], x[300:], y[300:], epochs=3, batch_size=64, seed=0)
    # lr / (1 + decay * epoch): 0.1, 0.05, 0.0333
    assert [round(m.lr, 4) for m in history] == [0.1, 0.05, 0.0333]


def test_trainer_never_feeds_batchnorm_a_single_sample() -> None:
    x, y = _problem(301)  # 301 = 3 x 100 + 1: the last batch would hold one sample
    model, opt, sched = _setup()
    history = train(model, opt, sched, x, y, x[:50], y[:50], epochs=1, batch_size=100, seed=0)
    assert len(history) == 1  # BatchNorm1d raises on a one-sample batch in train mode


def test_trainer_stops_at_once_on_nan_loss() -> None:
    x, y = _problem()
    x[5] = float("nan")
    model, opt, sched = _setup()
    calls: list[EpochMetrics] = []
    with pytest.raises(TrainingDiverged, match="training loss became nan at epoch 1"):
        train(model, opt, sched, x, y, x[:50], y[:50], epochs=10, batch_size=16, seed=0, on_epoch=calls.append)
    assert calls == []


def test_trainer_on_epoch_exception_stops_training() -> None:
    x, y = _problem()
    model, opt, sched = _setup()

    class Stop(Exception):
        pass

    def stop_at_two(m: EpochMetrics) -> None:
        if m.epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        train(model, opt, sched, x, y, x, y, epochs=10, batch_size=64, seed=0, on_epoch=stop_at_two)


def test_trainer_evaluate_matches_manual_accuracy() -> None:
    x, y = _problem()
    model, _, _ = _setup()
    model.eval()
    with torch.no_grad():
        expected = (model(x).argmax(1) == y).float().mean().item()
    _, accuracy = evaluate(model, x, y, batch_size=7)
    assert accuracy == pytest.approx(expected)
    assert not model.training


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh runs it)")
def test_trainer_cuda_bf16_learns_on_device() -> None:
    x, y = _problem()
    x, y = x.cuda(), y.cuda()
    torch.manual_seed(0)
    model = build_model(ModelConfig("tuner.model.mlp", {"hidden_units": 32, "num_layers": 2}), (6,), 3).cuda()
    device = torch.device("cuda")
    opt, sched = build_optimizer(
        model.parameters(), OptimizerConfig("adam", 0.01, 0.9, 0.9, 0.999, 1e-8, 0.0, 0.0), device=device
    )
    history = train(model, opt, sched, x[:300], y[:300], x[300:], y[300:], epochs=5, batch_size=32, seed=0, bf16=True)
    assert history[-1].val_accuracy > 0.9
    assert next(model.parameters()).device.type == "cuda"


@pytest.mark.parametrize("name", ["mps", "cuda", "cuda:7"])
def test_trainer_unavailable_device_is_one_message_naming_it(name: str) -> None:
    available = torch.backends.mps.is_available() if name == "mps" else torch.cuda.device_count() > 7
    if available:
        pytest.skip(f"{name} exists on this machine")
    with pytest.raises(ValueError, match=rf"trainer\.device='{name}' but "):
        resolve_device(name)
