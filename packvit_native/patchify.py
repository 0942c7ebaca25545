"""Turn images into the packed ``(patches, grid_thw)`` input the encoder takes, and back.

A patch covers ``p x p`` pixels of ``T = temporal_patch_size`` consecutive frames (``T = 1`` for 2D patches).
Its ``C*T*p*p`` values are flattened in one of two layouts:

- ``"chw"``: channel, frame, row, column, i.e. a Conv2d/Conv3d weight flattened (``(c, py, px)`` for ``T = 1``);
  what Qwen-VL's processors emit.
- ``"hwc"``: frame, row, column, channel; what SigLIP2's NaFlex processor emits.

The earlier names ``"cpp"`` and ``"ppc"`` are accepted for the two.
"""

from __future__ import annotations

from numbers import Integral

import torch
from torch import Tensor

from .config import patch_layout_name
from .packing import check_merge_size, validate_grid_thw

__all__ = ["patch_weight_layout", "patchify", "unpatchify"]


def _check_sizes(patch_size: int, temporal_patch_size: int) -> None:
    for name, value in (("patch_size", patch_size), ("temporal_patch_size", temporal_patch_size)):
        if not isinstance(value, Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _frames(image: Tensor, i: int, temporal: int) -> Tensor:
    """An image or clip as ``[F, C, H, W]`` with ``F`` a multiple of ``temporal`` (a still image repeated)."""
    if not isinstance(image, Tensor) or image.ndim not in (3, 4):
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"each image must be a tensor [C, H, W] or [T, C, H, W], got {shape}")
    if not image.is_floating_point():
        raise ValueError(f"images must be floating point, got dtype {image.dtype}")
    frames = image if image.ndim == 4 else image[None]
    if frames.numel() == 0:  # e.g. a clip of no frames, what a video reader gives for a broken file
        raise ValueError(f"image {i} is empty: shape {tuple(image.shape)}")
    if temporal > 1 and frames.shape[0] == 1:
        return frames.expand(temporal, *frames.shape[1:])  # a still image fills every frame of its patches
    if frames.shape[0] % temporal:
        raise ValueError(
            f"image {i} is a clip of {frames.shape[0]} frames, which is not a whole number of temporal patches "
            f"of {temporal} frames; pad it (e.g. repeat its last frame) to a multiple of {temporal}"
        )
    return frames


def patchify(
    images: list[Tensor] | Tensor,
    patch_size: int,
    layout: str = "chw",
    merge_size: int = 1,
    temporal_patch_size: int = 1,
) -> tuple[Tensor, Tensor]:
    """Cut images into patches and pack them into one tensor.

    Args:
        images: a list of ``[C, H, W]`` images or ``[F, C, H, W]`` clips (``F`` frames of one size), or one
            batched ``[B, C, H, W]`` tensor. ``H`` and ``W`` must be multiples of ``patch_size``.
        patch_size: ``p``.
        layout: element order inside a patch, ``"chw"`` or ``"hwc"`` (see the module docstring). Use the
            model's ``config.patch_layout``, or call ``model.patchify``.
        merge_size: ``1`` for row-major patches; ``m`` for merge order (each ``m x m`` block of patches
            contiguous, blocks row-major; rows and columns of every image must be multiples of ``m``). Use the
            model's ``config.merge_size``.
        temporal_patch_size: ``T`` frames per patch. A still image is repeated ``T`` times (as Qwen-VL's
            processor does); a clip must have a multiple of ``T`` frames.

    Returns:
        ``patches [sum(t*h*w), C*T*p*p]`` (frames and images in order) and ``grid_thw`` int64 ``[B, 3]`` on the
        CPU, ``t`` counting temporal patches.
    """
    layout = patch_layout_name(layout)
    if isinstance(images, Tensor):
        if images.ndim != 4:
            raise ValueError(f"a batched image tensor must be [B, C, H, W], got {tuple(images.shape)}")
        images = list(images.unbind(0))
    if not images:
        raise ValueError("no images to patchify")
    p, m, tp = patch_size, merge_size, temporal_patch_size
    _check_sizes(p, tp)
    chunks, grid, channels = [], [], None
    for i, image in enumerate(images):
        frames = _frames(image, i, tp)
        f, c, hh, ww = frames.shape
        channels = c if channels is None else channels
        if c != channels:
            raise ValueError(
                f"image {i} has {c} channels and image 0 {channels}; a batch has one channel count"
            )
        if hh % p or ww % p or hh == 0 or ww == 0:
            raise ValueError(
                f"image {i} is {hh}x{ww} pixels, which is not a positive multiple of patch size {p}"
            )
        t, h, w = f // tp, hh // p, ww // p
        check_merge_size(((t, h, w),), m)
        x = frames.reshape(t, tp, c, h // m, m, p, w // m, m, p)
        # [t, h/m, w/m, m, m, patch]: with m = 1 this is plain row-major; a patch is (c, T, p, p) or (T, p, p, c)
        x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8) if layout == "chw" else x.permute(0, 3, 6, 4, 7, 1, 5, 8, 2)
        chunks.append(x.reshape(t * h * w, c * tp * p * p))
        grid.append((t, h, w))
    return torch.cat(chunks), torch.tensor(grid, dtype=torch.int64)


def unpatchify(
    patches: Tensor,
    grid_thw: Tensor,
    patch_size: int,
    layout: str = "chw",
    merge_size: int = 1,
    temporal_patch_size: int = 1,
) -> list[Tensor]:
    """Inverse of :func:`patchify` (same arguments): one ``[t*T, C, H, W]`` clip per entry."""
    layout = patch_layout_name(layout)
    grid = validate_grid_thw(grid_thw)
    check_merge_size(grid, merge_size)
    if patches.ndim != 2 or patches.shape[0] != sum(t * h * w for t, h, w in grid):
        raise ValueError(
            f"patches {tuple(patches.shape)} do not match grid_thw ({sum(t * h * w for t, h, w in grid)} patches)"
        )
    p, m, tp = patch_size, merge_size, temporal_patch_size
    _check_sizes(p, tp)
    if patches.shape[1] % (tp * p * p):
        raise ValueError(
            f"patches have {patches.shape[1]} values each, not a whole number of channels of T*p*p = {tp}*{p}*{p}"
        )
    out, start = [], 0
    for t, h, w in grid:
        n = t * h * w
        x = patches[start : start + n]
        start += n
        if layout == "chw":
            x = x.reshape(t, h // m, w // m, m, m, -1, tp, p, p).permute(0, 6, 5, 1, 3, 7, 2, 4, 8)
        else:
            x = x.reshape(t, h // m, w // m, m, m, tp, p, p, -1).permute(0, 5, 8, 1, 3, 6, 2, 4, 7)
        out.append(
            x.reshape(t * tp, x.shape[2], h * p, w * p)
        )  # [t, T, c, h/m, m, p, w/m, m, p] -> [F, C, H, W]
    return out


def patch_weight_layout(
    weight: Tensor, channels: int, patch: int, temporal: int, src: str, dst: str
) -> Tensor:
    """A patch-embedding weight ``[D, C*T*p*p]`` over inputs in layout ``src``, rewritten for inputs in ``dst``."""
    src, dst = patch_layout_name(src), patch_layout_name(dst)
    if src == dst:
        return weight
    if src == "chw":  # (c, t, py, px) -> (t, py, px, c)
        w = weight.reshape(-1, channels, temporal, patch, patch).permute(0, 2, 3, 4, 1)
    else:  # (t, py, px, c) -> (c, t, py, px)
        w = weight.reshape(-1, temporal, patch, patch, channels).permute(0, 4, 1, 2, 3)
    return w.reshape(weight.shape[0], -1)
