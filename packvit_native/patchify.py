"""Turn images into the packed ``(patches, grid_thw)`` input the encoder takes."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["patchify", "unpatchify"]


def _frames(image: Tensor) -> Tensor:
    if not isinstance(image, Tensor) or image.ndim not in (3, 4):
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"each image must be a tensor [C, H, W] or [T, C, H, W], got {shape}")
    if not image.is_floating_point():
        raise ValueError(f"images must be floating point, got dtype {image.dtype}")
    return image if image.ndim == 4 else image[None]


def patchify(images: list[Tensor] | Tensor, patch_size: int, layout: str = "cpp") -> tuple[Tensor, Tensor]:
    """Cut images into patches and pack them into one tensor.

    Args:
        images: a list of ``[C, H, W]`` images or ``[T, C, H, W]`` clips (``T`` frames of one size), or one
            batched ``[B, C, H, W]`` tensor. ``H`` and ``W`` must be multiples of ``patch_size``.
        patch_size: ``p``.
        layout: element order inside a patch: ``"cpp"`` (channel, row, col: a Conv2d weight flattened) or
            ``"ppc"`` (row, col, channel: what SigLIP2's NaFlex processor emits). Use the model's
            ``config.patch_layout``, or call ``model.patchify``.

    Returns:
        ``patches [sum(T*h*w), C*p*p]`` (patches row-major within each frame, frames and images in order) and
        ``grid_thw`` int64 ``[B, 3]`` on the CPU.
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
        x = frames.reshape(t, c, h, p, w, p)
        x = x.permute(0, 2, 4, 1, 3, 5) if layout == "cpp" else x.permute(0, 2, 4, 3, 5, 1)  # [t, h, w, ...]
        chunks.append(x.reshape(t * h * w, c * p * p))
        grid.append((t, h, w))
    return torch.cat(chunks), torch.tensor(grid, dtype=torch.int64)


def unpatchify(patches: Tensor, grid_thw: Tensor, patch_size: int, layout: str = "cpp") -> list[Tensor]:
    """Inverse of :func:`patchify`: ``[T, C, H, W]`` clips, one per entry of ``grid_thw``."""
    p = patch_size
    out, start = [], 0
    for t, h, w in grid_thw.tolist():
        n = t * h * w
        x = patches[start : start + n]
        start += n
        if layout == "cpp":
            x = x.reshape(t, h, w, -1, p, p).permute(0, 3, 1, 4, 2, 5)  # [t, c, h, p, w, p]
        else:
            x = x.reshape(t, h, w, p, p, -1).permute(0, 5, 1, 3, 2, 4)
        out.append(x.reshape(t, x.shape[1], h * p, w * p))
    return out
