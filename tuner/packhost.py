"""A device slot's packs (tuner.pack), by id: the worker process's side of ``trainer.pack``, or the tuner
process's on CUDA. Nothing here imports Optuna: tuner.packing asks, reports and tells."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from tuner import packauto
from tuner.pack import Member, Pack
from tuner.trainer import EpochMetrics, Setup, TrainJob, release_memory

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
    members that join and leave, then trains every pack one epoch. A member leaves by itself when it diverges
    or has trained its epochs; the weights of the latter are kept until the tuner process lets it go."""

    def __init__(self, splits: Callable[[DataConfig, torch.device], Splits]) -> None:
        self.splits = splits
        self.packs: dict[int, Pack] = {}
        self.where: dict[int, int] = {}  # member key -> pack id
        self.done: dict[int, dict[str, torch.Tensor]] = {}  # a finished member's weights, by key

    def epoch(self, joins: Sequence[PackJoin], leaves: Sequence[int]) -> dict[int, tuple[Setup | None, Result]]:
        """Each member's setup (on joining) and its epoch's metrics, or the error that ended it."""
        self._leave([key for key in leaves if self.done.pop(key, None) is None and key in self.where])
        out: dict[int, tuple[Setup | None, Result]] = {}
        setups: dict[int, Setup] = {}
        for pack_id in dict.fromkeys(j.pack for j in joins):
            group = [j for j in joins if j.pack == pack_id]
            device = torch.device(group[0].job.device)
            try:
                splits = self.splits(group[0].job.cfg.data, device)
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
        ended: list[int] = []
        failed = False
        for pack in self.packs.values():
            cfg = pack.members[0].cfg
            splits = self.splits(cfg.data, pack.device)
            try:
                results: list[Result] = list(
                    pack.train_epoch(
                        splits.x_train,
                        splits.y_train,
                        splits.x_val,
                        splits.y_val,
                        batch_size=cfg.data.batch_size,
                        eval_batch_size=cfg.trainer.eval_batch_size,
                        bf16=cfg.trainer.bf16,
                    )
                )
            except Exception as err:  # out of memory, say: this pack's members fail and leave, no other pack's
                # Without its traceback, whose frames hold the pack's tensors, so that they are freed.
                results, failed = [err.with_traceback(None)] * len(pack.members), True
            for member, result in zip(pack.members, results, strict=True):
                out[member.key] = (setups.get(member.key), result)
                if isinstance(result, BaseException):
                    ended.append(member.key)
                elif result.epoch >= member.cfg.trainer.epochs:
                    self.done[member.key] = self.state(member.key)
                    ended.append(member.key)
        self._leave(ended)
        if failed:
            release_memory()
        return out

    def _leave(self, keys: Sequence[int]) -> None:
        for pack_id in dict.fromkeys(self.where[key] for key in keys):
            pack = self.packs[pack_id]
            pack.change(leave=[m for m in pack.members if m.key in keys])
            if not pack.members:
                del self.packs[pack_id]
        for key in keys:
            del self.where[key]

    def probe(self, job: TrainJob, most: int | None) -> dict[int, float]:
        """Member-steps per second of ``job``'s shape by pack size, on this slot's device (tuner.packauto)."""
        device = torch.device(job.device)
        return packauto.probe(job.cfg, self.splits(job.cfg.data, device), device, most)

    def state(self, key: int) -> dict[str, torch.Tensor]:
        """A member's weights, on the CPU, for ``nn.Module.load_state_dict``."""
        if key in self.done:
            return self.done[key]
        pack = self.packs[self.where[key]]
        member = next(m for m in pack.members if m.key == key)
        return {n: t.cpu() for n, t in pack.state_dict(member).items()}
