"""The one configuration of the one encoder: a frozen dataclass that every family maps onto.

Families differ only in a handful of switches (norm, MLP kind, biases, layer scale, how positions are encoded,
prefix tokens, pooling head); everything else is shared. The dataclass is frozen and has no ``__post_init__``
that rewrites fields: what you read is what was written. JSON round trip is strict: an unknown or missing
field is an error, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "EncoderConfig"]

FORMAT_NAME = "packvit-native"
FORMAT_VERSION = 1

Family = Literal["dinov3", "aimv2", "siglip", "siglip2"]
MlpKind = Literal["mlp", "swiglu"]
Activation = Literal["gelu", "gelu_tanh", "silu", "quick_gelu"]
NormKind = Literal["layernorm", "rmsnorm"]
PositionKind = Literal["rope2d", "sincos2d", "learned"]
PositionResize = Literal["none", "bicubic", "bilinear_antialias"]
HeadKind = Literal["none", "cls", "map", "attention_pool"]
PatchLayout = Literal["cpp", "ppc"]

_CHOICES: dict[str, tuple[str, ...]] = {
    "family": Family.__args__,
    "mlp": MlpKind.__args__,
    "activation": Activation.__args__,
    "norm": NormKind.__args__,
    "positions": PositionKind.__args__,
    "pos_resize": PositionResize.__args__,
    "head": HeadKind.__args__,
    "patch_layout": PatchLayout.__args__,
}


@dataclass(frozen=True)
class EncoderConfig:
    """Architecture of a packed ViT encoder.

    Args:
        family: which source model family the weights come from (decides nothing by itself; recorded for
            conversion checks and error messages).
        patch_size: side of a square patch in pixels.
        num_channels: image channels.
        hidden_size: token width ``D``.
        num_layers: number of transformer blocks.
        num_heads: attention heads; ``D`` must be divisible by it.
        mlp_hidden: hidden width of the MLP (of each branch, for SwiGLU).
        mlp: ``"mlp"`` (fc1 -> act -> fc2) or ``"swiglu"`` (act(gate) * up -> down).
        activation: ``"gelu"`` (erf), ``"gelu_tanh"``, ``"silu"`` or ``"quick_gelu"``.
        norm: ``"layernorm"`` or ``"rmsnorm"`` (for every norm in the model).
        norm_eps: epsilon of every norm.
        qkv_bias / proj_bias / mlp_bias / patch_bias: whether those linears have biases.
        key_bias: with ``qkv_bias``, whether the key projection has a bias of its own. ``False`` (DINOv3):
            the key third of the fused q/k/v bias is zero and held there (it gets no gradient).
        patch_norm: a norm right after the patch embedding (AIMv2).
        layer_scale: layer scale on both residual branches (DINOv3).
        num_cls: class tokens at the start of every segment (0 or 1).
        num_registers: register tokens after the class token.
        positions: ``"rope2d"`` (rotary on patch-centre coordinates), ``"sincos2d"`` (fixed additive table
            built per image size) or ``"learned"`` (additive learned grid).
        rope_theta: RoPE base period.
        pos_grid: ``(rows, cols)`` of a learned position table.
        pos_resize: how a learned table meets an image of another size: ``"none"`` (exact size only),
            ``"bicubic"`` or ``"bilinear_antialias"``.
        final_norm: a norm after the last block.
        head: pooled output: ``"none"``, ``"cls"`` (normed class token), ``"map"`` (SigLIP multi-head attention
            pooling) or ``"attention_pool"`` (AIMv2 attention pooling).
        patch_layout: per-patch element order of the input: ``"cpp"`` (channel, row, col) or ``"ppc"``
            (row, col, channel).
        merge_size: token order inside each frame, for inputs and outputs alike: ``1`` is row-major; ``m > 1``
            is merge order (each ``m x m`` block of patches contiguous, blocks row-major), which a Qwen-style
            spatial merger reshapes without a gather. Not part of the weights: ``patchify``,
            :func:`~packvit_native.preprocess` and the forward all read it from here, so they always agree.
        image_mean / image_std: per-channel normalisation the checkpoint expects.
        pos_embed_shift / pos_embed_jitter / pos_embed_rescale: DINOv3 RoPE coordinate augmentation used in
            training mode (``None`` disables each).
        drop_path_rate: stochastic depth in training mode: the probability that a block's residual branch is
            dropped for a whole image (segment); every block uses the same rate, as DINOv3 does.
    """

    family: Family
    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_hidden: int
    num_channels: int = 3
    mlp: MlpKind = "mlp"
    activation: Activation = "gelu"
    norm: NormKind = "layernorm"
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    key_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True
    patch_bias: bool = True
    patch_norm: bool = False
    layer_scale: bool = False
    num_cls: int = 0
    num_registers: int = 0
    positions: PositionKind = "rope2d"
    rope_theta: float = 100.0
    pos_grid: tuple[int, int] | None = None
    pos_resize: PositionResize = "none"
    final_norm: bool = True
    head: HeadKind = "none"
    patch_layout: PatchLayout = "cpp"
    merge_size: int = 1
    image_mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    image_std: tuple[float, ...] = (0.229, 0.224, 0.225)
    pos_embed_shift: float | None = None
    pos_embed_jitter: float | None = None
    pos_embed_rescale: float | None = None
    drop_path_rate: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_prefix(self) -> int:
        return self.num_cls + self.num_registers

    @property
    def patch_dim(self) -> int:
        return self.num_channels * self.patch_size**2

    def validate(self) -> EncoderConfig:
        """Raise ``ValueError`` on an inconsistent configuration; return self for chaining."""
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"config.{name} = {getattr(self, name)!r}; allowed: {list(allowed)}")
        for name in (
            "patch_size", "hidden_size", "num_layers", "num_heads", "mlp_hidden", "num_channels", "merge_size",
        ):  # fmt: skip
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"config.{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.positions == "rope2d" and self.head_dim % 4:
            raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {self.head_dim}")
        if self.positions == "sincos2d" and self.hidden_size % 4:
            raise ValueError(f"2D sin-cos positions need hidden_size divisible by 4, got {self.hidden_size}")
        if (self.positions == "learned") != (self.pos_grid is not None):
            raise ValueError("pos_grid is required with learned positions and only with them")
        if self.pos_grid is not None and (
            len(self.pos_grid) != 2 or any(not isinstance(n, int) or n < 1 for n in self.pos_grid)
        ):
            raise ValueError(f"pos_grid must be (rows, cols) of positive integers, got {self.pos_grid!r}")
        if self.pos_resize != "none" and self.positions != "learned":
            raise ValueError(f"pos_resize applies to learned positions only, not {self.positions!r}")
        if self.num_cls not in (0, 1) or self.num_registers < 0:
            raise ValueError("num_cls must be 0 or 1 and num_registers >= 0")
        if self.head == "cls" and not self.num_cls:
            raise ValueError('head="cls" needs a class token (num_cls=1)')
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate!r}")
        if len(self.image_mean) != self.num_channels or len(self.image_std) != self.num_channels:
            raise ValueError("image_mean and image_std need one value per channel")
        return self

    def replace(self, **changes: Any) -> EncoderConfig:
        return dataclasses.replace(self, **changes).validate()

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderConfig:
        data = dict(data)
        if data.pop("format", None) != FORMAT_NAME:
            raise ValueError(f"not a {FORMAT_NAME} config (its 'format' field is missing or different)")
        version = data.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(
                f"unsupported {FORMAT_NAME} config version {version!r}; expected {FORMAT_VERSION}"
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"unknown config fields: {unknown}")
        for name in ("pos_grid", "image_mean", "image_std"):
            if isinstance(data.get(name), list):
                data[name] = tuple(data[name])
        try:
            return cls(**data).validate()
        except TypeError as e:  # a missing required field
            raise ValueError(f"invalid {FORMAT_NAME} config: {e}") from None

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> EncoderConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
