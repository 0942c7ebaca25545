"""Position encodings, each computed once per forward for the whole packed batch.

- :class:`Rope2D` (DINOv3): rotary angles from patch-centre coordinates normalised to [-1, 1] per image; prefix
  tokens get the identity rotation (cos = 1, sin = 0).
- :class:`SinCos2D` (AIMv2 native): a fixed additive sin-cos table per image size.
- :class:`LearnedGrid` (SigLIP, SigLIP2, fixed-size AIMv2): an additive learned table of ``rows x cols``,
  resized to each distinct image size once per forward.

Tables that depend only on the image size are built in fp32 per *distinct* size and gathered into packed order
with one index; nothing here runs per layer.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import EncoderConfig
from .packing import Packing, _to_device

__all__ = ["LearnedGrid", "Rope2D", "SinCos2D", "build_positions"]


def _size_table_rows(packing: Packing) -> tuple[tuple[tuple[int, int], ...], Tensor]:
    """Distinct frame sizes, and for each patch its row in the concatenation of per-size row-major tables.

    Rows come from each patch's own (row, col), so any token order inside a frame is honoured.
    """
    distinct = tuple(dict.fromkeys(packing.frame_sizes))
    offsets, start = {}, 0
    for h, w in distinct:
        offsets[(h, w)] = start
        start += h * w
    seg_offset = torch.tensor([offsets[s] for s in packing.frame_sizes], dtype=torch.int64)  # [S]
    seg_offset = _to_device(seg_offset, packing.patch_coords.device)
    row, col, _, w = packing.patch_coords.long().unbind(1)
    return distinct, seg_offset[packing.patch_segment] + row * w + col  # [N]


class Rope2D(nn.Module):
    """DINOv3's 2D RoPE: per-axis frequencies ``theta ** -(4i / head_dim)``, angles ``2*pi*coord*freq``.

    The y and x angle halves are concatenated and the whole vector tiled twice, so the rotation pairs channel
    ``j`` with ``j + head_dim/2`` (rotate-half layout). Angles are computed in fp32 as the reference does and
    cast to the activation dtype once per forward.

    In training mode the coordinates are augmented as DINOv3 trains (random shift, log-uniform jitter per axis,
    log-uniform rescale), with one draw per segment: each packed image is augmented as if it were its own batch.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.theta = config.rope_theta
        self.shift = config.pos_embed_shift
        self.jitter = config.pos_embed_jitter
        self.rescale = config.pos_embed_rescale

    def _augment(self, coords: Tensor, packing: Packing) -> Tensor:
        s = packing.num_segments
        seg = packing.patch_segment
        if self.shift is not None:
            coords = coords + torch.empty(s, 2, device=coords.device).uniform_(-self.shift, self.shift)[seg]
        if self.jitter is not None:
            r = math.log(self.jitter)
            coords = coords * torch.empty(s, 2, device=coords.device).uniform_(-r, r).exp()[seg]
        if self.rescale is not None:
            r = math.log(self.rescale)
            coords = coords * torch.empty(s, 1, device=coords.device).uniform_(-r, r).exp()[seg]
        return coords

    def forward(self, packing: Packing, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(cos, sin)``, each ``[T, 1, head_dim]`` over the full packed sequence, prefix rows included."""
        pc = packing.patch_coords.float()  # [N, 4]: row, col, h, w
        row, col, h, w = pc.unbind(1)
        coords = (
            torch.stack([(row + 0.5) / h, (col + 0.5) / w], dim=1) * 2.0 - 1.0
        )  # [N, 2] (y, x) in [-1, 1]
        if self.training:
            coords = self._augment(coords, packing)
        freqs = 1.0 / self.theta ** torch.arange(0, 1, 4 / self.head_dim, device=pc.device)  # [Dh/4]
        angles = (2 * math.pi * coords[:, :, None] * freqs).flatten(1).tile(2)  # [N, Dh]
        ones = angles.new_ones(packing.num_prefix, self.head_dim)
        cos = packing.insert_prefix(angles.cos(), ones)  # prefix rows: identity rotation
        sin = packing.insert_prefix(angles.sin(), ones.zero_())
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


@functools.lru_cache(maxsize=64)
def _sincos_table(h: int, w: int, dim: int, temperature: float, device: torch.device) -> Tensor:
    # AIMv2's layout: [sin(x*omega), cos(x*omega), sin(y*omega), cos(y*omega)], each dim/4 wide, with x the
    # column and y the row index. Built in float64 as transformers builds it, then stored as fp32.
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64, device=device) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float64, device=device),
        torch.arange(w, dtype=torch.float64, device=device),
        indexing="ij",
    )
    out_x = xs.flatten()[:, None] * omega[None, :]  # [h*w, dim/4]
    out_y = ys.flatten()[:, None] * omega[None, :]
    return torch.cat([out_x.sin(), out_x.cos(), out_y.sin(), out_y.cos()], dim=1).float()  # [h*w, dim]


class SinCos2D(nn.Module):
    """AIMv2-native fixed 2D sin-cos table, built per image size (cached across forwards) in fp32."""

    def __init__(self, config: EncoderConfig, temperature: float = 10000.0) -> None:
        super().__init__()
        self.dim = config.hidden_size
        self.temperature = temperature

    def forward(self, packing: Packing) -> Tensor:
        """``[N, D]`` fp32 additive embeddings in packed patch order (cached per size across forwards)."""
        distinct, rows = _size_table_rows(packing)
        device = packing.patch_coords.device
        tables = [_sincos_table(h, w, self.dim, self.temperature, device) for h, w in distinct]
        return torch.cat(tables).index_select(0, rows)


class LearnedGrid(nn.Module):
    """Additive learned position table of ``rows x cols`` entries, resized per distinct image size.

    ``resize="none"`` accepts only the trained grid; ``"bicubic"`` follows SigLIP's ``interpolate_pos_encoding``
    (exact table at the trained square size, bicubic otherwise); ``"bilinear_antialias"`` follows SigLIP2
    NaFlex, resizing in fp32 for every image. transformers resizes in fp32 only on the CPU and in the weight
    dtype on a GPU; we always resize in fp32, so a bf16 GPU run is closer to the fp32 result than the reference.
    """

    def __init__(self, config: EncoderConfig, device=None, dtype=None) -> None:
        super().__init__()
        assert config.pos_grid is not None
        self.grid = config.pos_grid
        self.resize = config.pos_resize
        self.weight = nn.Parameter(
            torch.empty(self.grid[0] * self.grid[1], config.hidden_size, device=device, dtype=dtype)
        )
        nn.init.normal_(self.weight, std=0.02)

    def check_sizes(self, packing: Packing) -> None:
        if self.resize != "none":
            return
        for h, w in packing.frame_sizes:
            if (h, w) != self.grid:
                raise ValueError(
                    f"this model's learned position table is {self.grid[0]}x{self.grid[1]} patches and was "
                    f"loaded without interpolation, but an image is {h}x{w} patches; resize the image or load "
                    f"with pos_resize='bicubic' (an extension: the reference model has no such option)"
                )

    def _table(self, h: int, w: int) -> Tensor:
        gh, gw = self.grid
        if (h, w) == (gh, gw) and (self.resize != "bilinear_antialias"):
            return self.weight
        grid = self.weight.reshape(1, gh, gw, -1).permute(0, 3, 1, 2)  # [1, D, gh, gw]
        if self.resize == "bicubic":
            out = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        else:
            # SigLIP2 resizes in fp32 (antialiased bilinear has no half-precision CPU kernel) and casts back.
            out = F.interpolate(
                grid.float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True
            )
        return out.to(self.weight.dtype).flatten(2)[0].T  # [h*w, D]

    def forward(self, packing: Packing) -> Tensor:
        """``[N, D]`` additive embeddings in packed patch order."""
        self.check_sizes(packing)
        distinct, rows = _size_table_rows(packing)
        return torch.cat([self._table(h, w) for h, w in distinct]).index_select(0, rows)


def build_positions(config: EncoderConfig, device=None, dtype=None) -> nn.Module:
    if config.positions == "rope2d":
        return Rope2D(config)
    if config.positions == "sincos2d":
        return SinCos2D(config)
    return LearnedGrid(config, device=device, dtype=dtype)
