"""The one configuration of the one encoder: a frozen dataclass that every family maps onto.

Towers differ in a handful of switches (norm, MLP kind, biases, layer scale, which position terms they add or
rotate by, prefix tokens, attention windows, output heads) and in how their images are prepared (resampling
filter, default size rule); all of it is data here, written by the converter. The runtime reads these fields
and never a family's name: ``family`` is recorded for messages and checks only.

The dataclass is frozen and has no ``__post_init__`` that rewrites fields: what you read is what was written.
The JSON round trip is strict: an unknown field is an error, never silently dropped. Version 1 files (written
before the fields above replaced per-family tables) are migrated on read, see :func:`_from_v1`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "PATCH_LAYOUT_ALIASES", "EncoderConfig", "patch_layout_name"]

FORMAT_NAME = "packvit-native"
FORMAT_VERSION = 2

MlpKind = Literal["mlp", "swiglu"]
Activation = Literal["gelu", "gelu_tanh", "silu", "quick_gelu"]
NormKind = Literal["layernorm", "rmsnorm"]
PosEmbedKind = Literal["none", "learned", "sincos2d"]
PositionResize = Literal["none", "bicubic", "bicubic_antialias", "bilinear_antialias", "bilinear_corners"]
RopeKind = Literal["none", "normalized", "index"]
HeadKind = Literal["none", "cls", "cls_norm", "mean", "map", "attention_pool", "merger"]
PatchLayout = Literal["chw", "hwc"]
Resample = Literal["bilinear", "bicubic"]

# Earlier names of the patch layouts, still accepted wherever a layout is given.
PATCH_LAYOUT_ALIASES = {"cpp": "chw", "ppc": "hwc"}

_CHOICES: dict[str, tuple[str, ...]] = {
    "mlp": MlpKind.__args__,
    "activation": Activation.__args__,
    "norm": NormKind.__args__,
    "pos_embed": PosEmbedKind.__args__,
    "pos_resize": PositionResize.__args__,
    "rope": RopeKind.__args__,
    "head": HeadKind.__args__,
    "patch_layout": PatchLayout.__args__,
    "resample": Resample.__args__,
}
_POSITIVE_INTS = (
    "patch_size", "hidden_size", "num_layers", "num_heads", "mlp_hidden", "num_channels", "merge_size",
    "temporal_patch_size",
)  # fmt: skip
_BOOLS = (
    "qkv_bias", "key_bias", "proj_bias", "mlp_bias", "patch_bias", "patch_norm", "layer_scale", "final_norm",
    "rope_fp32", "pos_embed_cls", "rope_cls", "embed_norm", "qk_norm",
)  # fmt: skip
_TUPLES = ("pos_grid", "image_mean", "image_std", "full_attention_blocks", "deepstack_layers")


def patch_layout_name(layout: str) -> str:
    """A patch layout by its current name (``"chw"`` / ``"hwc"``), accepting the earlier ``"cpp"`` / ``"ppc"``."""
    name = PATCH_LAYOUT_ALIASES.get(layout, layout)
    if name not in PatchLayout.__args__:
        raise ValueError(f"patch layout must be 'chw' or 'hwc' (or 'cpp' / 'ppc'), got {layout!r}")
    return name


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class EncoderConfig:
    """Architecture of a packed ViT encoder, and how its images are prepared.

    Args:
        family: the source model family (recorded for messages and checks; the runtime never branches on it).
        patch_size: side of a square patch in pixels.
        num_channels: image channels.
        temporal_patch_size: frames per patch (``T``): a patch covers ``T`` consecutive frames (Qwen-VL's
            Conv3d stem); a still image is its frame repeated ``T`` times. ``1`` for 2D patches.
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
        patch_norm: a norm right after the patch embedding, on the patch tokens (AIMv2).
        embed_norm: a norm over the whole sequence after the embeddings (positions added, prefix tokens
            inserted), before the first block (CLIP's and MLCD's ``pre_layrnorm``).
        qk_norm: an RMS norm (epsilon ``norm_eps``) over all heads of q and of k, before they are split into
            heads (InternViT-6B).
        layer_scale: layer scale on both residual branches (DINOv3).
        num_cls: class tokens at the start of every segment (0 or 1).
        num_registers: register tokens after the class token.
        pos_embed: the additive position term: ``"none"``, ``"learned"`` (a learned ``pos_grid`` table) or
            ``"sincos2d"`` (a fixed 2D sin-cos table built per image size).
        pos_grid: ``(rows, cols)`` of a learned position table.
        pos_resize: how a learned table meets an image of another size: ``"none"`` (exact size only),
            ``"bicubic"`` (exact at the trained size, else bicubic), ``"bicubic_antialias"`` (the same with an
            antialiased bicubic), ``"bilinear_antialias"`` (always resized, antialiased) or ``"bilinear_corners"``
            (always resized, bilinear with aligned corners).
        pos_embed_cls: the additive table has an entry of its own for the class token (CLIP, DINOv2,
            InternViT): ``positions.cls``, added to the class token; registers get none.
        rope: the rotary position term over each patch's (row, column): ``"none"``, ``"normalized"``
            (patch centres scaled to [-1, 1] per image, angles ``2*pi*coord*freq``) or ``"index"`` (integer
            row and column, angles ``coord*freq``). Prefix tokens get the identity rotation, unless ``rope_cls``.
        rope_cls: the class token has learned rotary angles of its own (``positions.cls_angles``,
            ``head_dim / 2`` of them, used for both halves; MLCD).
        rope_theta: RoPE base period.
        rope_fp32: rotate q and k in fp32 and cast back (as Qwen-VL does), instead of in the activation dtype.
        window_size: side of the attention windows in patches (a multiple of ``merge_size``); ``0`` for none.
            Windows tile each frame from its top-left corner, whole ``merge_size`` blocks each; those at the
            right and bottom edges may be partial.
        full_attention_blocks: with windows, the (0-based) blocks that attend over whole frames instead.
        final_norm: a norm after the last block.
        head: pooled output: ``"none"``, ``"cls"`` (the class token after the final norm), ``"cls_norm"`` (the
            class token through a norm of the head's own, CLIP's ``post_layernorm``), ``"mean"`` (the mean of
            each frame's patch tokens after the final norm), ``"map"`` (SigLIP multi-head attention pooling), ``"attention_pool"`` (AIMv2 attention pooling) or ``"merger"`` (one row per
            ``merge_size x merge_size`` block: norm, then an MLP over the block's concatenated tokens).
        out_hidden_size: output width of the merger (and of the deepstack mergers).
        projection_dim: width of a bias-free projection of the pooled output (CLIP's ``visual_projection``),
            returned as ``image_embeds``; ``None`` for none.
        deepstack_layers: layers (numbered as ``hidden_states``: ``i`` is block ``i``'s output) whose tokens
            also go through a merger of their own, normed after the blocks are concatenated (Qwen3-VL).
        patch_layout: element order inside an input patch: ``"chw"`` (channel, frame, row, col: a Conv
            weight flattened) or ``"hwc"`` (frame, row, col, channel).
        merge_size: token order inside each frame, for inputs and outputs alike: ``1`` is row-major; ``m > 1``
            is merge order (each ``m x m`` block of patches contiguous, blocks row-major), which a Qwen-style
            spatial merger reshapes without a gather. ``patchify``, :func:`~packvit_native.preprocess` and the
            forward all read it from here, so they always agree. A merger head or windows fix it.
        resample: the filter images are resized with (what the checkpoint's image processor uses).
        resize_max_patches: default size rule: fill this many patches per frame (SigLIP2 NaFlex).
        resize_min_pixels / resize_max_pixels: default size rule: native resolution within this pixel area.
            With no rule set, :func:`~packvit_native.preprocess.default_resize` picks one.
        image_mean / image_std: per-channel normalisation the checkpoint expects.
        pos_embed_shift / pos_embed_jitter / pos_embed_rescale: DINOv3 RoPE coordinate augmentation used in
            training mode (``None`` disables each).
        drop_path_rate: stochastic depth in training mode: the probability that a block's residual branch is
            dropped for a whole image (segment); every block uses the same rate, as DINOv3 does.
    """

    family: str
    patch_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    mlp_hidden: int
    num_channels: int = 3
    temporal_patch_size: int = 1
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
    embed_norm: bool = False
    qk_norm: bool = False
    layer_scale: bool = False
    num_cls: int = 0
    num_registers: int = 0
    pos_embed: PosEmbedKind = "none"
    pos_grid: tuple[int, int] | None = None
    pos_resize: PositionResize = "none"
    pos_embed_cls: bool = False
    rope: RopeKind = "none"
    rope_theta: float = 100.0
    rope_fp32: bool = False
    rope_cls: bool = False
    window_size: int = 0
    full_attention_blocks: tuple[int, ...] = ()
    final_norm: bool = True
    head: HeadKind = "none"
    out_hidden_size: int | None = None
    deepstack_layers: tuple[int, ...] = ()
    projection_dim: int | None = None
    patch_layout: PatchLayout = "chw"
    merge_size: int = 1
    resample: Resample = "bilinear"
    resize_max_patches: int | None = None
    resize_min_pixels: int | None = None
    resize_max_pixels: int | None = None
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
        """Values per input patch: ``C * T * p * p``."""
        return self.num_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def positions(self) -> str:
        """The earlier single position field (``"rope2d"``, ``"sincos2d"``, ``"learned"``), for code written
        against it; ``"none"`` or ``"learned+rope"`` where the model has neither or both."""
        rotary = self.rope != "none"
        if self.pos_embed == "none":
            return "rope2d" if rotary else "none"
        return f"{self.pos_embed}+rope" if rotary else self.pos_embed

    @property
    def fixed_size(self) -> tuple[int, int] | None:
        """``(rows, cols)`` in patches if the model runs at one size only (a learned table it cannot resize)."""
        fixed = self.pos_embed == "learned" and self.pos_resize == "none"
        return tuple(self.pos_grid) if fixed else None  # a list when the config was built in Python

    @property
    def merge_fixed(self) -> bool:
        """Whether the weights depend on ``merge_size`` (mergers and windows group ``m x m`` blocks)."""
        return self.head == "merger" or bool(self.deepstack_layers) or self.window_size > 0

    def validate(self) -> EncoderConfig:
        """Raise ``ValueError`` on an inconsistent configuration; return self for chaining."""
        if not isinstance(self.family, str) or not self.family:
            raise ValueError(f"config.family must be a non-empty string, got {self.family!r}")
        for name, allowed in _CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"config.{name} = {getattr(self, name)!r}; allowed: {list(allowed)}")
        for name in _POSITIVE_INTS:
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"config.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"config.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("norm_eps", "rope_theta"):
            if not _is_number(getattr(self, name)) or getattr(self, name) <= 0:
                raise ValueError(
                    f"config.{name} must be a positive finite number, got {getattr(self, name)!r}"
                )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.rope != "none" and self.head_dim % 4:
            raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {self.head_dim}")
        if self.pos_embed == "sincos2d" and self.hidden_size % 4:
            raise ValueError(f"2D sin-cos positions need hidden_size divisible by 4, got {self.hidden_size}")
        if (self.pos_embed == "learned") != (self.pos_grid is not None):
            raise ValueError("pos_grid is required with learned positions and only with them")
        if self.pos_grid is not None and (
            len(self.pos_grid) != 2 or any(not _is_int(n) or n < 1 for n in self.pos_grid)
        ):
            raise ValueError(f"pos_grid must be (rows, cols) of positive integers, got {self.pos_grid!r}")
        if self.pos_resize != "none" and self.pos_embed != "learned":
            raise ValueError(f"pos_resize applies to learned positions only, not {self.pos_embed!r}")
        if not _is_int(self.num_cls) or not _is_int(self.num_registers):
            raise ValueError("num_cls and num_registers must be integers")
        if self.num_cls not in (0, 1) or self.num_registers < 0:
            raise ValueError("num_cls must be 0 or 1 and num_registers >= 0")
        if self.head in ("cls", "cls_norm") and not self.num_cls:
            raise ValueError(f'head="{self.head}" needs a class token (num_cls=1)')
        if self.pos_embed_cls and (self.pos_embed != "learned" or not self.num_cls):
            raise ValueError("pos_embed_cls needs a learned position table and a class token")
        if self.rope_cls and (self.rope == "none" or not self.num_cls):
            raise ValueError("rope_cls needs rotary positions and a class token")
        if self.projection_dim is not None and (
            not _is_int(self.projection_dim) or self.projection_dim < 1 or self.head in ("none", "merger")
        ):
            raise ValueError(
                f"projection_dim must be a positive integer on a pooling head, got {self.projection_dim!r}"
            )
        self._validate_windows()
        self._validate_mergers()
        if not _is_number(self.drop_path_rate) or not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate!r}")
        for name in ("pos_embed_shift", "pos_embed_jitter", "pos_embed_rescale"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or value < 0):
                raise ValueError(f"config.{name} must be a non-negative number or null, got {value!r}")
        self._validate_image_stats()
        return self

    def _validate_windows(self) -> None:
        if not _is_int(self.window_size) or self.window_size < 0:
            raise ValueError(f"window_size must be a non-negative integer, got {self.window_size!r}")
        if self.window_size and self.window_size % self.merge_size:
            raise ValueError(
                f"window_size {self.window_size} is not a whole number of {self.merge_size}x{self.merge_size} "
                "merge blocks"
            )
        if self.window_size and self.num_prefix:
            raise ValueError("attention windows and prefix tokens cannot be combined")
        if self.full_attention_blocks and not self.window_size:
            raise ValueError(
                "full_attention_blocks needs window_size > 0 (without windows every block is full)"
            )
        for i in self.full_attention_blocks:
            if not _is_int(i) or not 0 <= i < self.num_layers:
                raise ValueError(
                    f"full_attention_blocks entry {i!r} is not a block index 0..{self.num_layers - 1}"
                )

    def _validate_mergers(self) -> None:
        needs_width = self.head == "merger" or bool(self.deepstack_layers)
        if needs_width != (self.out_hidden_size is not None):
            raise ValueError(
                "out_hidden_size is required by a merger head or deepstack layers, and only by them"
            )
        if needs_width and (not _is_int(self.out_hidden_size) or self.out_hidden_size < 1):
            raise ValueError(f"out_hidden_size must be a positive integer, got {self.out_hidden_size!r}")
        if needs_width and self.num_prefix:
            raise ValueError("merger outputs and prefix tokens cannot be combined")
        for i in self.deepstack_layers:
            if not _is_int(i) or not 1 <= i <= self.num_layers:
                raise ValueError(f"deepstack_layers entry {i!r} is not a block output 1..{self.num_layers}")

    def _validate_image_stats(self) -> None:
        for name in ("resize_max_patches", "resize_min_pixels", "resize_max_pixels"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise ValueError(f"config.{name} must be a non-negative integer or null, got {value!r}")
        if self.resize_max_patches is not None and (
            self.resize_min_pixels is not None or self.resize_max_pixels is not None
        ):
            raise ValueError("give one default size rule: resize_max_patches or resize_min/max_pixels")
        if len(self.image_mean) != self.num_channels or len(self.image_std) != self.num_channels:
            raise ValueError("image_mean and image_std need one value per channel")
        if not all(_is_number(m) for m in self.image_mean) or not all(
            _is_number(s) and s > 0 for s in self.image_std
        ):
            raise ValueError(
                f"image_mean must be finite numbers and image_std positive ones, got {self.image_mean!r} and "
                f"{self.image_std!r}"
            )

    def replace(self, **changes: Any) -> EncoderConfig:
        return dataclasses.replace(self, **changes).validate()

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a {FORMAT_NAME} config must be a JSON object, got {type(data).__name__}")
        data = dict(data)
        if data.pop("format", None) != FORMAT_NAME:
            raise ValueError(f"not a {FORMAT_NAME} config (its 'format' field is missing or different)")
        version = data.pop("format_version", None)
        if version == 1:
            data = _from_v1(data)
        elif version != FORMAT_VERSION:
            raise ValueError(
                f"unsupported {FORMAT_NAME} config version {version!r}; this release reads 1 and {FORMAT_VERSION}"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"unknown config fields: {unknown}")
        for name in _TUPLES:
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


_V1_POSITIONS = {
    "rope2d": ("none", "normalized"),
    "sincos2d": ("sincos2d", "none"),
    "learned": ("learned", "none"),
}


def _from_v1(data: dict[str, Any]) -> dict[str, Any]:
    data = dict(data)
    positions = data.pop("positions", "rope2d")
    if positions not in _V1_POSITIONS:
        raise ValueError(f"config.positions = {positions!r}; allowed in version 1: {list(_V1_POSITIONS)}")
    data["pos_embed"], data["rope"] = _V1_POSITIONS[positions]
    data["patch_layout"] = PATCH_LAYOUT_ALIASES.get(data.get("patch_layout", "cpp"), data.get("patch_layout"))
    # Version 1 recorded the family and left its preprocessing defaults to per-family tables in the runtime;
    # the family modules keep what those tables held, so a version-1 folder loads exactly as it did (only
    # version 1 needs the converter package, which ships beside the runtime).
    from weights_convert.families import version_1_defaults

    return data | {"resample": "bilinear"} | version_1_defaults(data.get("family"))
