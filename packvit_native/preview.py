"""A picture of the features: the first three principal components of an image's patch tokens as RGB.

The DINO-style feature map (Oquab et al., "DINOv2: Learning Robust Visual Features without Supervision", 2023,
figure 1): each image's patch tokens are centred, projected on their own first three principal components
(computed per image, in float32), and each component is scaled to ``[0, 255]`` over that image. Patches that
the model sees as alike get alike colours. Signs of principal components are arbitrary; each is fixed so that
its largest-magnitude loading is positive, so the same tokens always give the same picture.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from . import atomic

__all__ = ["pca_rgb", "write_png"]


def pca_rgb(tokens: Tensor, h: int, w: int, merge_size: int = 1) -> np.ndarray:
    """``uint8 [h, w, 3]``: the first ``h * w`` rows of ``tokens [n, D]`` (one frame, in the model's token order:
    row-major, or ``merge_size x merge_size`` blocks) projected on their first three principal components."""
    x = tokens[: h * w].detach().float()
    x = x - x.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(x, full_matrices=False)  # rows of v: principal directions, largest first
    v = v[:3]
    v = v * torch.where(v.gather(1, v.abs().argmax(1, keepdim=True)) < 0, -1.0, 1.0)  # fix the signs
    proj = x @ v.T  # [h*w, <=3]
    if proj.shape[1] < 3:  # fewer tokens or dimensions than components
        proj = torch.cat([proj, proj.new_zeros(proj.shape[0], 3 - proj.shape[1])], 1)
    lo, hi = proj.min(0).values, proj.max(0).values
    rgb = ((proj - lo) / (hi - lo).clamp_min(1e-12) * 255).round().to(torch.uint8)
    m = merge_size
    if m > 1:  # merge order: blocks row-major, each block's m x m tokens row-major -> plain row-major
        rgb = rgb.reshape(h // m, w // m, m, m, 3).permute(0, 2, 1, 3, 4)
    return rgb.reshape(h, w, 3).cpu().numpy()


def write_png(path: Path, rgb: np.ndarray, scale: int = 1) -> None:
    """Write ``rgb [h, w, 3]`` as a PNG, each patch ``scale`` pixels wide (nearest neighbour), atomically."""
    image = Image.fromarray(rgb, "RGB")
    if scale > 1:
        image = image.resize((rgb.shape[1] * scale, rgb.shape[0] * scale), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_file(path, lambda tmp: image.save(tmp, format="PNG"))
