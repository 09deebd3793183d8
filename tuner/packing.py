"""The tuner process's side of packs (``trainer.pack``): a worker slot trains up to ``pack`` trials at once.

The slot asks each trial, reports each epoch, prunes and tells each trial as tuner.loop does for one; the trials
it trains together (tuner.pack) share a shape: the first member's sampled model and data values are fixed for
the pack's later members (Optuna's PartialFixedSampler); everything else each member samples on its own.
A member that leaves (pruned, failed, done) frees its place for a new trial of the same shape at the next epoch.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from tuner._compat import trial_id
from tuner.budget import Budget, BudgetReached
from tuner.faults import beating, check_interrupt, error_reason, interrupts_allowed
from tuner.objective import Objective
from tuner.packauto import PROBE_SHARE, SHAPE_TRIALS, AutoPack
from tuner.packhost import PackJoin
from tuner.space import REVERSE_PREFIX
from tuner.trainer import EpochMetrics, TrainJob

__all__ = ["SHAPE_PREFIXES", "run_packs"]

# Set once for the process: warnings.catch_warnings() in the worker threads would race on the filters.
warnings.filterwarnings("ignore", "PartialFixedSampler is experimental", optuna.exceptions.ExperimentalWarning)

log = logging.getLogger("tuner")

# The parameters that decide a pack's stacked shape: members of one pack share their values.
SHAPE_PREFIXES = ("model.", "data.")
WARM_CHECK_S = 0.5  # until the pruner's startup trials are complete, how often other workers' are counted


@dataclass
class _Member:
    trial: optuna.Trial
    job: TrainJob
    pack: int
    history: list[EpochMetrics] = field(default_factory=list)


@dataclass
class _OpenPack:
    """The pack that new trials join until it has taken ``limit`` of them (``SHAPE_TRIALS`` times its size)."""

    id: int  # its first member's trial number: unique in the study
    fixed: dict[str, Any]
    shape: tuple[Any, ...]
    size: int  # members at once
    limit: int
    taken: int = 0


def _shape(job: TrainJob) -> tuple[Any, ...]:
    cfg = job.cfg
    return cfg.model, cfg.data, cfg.trainer.eval_batch_size, cfg.trainer.bf16, job.device


class _Slot:
    """One slot's members, and the epochs in flight: the next epoch is sent as soon as the last one's results
    come, before they are stored, so the worker trains while this process writes (a pruned member trains one
    epoch more, unreported; a new trial joins one epoch later)."""

    def __init__(
        self,
        study: optuna.Study,
        objective: Objective,
        size: int | AutoPack,
        warmup: int,
        told: list[Callable[..., None]],
    ) -> None:
        self.study, self.objective, self.size, self.told = study, objective, size, told
        self.started, self.probing = time.monotonic(), 0.0  # seconds this slot's worker spent in probes
        self.warmup, self.warm = warmup, warmup == 0
        self.warm_check = 0.0  # when to count the study's complete trials again (at once after one here)
        self.live: dict[int, _Member] = {}  # asked and not yet told
        self.hosted: set[int] = set()  # in the slot's packs and still training
        self.open: _OpenPack | None = None
        self.joins: list[PackJoin] = []
        self.leaves: list[int] = []
        self.in_flight = False
        self.start_size: dict[int, int] = {}

    def fill(self, budget: Budget, storage: BaseStorage, interval: int | None) -> None:
        """Ask trials until the slot is full or the budget is used; ``BudgetReached`` once it is. Until the
        study has ``warmup`` complete trials (the pruner's startup), one at a time, as without packs: trials
        that start together finish together, and none of them could be pruned."""
        if not self.warm and time.monotonic() >= self.warm_check:  # reading every trial each epoch costs
            self.warm_check = time.monotonic() + WARM_CHECK_S
            self.warm = len(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= self.warmup
        if len(self.live) >= self._room():
            return
        with budget.asking(self.study) as ask:
            while len(self.live) < self._room():
                open_ = self.open if self.open is not None and self.open.taken < self.open.limit else None
                trial, job = self._ask(ask, open_.fixed if open_ else {})
                if job is None:
                    continue
                if interval is not None and hasattr(storage, "record_heartbeat"):
                    storage.record_heartbeat(trial_id(trial))
                if open_ is None or _shape(job) != open_.shape:
                    try:
                        size = self._size(job)
                    except Exception as err:  # its worker died: receive() fails what it held; this one trains alone
                        log.warning("trainer.pack=auto: no probe of trial %d's shape (%s)", trial.number, err)
                        size = 1
                    except BaseException as err:  # Ctrl-C or SIGTERM: this trial ends with the slot's others
                        self.live[trial.number] = _Member(trial, job, trial.number)
                        self.fail_all(err)
                        raise
                    fixed = {  # trial.params reads the trial back: only for a pack that more trials join
                        k: v
                        for k, v in (trial.params if size > 1 else {}).items()
                        if k.removeprefix(REVERSE_PREFIX).startswith(SHAPE_PREFIXES)
                    }
                    # A pack of one takes one trial: the next draws its own shape, as without packs.
                    limit = size * SHAPE_TRIALS if size > 1 else 1
                    open_ = self.open = _OpenPack(trial.number, fixed, _shape(job), size, limit)
                open_.taken += 1
                self.live[trial.number] = _Member(trial, job, open_.id)
                self.joins.append(PackJoin(open_.id, trial.number, job))

    def _room(self) -> int:
        """Members the slot trains at once now: the open pack's size (the last one's until the next is drawn)."""
        if not self.warm:
            return 1
        if isinstance(self.size, int):
            return self.size
        return self.open.size if self.open is not None else 1

    def _size(self, job: TrainJob) -> int:
        """The size of a pack of ``job``'s shape: ``trainer.pack``, or auto's choice (tuner.packauto)."""
        auto = self.size
        if isinstance(auto, int):
            return auto
        known = 1 if auto.most == 1 else auto.known(job)  # a study too small to pack has nothing to probe
        if known is not None:
            return known
        if self.probing > PROBE_SHARE * (time.monotonic() - self.started):
            return auto.nearest(job)
        start = time.monotonic()
        rates = self.objective.trainer.pack_probe(job, auto.most, self.objective.cache)
        self.probing += time.monotonic() - start
        return auto.record(job, rates)

    def _ask(self, ask: Callable[[], optuna.Trial], fixed: dict[str, Any]) -> tuple[optuna.Trial, TrainJob | None]:
        """Ask a trial and sample its config, ``fixed`` taken as given (relative samplers too sample at the ask);
        a config that fails its checks fails the trial (``None``)."""
        sampler = self.study.sampler
        if fixed:
            self.study.sampler = optuna.samplers.PartialFixedSampler(fixed, sampler)
        try:
            trial = ask()
            try:
                return trial, self.objective.begin(trial)
            except Exception as err:
                self._tell(trial, [], TrialState.FAIL, err)
                return trial, None
        finally:
            self.study.sampler = sampler

    def send(self) -> None:
        """Start the next epoch of every hosted member, with the trials that join and leave."""
        for join in self.joins:
            self.hosted.add(join.key)
            self.start_size[join.key] = sum(self.live[k].pack == join.pack for k in self.hosted)
        try:
            self.objective.trainer.pack_send(self.joins, self.leaves, self.objective.cache)
        except BaseException as err:
            self.fail_all(err)
            return
        self.joins, self.leaves, self.in_flight = [], [], True

    def receive(self) -> None:
        """Take the epoch in flight, send the next one, then report each member; a failed slot (its worker died,
        an interrupt) fails every member."""
        try:
            with interrupts_allowed():
                results = self.objective.trainer.pack_recv()
        except BaseException as err:
            self.fail_all(err)
            return
        self.in_flight = False
        for number, (_, result) in results.items():
            if isinstance(result, BaseException) or result.epoch >= self.live_epochs(number):
                self.hosted.discard(number)  # it left its pack by itself
        if self.hosted or self.joins:
            self.send()
        for number, (setup, result) in results.items():
            member = self.live.get(number)
            if member is None:
                continue  # pruned an epoch ago: this epoch was trained ahead, and is not reported
            try:
                if setup is not None:
                    self.objective.setup(member.trial, member.job, setup)
                    member.trial.set_user_attr("pack_id", member.pack)
                    member.trial.set_user_attr("pack_size", self.start_size.pop(number))
                self._after_epoch(member, result)
            except optuna.exceptions.UpdateFinishedTrialError:  # another worker gave it up for dead
                self._drop(member)

    def _drop(self, member: _Member) -> None:
        number = member.trial.number
        self.live.pop(number, None)
        if number in self.hosted:
            self.hosted.discard(number)
            self.leaves.append(number)
        log.warning(
            "trial %d was given up for dead by another worker (no heartbeat for study.grace_period) and queued "
            "again; this worker goes on. A longer study.grace_period avoids this on a loaded machine.",
            number,
        )

    def live_epochs(self, number: int) -> int:
        member = self.live.get(number)
        return member.job.cfg.trainer.epochs if member is not None else 0

    def fail_all(self, err: BaseException) -> None:
        for member in list(self.live.values()):
            try:
                self._tell(member.trial, member.history, TrialState.FAIL, err)
            except optuna.exceptions.UpdateFinishedTrialError:
                self._drop(member)
        self.hosted.clear()
        self.joins, self.leaves, self.in_flight, self.open = [], [], False, None  # a new worker has no pack
        if isinstance(err, KeyboardInterrupt):
            raise err

    def _after_epoch(self, member: _Member, result: EpochMetrics | BaseException) -> None:
        trial = member.trial
        if isinstance(result, BaseException):  # it left its pack already
            self._tell(trial, member.history, TrialState.FAIL, result)
            return
        member.history.append(result)
        try:
            self.objective.report(trial, result, member.history)
        except optuna.TrialPruned:
            self.hosted.discard(trial.number)
            self.leaves.append(trial.number)
            self._tell(trial, member.history, TrialState.PRUNED)
            return
        if result.epoch < member.job.cfg.trainer.epochs:
            return
        self.objective.keep(trial, member.job, member.history, lambda: self._model(member))
        self.leaves.append(trial.number)
        self._tell(trial, member.history, TrialState.COMPLETE)

    def _model(self, member: _Member) -> Any:
        from tuner.model import build_model

        state = self.objective.trainer.pack_state(member.trial.number)
        splits = self.objective.splits(member.job.cfg.data, torch.device(member.job.device))
        model = build_model(member.job.cfg.model, splits.input_shape, splits.num_classes)
        model.load_state_dict(state)
        return model.to(member.job.device)

    def _tell(
        self, trial: optuna.Trial, history: list[EpochMetrics], state: TrialState, err: BaseException | None = None
    ) -> None:
        self.live.pop(trial.number, None)
        if err is not None:
            trial.set_user_attr("fail_reason", _fail_reason(err))
        self.objective.end(trial, history)
        value = history[-1].val_accuracy if state == TrialState.COMPLETE else None
        self.warm_check = 0.0 if value is not None else self.warm_check
        told = self.study.tell(trial, value, state=None if value is not None else state, skip_if_finished=True)
        for callback in self.told:
            callback(self.study, told)


def _fail_reason(err: BaseException) -> str:
    if isinstance(err, KeyboardInterrupt):
        return f"interrupted by {getattr(err, 'signal_name', 'SIGINT')}"
    return error_reason(err)


def run_packs(
    study: optuna.Study,
    objective: Objective,
    *,
    size: int | AutoPack,
    warmup: int = 0,
    storage: BaseStorage,
    budget: Budget,
    heartbeat_interval: int | None,
    told: list[Callable[..., None]],
    before_ask: Callable[[], None],
    should_stop: Callable[[], bool],
) -> None:
    """One slot's trials in packs of ``size`` (auto: each shape's own; one at a time until ``warmup`` trials are
    complete), until the budget is used or ``should_stop()`` (the time is up, a failure streak); members still
    training then finish."""
    slot = _Slot(study, objective, size, warmup, told)
    asking = True
    # list(): one step under the GIL, so the heartbeat thread never sees the dict change while it reads it.
    with beating(storage, lambda: [trial_id(m.trial) for m in list(slot.live.values())], heartbeat_interval):
        while True:
            if asking and not should_stop():
                before_ask()
                try:
                    slot.fill(budget, storage, heartbeat_interval)
                except BudgetReached:
                    asking = False
            if not slot.in_flight and (slot.joins or slot.hosted):
                slot.send()
            if not slot.in_flight:
                return
            objective.last_trials = list(slot.live)
            slot.receive()
            try:
                check_interrupt()  # a safe point: every member's epoch is reported
            except KeyboardInterrupt as err:  # one that came while this process stored: the members end here
                slot.fail_all(err)
