"""Turn images into the packed ``(patches, grid_thw)`` input the encoder takes."""

from __future__ import annotations

import torch
from torch import Tensor

from .packing import check_merge_size, validate_grid_thw

__all__ = ["patchify", "unpatchify"]


def _frames(image: Tensor) -> Tensor:
    if not isinstance(image, Tensor) or image.ndim not in (3, 4):
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"each image must be a tensor [C, H, W] or [T, C, H, W], got {shape}")
    if not image.is_floating_point():
        raise ValueError(f"images must be floating point, got dtype {image.dtype}")
    return image if image.ndim == 4 else image[None]


def patchify(
    images: list[Tensor] | Tensor, patch_size: int, layout: str = "cpp", merge_size: int = 1
) -> tuple[Tensor, Tensor]:
    """Cut images into patches and pack them into one tensor.

    Args:
        images: a list of ``[C, H, W]`` images or ``[T, C, H, W]`` clips (``T`` frames of one size), or one
            batched ``[B, C, H, W]`` tensor. ``H`` and ``W`` must be multiples of ``patch_size``.
        patch_size: ``p``.
        layout: element order inside a patch: ``"cpp"`` (channel, row, col: a Conv2d weight flattened) or
            ``"ppc"`` (row, col, channel: what SigLIP2's NaFlex processor emits). Use the model's
            ``config.patch_layout``, or call ``model.patchify``.
        merge_size: ``1`` for row-major patches; ``m`` for merge order (each ``m x m`` block of patches
            contiguous, blocks row-major; rows and columns of every image must be multiples of ``m``). Use the
            model's ``config.merge_size``.

    Returns:
        ``patches [sum(T*h*w), C*p*p]`` (frames and images in order) and ``grid_thw`` int64 ``[B, 3]`` on the
        CPU.
    """
    if layout not in ("cpp", "ppc"):
        raise ValueError(f"layout must be 'cpp' or 'ppc', got {layout!r}")
    if isinstance(images, Tensor):
        if images.ndim != 4:
            raise ValueError(f"a batched image tensor must be [B, C, H, W], got {tuple(images.shape)}")
        images = list(images.unbind(0))
    if not images:
        raise ValueError("no images to patchify")
    p = patch_size
    chunks, grid = [], []
    for i, image in enumerate(images):
        frames = _frames(image)
        t, c, hh, ww = frames.shape
        if hh % p or ww % p or hh == 0 or ww == 0:
            raise ValueError(
                f"image {i} is {hh}x{ww} pixels, which is not a positive multiple of patch size {p}"
            )
        h, w = hh // p, ww // p
        check_merge_size(((t, h, w),), merge_size)
        m = merge_size
        x = frames.reshape(t, c, h // m, m, p, w // m, m, p)
        # [t, h/m, w/m, m, m, (c, p, p) or (p, p, c)]: with m = 1 this is plain row-major
        x = x.permute(0, 2, 5, 3, 6, 1, 4, 7) if layout == "cpp" else x.permute(0, 2, 5, 3, 6, 4, 7, 1)
        chunks.append(x.reshape(t * h * w, c * p * p))
        grid.append((t, h, w))
    return torch.cat(chunks), torch.tensor(grid, dtype=torch.int64)


def unpatchify(
    patches: Tensor, grid_thw: Tensor, patch_size: int, layout: str = "cpp", merge_size: int = 1
) -> list[Tensor]:
    """Inverse of :func:`patchify` (same ``layout`` and ``merge_size``): ``[T, C, H, W]`` clips, one per entry."""
    if layout not in ("cpp", "ppc"):
        raise ValueError(f"layout must be 'cpp' or 'ppc', got {layout!r}")
    grid = validate_grid_thw(grid_thw)
    check_merge_size(grid, merge_size)
    if patches.ndim != 2 or patches.shape[0] != sum(t * h * w for t, h, w in grid):
        raise ValueError(
            f"patches {tuple(patches.shape)} do not match grid_thw ({sum(t * h * w for t, h, w in grid)} patches)"
        )
    p, m = patch_size, merge_size
    out, start = [], 0
    for t, h, w in grid:
        n = t * h * w
        x = patches[start : start + n]
        start += n
        if layout == "cpp":
            x = x.reshape(t, h // m, w // m, m, m, -1, p, p).permute(0, 5, 1, 3, 6, 2, 4, 7)
        else:
            x = x.reshape(t, h // m, w // m, m, m, p, p, -1).permute(0, 7, 1, 3, 5, 2, 4, 6)
        out.append(x.reshape(t, x.shape[1], h * p, w * p))  # [t, c, h/m, m, p, w/m, m, p] -> [t, c, H, W]
    return out
