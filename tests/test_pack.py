"""tuner.pack: K trials trained as one stacked model train as each would alone."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import compose_raw
from tuner.config import TrialConfig, parse_trial
from tuner.data import Splits, load_splits
from tuner.pack import Member, Pack
from tuner.trainer import EpochMetrics, TrainJob, fit

# Per-member settings: each optimizer with its own lr, momentum or betas, weight decay and lr decay.
OPTIMIZERS = [
    ["optimizer.name=sgd", "optimizer.lr=0.05", "optimizer.momentum=0.9", "optimizer.lr_decay=0.3"],
    ["optimizer.name=sgd", "optimizer.lr=0.2", "optimizer.momentum=0.0", "optimizer.weight_decay=0.01"],
    ["optimizer.name=adam", "optimizer.lr=0.003", "optimizer.beta1=0.8", "optimizer.beta2=0.99", "optimizer.eps=1e-6"],
    ["optimizer.name=adam", "optimizer.lr=0.01", "optimizer.weight_decay=0.001", "optimizer.lr_decay=1.0"],
    ["optimizer.name=rmsprop", "optimizer.lr=0.001", "optimizer.momentum=0.5", "optimizer.beta2=0.9"],
    ["optimizer.name=rmsprop", "optimizer.lr=0.003", "optimizer.eps=1e-5"],
]
MODELS = {
    "mlp": ["model=mlp", "model.hidden_units=32", "model.num_layers=2"],
    "cnn": ["model=cnn", "model.hidden_units=16", "model.num_layers=2", "model.channels=4"],
}


def _cfg(*overrides: str) -> TrialConfig:
    return parse_trial(compose_raw("data=mnist1d", "data.num_samples=600", "trainer.device=cpu", *overrides))


@pytest.fixture(scope="module")
def splits() -> Splits:
    return load_splits(_cfg().data)


def _alone(cfg: TrialConfig, seed: int, splits: Splits) -> tuple[list[EpochMetrics], torch.nn.Module]:
    history: list[EpochMetrics] = []
    model = fit(TrainJob(cfg, seed, "cpu"), splits, on_setup=lambda s: None, on_epoch=history.append)
    return history, model


def _packed(
    cfgs: list[TrialConfig], seeds: list[int], splits: Splits, epochs: int
) -> tuple[Pack, list[Member], list[list[EpochMetrics]]]:
    """The pack after ``epochs``, its members, and each member's per-epoch metrics."""
    pack = Pack(splits.input_shape, splits.num_classes, torch.device("cpu"))
    members = [Member(i, cfg, seed) for i, (cfg, seed) in enumerate(zip(cfgs, seeds, strict=True))]
    pack.change(join=members)
    histories: list[list[EpochMetrics]] = [[] for _ in members]
    for _ in range(epochs):
        results = pack.train_epoch(
            splits.x_train, splits.y_train, splits.x_val, splits.y_val, batch_size=cfgs[0].data.batch_size
        )
        for history, result in zip(histories, results, strict=True):
            assert isinstance(result, EpochMetrics)
            history.append(result)
    return pack, members, histories


def _same(a: list[EpochMetrics], b: list[EpochMetrics]) -> None:
    assert [m.epoch for m in a] == [m.epoch for m in b]
    for x, y in zip(a, b, strict=True):
        assert y.train_loss == pytest.approx(x.train_loss, rel=1e-4, abs=1e-5)
        assert y.val_loss == pytest.approx(x.val_loss, rel=1e-4, abs=1e-5)
        assert y.val_accuracy == pytest.approx(x.val_accuracy, abs=2 / 600)  # one sample's flip at most
        assert y.lr == pytest.approx(x.lr, rel=1e-12)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_pack_members_with_mixed_optimizers_train_as_each_would_alone(model: str, splits: Splits) -> None:
    epochs = 3
    cfgs = [_cfg(*MODELS[model], *opt, f"trainer.epochs={epochs}") for opt in OPTIMIZERS]
    seeds = [11 + 7 * i for i in range(len(cfgs))]
    pack, members, histories = _packed(cfgs, seeds, splits, epochs)
    for cfg, seed, member, packed_history in zip(cfgs, seeds, members, histories, strict=True):
        history, alone = _alone(cfg, seed, splits)
        _same(history, packed_history)
        packed = pack.model(member)
        alone.eval(), packed.eval()
        with torch.no_grad():
            agree = (alone(splits.x_val).argmax(1) == packed(splits.x_val).argmax(1)).float().mean().item()
        assert agree >= 0.995
        for name, value in alone.state_dict().items():  # weights, running averages, BatchNorm's batch count
            assert torch.allclose(packed.state_dict()[name].float(), value.float(), rtol=1e-3, atol=1e-4), name


def test_pack_of_one_trains_exactly_as_alone_and_keeps_its_member_on_course_as_others_join_and_leave(
    splits: Splits,
) -> None:
    cfgs = [_cfg(*MODELS["mlp"], *opt, "trainer.epochs=6") for opt in OPTIMIZERS[:3]]
    pack = Pack(splits.input_shape, splits.num_classes, torch.device("cpu"))
    members = [Member(i, cfg, 5 + i) for i, cfg in enumerate(cfgs)]
    histories: list[list[EpochMetrics]] = [[] for _ in members]

    def epochs(n: int) -> None:
        for _ in range(n):
            results = pack.train_epoch(splits.x_train, splits.y_train, splits.x_val, splits.y_val, batch_size=128)
            for member, result in zip(pack.members, results, strict=True):
                assert isinstance(result, EpochMetrics)
                histories[member.key].append(result)

    pack.change(join=members[:1])
    epochs(2)
    alone, model = _alone(cfgs[0], 5, splits)
    strip = [(m.epoch, m.train_loss, m.val_loss, m.val_accuracy, m.lr) for m in alone[:2]]
    assert [(m.epoch, m.train_loss, m.val_loss, m.val_accuracy, m.lr) for m in histories[0]] == strip  # bit for bit
    pack.change(join=members[1:])  # stacked from here: the first member's weights and optimizer state go along
    epochs(2)
    pack.change(leave=members[1:])  # alone again
    epochs(2)
    _same(alone, histories[0])
    _same(_alone(cfgs[1], 6, splits)[0][:2], histories[1])
    for name, value in model.state_dict().items():
        assert torch.allclose(pack.state_dict(members[0])[name].float(), value.float(), rtol=1e-3, atol=1e-4), name
