"""Training in worker processes: the same learning as in-process, pruning, crashes and interrupts."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch

from tests.conftest import compose_raw
from tuner.config import ConfigError, TrialConfig, parse_trial
from tuner.data import Splits, load_splits
from tuner.faults import Interrupted
from tuner.trainer import EpochMetrics, LocalTrainer, TrainingDiverged, TrainJob
from tuner.workers import MAX_AUTO_WORKERS, WORKER_IMPORTS, ProcessTrainer, WorkerDied, resolve_workers


def _cfg(*overrides: str) -> TrialConfig:
    return parse_trial(compose_raw("data=digits", "trainer.epochs=3", "trainer.device=cpu", *overrides))


@pytest.fixture(scope="module")
def splits() -> Splits:
    return load_splits(_cfg().data)


@pytest.fixture(scope="module")
def trainer() -> Iterator[ProcessTrainer]:
    trainer = ProcessTrainer(threads=1)
    yield trainer
    trainer.close()


def _fit(
    trainer: ProcessTrainer | LocalTrainer, cfg: TrialConfig, splits: Splits, *, keep: bool = True, on_epoch=None
) -> tuple[torch.nn.Module | None, list[EpochMetrics]]:
    history: list[EpochMetrics] = []

    def record(metrics: EpochMetrics) -> None:
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(metrics)

    model = trainer.fit(
        TrainJob(cfg, seed=7, device="cpu"), splits, on_setup=lambda s: None, on_epoch=record, keep_model=lambda: keep
    )
    return model, history


@pytest.mark.slow
def test_workers_a_worker_process_learns_what_this_process_learns(trainer: ProcessTrainer, splits: Splits) -> None:
    cfg = _cfg("optimizer.name=adam", "optimizer.lr=0.01")
    torch.set_num_threads(1)  # as the worker: the same summation order
    local_model, local = _fit(LocalTrainer(), cfg, splits)
    remote_model, remote = _fit(trainer, cfg, splits)
    assert [m.epoch for m in remote] == [1, 2, 3]
    for a, b in zip(local, remote, strict=True):
        assert b.val_accuracy == pytest.approx(a.val_accuracy, abs=1e-6)
        assert b.train_loss == pytest.approx(a.train_loss, rel=1e-5)
    assert remote[-1].val_accuracy > 0.8  # it learned
    assert local_model is not None and remote_model is not None
    local_model.eval()
    remote_model.eval()
    with torch.no_grad():  # the weights that came back predict as the in-process model does
        assert torch.equal(local_model(splits.x_val).argmax(1), remote_model(splits.x_val).argmax(1))


@pytest.mark.slow
def test_workers_no_weights_come_back_unless_wanted(trainer: ProcessTrainer, splits: Splits) -> None:
    model, history = _fit(trainer, _cfg("trainer.epochs=1"), splits, keep=False)
    assert model is None and len(history) == 1


@pytest.mark.slow
def test_workers_a_pruned_trial_stops_at_that_epoch_and_the_worker_takes_the_next(
    trainer: ProcessTrainer, splits: Splits
) -> None:
    def prune(metrics: EpochMetrics) -> None:
        raise optuna.TrialPruned(f"pruned at epoch {metrics.epoch}")

    trainer.start()  # started here if no earlier test of this process did
    pid = trainer.pid
    with pytest.raises(optuna.TrialPruned, match="pruned at epoch 1"):
        _fit(trainer, _cfg(), splits, on_epoch=prune)
    model, history = _fit(trainer, _cfg("trainer.epochs=2"), splits)
    assert len(history) == 2 and model is not None
    assert trainer.pid == pid  # the same worker, not a restarted one


@pytest.mark.slow
@pytest.mark.parametrize("epoch", [2, 3])
def test_workers_a_trial_pruned_later_or_at_its_last_epoch_leaves_the_worker_ready(
    trainer: ProcessTrainer, splits: Splits, epoch: int
) -> None:
    # The worker trains the next epoch before it reads the answer to the last one (tuner.worker's relay).
    def prune(metrics: EpochMetrics) -> None:
        if metrics.epoch == epoch:
            raise optuna.TrialPruned(f"pruned at epoch {metrics.epoch}")

    seen: list[int] = []
    with pytest.raises(optuna.TrialPruned, match=f"pruned at epoch {epoch}"):
        _fit(trainer, _cfg(), splits, on_epoch=lambda m: (seen.append(m.epoch), prune(m)))
    assert seen == list(range(1, epoch + 1))  # the epoch trained ahead is never reported
    model, history = _fit(trainer, _cfg("trainer.epochs=2"), splits)
    assert [m.epoch for m in history] == [1, 2] and model is not None


class FailsInEpoch2(torch.nn.Module):
    """A user's model whose forward breaks after ``calls`` training batches: an error after an answered epoch."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, calls: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(int(torch.tensor(input_shape).prod()), num_classes)
        self.calls, self.left = calls, calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.left -= 1
            if self.left < 0:
                raise RuntimeError(f"broken after {self.calls} batches")
        return self.linear(x.flatten(1))


@pytest.mark.slow
def test_workers_an_error_in_a_later_epoch_is_raised_and_the_worker_takes_the_next(
    trainer: ProcessTrainer, splits: Splits
) -> None:
    raw = compose_raw("data=digits", "trainer.epochs=3", "trainer.device=cpu", "data.batch_size=64")
    batches = -(-len(splits.y_train) // 64)
    raw["model"] = {"_target_": f"{__name__}.FailsInEpoch2", "calls": batches + 1}
    trainer.start()
    pid, seen = trainer.pid, []
    with pytest.raises(RuntimeError, match=f"broken after {batches + 1} batches"):
        _fit(trainer, parse_trial(raw), splits, on_epoch=lambda m: seen.append(m.epoch))
    assert seen == [1]
    model, history = _fit(trainer, _cfg("trainer.epochs=2"), splits)  # the answer to epoch 1 was not left unread
    assert [m.epoch for m in history] == [1, 2] and model is not None
    assert trainer.pid == pid


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads a process's CPU time from /proc")
def test_workers_a_slow_storage_does_not_stall_training(trainer: ProcessTrainer, splits: Splits) -> None:
    # While this process stores epoch 1 (here: holds it for 2 s), the worker trains epoch 2.
    trainer.start()
    assert trainer.pid is not None
    spent: list[float] = []

    def slow_store(metrics: EpochMetrics) -> None:
        if metrics.epoch == 1:
            assert trainer.pid is not None
            before = _cpu_seconds(trainer.pid)
            time.sleep(2.0)
            spent.append(_cpu_seconds(trainer.pid) - before)

    cfg = _cfg("trainer.epochs=2", "model.hidden_units=512", "model.num_layers=3", "data.batch_size=16")
    _, history = _fit(trainer, cfg, splits, on_epoch=slow_store)
    assert history[1].seconds > 0.1  # long enough for the CPU clock's ticks
    assert spent[0] >= 0.5 * history[1].seconds  # epoch 2 trained during the wait, not after it


@pytest.mark.slow
def test_workers_a_diverging_trial_raises_its_error_here(trainer: ProcessTrainer, splits: Splits) -> None:
    with pytest.raises(TrainingDiverged, match="training loss became"):
        _fit(trainer, _cfg("optimizer.lr=1e30", "optimizer.momentum=0.99"), splits)


@pytest.mark.slow
def test_workers_a_killed_worker_fails_its_trial_and_a_new_one_takes_the_next(splits: Splits) -> None:
    trainer = ProcessTrainer(threads=1)
    try:

        def kill(metrics: EpochMetrics) -> None:
            assert trainer.pid is not None
            os.kill(trainer.pid, signal.SIGKILL)

        with pytest.raises(WorkerDied, match="exited with code -9"):
            _fit(trainer, _cfg("trainer.epochs=50"), splits, on_epoch=kill)
        model, history = _fit(trainer, _cfg("trainer.epochs=1"), splits)
        assert model is not None and len(history) == 1
    finally:
        trainer.close()


@pytest.mark.slow
def test_workers_interrupt_ends_the_running_trial_with_the_signal(splits: Splits) -> None:
    trainer = ProcessTrainer(threads=1)
    started = threading.Event()
    try:
        timer = threading.Thread(target=lambda: started.wait(60) and trainer.interrupt("SIGTERM"))
        timer.start()
        with pytest.raises(Interrupted) as raised:
            _fit(trainer, _cfg("trainer.epochs=1000"), splits, on_epoch=lambda m: started.set())
        timer.join()
        assert raised.value.signal_name == "SIGTERM"
        with pytest.raises(Interrupted):  # no new worker is started once interrupted
            _fit(trainer, _cfg("trainer.epochs=1"), splits)
    finally:
        trainer.close()


def test_workers_auto_is_one_per_core_on_cpu_and_one_elsewhere() -> None:
    cores = len(os.sched_getaffinity(0))
    assert resolve_workers(None, 1, torch.device("cpu")) == min(cores, MAX_AUTO_WORKERS)
    assert resolve_workers(None, 2, torch.device("cpu")) == max(1, min(cores // 2, MAX_AUTO_WORKERS))
    assert resolve_workers(None, None, torch.device("cpu")) == 1  # torch's own threads use every core
    assert resolve_workers(None, 1, torch.device("cuda")) == 1
    assert resolve_workers(3, 1, torch.device("cpu")) == 3


@pytest.mark.parametrize("value", ["0", "-1", "many", "1.5", "true"])
def test_workers_bad_count_is_named(value: str) -> None:
    with pytest.raises(ConfigError, match=r"trainer\.workers must be auto or an integer >= 1, but got"):
        parse_trial(compose_raw(f"trainer.workers={value}"))


def _exited(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")  # a zombie has exited; nobody may reap an orphan here


def _env_loader() -> Any:  # data._target_ of the test below: what the worker's environment holds
    raise RuntimeError(f"TUNER_TEST_WORKER_ENV={os.environ.get('TUNER_TEST_WORKER_ENV')}")


@pytest.mark.slow
@pytest.mark.parametrize("fork", [True, False], ids=["forked", "fresh"])
def test_workers_a_worker_has_this_processs_environment_and_a_process_group_of_its_own(
    fork: bool, splits: Splits, monkeypatch: pytest.MonkeyPatch
) -> None:
    earlier = ProcessTrainer(1)
    earlier.start()  # the forkserver runs, started before the variable is set (as in a long test run)
    earlier.close()
    value = f"set-after-{time.monotonic_ns()}"
    monkeypatch.setenv("TUNER_TEST_WORKER_ENV", value)  # a worker reads HOME and the like as this process has them
    trainer = ProcessTrainer(1, fork=fork)
    try:
        cfg = _cfg()
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, target=f"{__name__}._env_loader"))
        with pytest.raises(Exception, match=f"TUNER_TEST_WORKER_ENV={value}"):
            _fit(trainer, cfg, splits)
        assert trainer.pid is not None
        assert os.getpgid(trainer.pid) == trainer.pid  # a terminal's Ctrl-C reaches the tuner process only
    finally:
        trainer.close()


@pytest.mark.slow
@pytest.mark.parametrize("fork", [True, False], ids=["forked", "fresh"])
def test_workers_a_worker_exits_soon_after_the_tuner_process_is_killed(fork: bool) -> None:
    script = (
        "import time\n"
        "from tuner.workers import ProcessTrainer\n"
        f"trainer = ProcessTrainer(1, fork={fork})\n"
        "trainer.start()\n"
        "print(trainer.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    tuner_process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert tuner_process.stdout is not None
    worker = int(tuner_process.stdout.readline())
    assert not _exited(worker)
    tuner_process.kill()  # SIGKILL: no cleanup runs in the tuner process
    tuner_process.wait()
    deadline = time.monotonic() + 10
    while not _exited(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _exited(worker)


@pytest.mark.slow
def test_workers_a_worker_process_loads_neither_optuna_nor_hydra() -> None:
    # What a worker imports (the forkserver's preload, or a fresh interpreter's tuner.worker): torch and tuner's
    # training modules, none of the study's stack or the config's, which would add a second or more to every start.
    heavy = ("optuna", "sqlalchemy", "hydra", "omegaconf")
    imports = "; ".join(f"import {name}" for name in WORKER_IMPORTS)
    script = f"import sys; {imports}; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads a process's CPU time from /proc")
def test_workers_a_pack_trains_while_this_process_stores_the_last_epoch(
    trainer: ProcessTrainer, splits: Splits
) -> None:
    from tuner.data import SplitsCache
    from tuner.packhost import PackJoin

    cfg = _cfg("trainer.epochs=2", "model.hidden_units=512", "model.num_layers=3", "data.batch_size=16")
    joins = [PackJoin(pack=0, key=k, job=TrainJob(cfg, seed=k, device="cpu")) for k in range(4)]
    trainer.start()
    assert trainer.pid is not None
    before = _cpu_seconds(trainer.pid)
    trainer.pack_send(joins, [], SplitsCache())  # returns at once: the epoch trains meanwhile
    time.sleep(2.0)
    spent = _cpu_seconds(trainer.pid) - before
    first = trainer.pack_recv()
    seconds = next(iter(first.values()))[1].seconds
    assert sorted(first) == [0, 1, 2, 3] and seconds > 0.1 and spent >= 0.5 * seconds
    trainer.pack_send([], [], SplitsCache())
    second = trainer.pack_recv()
    assert {m.epoch for _, m in second.values()} == {2}
    assert set(trainer.pack_state(2)) >= {"1.weight", "2.running_mean"}  # a finished member's weights
