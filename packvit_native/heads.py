"""Pooling heads: one pooled vector per segment, computed from the final packed tokens."""

from __future__ import annotations

from torch import Tensor, nn

from .config import EncoderConfig
from .packing import Packing

__all__ = ["ClsHead", "build_head"]


class ClsHead(nn.Module):
    """The final-normed class token of each segment (DINOv3's pooler output)."""

    def forward(self, x: Tensor, packing: Packing, backend: str) -> Tensor:
        return packing.prefix_tokens(x)[:, 0]  # [S, D]


def build_head(config: EncoderConfig, device=None, dtype=None) -> nn.Module | None:
    if config.head == "cls":
        return ClsHead()
    return None
