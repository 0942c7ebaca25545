"""``packvit encode --processes``: images read and preprocessed in worker processes instead of threads.

Loading threads share the interpreter lock with the thread that gathers batches and launches the forward, and
every tensor operation either side runs is a point where the other may take it: with a GPU, the forward then
waits on the host. Worker processes have interpreters of their own. Each starts once, from a fork server (so
no thread, lock or CUDA state of this process is copied into it), and receives the model's config and the
resize settings once; per image it gets the encoded bytes (or a file's path) and returns ``(patches,
grid_thw)`` in ``--dtype`` through shared memory (``torch.multiprocessing``). Here the patches are pinned for
an asynchronous copy to the GPU, on the pool's own result thread, not on the main thread.

The patches are those the threads make: the same function (:func:`packvit_native.shards.preprocess_bytes`, or
:func:`packvit_native.preprocess` for a file) runs in the worker.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing
from PIL import Image
from torch import Tensor

__all__ = ["LoadingProcesses", "WorkerDied"]

# What a worker needs of packvit encode's settings (the rest stays in this process).
SETTINGS = ("dtype", "resample", "max_decoded_pixels")

OWNER_POLL_S = 1.0  # how often a worker checks that its run is still there

_settings: tuple[Any, argparse.Namespace, dict[str, Any]] | None = None  # this worker's (config, args, rule)


class WorkerDied(RuntimeError):
    """A worker process ended while images were queued (killed, out of memory, a crash in a decoder)."""


def _start(config: Any, args: argparse.Namespace, rule: dict[str, Any], owner: int) -> None:
    global _settings
    from . import shards  # noqa: F401  (imported now, while the run waits for its workers)

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent to handle
    threading.Thread(target=_end_with, args=(owner,), daemon=True).start()
    torch.set_num_threads(1)  # the processes are the parallelism (see LoadingThreads)
    # --max-decoded-pixels is checked before PIL's own, looser bomb check, whose warning is noise here
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    _settings = (config, args, rule)


def _end_with(owner: int) -> None:
    """End this worker once the process that started it is gone. A worker waiting for images would otherwise
    outlive a run killed with SIGKILL: its siblings keep the queue's pipe open, and its parent is the fork
    server, not the run."""
    while True:
        time.sleep(OWNER_POLL_S)
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            os._exit(1)
        except PermissionError:  # the pid now belongs to another user's process: ours is gone
            os._exit(1)


def _ready() -> None:
    time.sleep(0.05)  # long enough that every worker takes one of these


def _load(source: bytes | str) -> tuple[Tensor, list[list[int]]]:
    from .loading import DTYPES
    from .preprocess import preprocess
    from .shards import preprocess_bytes

    assert _settings is not None, "started without _start"
    config, args, rule = _settings
    if isinstance(source, str):
        patches, grid = preprocess(
            Path(source), config, resample=args.resample, max_decoded_pixels=args.max_decoded_pixels, **rule
        )
    else:
        patches, grid = preprocess_bytes(source, config, args, rule)
    # The forward's first cast (half the bytes to share in bfloat16); the grid as integers, not a second tensor to
    # pass through shared memory.
    return patches.to(DTYPES[args.dtype]), grid.tolist()


class LoadingProcesses:
    """``(patches, grid_thw)`` of items, made in ``workers`` processes; for :func:`packvit_native.cli.prefetch`.

    Args:
        source: an item's encoded bytes, or the path of its file as a string; ``None`` for an item without an
            image (its future gives ``None``).
        workers: processes.
        config, args, rule: the model's config, ``packvit encode``'s settings and the resize rule.
        pin: pin the patches (for a CUDA device).

    A future raises the ``ValueError`` the image's preprocessing raised, or :class:`WorkerDied` if a worker
    ended; then every image still queued fails so, and the caller should stop.
    """

    def __init__(
        self,
        source: Callable[[Any], bytes | str | None],
        workers: int,
        config: Any,
        args: argparse.Namespace,
        rule: dict[str, Any],
        pin: bool,
    ) -> None:
        context = torch.multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        settings = argparse.Namespace(**{name: getattr(args, name) for name in SETTINGS})
        self.source, self.pin, self.window = source, pin, 2 * workers
        self.pool = ProcessPoolExecutor(
            workers, mp_context=context, initializer=_start, initargs=(config, settings, rule, os.getpid())
        )
        # Started now, so that a run's clock leaves their start-up out, and a failure to start shows here.
        for started in [self.pool.submit(_ready) for _ in range(workers)]:
            started.result()

    def submit(self, item: Any) -> Future:
        out: Future = Future()
        try:
            source = self.source(item)
        except BaseException as e:  # reading the item failed: its error, as a thread's load reports it
            out.set_exception(e)
            return out
        if source is None:
            out.set_result(None)
            return out
        try:
            done = self.pool.submit(_load, source)
        except BrokenProcessPool as e:
            out.set_exception(WorkerDied(f"a loading process ended: {e}"))
            return out
        done.add_done_callback(lambda f: self._finish(f, out))
        return out

    def _finish(self, done: Future, out: Future) -> None:
        if done.cancelled():
            out.cancel()
            return
        error = done.exception()
        if isinstance(error, BrokenProcessPool):
            out.set_exception(WorkerDied(f"a loading process ended: {error}"))
        elif error is not None:
            out.set_exception(error)
        else:
            patches, grid = done.result()
            out.set_result(
                (patches.pin_memory() if self.pin else patches, torch.tensor(grid, dtype=torch.int64))
            )

    def close(self) -> None:
        """Stop: queued images are dropped (after Ctrl-C nothing more is decoded); waits for the processes."""
        self.pool.shutdown(wait=True, cancel_futures=True)
