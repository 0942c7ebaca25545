"""``packvit encode --processes``: images read and preprocessed in worker processes instead of threads.

Loading threads share the interpreter lock with the thread that gathers batches and launches the forward, and
every tensor operation either side runs is a point where the other may take it: with a GPU, the forward then
waits on the host. Worker processes have interpreters of their own. Each starts once, from a fork server (so
no thread, lock or CUDA state of this process is copied into it; a fresh interpreter where there is none),
and receives the model's config and the resize settings once; per image it gets the encoded bytes (or a
file's path) and returns ``(patches, grid_thw)`` in ``--dtype``.

The patches come back through slots of shared memory made once for the run, one per image in flight: the
run picks a free slot when it hands an image out, the worker writes the patches into it and returns only
their shape, and the pool's result thread copies them out (into pinned memory on a CUDA run, for an
asynchronous copy to the GPU) and frees the slot. Sharing each image's tensor on its own
(``torch.multiprocessing``) made a new shared-memory segment and passed its descriptor per image: about 20 ms
for a 1024 x 1024 image's 6 MB on a 2-core machine, more than decoding it. The slots take ``2 * workers + 1``
times 8 MiB of ``/dev/shm``; patches larger than a slot, or every image where ``/dev/shm`` has less than twice
the slots' size free, still travel that way.

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
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing
from PIL import Image
from torch import Tensor

from .loading import DTYPES
from .preprocess import LOADING_NICENESS

__all__ = ["LoadingFailed", "LoadingProcesses"]

# What a worker needs of packvit encode's settings (the rest stays in this process).
SETTINGS = ("dtype", "resample", "max_decoded_pixels")

# A 1024 x 1024 image of one frame is 6 MiB of patches in bfloat16 or float16 (3 * 1024 * 1024 values, the
# patch size does not matter): the GPU's default. float32 patches, or two-frame patches (Qwen-VL), of an image
# that size take 12 MiB and travel as tensors of their own.
SLOT_BYTES = 8 << 20
SHM = Path("/dev/shm")  # where the slots live on Linux (PyTorch's shared memory)
OWNER_POLL_S = 1.0  # how often a worker checks that its run is still there
START_TIMEOUT_S = 300.0  # the most the workers may take to start (import PyTorch, this package)

_settings: tuple[Any, argparse.Namespace, dict[str, Any]] | None = None  # this worker's (config, args, rule)
_slots: Tensor | None = None  # the run's shared slots, [slots, SLOT_BYTES] bytes, or None


class LoadingFailed(RuntimeError):
    """The worker processes cannot go on: one ended (killed, out of memory, a crash in a decoder), they could
    not start, or a result could not be received here. Every image still queued fails so."""


ENDED = "a loading process ended unexpectedly (killed, out of memory, or a crash in a decoder)"


def _start(
    config: Any,
    args: argparse.Namespace,
    rule: dict[str, Any],
    slots: Tensor | None,
    owner: tuple[int, str | None],
    everyone: Any,
) -> None:
    global _settings, _slots
    from . import shards  # noqa: F401  (imported now, before the run's clock starts)

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent to handle
    threading.Thread(target=_end_with, args=(owner,), daemon=True).start()
    torch.set_num_threads(1)  # the processes are the parallelism (see LoadingThreads)
    if hasattr(os, "nice"):  # not on Windows
        os.nice(LOADING_NICENESS)  # the thread feeding the GPU gets a core first (see LoadingThreads)
    # --max-decoded-pixels is checked before PIL's own, looser bomb check, whose warning is noise here
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    _settings, _slots = (config, args, rule), slots
    everyone.wait(timeout=START_TIMEOUT_S)  # every worker started before the first image is taken


def _identity(pid: int) -> tuple[int, str | None]:
    """A process's pid and, where ``/proc`` tells it, its start time: a pid reused later has another. A process
    that has ended but is not yet reaped (a zombie, state ``Z``) has no identity: it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return pid, None
    return pid, None if fields[0] in ("Z", "X") or len(fields) < 20 else fields[19]


def _end_with(owner: tuple[int, str | None]) -> None:
    """End this worker once the process that started it is gone. A worker waiting for images would otherwise
    outlive a run killed with SIGKILL: its siblings keep the queue's pipe open, and its parent is the fork
    server, not the run."""
    pid, started = owner
    while True:
        time.sleep(OWNER_POLL_S)
        try:
            os.kill(pid, 0)
        except (ProcessLookupError, PermissionError):  # gone (or its pid now another user's)
            os._exit(1)
        if started is not None and _identity(pid)[1] != started:  # ended (a zombie), or its pid reused
            os._exit(1)


def _ready() -> None:
    """Nothing: run once per worker, after every worker's start."""


def _load(source: bytes | str, slot: int | None) -> tuple[Tensor | tuple[int, ...], list[list[int]]]:
    """One image's patches and grid. With a ``slot`` the patches are written there and only their shape is
    returned; without one, or when they do not fit, the patches themselves."""
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
    # pass back.
    patches = patches.to(DTYPES[args.dtype]).contiguous()
    nbytes = patches.numel() * patches.element_size()
    if slot is None or _slots is None or nbytes > _slots.shape[1]:
        return patches, grid.tolist()
    _slots[slot, :nbytes].copy_(patches.view(-1).view(torch.uint8))
    return tuple(patches.shape), grid.tolist()


def _shared_slots(count: int) -> Tensor | None:
    """``count`` slots of shared memory, or ``None`` where they cannot be had: ``/dev/shm`` lacks room for them
    with as much again to spare (writing past its end would kill the process with SIGBUS), or the allocation
    fails."""
    if SHM.is_dir():
        stat = os.statvfs(SHM)
        if stat.f_bavail * stat.f_frsize < 2 * count * SLOT_BYTES:
            return None
    try:
        return torch.empty(count, SLOT_BYTES, dtype=torch.uint8).share_memory_()
    except RuntimeError:
        return None


class LoadingProcesses:
    """``(patches, grid_thw)`` of items, made in ``workers`` processes; for :func:`packvit_native.cli.prefetch`.

    Args:
        source: an item's encoded bytes, or the path of its file as a string; ``None`` for an item without an
            image (its future gives ``None``).
        workers: processes.
        config, args, rule: the model's config, ``packvit encode``'s settings and the resize rule.
        pin: pin the patches (for a CUDA device).

    A future raises the ``ValueError`` the image's preprocessing raised, or :class:`LoadingFailed` (then every
    image still queued fails so, and the caller should stop). Construction raises :class:`LoadingFailed` if
    the workers cannot start.
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
        if "forkserver" in torch.multiprocessing.get_all_start_methods():
            context = torch.multiprocessing.get_context("forkserver")
            context.set_forkserver_preload([__name__])
        else:  # Windows: each worker starts a fresh interpreter
            context = torch.multiprocessing.get_context("spawn")
        settings = argparse.Namespace(**{name: getattr(args, name) for name in SETTINGS})
        self.source, self.pin, self.window = source, pin, 2 * workers
        # One slot per image in flight: prefetch keeps `window` loads queued besides the one it has handed out,
        # and a slot is free again once its image is copied out, before its future resolves.
        self.slots = _shared_slots(self.window + 1)
        self.free = deque(range(self.window + 1) if self.slots is not None else ())
        self.dtype = DTYPES[args.dtype]
        owner = _identity(os.getpid())
        self.pool = ProcessPoolExecutor(
            workers, mp_context=context, initializer=_start,
            initargs=(config, settings, rule, self.slots, owner, context.Barrier(workers)),
        )  # fmt: skip
        # Started now, so that the run's clock leaves their start-up out, and a failure to start shows here.
        try:
            for started in [self.pool.submit(_ready) for _ in range(workers)]:
                started.result()
        except BrokenProcessPool as e:
            self.pool.shutdown(wait=True, cancel_futures=True)
            raise LoadingFailed(
                f"the loading processes could not start ({_cause(e)}); a script that calls packvit encode "
                "with --processes needs the if __name__ == '__main__': guard"
            ) from None

    def submit(self, item: Any) -> Future:
        out: Future = Future()
        try:
            source = self.source(item)
        except Exception as e:  # reading the item failed: its error, as a thread's load reports it
            out.set_exception(e)
            return out
        if source is None:
            out.set_result(None)
            return out
        # No free slot cannot happen through prefetch (see __init__); the patches would travel on their own.
        slot = self.free.popleft() if self.free else None
        try:
            done = self.pool.submit(_load, source, slot)
        except BrokenProcessPool as e:
            self._release(slot)
            out.set_exception(LoadingFailed(f"{ENDED}: {_cause(e)}"))
            return out
        except BaseException:  # e.g. submitted after close(): the slot is not lost
            self._release(slot)
            raise
        done.add_done_callback(lambda f: self._finish(f, out, slot))
        return out

    def _release(self, slot: int | None) -> None:
        if slot is not None:
            self.free.append(slot)

    def _received(self, patches: Tensor | tuple[int, ...], slot: int | None) -> Tensor:
        """The patches as this process's own tensor (pinned with ``pin``), copied out of their slot."""
        if isinstance(patches, Tensor):
            return patches.pin_memory() if self.pin else patches
        assert self.slots is not None and slot is not None, "a shape came back for an image without a slot"
        out = self._allocate(patches)
        out.view(-1).view(torch.uint8).copy_(self.slots[slot, : out.numel() * out.element_size()])
        return out

    def _allocate(self, shape: tuple[int, ...]) -> Tensor:
        return torch.empty(shape, dtype=self.dtype, pin_memory=self.pin)

    def _finish(self, done: Future, out: Future, slot: int | None) -> None:
        """Resolve ``out`` from ``done``, whatever happens: this runs on the pool's thread, where an exception
        would only be logged and ``out`` would never resolve. The slot is free again before ``out`` resolves,
        so the image handed out next, as soon as this one is taken, finds it."""
        if done.cancelled():
            self._release(slot)
            out.cancel()
            return
        try:
            error = done.exception()
            if isinstance(error, BrokenProcessPool):
                error = LoadingFailed(f"{ENDED}: {_cause(error)}")
            if error is None:
                patches, grid = done.result()
                result = (self._received(patches, slot), torch.tensor(grid, dtype=torch.int64))
        except Exception as e:  # e.g. pinning failed
            error = LoadingFailed(f"a loaded image could not be received: {type(e).__name__}: {e}")
        finally:
            self._release(slot)
        if error is not None:
            out.set_exception(error)
        else:
            out.set_result(result)

    def close(self) -> None:
        """Stop: queued images are dropped (after Ctrl-C nothing more is decoded); waits for the processes,
        then lets the shared slots go (every result callback has run by then)."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.slots = None
        self.free.clear()


def _cause(error: BaseException) -> str:
    """What ended the pool, without BrokenProcessPool's own sentence."""
    cause = error.__cause__
    return f"{type(cause).__name__}: {cause}" if cause is not None else "no reason given"
