"""Training in worker processes: ``ProcessTrainer`` sends each job down a pipe to a child that runs
``tuner.trainer.fit`` and relays every epoch back, so the objective reports and prunes as in-process and only the
tuner process touches Optuna's storage.

Processes, not threads: a small model is per-op bound and threads share the GIL (docs/benchmarks.md, "Workers:
processes against threads"); Optuna's ``n_jobs`` runs threads and reseeds the sampler each trial, so ``study.seed``
would no longer fix the draws; its multi-process recipe (processes on one RDB storage) and torch.multiprocessing
run no epoch loop that reports back. The weights come back only when the trial is the study's new best.
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tuner.data import Splits, SplitsCache
from tuner.faults import Interrupted, error_reason
from tuner.model import build_model
from tuner.packhost import PackHost, PackJoin
from tuner.trainer import EpochMetrics, Setup, TrainJob, fit

__all__ = ["ProcessTrainer", "WorkerDied", "resolve_workers", "worker_main"]

# ``trainer.workers=auto`` on CPU: one worker per core this process may use, at most this many (each
# holds its own copy of the data set: about 190 MB for Fashion-MNIST's 60k images).
MAX_AUTO_WORKERS = 8
# Seconds between a worker's checks that the tuner process that started it is still there.
_ORPHAN_CHECK_S = 1.0
# Seconds a worker is given to exit after the tuner process asks it to, before it is terminated.
_EXIT_TIMEOUT_S = 5.0


class WorkerDied(RuntimeError):
    """The worker process training a trial exited (killed, out of host memory, a crash in native code)."""


class _Stopped(Exception):
    """In a worker: the tuner process answered an epoch with "stop" (the trial was pruned, or failed there)."""


def resolve_workers(workers: int | None, threads: int | None, device: torch.device, *, processes: int = 1) -> int:
    """``trainer.workers``: a number as given; ``auto`` (None) is one per usable core on CPU, shared by the
    ``processes`` tuner processes on this machine; else 1, and 1 when ``trainer.threads`` is unset (each model
    would use every core)."""
    if workers is not None:
        return workers
    if device.type != "cpu" or threads is None:
        return 1
    return max(1, min(len(os.sched_getaffinity(0)) // (threads * max(processes, 1)), MAX_AUTO_WORKERS))


class _Pipe(multiprocessing.connection.Connection):
    """One end of a worker's socket, with the standard pickler: multiprocessing's sends a tensor as a
    shared-memory handle that only a multiprocessing-started child can claim; here weights travel by value."""

    def send(self, obj: Any) -> None:
        self.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))

    def recv(self) -> Any:
        return pickle.loads(self.recv_bytes())


def _portable(err: BaseException) -> BaseException:
    """``err`` if it survives the pipe, else a RuntimeError that keeps its type and message."""
    try:
        pickle.loads(pickle.dumps(err))
    except Exception:
        return RuntimeError(error_reason(err))
    return err


class _Relay:
    """A worker's ``on_epoch``: sends each epoch and trains the next one while the tuner process stores it and
    decides on pruning; the answer is read at the next epoch's end, so the storage's latency never stalls
    training, and a pruned trial costs at most one epoch more (never reported)."""

    def __init__(self, conn: _Pipe) -> None:
        self.conn = conn
        self.pending = False

    def __call__(self, metrics: EpochMetrics) -> None:
        self.settle()
        self.conn.send(("epoch", metrics))
        self.pending = True

    def settle(self) -> None:
        """Read the answer to the last epoch sent; ``_Stopped`` if it was "stop"."""
        if self.pending:
            self.pending = False
            if not self.conn.recv():
                raise _Stopped


def _serve(conn: _Pipe, threads: int | None) -> None:
    """A worker process: train the jobs the tuner process sends until it sends ``None`` or goes away."""
    if threads is not None:
        torch.set_num_threads(threads)
    cache = SplitsCache()
    host = PackHost(cache.get)
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the tuner process is gone
            return
        if job is None:
            return
        if isinstance(job, tuple):  # a pack's epoch, or a member's weights (tuner.packing)
            conn.send(_serve_pack(host, job))
            continue
        relay = _Relay(conn)
        try:
            splits = cache.get(job.cfg.data, torch.device(job.device))
            model = fit(job, splits, on_setup=lambda setup: conn.send(("setup", setup)), on_epoch=relay)
            relay.settle()
        except _Stopped:
            conn.send(("stopped", None))
            continue
        except Exception as err:
            try:
                relay.settle()  # the answer to the last epoch is read before the next job is
            except _Stopped:
                conn.send(("stopped", None))
                continue
            conn.send(("error", _portable(err)))
            continue
        conn.send(("done", None))
        if conn.recv():
            conn.send(("model", {k: v.detach().cpu() for k, v in model.state_dict().items()}))
        del model


def _serve_pack(host: PackHost, message: tuple[Any, ...]) -> tuple[str, Any]:
    try:
        if message[0] == "state":
            return "state", host.state(message[1])
        results = host.epoch(*message[1:])
    except Exception as err:
        return "error", _portable(err)
    return "packed", {
        key: (setup, _portable(r) if isinstance(r, BaseException) else r) for key, (setup, r) in results.items()
    }


def _launch(threads: int | None) -> tuple[subprocess.Popen[bytes], _Pipe]:
    """Start a worker: a fresh interpreter, not ``multiprocessing``'s spawn, which re-runs the parent's
    ``__main__`` (all of Hydra) and fails inside joblib's loky workers. Its own process group keeps Ctrl-C
    to the tuner process, which ends it."""
    ours, theirs = socket.socketpair()
    package_root = str(Path(__file__).resolve().parent.parent)  # tuner importable from a plain checkout too
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-c", "import sys, tuner.workers as w; w.worker_main(sys.argv[1:])"]
    with theirs:
        process = subprocess.Popen(
            [*command, str(theirs.fileno()), "" if threads is None else str(threads)],
            pass_fds=(theirs.fileno(),),
            env=env,
            process_group=0,
        )
    return process, _Pipe(ours.detach())


def worker_main(argv: list[str]) -> None:
    """The worker process's entry point (see ``_launch``): ``<socket fd> <torch threads or "">``."""
    fd, threads = argv
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    _serve(_Pipe(int(fd)), int(threads) if threads else None)


def _exit_when_orphaned(parent: int) -> None:
    """A killed tuner process closes the pipe, but a worker notices only at its next epoch: check each second."""
    while os.getppid() == parent:
        time.sleep(_ORPHAN_CHECK_S)
    os._exit(1)


class ProcessTrainer:
    """Trains each job in a worker process of its own (started on first use, and again after it died), for
    one thread of the tuner process at a time."""

    def __init__(self, threads: int | None) -> None:
        self.threads = threads
        self._process: subprocess.Popen[bytes] | None = None
        self._conn: _Pipe | None = None
        self._interrupted: str | None = None
        self._lock = threading.Lock()  # interrupt (main thread) against start (a worker thread)
        self._stashed: list[Any] = []  # pack results that came before the weights asked for after them

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> _Pipe:
        """Start the worker process unless it runs: early, before the first job, since torch's import is slow."""
        with self._lock:
            if self._interrupted is not None:
                raise Interrupted(self._interrupted)
            if self._process is None or self._process.poll() is not None:
                if self._conn is not None:
                    self._conn.close()  # a dead worker's end of the pipe
                self._process, self._conn = _launch(self.threads)
            assert self._conn is not None
            return self._conn

    def _recv(self, conn: _Pipe) -> tuple[str, Any]:
        try:
            return conn.recv()
        except (EOFError, OSError):
            raise self._died() from None

    def _send(self, conn: _Pipe, message: object) -> None:
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

    def _stop(self, conn: _Pipe) -> None:
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
