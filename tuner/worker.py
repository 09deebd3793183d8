"""A worker process (started by ``tuner.workers.ProcessTrainer``): trains the jobs the tuner process sends down
its socket, one trial (``tuner.trainer.fit``, each epoch relayed back) or a pack's epoch (``tuner.packhost``) at a
time, until the tuner process sends ``None`` or goes away. It imports torch and tuner's training modules only.
"""

from __future__ import annotations

import atexit
import gc
import multiprocessing.connection
import os
import pickle
import select
import socket
import threading
from typing import Any

import torch

from tuner.data import SplitsCache
from tuner.faults import error_reason
from tuner.packhost import PackHost
from tuner.trainer import EpochMetrics, fit

__all__ = ["Pipe", "forked_main", "worker_main"]

# The forkserver (which imports this module) and a fresh worker end by Python's shutdown, which would search torch's
# millions of objects for reference cycles; they hold nothing that needs it. A forked worker ends by os._exit.
atexit.register(gc.freeze)


class _Stopped(Exception):
    """In a worker: the tuner process answered an epoch with "stop" (the trial was pruned, or failed there)."""


class Pipe(multiprocessing.connection.Connection):
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

    def __init__(self, conn: Pipe) -> None:
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


def _serve(conn: Pipe, threads: int | None) -> None:
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
        if message[0] == "probe":
            return "probed", host.probe(*message[1:])
        results = host.epoch(*message[1:])
    except Exception as err:
        return "error", _portable(err)
    return "packed", {
        key: (setup, _portable(r) if isinstance(r, BaseException) else r) for key, (setup, r) in results.items()
    }


def worker_main(argv: list[str]) -> None:
    """A fresh interpreter's entry point (see ``tuner.workers._launch``): ``<socket fd> <torch threads or "">``."""
    fd, threads = argv
    _exit_when_orphaned(int(fd))
    _serve(Pipe(int(fd)), int(threads) if threads else None)


def forked_main(sock: socket.socket, threads: int | None, env: dict[str, str]) -> None:
    """A worker forked from the forkserver (see ``tuner.workers._launch``), in the tuner process's environment."""
    os.setpgid(0, 0)  # as a fresh worker's process_group=0: Ctrl-C reaches the tuner process only
    os.environ.clear()
    os.environ.update(env)  # the forkserver's is the tuner process's when the forkserver started
    _exit_when_orphaned(sock.fileno())
    _serve(Pipe(sock.detach()), threads)


def _exit_when_orphaned(fd: int) -> None:
    """A killed tuner process closes its end of the socket, but a training worker would notice only at its next
    epoch: a thread waits for that hang-up (not for data, which the worker reads) and exits at once."""
    poller = select.poll()
    poller.register(fd, getattr(select, "POLLRDHUP", 0) | select.POLLHUP)

    def wait() -> None:
        poller.poll()
        os._exit(1)

    threading.Thread(target=wait, daemon=True).start()
