"""Position encodings: one module, one interface, computed once per forward for the whole packed batch.

:class:`Positions` returns :class:`PositionTerms`: an additive term for the patch tokens, rotary angles for the
block sequence, or both (Qwen3-VL adds a resized learned table *and* rotates by 2D RoPE). The encoder adds what
is there and hands the angles to the blocks; it never asks which kind of encoding a model has.

Additive terms (``config.pos_embed``):

- ``"learned"``: a ``rows x cols`` table, resized per distinct image size as ``config.pos_resize`` says
  (SigLIP's, CLIP's and DINOv2's bicubic ``interpolate_pos_encoding``, DINOv2-with-registers' antialiased
  bicubic, SigLIP2 NaFlex's antialiased bilinear, Qwen3-VL's bilinear with aligned corners) or used at its
  trained size only; with ``config.pos_embed_cls`` one more entry for the class token, never resized.
- ``"sincos2d"``: AIMv2-native's fixed 2D sin-cos table, built per image size.

Rotary angles (``config.rope``), from each patch's own (row, col), so any token order inside a frame is right:

- ``"normalized"`` (DINOv3): patch centres scaled to [-1, 1] per image, angles ``2*pi*coord*freq``; in
  training mode, DINOv3's coordinate augmentation (one draw per frame).
- ``"index"`` (Qwen-VL): integer row and column, angles ``coord*freq``.

Both use frequencies ``theta ** -(4i / head_dim)`` and the same layout: row angles, then column angles, the
whole vector tiled twice, so the rotation pairs channel ``j`` with ``j + head_dim/2`` (rotate-half). Prefix
tokens get the identity rotation, or with ``config.rope_cls`` the class token its own learned angles (MLCD).

Tables that depend only on the image size are built in fp32 per *distinct* size and gathered into packed order
with one index; nothing here runs per layer.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import EncoderConfig
from .packing import Packing

__all__ = ["PositionTerms", "Positions"]


@dataclass(frozen=True)
class PositionTerms:
    """What a model's position encoding contributes to one forward.

    Attributes:
        additive: ``[N, D]`` fp32 term added to the patch tokens (input order), or ``None``.
        cls: ``[1, D]`` fp32 term added to the class token (its entry of a learned table), or ``None``.
        rotary: ``(cos, sin)``, each ``[T, 1, head_dim]`` over the block sequence (identity on prefix tokens),
            in the dtype q and k are rotated in, or ``None``.
    """

    additive: Tensor | None = None
    rotary: tuple[Tensor, Tensor] | None = None
    cls: Tensor | None = None


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


SINCOS_TEMPERATURE = 10000.0


class Positions(nn.Module):
    """Every position term of a model (see the module docstring); ``forward`` gives :class:`PositionTerms`.

    The learned table, when there is one, is this module's ``weight`` ``[rows * cols, D]`` (and ``cls``
    ``[1, D]``, the class token's entry); MLCD's class-token angles are ``cls_angles`` ``[1, head_dim / 2]``.
    transformers resizes learned tables in fp32 on the CPU but in the weight dtype on a GPU; we always resize
    in fp32, so a bf16 GPU run is closer to the fp32 result than the reference.
    """

    def __init__(self, config: EncoderConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.config = config
        self.weight = self.cls = self.cls_angles = None
        if config.pos_embed == "learned":
            rows, cols = config.pos_grid
            self.weight = nn.Parameter(
                torch.empty(rows * cols, config.hidden_size, device=device, dtype=dtype)
            )
            nn.init.normal_(self.weight, std=0.02)
        if config.pos_embed_cls:
            self.cls = nn.Parameter(torch.zeros(1, config.hidden_size, device=device, dtype=dtype))
        if config.rope_cls:
            self.cls_angles = nn.Parameter(torch.zeros(1, config.head_dim // 2, device=device, dtype=dtype))
        self._additive = {"none": None, "learned": self._learned, "sincos2d": self._sincos}[config.pos_embed]
        self._coords = {"none": None, "normalized": self._normalized_coords, "index": self._index_coords}[
            config.rope
        ]

    def forward(self, packing: Packing, dtype: torch.dtype) -> PositionTerms:
        """Position terms of ``packing``'s batch; rotary angles come in ``dtype`` (fp32 with ``rope_fp32``)."""
        additive = None
        if self.config.pos_embed == "sincos2d":
            additive = self._sincos_of(packing)
        elif self._additive is not None:
            additive = self._gathered(packing)
        rotary = None
        if self._coords is not None:
            rotary = self._rotary_of(packing, torch.float32 if self.config.rope_fp32 else dtype)
        return PositionTerms(additive, rotary, None if self.cls is None else self.cls.float())

    def check_sizes(self, packing: Packing) -> None:
        """Refuse image sizes a fixed-size learned table cannot take."""
        fixed = self.config.fixed_size
        for h, w in packing.frame_sizes if fixed else ():
            if (h, w) != fixed:
                raise ValueError(
                    f"this model's learned position table is {fixed[0]}x{fixed[1]} patches and was loaded "
                    f"without interpolation, but an image is {h}x{w} patches; resize the image or load with "
                    f"pos_resize='bicubic' (an extension: the reference model has no such option)"
                )

    def _learned(self, h: int, w: int, device: torch.device) -> Tensor:
        gh, gw = self.config.pos_grid
        resize = self.config.pos_resize
        if (h, w) == (gh, gw) and resize in ("none", "bicubic", "bicubic_antialias"):
            return self.weight.float()
        grid = self.weight.float().reshape(1, gh, gw, -1).permute(0, 3, 1, 2)  # [1, D, gh, gw]
        if resize in ("bicubic", "bicubic_antialias"):
            antialias = resize == "bicubic_antialias"
            out = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False, antialias=antialias)
        elif resize == "bilinear_antialias":
            out = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        else:
            out = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=True)
        return out.flatten(2)[0].T  # [h*w, D]

    def _gathered(self, packing: Packing) -> Tensor:
        tables = [self._additive(h, w, packing.device) for h, w in packing.distinct_sizes]
        return torch.cat(tables).index_select(0, packing.size_table_rows)  # [N, D]

    def _sincos_of(self, packing: Packing) -> Tensor:
        """The fixed sin-cos term, kept on the packing from its second eval-mode use, as the rotary tables are.
        Besides saving work, a CUDA graph captured over the packing then reads a tensor the packing keeps
        alive, not one of the shared table cache's, which later sizes may evict and free."""
        if self.training:
            return self._gathered(packing)
        key = ("sincos", self.config.hidden_size, torch.is_inference_mode_enabled())
        term = packing.memo.get(key)
        if term is None:
            term = self._gathered(packing)
            packing.memo[key] = term if key in packing.memo else None
        return term

    def _sincos(self, h: int, w: int, device: torch.device) -> Tensor:
        return _sincos_table(h, w, self.config.hidden_size, SINCOS_TEMPERATURE, device)

    def _normalized_coords(self, packing: Packing) -> Tensor:
        row, col, h, w = packing.patch_coords.float().unbind(1)
        coords = (
            torch.stack([(row + 0.5) / h, (col + 0.5) / w], dim=1) * 2.0 - 1.0
        )  # [N, 2] (y, x) in [-1, 1]
        if self.training:
            coords = self._augment(coords, packing)
        return 2 * math.pi * coords

    def _index_coords(self, packing: Packing) -> Tensor:
        return packing.patch_coords[:, :2].float()  # [N, 2] (row, col)

    def _augment(self, coords: Tensor, packing: Packing) -> Tensor:
        """DINOv3's training-time coordinate augmentation, one draw per segment: random shift, log-uniform
        jitter per axis, log-uniform rescale (each only if configured)."""
        c = self.config
        s, seg = packing.num_segments, packing.patch_segment
        if c.pos_embed_shift is not None:
            coords = (
                coords
                + torch.empty(s, 2, device=coords.device).uniform_(-c.pos_embed_shift, c.pos_embed_shift)[seg]
            )
        if c.pos_embed_jitter is not None:
            r = math.log(c.pos_embed_jitter)
            coords = coords * torch.empty(s, 2, device=coords.device).uniform_(-r, r).exp()[seg]
        if c.pos_embed_rescale is not None:
            r = math.log(c.pos_embed_rescale)
            coords = coords * torch.empty(s, 1, device=coords.device).uniform_(-r, r).exp()[seg]
        return coords

    def _exponents(self, dh: int, device: torch.device) -> Tensor:
        # 4i / head_dim for i < head_dim / 4, spelled as each reference spells it: the two spellings round
        # differently in fp32, and angles of far-away patches magnify that.
        if self.config.rope == "normalized":
            return torch.arange(0, 1, 4 / dh, dtype=torch.float32, device=device)
        return torch.arange(0, dh // 2, 2, dtype=torch.float32, device=device) / (dh // 2)

    def _rotary_of(self, packing: Packing, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The rotary tables. In eval mode they depend on the packing and the rope settings alone, so the
        second forward over one packing (fixed-size serving: the model keeps its recent packings) keeps them
        on it, and later forwards skip the thirty-odd operations that make them. A packing used once (mixed
        sizes) keeps nothing but the note that it was used."""
        if self.training or self.cls_angles is not None:  # augmented, or learned: made anew every forward
            return self._rotary(self._coords(packing), packing, dtype)
        c = self.config
        # Tables made in inference mode may only be read there, so they are kept apart from the others.
        key = ("rotary", c.rope, c.rope_theta, c.head_dim, dtype, torch.is_inference_mode_enabled())
        tables = packing.memo.get(key)
        if tables is None:
            with torch.no_grad():  # a function of the packing alone: nothing to differentiate
                tables = self._rotary(self._coords(packing), packing, dtype)
            packing.memo[key] = tables if key in packing.memo else None
        return tables

    def _rotary(self, coords: Tensor, packing: Packing, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        dh = self.config.head_dim
        freqs = 1.0 / self.config.rope_theta ** self._exponents(dh, coords.device)  # [Dh/4]
        angles = (coords[:, :, None] * freqs).flatten(1).tile(2)  # [N, Dh]: row angles, col angles, twice
        prefix = angles.new_zeros(packing.num_prefix, dh)  # prefix rows: identity rotation (angle 0) ...
        if self.cls_angles is not None:  # ... or the class token's own
            prefix = torch.cat([self.cls_angles.float().tile(2), prefix[1:]])
        cos = packing.to_blocks(angles.cos(), prefix.cos())
        sin = packing.to_blocks(angles.sin(), prefix.sin())
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]
