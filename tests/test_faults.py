"""Crashes, interruptions, failing trials and many workers: real processes, real signals, real storages."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import optuna
import optuna_dashboard
import pytest
import torch
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

import tuner.trainer
from tests.conftest import SECRETS, Secret, compose_raw, leaks_in_files, postgres_dump
from tuner.budget import budget_used
from tuner.config import ConfigError, parse_run
from tuner.faults import FailureStreakError
from tuner.pack import Pack
from tuner.storage import make_storage
from tuner.trainer import train
from tuner.tune import prepare, tune

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

# trainer.workers=1: the tests that replace tuner.trainer.train need the training in this process.
# The reruns train 1 epoch where the first run was stopped during 1000: a change the study must be told of.
RERUN_SHORTER = "study.accept_changes=true"
SMALL = ["data=digits", "trainer.epochs=1", "study.name=faults", "pruner=none", "trainer.threads=1"]
SMALL.append("trainer.workers=1")
SMALL.append("trainer.pack=1")  # the faults of one trial at a time, injected at tuner.trainer.train (packs: below)
# Short heartbeats so that a dead worker is noticed within seconds, not minutes.
FAST_HEARTBEAT = ["study.heartbeat_interval=1", "study.grace_period=2"]


def _tuner(tmp_path: Path, storage: str, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tuner",
        f"study.storage={storage}",
        f"study.output_dir={tmp_path / 'out'}",
        *SMALL,
        *overrides,
    ]


def _start(tmp_path: Path, storage: str, *overrides: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        _tuner(tmp_path, storage, *overrides),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _run(tmp_path: Path, storage: str, *overrides: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_tuner(tmp_path, storage, *overrides), cwd=tmp_path, capture_output=True, text=True)


def _trials(storage: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="faults", storage=storage).get_trials()


def _wait_for_an_epoch(storage: str, proc: subprocess.Popen[str], timeout: float = 120.0, trials: int = 1) -> None:
    """Poll the storage until ``trials`` running trials have reported an epoch."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            if sum(t.state == TrialState.RUNNING and bool(t.intermediate_values) for t in _trials(storage)) >= trials:
                return
        except KeyError:  # the study is not created yet
            pass
        time.sleep(0.2)
    raise AssertionError("the worker reported no epoch in time")


def _tune(tmp_path: Path, *overrides: str) -> tuple[Any, optuna.Study]:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    raw = compose_raw(f"study.storage={url}", f"study.output_dir={tmp_path / 'out'}", *SMALL, *overrides)
    try:
        return tune(*prepare(raw)), optuna.load_study(study_name="faults", storage=url)
    except FailureStreakError as err:
        return err, optuna.load_study(study_name="faults", storage=url)


def test_faults_out_of_memory_fails_that_trial_frees_its_memory_and_the_study_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Simulated at the trainer's boundary: CPUs raise no torch.OutOfMemoryError (scripts/gpu_check.sh runs a real one).
    models: list[weakref.ref[torch.nn.Module]] = []
    freed_before_next_trial: list[bool] = []

    def train_or_run_out_of_memory(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if models:
            freed_before_next_trial.append(models[0]() is None)
            return train(model, *args, **kwargs)
        models.append(weakref.ref(model))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(tuner.trainer, "train", train_or_run_out_of_memory)
    summary, study = _tune(tmp_path, "study.n_trials=3")
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    reason = study.trials[0].user_attrs["fail_reason"]
    assert reason == "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB"
    assert freed_before_next_trial == [True, True]
    assert summary.best_number in (1, 2)


def test_faults_out_of_memory_in_a_pack_fails_its_members_frees_the_pack_and_the_study_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    packs: list[weakref.ref[Pack]] = []
    freed_before_next_epoch: list[bool] = []
    real = Pack.train_epoch

    def train_or_run_out_of_memory(self: Pack, *args: Any, **kwargs: Any) -> Any:
        if packs:
            freed_before_next_epoch.append(packs[0]() is None)
            return real(self, *args, **kwargs)
        packs.append(weakref.ref(self))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(Pack, "train_epoch", train_or_run_out_of_memory)
    summary, study = _tune(tmp_path, "study.n_trials=4", "trainer.pack=2")
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    for trial in study.trials[:2]:
        assert trial.user_attrs["fail_reason"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB"
    assert freed_before_next_epoch == [True]  # the failed pack was dropped, not trained again
    assert summary.best_number in (2, 3)


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh runs it)")
def test_faults_cuda_out_of_memory_from_the_allocator_frees_the_trial_and_the_study_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real allocator failure: the trial's model is on the GPU when the trainer asks for more than the device has.
    others: list[int] = []  # bytes allocated on the GPU besides the trial's own model, as each trial starts

    def train_after_a_huge_allocation(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        others.append(torch.cuda.memory_allocated() - _param_bytes(model))
        if len(others) > 1:
            return train(model, *args, **kwargs)
        free, _ = torch.cuda.mem_get_info()
        torch.empty(free * 2, dtype=torch.uint8, device="cuda")  # raises torch.OutOfMemoryError
        raise AssertionError("the allocation should have failed")

    monkeypatch.setattr(tuner.trainer, "train", train_after_a_huge_allocation)
    _, study = _tune(tmp_path, "study.n_trials=2", "trainer.device=cuda")
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert study.trials[0].user_attrs["fail_reason"].startswith("OutOfMemoryError: CUDA out of memory")
    assert others[1] == others[0]  # the failed trial's model and optimizer left nothing behind on the GPU


def test_faults_the_same_error_in_every_recent_trial_stops_the_study(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise FileNotFoundError("/data/shard-7.bin")

    monkeypatch.setattr(tuner.trainer, "train", broken)
    error, study = _tune(tmp_path, "study.n_trials=20", "study.max_failure_streak=3")
    assert isinstance(error, FailureStreakError)
    assert "the last 3 trials all failed with FileNotFoundError" in str(error)
    assert "study.max_failure_streak=3" in str(error)
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 3  # 17 trials of budget not burnt
    assert {t.user_attrs["fail_reason"] for t in study.trials} == {"FileNotFoundError: /data/shard-7.bin"}


def test_faults_trials_failing_in_different_ways_do_not_stop_the_study(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = iter([ValueError("bad shape"), None, RuntimeError("cuDNN error"), ValueError("bad shape")])

    def sometimes_broken(*args: Any, **kwargs: Any) -> Any:
        err = next(calls)
        if err is not None:
            raise err
        return train(*args, **kwargs)

    monkeypatch.setattr(tuner.trainer, "train", sometimes_broken)
    summary, study = _tune(tmp_path, "study.n_trials=4", "study.max_failure_streak=2")
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE", "FAIL", "FAIL"]
    assert [t.user_attrs.get("fail_reason") for t in study.trials if t.state == TrialState.FAIL] == [
        "ValueError: bad shape",
        "RuntimeError: cuDNN error",
        "ValueError: bad shape",
    ]
    assert summary.best_number == 1


def test_faults_a_worker_whose_trial_was_given_up_for_dead_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    stalled: list[int] = []

    def stalled_then_train(*args: Any, **kwargs: Any) -> Any:
        other = optuna.load_study(study_name="faults", storage=make_storage(url, heartbeat_interval=None))
        running = other.get_trials(states=(TrialState.RUNNING,))
        if not stalled:
            stalled.append(running[0].number)
            # What another worker's fail_stale_trials does when this worker's heartbeat came too late.
            other._storage.set_trial_state_values(running[0]._trial_id, TrialState.FAIL)
            RetryHeartbeatStaleTrialCallback()(other, other._storage.get_trial(running[0]._trial_id))
        return train(*args, **kwargs)

    monkeypatch.setattr(tuner.trainer, "train", stalled_then_train)
    summary, study = _tune(tmp_path, "study.n_trials=2")
    assert [t.state.name for t in study.trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert RetryHeartbeatStaleTrialCallback.retry_history(study.trials[1]) == [0]
    assert summary.states == {"COMPLETE": 2, "FAIL": 1}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("study.heartbeat_interval=0", "study.heartbeat_interval must be an integer >= 1 or null, but got 0."),
        ("study.max_failure_streak=two", "study.max_failure_streak must be an integer >= 1 or null, but got 'two'."),
    ],
)
def test_faults_bad_settings_are_named(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_run(compose_raw(override))


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_faults_sigkilled_worker_trial_becomes_fail_and_is_retried_by_the_next_worker(
    tmp_path: Path, workers: int
) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    run = ["study.n_trials=2", f"trainer.workers={workers}", *FAST_HEARTBEAT]
    worker = _start(tmp_path, url, *run, "trainer.epochs=1000")
    _wait_for_an_epoch(url, worker, trials=workers)
    worker.send_signal(signal.SIGKILL)  # its worker processes find their pipe closed and exit
    worker.wait()
    killed = _trials(url)
    assert [t.state for t in killed] == [TrialState.RUNNING] * workers  # nobody told the storage
    time.sleep(2.5)  # the grace period passes without a heartbeat
    result = _run(tmp_path, url, *run, RERUN_SHORTER)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "trial(s) of a dead worker marked FAIL and queued again" in result.stdout + result.stderr
    trials = _trials(url)
    # Each dead trial is replaced by its retry: two trials trained to the end, as study.n_trials=2 asks.
    assert [t.state for t in trials] == [TrialState.FAIL] * workers + [TrialState.COMPLETE] * 2
    for dead in killed:
        (retry,) = [t for t in trials if RetryHeartbeatStaleTrialCallback.retry_history(t) == [dead.number]]
        assert retry.params == dead.params  # the same configuration is trained again
        assert retry.user_attrs["seed"] == dead.user_attrs["seed"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "code", "workers"), [(signal.SIGINT, 130, 1), (signal.SIGTERM, 143, 1), (signal.SIGINT, 130, 2)]
)
def test_faults_interrupt_ends_the_trial_with_a_reason_and_the_same_command_resumes(
    tmp_path: Path, sig: signal.Signals, code: int, workers: int
) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    run = ["study.n_trials=2", f"trainer.workers={workers}"]
    worker = _start(tmp_path, url, *run, "trainer.epochs=1000")
    _wait_for_an_epoch(url, worker, trials=workers)
    worker.send_signal(sig)
    out = worker.communicate(timeout=60)[0]
    assert worker.returncode == code, out
    assert f"interrupted by {sig.name}" in out and "Traceback" not in out
    trials = _trials(url)
    interrupted, queued = trials[:workers], trials[workers:]
    assert [t.state for t in interrupted] == [TrialState.FAIL] * workers
    assert {t.user_attrs["fail_reason"] for t in interrupted} == {f"interrupted by {sig.name}"}
    assert [t.state for t in queued] == [TrialState.WAITING] * workers
    assert sorted(str(t.params) for t in queued) == sorted(str(t.params) for t in interrupted)
    if sig == signal.SIGTERM:
        return  # the same path as SIGINT from here on
    result = _run(tmp_path, url, *run, RERUN_SHORTER)  # the same command, again
    assert result.returncode == 0, result.stdout + result.stderr
    trials = _trials(url)
    assert [t.state for t in trials] == [TrialState.FAIL] * workers + [TrialState.COMPLETE] * 2
    for retry in trials[workers : 2 * workers]:  # then the fresh trials that complete the budget
        (number,) = RetryHeartbeatStaleTrialCallback.retry_history(retry)
        assert "fail_reason" not in retry.user_attrs and retry.user_attrs["seed"] == trials[number].user_attrs["seed"]


@pytest.mark.slow
def test_faults_three_workers_share_one_postgresql_study(tmp_path: Path, postgres_url: str) -> None:
    n_trials = 9
    workers = [_start(tmp_path, postgres_url, f"study.n_trials={n_trials}") for _ in range(3)]
    outputs = [w.communicate(timeout=300)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0, 0], outputs
    trials = _trials(postgres_url)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) == len(trials)
    assert all(t.state.is_finished() for t in trials)  # none left RUNNING or WAITING
    assert len(trials) == n_trials  # not one more: the storage refuses a trial beyond the budget
    ran = sum(out.count(" COMPLETE ") + out.count(" PRUNED ") + out.count(" FAIL ") for out in outputs)
    assert ran == len(trials)  # every trial was run by one of the three workers and reported once


# A plain password, one percent-encoded in the URL, one as it is in a quoted override, one in Hydra's escapes.
# A real run per spelling costs ~18 s: the run tests take the two that need encoding or quoting most and the plain
# one; tests/test_secrets.py checks every spelling in every place without a server.
RUN_SECRETS = ["plain", "percent-encoded", "unicode-space-quoted"]


@pytest.mark.slow
@pytest.mark.parametrize("secret", [SECRETS[k] for k in RUN_SECRETS], ids=RUN_SECRETS)
def test_faults_storage_password_never_appears_in_any_output(tmp_path: Path, postgres_url: str, secret: Secret) -> None:
    result = _run(tmp_path, secret.override(postgres_url), "study.n_trials=2")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert leaks_in_files(tmp_path, secret) == {} and secret.leaks(out) == []
    assert "storage               postgresql://tuner:***@127.0.0.1:" in out  # the summary names the masked URL
    # Every row of every table tuner wrote: the config, the dashboard's note (study system attrs), the trials.
    assert secret.leaks(postgres_dump(postgres_url)) == []
    study = optuna.load_study(study_name="faults", storage=postgres_url)
    note = optuna_dashboard.get_note(study)
    assert secret.leaks(note) == [] and "postgresql://tuner:***@127.0.0.1:" in note
    assert study.user_attrs["config"]["study"]["storage"].startswith("postgresql://tuner:***@127.0.0.1:")
    # Error messages: a database that is not there, and a server that refuses the connection.
    missing = secret.override(postgres_url.replace("/tuner_", "/missing_"))
    refused = secret.override(make_url(postgres_url).set(port=1).render_as_string(hide_password=False))
    for storage, shown in ((missing, "/missing_"), (refused, "postgresql://tuner:***@127.0.0.1:1/tuner_")):
        bad = _run(tmp_path, storage, "study.n_trials=1")
        out = bad.stdout + bad.stderr
        assert bad.returncode == 2 and "cannot be opened" in out and shown in out, out
        assert secret.leaks(out) == [] and leaks_in_files(tmp_path, secret) == {}


def _signal_after_start(
    cmd: list[str], cwd: Path, sig: signal.Signals, delay: float, *, after: str = " to run ("
) -> tuple[int, str]:
    """Start ``cmd``, wait until it prints ``after`` (by default: it has opened its study), then ``delay`` seconds
    more, and send ``sig``."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    opened = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if after in line:
                opened.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    opened.wait(timeout=120)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(sig)
    code = proc.wait(timeout=120)
    reader.join(timeout=10)
    return code, "".join(lines)


@pytest.mark.slow
@pytest.mark.parametrize(("workers", "delays"), [(1, [0.0, 0.2, 0.6, 1.2, 2.0]), (2, [0.0, 0.5, 1.2])])
def test_faults_an_interrupt_at_any_moment_loses_no_trial(tmp_path: Path, workers: int, delays: list[float]) -> None:
    # Moments spread over a run: start-up after the study is opened, sampling, training, telling, saving the
    # best model, scoring it. Every run, whatever it was doing, must leave each stopped trial queued again and
    # uncounted. The runs continue one study, so each later one is stopped while it resumes the trials the last
    # one queued; the same command must then complete the study.
    url = f"sqlite:///{tmp_path / 'study.db'}"
    n_trials = 4
    overrides = [
        f"study.n_trials={n_trials}",
        "trainer.epochs=20",
        "study.max_retry=null",
        f"trainer.workers={workers}",
    ]
    cmd = _tuner(tmp_path, url, *overrides)
    interrupted = 0
    failed_before: set[int] = set()
    for i, delay in enumerate(delays):
        sig = signal.SIGTERM if i % 3 == 2 else signal.SIGINT
        code, out = _signal_after_start(cmd, tmp_path, sig, delay)
        assert code in (0, 130, 143), out
        assert "Traceback" not in out, out
        trials = _trials(url)
        assert not [t.number for t in trials if t.state == TrialState.RUNNING], out
        for failed in (t for t in trials if t.state == TrialState.FAIL):
            if failed.number not in failed_before:
                assert failed.user_attrs["fail_reason"] == f"interrupted by {sig.name}", out
            queued = [t for t in trials if failed.number in RetryHeartbeatStaleTrialCallback.retry_history(t)]
            assert queued, out
            failed_before.add(failed.number)
        finished = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
        assert budget_used(trials) == finished  # a stopped trial does not count
        interrupted += code != 0  # 0: the run ended before the signal
    assert interrupted >= len(delays) // 2  # most moments landed inside a run, not after it
    rerun = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    trials = _trials(url)
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == n_trials


@pytest.mark.slow
def test_faults_a_failing_trial_is_one_console_line_and_keeps_its_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom in the user's model")

    monkeypatch.setattr(tuner.trainer, "train", broken)
    summary, study = _tune(tmp_path, "study.n_trials=2", "study.max_failure_streak=null")

    console = "".join(capfd.readouterr())
    assert "Traceback" not in console and "failed with value None" not in console
    assert [t.user_attrs["fail_reason"] for t in study.trials] == ["RuntimeError: boom in the user's model"] * 2
    assert summary.states == {"FAIL": 2}


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "delay"), [(signal.SIGINT, 0.0), (signal.SIGINT, 0.15), (signal.SIGTERM, 0.4)])
def test_faults_a_signal_once_the_study_has_finished_leaves_it_complete(
    tmp_path: Path, sig: signal.Signals, delay: float
) -> None:
    # The summary is printed; Hydra and Python shut down: the run is complete whatever lands now.
    url = f"sqlite:///{tmp_path / 'study.db'}"
    cmd = _tuner(tmp_path, url, "study.n_trials=2")
    code, out = _signal_after_start(cmd, tmp_path, sig, delay, after="study finished")
    # 0 once tuner's code is done; 130/143 (one line) if it lands while tune() returns; never killed by it (-2/-15).
    assert code in (0, 130, 143) and "Traceback" not in out, out
    assert [t.state for t in _trials(url)] == [TrialState.COMPLETE] * 2


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_faults_an_interrupt_or_a_kill_ends_every_member_of_a_pack_and_the_same_command_resumes(
    tmp_path: Path, workers: int
) -> None:
    # SIGINT: every member is failed with the reason and queued again. SIGKILL: nobody tells the storage; the
    # members' heartbeats stop, and the next command fails and queues them. Either way it then ends at n_trials.
    members = 3 * workers
    run = [f"study.n_trials={members}", f"trainer.workers={workers}", "trainer.pack=3", *FAST_HEARTBEAT]
    for sig in (signal.SIGINT, signal.SIGKILL):
        url = f"sqlite:///{tmp_path / f'{sig.name}.db'}"
        proc = _start(tmp_path, url, *run, "trainer.epochs=1000")
        _wait_for_an_epoch(url, proc, trials=members)
        proc.send_signal(sig)
        out = proc.communicate(timeout=60)[0]
        stopped = _trials(url)
        if sig == signal.SIGINT:
            assert proc.returncode == 130 and "Traceback" not in out, out
            assert [t.state for t in stopped[:members]] == [TrialState.FAIL] * members
            assert {t.user_attrs["fail_reason"] for t in stopped[:members]} == {"interrupted by SIGINT"}
            assert [t.state for t in stopped[members:]] == [TrialState.WAITING] * members
        else:
            assert [t.state for t in stopped] == [TrialState.RUNNING] * members
            time.sleep(2.5)  # the grace period passes without a heartbeat
        assert len({t.user_attrs["pack_id"] for t in stopped[:members]}) == workers  # one pack per worker
        result = _run(tmp_path, url, *run, RERUN_SHORTER)
        assert result.returncode == 0, result.stdout + result.stderr
        trials = _trials(url)
        assert sum(t.state == TrialState.COMPLETE for t in trials) == members
        for dead in trials[:members]:
            assert dead.state == TrialState.FAIL
            (retry,) = [t for t in trials if RetryHeartbeatStaleTrialCallback.retry_history(t) == [dead.number]]
            assert retry.params == dead.params and retry.user_attrs["seed"] == dead.user_attrs["seed"]
