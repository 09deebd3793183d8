"""Training in worker processes: ``ProcessTrainer`` sends each job down a pipe to a child (``tuner.worker``) that
runs ``tuner.trainer.fit`` and relays every epoch back, so the objective reports and prunes as in-process and only
the tuner process touches Optuna's storage.

Processes, not threads: a small model is per-op bound and threads share the GIL (docs/benchmarks.md, "Workers:
processes against threads"); Optuna's ``n_jobs`` runs threads and reseeds the sampler each trial, so ``study.seed``
would no longer fix the draws; its multi-process recipe (processes on one RDB storage) and torch.multiprocessing
run no epoch loop that reports back. The weights come back only when the trial is the study's new best.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.forkserver
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tuner.data import Splits, SplitsCache
from tuner.faults import Interrupted
from tuner.model import build_model
from tuner.packhost import PackJoin
from tuner.trainer import EpochMetrics, Setup, TrainJob
from tuner.worker import Pipe, forked_main

__all__ = ["WORKER_IMPORTS", "ProcessTrainer", "WorkerDied", "resolve_workers", "warm_up"]

# ``trainer.workers=auto`` on CPU: one worker per core this process may use, at most this many (each
# holds its own copy of the data set: about 190 MB for Fashion-MNIST's 60k images).
MAX_AUTO_WORKERS = 8
# Seconds a worker is given to exit after the tuner process asks it to, before it is terminated.
_EXIT_TIMEOUT_S = 5.0
# CPU workers fork from multiprocessing's forkserver, which imports what a worker needs once per tuner process:
# torch, torch._dynamo (every torch.optim optimizer imports it), scikit-learn's splitter and tuner.worker. A fresh
# interpreter spends ~3.5 s of CPU on them per worker. Listed in the forkserver's import order.
WORKER_IMPORTS = ("torch", "torch._dynamo", "sklearn.model_selection", "tuner.worker")
_FORKSERVER = multiprocessing.get_context("forkserver")
_FORKSERVER.set_forkserver_preload(list(WORKER_IMPORTS))


class WorkerDied(RuntimeError):
    """The worker process training a trial exited (killed, out of host memory, a crash in native code)."""


def resolve_workers(workers: int | None, threads: int | None, device: torch.device, *, processes: int = 1) -> int:
    """``trainer.workers``: a number as given; ``auto`` (None) is one per usable core on CPU, shared by the
    ``processes`` tuner processes on this machine; else 1, and 1 when ``trainer.threads`` is unset (each model
    would use every core)."""
    if workers is not None:
        return workers
    if device.type != "cpu" or threads is None:
        return 1
    return max(1, min(len(os.sched_getaffinity(0)) // (threads * max(processes, 1)), MAX_AUTO_WORKERS))


def warm_up() -> None:
    """Start the forkserver now, so that its imports run beside this process's set-up (data, storage) and the
    first worker forks at once."""
    multiprocessing.forkserver.ensure_running()


class _Forked:
    """A worker forked from the forkserver, with the part of ``subprocess.Popen`` that ``ProcessTrainer`` uses."""

    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        self.process = process

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout)
        return self.process.exitcode

    def terminate(self) -> None:
        self.process.terminate()


Process = subprocess.Popen[bytes] | _Forked


def _launch(threads: int | None, *, fork: bool) -> tuple[Process, Pipe]:
    """Start a worker: forked from the forkserver (CPU), or a fresh interpreter (CUDA: the forkserver's children
    must not share a CUDA driver state). Not ``multiprocessing``'s spawn, which re-runs the parent's ``__main__``
    (all of Hydra). Either way in a process group of its own, which keeps Ctrl-C to the tuner process, which
    ends it."""
    ours, theirs = socket.socketpair()
    if fork:
        forked = _FORKSERVER.Process(target=forked_main, args=(theirs, threads, dict(os.environ)), daemon=True)
        forked.start()
        theirs.close()
        return _Forked(forked), Pipe(ours.detach())
    package_root = str(Path(__file__).resolve().parent.parent)  # tuner importable from a plain checkout too
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-c", "import sys, tuner.worker as w; w.worker_main(sys.argv[1:])"]
    with theirs:
        process = subprocess.Popen(
            [*command, str(theirs.fileno()), "" if threads is None else str(threads)],
            pass_fds=(theirs.fileno(),),
            env=env,
            process_group=0,
        )
    return process, Pipe(ours.detach())


class ProcessTrainer:
    """Trains each job in a worker process of its own (started on first use, and again after it died), for
    one thread of the tuner process at a time."""

    def __init__(self, threads: int | None, *, fork: bool = True) -> None:
        self.threads, self.fork = threads, fork  # fork: from the forkserver (CPU jobs only, see _launch)
        self._process: Process | None = None
        self._conn: Pipe | None = None
        self._interrupted: str | None = None
        self._lock = threading.Lock()  # interrupt (main thread) against start (a worker thread)
        self._stashed: list[Any] = []  # pack results that came before the weights asked for after them

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> Pipe:
        """Start the worker process unless it runs: early, before the first job, since torch's import is slow."""
        with self._lock:
            if self._interrupted is not None:
                raise Interrupted(self._interrupted)
            if self._process is not None and self._process.poll() is None:
                assert self._conn is not None
                return self._conn
            if self._conn is not None:
                self._conn.close()  # a dead worker's end of the pipe
            self._process = self._conn = None
        # Outside the lock: the forkserver's first fork waits for its imports, and an interrupt must not wait.
        process, conn = _launch(self.threads, fork=self.fork)
        with self._lock:
            self._process, self._conn = process, conn
            if self._interrupted is not None:
                process.terminate()
                raise Interrupted(self._interrupted)
        return conn

    def _recv(self, conn: Pipe) -> tuple[str, Any]:
        try:
            return conn.recv()
        except (EOFError, OSError):
            raise self._died() from None

    def _send(self, conn: Pipe, message: object) -> None:
        try:
            conn.send(message)
        except OSError:  # BrokenPipeError, ConnectionResetError
            raise self._died() from None

    def _died(self) -> BaseException:
        process = self._process
        if self._interrupted is not None:
            return Interrupted(self._interrupted)
        code = None
        if process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = process.wait(_EXIT_TIMEOUT_S)
        self._process = None
        return WorkerDied(f"the worker process training this trial exited with code {code}")

    def fit(
        self,
        job: TrainJob,
        splits: Splits,
        *,
        on_setup: Callable[[Setup], None],
        on_epoch: Callable[[EpochMetrics], None],
        keep_model: Callable[[], bool],
    ) -> nn.Module | None:
        conn = self.start()
        self._send(conn, job)
        while True:
            kind, payload = self._recv(conn)
            if kind == "setup":
                on_setup(payload)
            elif kind == "epoch":
                try:
                    on_epoch(payload)  # raises optuna.TrialPruned to stop
                except BaseException:
                    self._stop(conn)
                    raise
                self._send(conn, True)
            elif kind == "error":
                raise payload
            elif kind == "done":
                keep = keep_model()
                self._send(conn, keep)
                if not keep:
                    return None
                _, state = self._recv(conn)
                model = build_model(job.cfg.model, splits.input_shape, splits.num_classes)
                model.load_state_dict(state)
                return model.to(job.device)
            else:
                raise RuntimeError(f"unexpected message {kind!r} from the worker process")

    def pack_send(self, joins: Sequence[PackJoin], leaves: Sequence[int], cache: SplitsCache) -> None:
        """Start one epoch of this worker's packs (``tuner.packhost.PackHost.epoch``) on its own data; its results
        come from ``pack_recv``, so this process can store the last epoch's while the worker trains."""
        self._send(self.start(), ("pack", list(joins), list(leaves)))

    def pack_recv(self) -> dict[int, tuple[Setup | None, EpochMetrics | BaseException]]:
        return self._stashed.pop(0) if self._stashed else self._pack_answer("packed")

    def pack_state(self, key: int) -> dict[str, torch.Tensor]:
        """A finished member's weights (answered after the epoch in flight, if any)."""
        self._send(self.start(), ("state", key))
        return self._pack_answer("state")

    def pack_probe(self, job: TrainJob, most: int | None, cache: SplitsCache) -> dict[int, float]:
        """``job``'s shape timed by pack size in the worker (tuner.packauto.probe), after the epoch in flight."""
        self._send(self.start(), ("probe", job, most))
        return self._pack_answer("probed")

    def _pack_answer(self, answer: str) -> Any:
        while True:
            kind, payload = self._recv(self.start())
            if kind == "error":
                raise payload
            if kind == answer:
                return payload
            if kind != "packed":
                raise RuntimeError(f"unexpected message {kind!r} from the worker process")
            self._stashed.append(payload)  # an epoch's results, asked for after the weights

    def _stop(self, conn: Pipe) -> None:
        """Tell the worker to drop the trial, and wait until it has, so that it is ready for the next job."""
        try:
            conn.send(False)
            while conn.recv()[0] != "stopped":
                pass
        except (EOFError, OSError):
            pass  # it is gone; the next job starts a new one

    def interrupt(self, signal_name: str) -> None:
        """Ctrl-C or SIGTERM: end the worker now; the trial it trains raises ``Interrupted``."""
        with self._lock:
            self._interrupted = signal_name
            if self._process is not None and self._process.poll() is None:
                self._process.terminate()

    def close(self) -> None:
        with self._lock:
            process, conn = self._process, self._conn
            self._process = self._conn = None
        if process is None or conn is None:
            return
        with contextlib.suppress(OSError):
            conn.send(None)
        try:
            process.wait(_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.terminate()
            process.wait(_EXIT_TIMEOUT_S)
        conn.close()
