"""From images (PIL images, tensors or files) to the packed ``(patches, grid_thw)`` a model takes.

Every image is resized to whole patches with its aspect ratio kept as well as the grid allows, scaled to
``[0, 1]``, normalised with the checkpoint's mean and std (``config.image_mean`` / ``config.image_std``) and cut
into patches in the model's layout and token order. The target size follows one of three rules:

``max_patches=N`` (SigLIP2 NaFlex)
    The largest scale ``s`` whose grid fits ``N`` patches, found by bisection of ``s`` over ``[1e-6, 100]`` down
    to a width of ``1e-5``; each side becomes ``max(f, ceil(side * s / f) * f)`` with ``f = patch_size *
    merge_size``. Small images are upscaled too, so the budget is always nearly filled. With ``merge_size = 1``
    this is the size transformers' ``Siglip2ImageProcessor`` picks.
``min_pixels=..., max_pixels=...`` (Qwen2-VL smart resize)
    Each side is rounded to the nearest multiple of ``f``. If the area then exceeds
    ``max_pixels``, both sides are scaled by ``sqrt(max_pixels / area)`` and rounded down to multiples of
    ``f``; if it falls below ``min_pixels``, they are scaled by ``sqrt(min_pixels / area)`` and rounded up.
    Images within the budget keep (nearly) their native resolution. A side is never below ``f``.
``size=(height, width)``
    A fixed size in pixels (aspect ratio not kept): what a model whose learned position table cannot be
    resized needs.

With none given, :func:`default_resize` takes the checkpoint's rule from its config (what its image processor
does, recorded by the converter): the trained grid for a learned table that cannot be resized, else
``config.resize_max_patches`` or ``config.resize_min_pixels`` / ``resize_max_pixels``, else smart resize between
``16`` and ``1024`` patches' worth of pixels.

A model with ``temporal_patch_size = T > 1`` (Qwen-VL) takes every still image repeated over ``T`` frames and
clips whose frame count is a multiple of ``T``.

Resampling uses ``config.resample`` unless told otherwise. PIL images (and files) are resized by PIL itself, on 8-bit pixels, and converted to float as
transformers' PIL image processors do (``uint8 -> float64 * 1/255 -> float32``, then ``(x - mean) / std`` in
float32), so the patches are bit-identical to theirs. Tensors are resized with
``torch.nn.functional.interpolate(antialias=True)`` in float32 on their own device (close to PIL, not bitwise:
PIL rounds to 8 bits after resizing). No step loops over pixels in Python.
"""

from __future__ import annotations

import io
import math
import os
import re
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import Tensor

from .config import EncoderConfig
from .patchify import patchify

__all__ = [
    "MAX_DECODED_PIXELS",
    "ImageLike",
    "LoadingThreads",
    "decode",
    "default_resize",
    "load_image",
    "naflex_size",
    "preprocess",
    "smart_size",
    "target_size",
]

ImageLike = Image.Image | Tensor | str | os.PathLike

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def naflex_size(
    height: int, width: int, patch_size: int, max_patches: int, factor: int | None = None
) -> tuple[int, int]:
    """Pixel size for the ``max_patches`` rule (see the module docstring); ``factor`` defaults to ``patch_size``."""
    f = factor or patch_size
    if max_patches < (f // patch_size) ** 2:
        raise ValueError(f"max_patches={max_patches} cannot hold even one {f}x{f}-pixel block of patches")

    def side(scale: float, n: int) -> int:
        return max(f, math.ceil(n * scale / f) * f)

    lo, hi = 1e-6, 100.0
    while hi - lo >= 1e-5:
        mid = (lo + hi) / 2
        if (side(mid, height) // patch_size) * (side(mid, width) // patch_size) <= max_patches:
            lo = mid
        else:
            hi = mid
    return side(lo, height), side(lo, width)


def smart_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Pixel size for the ``min_pixels`` / ``max_pixels`` rule (see the module docstring)."""
    if not 0 <= min_pixels <= max_pixels:
        raise ValueError(f"need 0 <= min_pixels <= max_pixels, got {min_pixels} and {max_pixels}")
    if max_pixels < factor * factor:
        raise ValueError(f"max_pixels={max_pixels} is below one {factor}x{factor} block")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / shrink / factor) * factor)
        w = max(factor, math.floor(width / shrink / factor) * factor)
    elif h * w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * grow / factor) * factor, math.ceil(width * grow / factor) * factor
    h, w = max(factor, h), max(factor, w)  # a side under factor/2 with min_pixels = 0 would round to nothing
    if h * w > max_pixels:
        # Only an extreme aspect ratio gets here: its short side was raised to one block, so the long side is
        # trimmed to keep the budget (Qwen2-VL refuses such images outright).
        if h > w:
            h = max(factor, max_pixels // w // factor * factor)
        else:
            w = max(factor, max_pixels // h // factor * factor)
    return h, w


def default_resize(config: EncoderConfig) -> dict[str, Any]:
    """The resize rule :func:`preprocess` uses for ``config`` when the caller gives none."""
    p = config.patch_size
    if config.fixed_size is not None:
        return {"size": (config.fixed_size[0] * p, config.fixed_size[1] * p)}
    if config.resize_max_patches is not None:
        return {"max_patches": config.resize_max_patches}
    lo, hi = config.resize_min_pixels, config.resize_max_pixels
    return {
        "min_pixels": 16 * p * p if lo is None else lo,
        "max_pixels": max(1024 * p * p, lo or 0) if hi is None else hi,
    }


def target_size(
    height: int,
    width: int,
    config: EncoderConfig,
    *,
    max_patches: int | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    size: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """Pixel ``(height, width)`` an image of ``height x width`` is resized to (rules in the module docstring)."""
    given = {
        k: v
        for k, v in (
            ("max_patches", max_patches),
            ("min_pixels", min_pixels),
            ("max_pixels", max_pixels),
            ("size", size),
        )
        if v is not None
    }
    rule = given or default_resize(config)
    if len({"max_patches", "size"} & set(rule)) + bool({"min_pixels", "max_pixels"} & set(rule)) > 1:
        raise ValueError(
            f"give one resize rule: max_patches, min_pixels/max_pixels, or size; got {sorted(given)}"
        )
    if height < 1 or width < 1:
        raise ValueError(f"image of {height}x{width} pixels is empty")
    p = config.patch_size
    f = p * config.merge_size
    if "size" in rule:
        h, w = rule["size"]
        if h % f or w % f or h < 1 or w < 1:
            raise ValueError(
                f"size={rule['size']} is not a positive multiple of {f} pixels on both sides "
                f"(patch size {p} x merge size {config.merge_size})"
            )
        return h, w
    if "max_patches" in rule:
        return naflex_size(height, width, p, rule["max_patches"], factor=f)
    base = default_resize(config)
    lo = rule.get("min_pixels", base.get("min_pixels", 0))
    hi = rule.get("max_pixels", base.get("max_pixels", 1024 * p * p))
    return smart_size(height, width, f, lo, hi)


# Largest image (width x height) load_image decodes by default: 64 Mi pixels, e.g. 8192 x 8192, 192 MB as RGB.
# A file of a few hundred KB can declare 10000 x 10000 pixels, 300 MB decoded as RGB, so the declared size is
# checked first. Pillow's own check (twice Image.MAX_IMAGE_PIXELS, about 179 M pixels, refused in Image.open)
# is lifted for an image within a higher limit asked for, and its refusal is worded as ours.
MAX_DECODED_PIXELS = 64 * 2**20


_OVER_LIMIT = " pixels, over the limit of"


def refused_pixels(error: str) -> int | None:
    """The pixel count an image was refused for, if ``error`` is :func:`decode`'s message for an image over the
    ``max_decoded_pixels`` limit: a rerun with a higher limit reads it again."""
    found = re.search(rf"(\d+){_OVER_LIMIT} \d+ decoded pixels", error)
    return int(found.group(1)) if found else None


def decode(
    source: str | os.PathLike | BinaryIO,
    mode: str = "RGB",
    max_decoded_pixels: int | None = MAX_DECODED_PIXELS,
) -> Image.Image:
    """Decode an image file, or an open binary stream of one, fully (EXIF orientation applied) in ``mode``.

    Raises ``ValueError`` if it is unreadable or declares more than ``max_decoded_pixels`` pixels (``None``: no
    limit of ours), which is checked from the header before anything is decoded.
    """
    if not isinstance(source, (str, os.PathLike)) and not (hasattr(source, "seekable") and source.seekable()):
        source = io.BytesIO(source.read())  # read again if Pillow's limit must be lifted for it
    try:
        try:
            return _decoded(source, mode, max_decoded_pixels)
        except Image.DecompressionBombError as e:  # over Pillow's own limit, checked in Image.open
            pixels = re.search(r"\((\d+) pixels\)", str(e))
            if pixels is None or (max_decoded_pixels is not None and int(pixels[1]) > max_decoded_pixels):
                raise ValueError(_over_limit(pixels[1], max_decoded_pixels) if pixels else str(e)) from None
        if not isinstance(source, (str, os.PathLike)):
            source.seek(0)  # seekable: made so below
        with _PILLOW_LIMIT:  # within our limit: opened again with Pillow's check lifted for this image alone
            saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
            try:
                return _decoded(source, mode, max_decoded_pixels)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(str(e)) from None


def _decoded(source: str | os.PathLike | BinaryIO, mode: str, max_decoded_pixels: int | None) -> Image.Image:
    with Image.open(source) as im:  # reads the header only
        w, h = im.size
        if max_decoded_pixels is not None and w * h > max_decoded_pixels:
            raise ValueError(_over_limit(f"{w}x{h} = {w * h}", max_decoded_pixels))
        im.load()
        return _upright(im).convert(mode)


def _over_limit(pixels: str, limit: int | None) -> str:
    return (
        f"it declares {pixels}{_OVER_LIMIT} {limit} decoded pixels (max_decoded_pixels, --max-decoded-pixels)"
    )


# Held while Pillow's process-wide limit is lifted for one image within ours (see decode).
_PILLOW_LIMIT = threading.Lock()


# EXIF orientation -> the transpose that shows the image upright, as Pillow's exif_transpose applies it.
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}  # fmt: skip


def _upright(im: Image.Image) -> Image.Image:
    """``im`` with its EXIF orientation applied. Pillow's exif_transpose fails on some damaged tags elsewhere in
    the EXIF block (a Make tag of the wrong type, as some phones write: AttributeError, TypeError,
    struct.error); the orientation tag alone is read then, and an image whose EXIF cannot be read at all is
    taken as stored (transformers' load_image raises on both)."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:
        pass
    try:
        method = _ORIENTATION.get(im.getexif().get(0x0112, 1))
    except Exception:
        return im
    return im.transpose(method) if method is not None else im


def load_image(
    path: str | os.PathLike, mode: str = "RGB", max_decoded_pixels: int | None = MAX_DECODED_PIXELS
) -> Image.Image:
    """:func:`decode` of a file, with a ``ValueError`` that names the file."""
    try:
        return decode(path, mode, max_decoded_pixels)
    except ValueError as e:
        raise ValueError(f"cannot read image {os.fspath(path)}: {e}") from None


def _mode(channels: int) -> str:
    if channels not in (1, 3):
        raise ValueError(f"PIL images and files need a 1- or 3-channel model, this one has {channels}")
    return "RGB" if channels == 3 else "L"


def _from_pil(image: Image.Image, hw: tuple[int, int], resample: str, channels: int) -> Tensor:
    image = image if image.mode == _mode(channels) else image.convert(_mode(channels))
    if image.size != (hw[1], hw[0]):
        image = image.resize((hw[1], hw[0]), resample=_RESAMPLE[resample])
    pixels = torch.from_numpy(np.asarray(image).copy()).reshape(hw[0], hw[1], channels)  # [H, W, C] uint8
    # float64 * (1/255) then float32, as transformers rescales, so the values match its processors bit for bit.
    return (pixels.permute(2, 0, 1).double() * (1 / 255)).float()[None]  # [1, C, H, W]


def _unit_range(image: Tensor, i: int) -> Tensor:
    """A tensor image as floats in [0, 1]: ``uint8`` is read as 0-255, floats must already be in [0, 1]."""
    if image.numel() == 0:  # e.g. a clip of no frames, what a video reader gives for a broken file
        raise ValueError(f"image {i} is empty: shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image.double() * (1 / 255)  # float64 then float32, as transformers rescales
    if not image.is_floating_point():
        raise ValueError(
            f"image {i}: a tensor must be uint8 (0-255) or floating point (0-1), got {image.dtype}"
        )
    lo, hi = float(image.min()), float(image.max())
    if lo < 0 or hi > 1:
        raise ValueError(
            f"image {i}: a floating-point tensor must hold pixels in [0, 1], got values from {lo:g} to {hi:g}; "
            "divide 0-255 pixels by 255, or pass them as a uint8 tensor"
        )
    return image


def _from_tensor(image: Tensor, hw: tuple[int, int], resample: str) -> Tensor:
    frames = (image if image.ndim == 4 else image[None]).float()  # [T, C, H, W]
    if tuple(frames.shape[-2:]) == hw:
        return frames
    out = F.interpolate(frames, size=hw, mode=resample, align_corners=False, antialias=True)
    return (
        out.clamp_(0, 1) if resample == "bicubic" else out
    )  # bicubic overshoots; PIL clips to the pixel range


def preprocess(
    images: ImageLike | Sequence[ImageLike],
    model: Any,
    *,
    max_patches: int | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    size: tuple[int, int] | None = None,
    resample: str | None = None,
    device: torch.device | str | None = None,
    max_decoded_pixels: int | None = MAX_DECODED_PIXELS,
) -> tuple[Tensor, Tensor]:
    """Resize, normalise and patchify images into the packed input of ``model``.

    Args:
        images: one image or a list of them; each a PIL image, a file path, a ``[C, H, W]`` tensor (``uint8`` in
            ``[0, 255]`` or floating in ``[0, 1]``) or a ``[T, C, H, W]`` clip (all frames share one size). A
            single ``[B, C, H, W]`` tensor is a batch of images.
        model: a :class:`~packvit_native.PackedVisionEncoder` or its :class:`~packvit_native.EncoderConfig`;
            patch size, channels, mean/std, patch layout and ``merge_size`` come from it.
        max_patches: NaFlex rule: fill a budget of this many patches per frame.
        min_pixels, max_pixels: smart-resize rule: native resolution, clamped to this pixel area.
        size: fixed ``(height, width)`` in pixels.
        resample: ``"bilinear"`` or ``"bicubic"``; default: ``config.resample``, what the checkpoint's image
            processor uses.
        device: where tensors are resized and the patches returned (default: the CPU).
        max_decoded_pixels: image files declaring more pixels than this are refused before decoding
            (``ValueError``; see :func:`load_image`); ``None`` for no limit of ours.

    Returns:
        ``patches [N, C*p*p]`` float32 on ``device`` and ``grid_thw`` int64 ``[B, 3]`` on the CPU, ready for
        ``model``.
    """
    config: EncoderConfig = model if isinstance(model, EncoderConfig) else model.config
    resample = resample or config.resample
    if resample not in _RESAMPLE:
        raise ValueError(f"resample must be one of {list(_RESAMPLE)}, got {resample!r}")
    if isinstance(images, np.ndarray) or (
        isinstance(images, (list, tuple)) and any(isinstance(im, np.ndarray) for im in images)
    ):
        raise ValueError(
            "numpy arrays are ambiguous (HWC or CHW); pass PIL images, paths, or tensors "
            "(e.g. torch.from_numpy(hwc_uint8).permute(2, 0, 1))"
        )
    if isinstance(images, (Image.Image, str, os.PathLike)) or (
        isinstance(images, Tensor) and images.ndim == 3
    ):
        images = [images]
    elif isinstance(images, Tensor):
        if images.ndim != 4:
            raise ValueError(
                f"an image tensor must be [C, H, W] or a batch [B, C, H, W], got {tuple(images.shape)}"
            )
        images = list(images.unbind(0))
    if not images:
        raise ValueError("no images to preprocess")
    rule = {"max_patches": max_patches, "min_pixels": min_pixels, "max_pixels": max_pixels, "size": size}
    c = config.num_channels
    mean = torch.tensor(config.image_mean, dtype=torch.float32, device=device)[:, None, None]
    std = torch.tensor(config.image_std, dtype=torch.float32, device=device)[:, None, None]
    frames = []
    for i, item in enumerate(images):
        if isinstance(item, (str, os.PathLike)):
            item = load_image(Path(item), _mode(c), max_decoded_pixels)
        if isinstance(item, Image.Image):
            x = _from_pil(item, target_size(item.height, item.width, config, **rule), resample, c).to(device)
        elif isinstance(item, Tensor):
            if item.ndim not in (3, 4) or item.shape[-3] != c:
                raise ValueError(
                    f"image {i}: a tensor must be [C, H, W] or [T, C, H, W] with C = {c}, got {tuple(item.shape)}"
                )
            hw = target_size(item.shape[-2], item.shape[-1], config, **rule)
            x = _from_tensor(_unit_range(item.to(device), i), hw, resample)
        else:
            raise ValueError(
                f"image {i}: expected a PIL image, a path or a tensor, got {type(item).__name__}"
            )
        frames.append((x - mean) / std)  # [T, C, H, W]
    return patchify(
        frames, config.patch_size, layout=config.patch_layout, merge_size=config.merge_size,
        temporal_patch_size=config.temporal_patch_size,
    )  # fmt: skip


# How much lower the scheduling priority of image loading threads and processes is than the run's own.
LOADING_NICENESS = 10


def _loading_thread() -> None:
    torch.set_num_threads(1)
    if sys.platform == "linux":  # elsewhere the call would lower the whole process, the forward's thread too
        me = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, me, os.getpriority(os.PRIO_PROCESS, me) + LOADING_NICENESS)


class LoadingThreads(ThreadPoolExecutor):
    """Threads that read and preprocess images beside the forward, each running PyTorch's CPU operators on one
    thread of its own.

    PyTorch gives every thread that calls a parallel CPU operator its own team of intra-op threads, one per
    core, so ``workers`` loading threads would keep ``workers`` x cores threads busy, and the thread that
    launches the forward's kernels would wait for a core while the GPU idles. One image's work is small; the
    threads themselves are the parallelism.

    ``torch.set_num_threads(1)`` in the pool's threads also lowers the count PyTorch gives threads on their
    first parallel operator, so the creating thread's own count is settled first, and the process's count is
    put back on :meth:`shutdown`.

    With as many loading threads (or ``--processes`` workers) as cores, the thread that launches the forward
    also waits for a core behind them, for every operator it runs. On Linux the loaders therefore run at a
    lower scheduling priority (niceness +``LOADING_NICENESS``, per thread): they still take every core nothing
    else wants.
    """

    def __init__(self, workers: int) -> None:
        self.caller_threads = torch.get_num_threads()
        super().__init__(workers, initializer=_loading_thread)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait=wait, cancel_futures=cancel_futures)
        torch.set_num_threads(self.caller_threads)
