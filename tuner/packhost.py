"""A device slot's packs (tuner.pack), by id: the worker process's side of ``trainer.pack``, or the tuner
process's on CUDA. Nothing here imports Optuna: tuner.packing asks, reports and tells."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tuner.pack import Member, Pack
from tuner.trainer import EpochMetrics, Setup, TrainJob

if TYPE_CHECKING:
    from tuner.data import Splits
    from tuner.schema import DataConfig

__all__ = ["PackHost", "PackJoin", "Result"]


@dataclass(frozen=True)
class PackJoin:
    """A trial that joins pack ``pack`` at the next epoch (``key``: its trial number)."""

    pack: int
    key: int
    job: TrainJob


Result = EpochMetrics | BaseException


class PackHost:
    """The packs of one device slot (a worker process, or the tuner process on CUDA): each epoch it applies the
    members that join and leave, then trains every pack one epoch. A member that diverges leaves at once."""

    def __init__(self, splits: Callable[[DataConfig, torch.device], Splits]) -> None:
        self.splits = splits
        self.packs: dict[int, Pack] = {}
        self.where: dict[int, int] = {}  # member key -> pack id

    def epoch(self, joins: Sequence[PackJoin], leaves: Sequence[int]) -> dict[int, tuple[Setup | None, Result]]:
        """Each member's setup (on joining) and its epoch's metrics, or the error that ended it."""
        for key in leaves:
            pack = self.packs[self.where.pop(key)]
            pack.change(leave=[m for m in pack.members if m.key == key])
        out: dict[int, tuple[Setup | None, Result]] = {}
        setups: dict[int, Setup] = {}
        for pack_id in dict.fromkeys(j.pack for j in joins):
            group = [j for j in joins if j.pack == pack_id]
            first = group[0].job
            device = torch.device(first.device)
            try:
                splits = self.splits(first.cfg.data, device)
                pack = self.packs.get(pack_id) or Pack(splits.input_shape, splits.num_classes, device)
                members = [Member(j.key, j.job.cfg, j.job.seed) for j in group]
                pack.change(join=members)
            except Exception as err:  # a model that cannot be built or stacked: these trials fail, no other
                out.update({j.key: (None, err) for j in group})
                continue
            self.packs[pack_id] = pack
            for member in members:
                self.where[member.key] = pack_id
                setups[member.key] = Setup(param_count=pack.param_count, device=str(device))
        for pack_id, pack in list(self.packs.items()):
            if not pack.members:
                del self.packs[pack_id]
                continue
            cfg = pack.members[0].cfg
            splits = self.splits(cfg.data, pack.device)
            results = pack.train_epoch(
                splits.x_train,
                splits.y_train,
                splits.x_val,
                splits.y_val,
                batch_size=cfg.data.batch_size,
                eval_batch_size=cfg.trainer.eval_batch_size,
                bf16=cfg.trainer.bf16,
            )
            diverged = [m for m, r in zip(pack.members, results, strict=True) if isinstance(r, BaseException)]
            for member, result in zip(pack.members, results, strict=True):
                out[member.key] = (setups.get(member.key), result)
            if diverged:
                pack.change(leave=diverged)
                for member in diverged:
                    del self.where[member.key]
        return out

    def state(self, key: int) -> dict[str, torch.Tensor]:
        """A member's weights, on the CPU, for ``nn.Module.load_state_dict``."""
        pack = self.packs[self.where[key]]
        member = next(m for m in pack.members if m.key == key)
        return {n: t.cpu() for n, t in pack.state_dict(member).items()}
