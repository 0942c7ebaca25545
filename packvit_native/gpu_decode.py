"""``packvit encode --decode gpu``: JPEGs decoded by nvJPEG in groups, then resized and normalised on the GPU.

Decoding is what usually starves the GPU of a large encoding run, so the common case moves to the GPU and
everything else keeps the CPU path (:func:`packvit_native.shards.preprocess_bytes`, i.e. ``pv.preprocess``):

1. ``--workers`` host threads read each image's bytes and parse its header with PIL, decoding no pixels:
   size, colour space, EXIF orientation. A file goes to the GPU only when nvJPEG decodes it as libjpeg (PIL's
   decoder) does: a whole 8-bit Huffman-coded JPEG (baseline, extended or progressive; ending with its EOI
   marker, zero padding aside) whose three components are YCbCr by libjpeg's rule, read as RGB by PIL, and
   within ``--max-decoded-pixels``. CMYK, grayscale, RGB-coded, arithmetic-coded or truncated JPEGs, MPO files,
   other formats and anything PIL cannot open are preprocessed on the CPU in that thread, so they come out
   (or fail) exactly as without ``--decode gpu``.
2. One decode thread takes the queued JPEGs in groups (up to :data:`GROUP_IMAGES` images or
   :data:`GROUP_PIXELS` pixels, whatever has queued; one call of ``torchvision.io.decode_jpeg`` on a list
   decodes a group far faster than one call per image) and, on a CUDA stream of its own so that its kernels
   overlap the model's forward: applies the EXIF orientation (flips and transposes, as
   ``ImageOps.exif_transpose``), resizes with ``F.interpolate(antialias=True)`` and the model's filter (PIL's
   filter semantics: antialiased when shrinking, Keys cubic with ``a = -0.5``) in PIL's two passes, each
   rounded to 8 bits as PIL rounds, then normalises through a per-channel table of the 256 levels computed
   with the CPU path's own arithmetic (and cast to ``--dtype`` as the forward would cast them). Given the same decoded pixels, the patches therefore equal the CPU
   path's wherever no resize is needed, and elsewhere nearly all do, the rest a level off (PIL resizes in
   fixed point; Pillow 13 sometimes takes the passes in the other order, which moves a few values by up to 3
   levels). nvJPEG's IDCT and chroma upsampling differ slightly from libjpeg's, the larger difference.
3. A group nvJPEG refuses is split in halves until the refused images are found; those take the CPU path, as
   does a whole group if anything unforeseen fails on the device (counted and reported in the run summary).

The main thread never waits for the GPU here: the decode thread waits for its own stream only, and the
patches it hands over are complete, and marked as used by the consumer's stream so their memory is not reused
before the forward that reads them has run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .loading import DTYPES
from .patchify import patchify
from .preprocess import LoadingThreads, target_size

__all__ = ["GROUP_IMAGES", "GROUP_PIXELS", "GpuDecoder", "gpu_route", "nvjpeg_decoder", "orient"]

# A group is what has queued when the decode thread is free, up to this many images or decoded pixels (the
# pixel cap bounds the group's GPU memory: 2**27 RGB pixels are 384 MiB).
GROUP_IMAGES = 64
GROUP_PIXELS = 2**27
# How long the decode thread waits for more JPEGs, from the first of a group, before decoding a group that is
# not full.
LINGER_S = 0.002
# JPEG frames nvJPEG decodes as libjpeg does: baseline, extended sequential and progressive, Huffman-coded.
HUFFMAN_FRAMES = (0xC0, 0xC1, 0xC2)
ORIENTATION = 0x0112  # the EXIF tag


@dataclass
class _Job:
    """A JPEG for the GPU: its bytes, stored size, EXIF orientation and the size it is resized to."""

    data: Tensor  # uint8 [n] on the CPU
    height: int
    width: int
    orientation: int
    size: tuple[int, int]
    fallback: Callable[[], tuple[Tensor, Tensor]]  # the CPU path, if nvJPEG refuses it
    future: Future


def _frame(data: bytes) -> tuple[int, int, tuple[int, ...]] | None:
    """``(frame marker, sample precision, component ids)`` of a JPEG's first frame header, or ``None`` if the
    marker segments before it do not parse."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # a fill byte
            i += 1
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn (not DHT, JPG, DAC)
            header = data[i + 4 : i + 2 + length]
            if len(header) < 6 or len(header) < 6 + 3 * header[5]:
                return None
            return marker, header[0], tuple(header[6 + 3 * c] for c in range(header[5]))
        i += 2 + length
    return None


def _ycbcr(info: dict[str, Any], ids: tuple[int, ...]) -> bool:
    """Whether libjpeg reads a three-component JPEG as YCbCr: a JFIF marker says so, else an Adobe marker's
    transform flag, else component ids other than 'R', 'G', 'B'."""
    if "jfif" in info:
        return True
    if "adobe" in info:
        return info.get("adobe_transform") != 0
    return ids != (82, 71, 66)


def gpu_route(data: bytes, max_decoded_pixels: int | None) -> tuple[int, int, int] | None:
    """``(height, width, EXIF orientation)`` of a JPEG that nvJPEG decodes as PIL would (see the module
    docstring), from its header alone; ``None`` for anything the CPU path should take."""
    if data[:3] != b"\xff\xd8\xff" or not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return None  # not a JPEG, or one cut short (or with a trailer): PIL decides what it holds
    frame = _frame(data)
    if frame is None or frame[0] not in HUFFMAN_FRAMES or frame[1] != 8 or len(frame[2]) != 3:
        return None
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as im:
            if im.format != "JPEG" or im.mode != "RGB" or not _ycbcr(im.info, frame[2]):
                return None
            width, height = im.size
            orientation = im.getexif().get(ORIENTATION, 1)  # also read from XMP, as exif_transpose does
    except Exception:  # the CPU path reports whatever is wrong with it
        return None
    if max_decoded_pixels is not None and width * height > max_decoded_pixels:
        return None  # refused by the CPU path, with its message
    return height, width, orientation if orientation in range(1, 9) else 1


def orient(image: Tensor, orientation: int) -> Tensor:
    """``[C, H, W]`` turned as ``ImageOps.exif_transpose`` turns an image of this EXIF orientation (1-8)."""
    if orientation in (5, 6, 7, 8):
        image = image.transpose(-2, -1)
    flips = {2: (-1,), 3: (-2, -1), 4: (-2,), 6: (-1,), 7: (-2, -1), 8: (-2,)}.get(orientation)
    return image.flip(flips) if flips else image


def _torchvision_io() -> Any:
    try:
        import torchvision.io
    except Exception as e:  # ImportError, or a torchvision built for another torch failing to load its ops
        raise ValueError(
            f"--decode gpu decodes JPEGs with torchvision.io.decode_jpeg on the GPU, and torchvision cannot "
            f"be imported ({type(e).__name__}: {e}); install the torchvision release built for this torch "
            f"({torch.__version__}) with CUDA, e.g. from the same index as torch: pip install torchvision"
        ) from None
    return torchvision.io


def nvjpeg_decoder(device: torch.device) -> Callable[[list[Tensor]], list[Tensor]]:
    """torchvision's batched nvJPEG decode into ``uint8 [3, H, W]`` tensors on ``device``, tried once on a
    small JPEG; ``ValueError`` saying what is missing if it cannot run here."""
    tvio = _torchvision_io()
    if device.type != "cuda":
        raise ValueError(f"--decode gpu decodes JPEGs on a CUDA device; this run's --device is {device}")

    def decode(data: list[Tensor]) -> list[Tensor]:
        return tvio.decode_jpeg(data, mode=tvio.ImageReadMode.RGB, device=device)

    probe = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 100, 50)).save(probe, format="JPEG")
    try:
        decode([torch.frombuffer(bytearray(probe.getvalue()), dtype=torch.uint8)])
    except Exception as e:  # e.g. a torchvision built without nvJPEG
        raise ValueError(f"--decode gpu: torchvision cannot decode JPEGs on {device}: {e}") from None
    return decode


class GpuDecoder:
    """Images in, ``(patches, grid_thw)`` futures out, for :func:`packvit_native.cli.prefetch`: JPEGs
    decoded on ``device`` in groups, everything else by ``fallback`` on the host (see the module docstring).

    Args:
        config: the model's config (patch size, layout, merge size, mean and std).
        args: ``packvit encode``'s settings (``--resample``, ``--max-decoded-pixels``, ``--workers``,
            ``--dtype``: that of the patches).
        rule: the resize rule (:func:`packvit_native.cli.resize_rule`).
        device: the CUDA device the patches are made on.
        read: an item's encoded bytes, or ``None`` for an item without an image (its future gives ``None``).
        fallback: the CPU path, encoded bytes -> ``(patches, grid_thw)``; its ``ValueError`` is the item's.
        decode_jpegs: a list of encoded JPEGs (``uint8`` CPU tensors) -> ``uint8 [3, H, W]`` images on
            ``device``, raising ``RuntimeError`` if it refuses one; default :func:`nvjpeg_decoder`.
    """

    def __init__(
        self,
        config: Any,
        args: argparse.Namespace,
        rule: dict[str, Any],
        device: torch.device,
        read: Callable[[Any], bytes | None],
        fallback: Callable[[bytes], tuple[Tensor, Tensor]],
        decode_jpegs: Callable[[list[Tensor]], list[Tensor]] | None = None,
    ) -> None:
        if config.num_channels != 3:
            raise ValueError(
                f"--decode gpu decodes RGB images; this model takes {config.num_channels} channels"
            )
        self.config, self.rule, self.device = config, rule, device
        self.resample = args.resample or config.resample
        self.max_decoded_pixels = args.max_decoded_pixels
        self.read, self.fallback = read, fallback
        self.decode_jpegs = decode_jpegs or nvjpeg_decoder(device)
        # The CPU path's normalisation of every 8-bit level: uint8 -> float64 * (1/255) -> float32, then
        # (x - mean) / std in float32; a lookup gives the same values bit for bit. Stored in --dtype, the cast
        # the forward would make first: the patches take half the memory in bfloat16, with the same values.
        levels = (torch.arange(256, dtype=torch.float64) * (1 / 255)).float()
        mean = torch.tensor(config.image_mean, dtype=torch.float32)[:, None]
        std = torch.tensor(config.image_std, dtype=torch.float32)[:, None]
        table = ((levels[None] - mean) / std).reshape(-1)  # [3 * 256]
        self.table = table.to(device=device, dtype=DTYPES[args.dtype])
        self.offsets = (torch.arange(3) * 256).reshape(3, 1, 1).to(device)
        cuda = device.type == "cuda"
        # High priority: its short kernels run between the forward's, so a group is ready soon after it is
        # decoded rather than after the forward in flight.
        self.stream = torch.cuda.Stream(device, priority=-1) if cuda else None
        self.consumer = torch.cuda.current_stream(device) if cuda else None
        self.window = max(2 * args.workers, 2 * GROUP_IMAGES)  # enough ahead to fill groups
        self.pool = LoadingThreads(args.workers)
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.closed = False
        self.lock = threading.Lock()
        self.counts = {"gpu": 0, "cpu": 0}
        self.failure: str | None = None  # the first failure of the GPU path, and how often it failed
        self.failures = 0
        self.thread = threading.Thread(target=self._serve, name="packvit-gpu-decode", daemon=True)
        self.thread.start()

    def submit(self, item: Any) -> Future:
        """The future ``(patches, grid_thw)`` of ``item`` (``None`` if it has no image)."""
        future: Future = Future()
        self.pool.submit(self._inspect, item, future)
        return future

    def close(self) -> None:
        """Stop: queued work is dropped (after Ctrl-C nothing more is decoded); waits for the threads."""
        self.closed = True
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.jobs.put(None)
        self.thread.join()

    def summary(self) -> str:
        """How many images each path took, for the run's summary line."""
        gpu, cpu = self.counts["gpu"], self.counts["cpu"]
        text = f"--decode gpu: {gpu} JPEGs decoded on {self.device}, {cpu} images on the CPU"
        return text + (
            f" (the GPU path failed {self.failures} time(s), first: {self.failure})" if self.failure else ""
        )

    def _count(self, path: str, n: int = 1) -> None:
        with self.lock:
            self.counts[path] += n

    # -------------------------------------------------------------------------------------- host threads

    def _inspect(self, item: Any, future: Future) -> None:
        if self.closed:
            return
        try:
            try:
                data = self.read(item)
            except OSError as e:
                raise ValueError(f"cannot read image: {e.strerror or e}") from None
            if data is None:
                future.set_result(None)
                return
            route = gpu_route(data, self.max_decoded_pixels)
            if route is None:
                result = self.fallback(data)
                self._count("cpu")
                future.set_result(result)
                return
            height, width, orientation = route
            upright = (width, height) if orientation >= 5 else (height, width)
            size = target_size(*upright, self.config, **self.rule)
            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            self.jobs.put(_Job(raw, height, width, orientation, size, lambda: self.fallback(data), future))
        except BaseException as e:  # reported by the consumer, as the CPU path's errors are
            future.set_exception(e)

    # ------------------------------------------------------------------------------------ decode thread

    def _serve(self) -> None:
        stop = False
        while not stop:
            first = self.jobs.get()
            if first is None:
                return
            group, pixels = [first], first.height * first.width
            deadline = time.monotonic() + LINGER_S
            while len(group) < GROUP_IMAGES and pixels < GROUP_PIXELS:
                try:
                    job = self.jobs.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                group.append(job)
                pixels += job.height * job.width
            if not self.closed:
                self._run(group)

    def _run(self, group: list[_Job]) -> None:
        """Decode and preprocess one group and resolve its futures, whatever happens."""
        results: list[tuple[_Job, tuple[Tensor, Tensor]]] = []
        try:
            refused = self._on_device(group, results)
        except Exception as e:  # unforeseen (a CUDA error, say): the CPU path takes the whole group
            self.failure = self.failure or f"{type(e).__name__}: {e}"
            self.failures += 1
            results, refused = [], group
        self._count("gpu", len(results))
        for job, result in results:
            job.future.set_result(result)
        for job in refused:
            try:
                result = job.fallback()
            except BaseException as e:
                job.future.set_exception(e)
            else:
                self._count("cpu")
                job.future.set_result(result)

    def _on_device(self, group: list[_Job], results: list[tuple[_Job, tuple[Tensor, Tensor]]]) -> list[_Job]:
        """Decode and preprocess ``group`` on the decode stream into ``results``, complete when this returns;
        returns the jobs nvJPEG refused."""
        cuda = self.stream is not None
        device = torch.cuda.device(self.device) if cuda else contextlib.nullcontext()
        stream = torch.cuda.stream(self.stream) if cuda else contextlib.nullcontext()
        with device, stream, torch.no_grad():
            refused = self._decode(group, results)
            if cuda:
                for _, (patches, _) in results:
                    patches.record_stream(self.consumer)  # read by the forward on the consumer's stream
                done = torch.cuda.Event()
                done.record(self.stream)
                done.synchronize()  # this thread waits for its own stream only, never for the forward
        return refused

    def _decode(self, group: list[_Job], results: list[tuple[_Job, tuple[Tensor, Tensor]]]) -> list[_Job]:
        """Decode ``group`` in one call, or in halves until the JPEGs nvJPEG refuses are found; returns
        those."""
        try:
            images = self.decode_jpegs([job.data for job in group])
        except RuntimeError:
            if len(group) == 1:
                return group
            half = len(group) // 2
            return self._decode(group[:half], results) + self._decode(group[half:], results)
        refused = []
        for job, image in zip(group, images, strict=True):
            if tuple(image.shape) == (3, job.height, job.width):
                results.append((job, self._patches(image, job)))
            else:
                refused.append(job)
        return refused

    def _patches(self, image: Tensor, job: _Job) -> tuple[Tensor, Tensor]:
        """One decoded ``uint8 [3, H, W]`` image -> ``(patches, grid_thw)`` as the CPU path makes them."""
        x = orient(image, job.orientation)[None]  # [1, 3, H, W] uint8, then float levels once resized
        h, w = job.size
        # PIL resizes 8-bit images in two passes, each rounded half up into 8 bits, the width first. Doing the
        # same keeps the patches within a level of PIL's fixed-point result, nearly all of them equal to it
        # (Pillow 13 sometimes starts with the height: then a few values are up to 3 levels off).
        if x.shape[-1] != w:
            x = self._resize(x.float(), (x.shape[-2], w))
        if x.shape[-2] != h:
            x = self._resize(x.float(), (h, w))
        values = self.table[x[0].long() + self.offsets]  # [3, h, w] normalised
        c = self.config
        return patchify(
            [values], c.patch_size, layout=c.patch_layout, merge_size=c.merge_size,
            temporal_patch_size=c.temporal_patch_size,
        )  # fmt: skip

    def _resize(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        x = F.interpolate(x, size=size, mode=self.resample, align_corners=False, antialias=True)
        return x.add_(0.5).floor_().clamp_(0, 255)
