"""DINOv2 with and without registers (transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel``; Oquab et
al. 2023, "DINOv2: Learning Robust Visual Features without Supervision"; Darcet et al. 2024, "Vision
Transformers Need Registers").

One layout, two model_types that differ in data only: ``dinov2_with_registers`` inserts
``num_register_tokens`` registers after the class token (they get no position term). Keys are
``embeddings.*``, ``encoder.layer.N.*`` and ``layernorm.*``, as the hub checkpoints hold them and
``save_pretrained`` writes them. ``embeddings.mask_token`` (masked-image pre-training only) is dropped.

The position table's first row is the class token's entry (``positions.cls``); the rest is a square grid
that transformers resizes to every other image size, in fp32: bicubic for ``Dinov2Model``, antialiased
bicubic for ``Dinov2WithRegistersModel``, and the table unchanged at the trained square size. transformers
casts the resized table back to the weight dtype; we resize in fp32 in any case and cast the table to the
activation dtype before the add, as transformers adds it (the same in fp32). The giant model's SwiGLU (``weights_in`` = [x1; x2],
``silu(x1) * x2``) is our ``gate_up`` as is; it is SiLU whatever ``hidden_act`` says. ``layerscale_value``
only initialises ``lambda1``, which the checkpoint holds.

Preprocessing: ``BitImageProcessor`` resizes the short side to ``size.shortest_edge`` (256 on the hub) and
center-crops ``crop_size`` (224 x 224). We never crop: the default size rule keeps the aspect ratio at the
crop's pixel area (the reference's token count), in whole patches; without a crop, at least the short
side's square. The resampling filter is the processor's (bicubic).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from torch import Tensor

from packvit_native.config import EncoderConfig

from ..errors import ConversionError
from ..keymap import DROP, Converted, rename
from ..sources import Checkpoint
from .common import (
    IMAGENET_STATS,
    activation,
    image_stats,
    load_tower_reference,
    per_frame,
    refuse_dropout,
    require,
    resample_of,
    split_prefix,
    square,
    with_defaults,
)

NAME = "dinov2"
MODEL_TYPES = ("dinov2", "dinov2_with_registers")
HF_CLASSES = {"dinov2": "Dinov2Model", "dinov2_with_registers": "Dinov2WithRegistersModel"}
VARIANTS = ("default", "registers", "swiglu")
CROP = 224  # BitImageProcessor's default crop_size

# transformers' Dinov2Config / Dinov2WithRegistersConfig defaults (hub configs may omit them).
_COMMON = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "mlp_ratio": 4,
    "hidden_act": "gelu", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
    "layer_norm_eps": 1e-6, "image_size": 224, "num_channels": 3, "qkv_bias": True, "drop_path_rate": 0.0,
    "use_swiglu_ffn": False,
}  # fmt: skip
DEFAULTS = {
    "dinov2": {**_COMMON, "patch_size": 14},
    "dinov2_with_registers": {**_COMMON, "patch_size": 16, "num_register_tokens": 4},
}


def _number(v: dict[str, Any], key: str) -> float:
    value = v[key]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ConversionError(f"config.json {key} = {value!r} is not a non-negative number")
    return float(value)


def mlp_hidden(hidden: int, mlp_ratio: float, swiglu: bool) -> int:
    """Width of the MLP's hidden layer (of each SwiGLU branch: 2/3 of it, rounded up to a multiple of 8)."""
    h = int(hidden * mlp_ratio)
    return (int(h * 2 / 3) + 7) // 8 * 8 if swiglu else h


def _pixels(value: Any, key: str) -> int:
    """A processor size (an int, ``{"height", "width"}`` or ``{"shortest_edge"}``) as a pixel area."""
    if isinstance(value, dict):
        value = (value["height"], value["width"]) if "height" in value else (value["shortest_edge"],) * 2
    else:
        value = (value, value)
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value):
        raise ConversionError(f"preprocessor_config.json {key} = {value!r} is not a positive size")
    return value[0] * value[1]


def preprocessing(pre: dict[str, Any]) -> dict[str, Any]:
    """Resampling filter and default size rule closest to ``BitImageProcessor`` (see the module docstring)."""
    resample = resample_of(pre, "bicubic")
    if pre.get("do_center_crop", True):
        area = _pixels(pre.get("crop_size", CROP), "crop_size")
        return {"resample": resample, "resize_min_pixels": area, "resize_max_pixels": area}
    return {"resample": resample, "resize_min_pixels": _pixels(pre.get("size", CROP), "size")}


def config_from_hf(
    cfg: dict[str, Any], preprocessor: dict[str, Any] | None, keys: Collection[str] = ()
) -> EncoderConfig:
    v = with_defaults(cfg, DEFAULTS[cfg["model_type"]])
    refuse_dropout(v, "hidden_dropout_prob", "attention_probs_dropout_prob")
    drop_path = _number(v, "drop_path_rate")
    if drop_path >= 1:
        raise ConversionError(f"config.json drop_path_rate = {drop_path!r} is not a number in [0, 1)")
    swiglu = bool(v["use_swiglu_ffn"])
    patch = square(v["patch_size"], "patch_size")
    side = square(v["image_size"], "image_size") // patch
    hidden = require(v, "hidden_size")
    registers = cfg["model_type"] == "dinov2_with_registers"  # Dinov2Model has none, whatever the config says
    return EncoderConfig(
        family=NAME, patch_size=patch, num_channels=require(v, "num_channels"), hidden_size=hidden,
        num_layers=require(v, "num_hidden_layers"), num_heads=require(v, "num_attention_heads"),
        mlp_hidden=mlp_hidden(hidden, _number(v, "mlp_ratio"), swiglu), mlp="swiglu" if swiglu else "mlp",
        activation="silu" if swiglu else activation(v["hidden_act"]), norm="layernorm",
        norm_eps=_number(v, "layer_norm_eps"), qkv_bias=bool(v["qkv_bias"]), layer_scale=True, num_cls=1,
        num_registers=require(v, "num_register_tokens") if registers else 0, pos_embed="learned",
        pos_grid=(side, side), pos_resize="bicubic_antialias" if registers else "bicubic", pos_embed_cls=True,
        final_norm=True, head="cls", drop_path_rate=drop_path,
        **preprocessing(preprocessor or {}), **image_stats(preprocessor, IMAGENET_STATS),
    ).validate()  # fmt: skip


def _table(cfg: dict[str, Any], config: EncoderConfig) -> dict[str, str | None]:
    t: dict[str, str | None] = {
        "embeddings.cls_token": "cls",
        "embeddings.mask_token": DROP,
        "embeddings.position_embeddings": "positions.table",  # split into the class token's row and the grid
        "embeddings.patch_embeddings.projection.weight": "patch_embed.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    if cfg["model_type"] == "dinov2_with_registers":
        t["embeddings.register_tokens"] = "registers" if config.num_registers else DROP
    pairs = [("norm1", "norm1"), ("norm2", "norm2"), ("attention.output.dense", "attn.proj")]
    if config.mlp == "swiglu":  # weights_in = [x1; x2] with silu(x1) * x2: our gate_up, gate rows first
        pairs += [("mlp.weights_in", "mlp.gate_up"), ("mlp.weights_out", "mlp.down")]
    else:
        pairs += [("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]
    for i in range(config.num_layers):
        s, o = f"encoder.layer.{i}.", f"blocks.{i}."
        for src, dst in pairs:
            t[f"{s}{src}.weight"], t[f"{s}{src}.bias"] = f"{o}{dst}.weight", f"{o}{dst}.bias"
        for name in ("query", "key", "value"):
            t[f"{s}attention.attention.{name}.weight"] = f"{o}attn.{name[0]}.weight"
            if config.qkv_bias:
                t[f"{s}attention.attention.{name}.bias"] = f"{o}attn.{name[0]}.bias"
        t[f"{s}layer_scale1.lambda1"], t[f"{s}layer_scale2.lambda1"] = f"{o}ls1.gamma", f"{o}ls2.gamma"
    return t


def convert_state_dict(state: dict[str, Tensor], cfg: dict[str, Any], config: EncoderConfig) -> Converted:
    c = rename(state, _table(cfg, config))
    c.conv_to_linear("patch_embed.weight")
    prefix = ["cls", "registers"] if "registers" in c.tensors else ["cls"]
    for key in [*prefix, "positions.table"]:  # [1, n, D] -> [n, D]
        c.as_rows(key)
    c.fuse(prefix, "prefix")  # [1 + R, D]: class token, then registers
    table, sources = c.pop("positions.table")  # [1 + rows * cols, D]
    c.put("positions.cls", table[:1], sources)
    c.put("positions.weight", table[1:], sources)
    for i in range(config.num_layers):
        for kind in ("weight", "bias"):
            c.fuse([f"blocks.{i}.attn.{n}.{kind}" for n in "qkv"], f"blocks.{i}.attn.qkv.{kind}")
    return c


def tiny_hf_config(variant: str = "default") -> dict[str, Any]:
    """A small transformers config with an 8x8 position table: ``default`` (``Dinov2Model``), ``registers``
    (``Dinov2WithRegistersModel``, 2 registers) or ``swiglu`` (the giant model's MLP, ``hidden_act`` left at
    GELU as in its config: the SwiGLU is SiLU regardless)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown dinov2 variant {variant!r}; choose one of {list(VARIANTS)}")
    cfg = {"model_type": "dinov2", "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
           "mlp_ratio": 2, "patch_size": 4, "image_size": 32, "layerscale_value": 0.5}  # fmt: skip
    if variant == "registers":
        cfg.update(model_type="dinov2_with_registers", num_register_tokens=2)
    if variant == "swiglu":
        cfg.update(use_swiglu_ffn=True, mlp_ratio=4)  # 2/3 of 256 = 170, rounded up to 176
    return cfg


def _frame_forward(model: Any, frame: Tensor) -> dict[str, Any]:
    """transformers' outputs for one ``[C, H, W]`` frame, split as ours are (prefix tokens, patch tokens)."""
    k = 1 + getattr(model.config, "num_register_tokens", 0)
    out = model(pixel_values=frame[None], output_hidden_states=True)
    return split_prefix(out, k)


reference_forward = per_frame(_frame_forward)


def load_reference(ckpt: Checkpoint) -> Any:
    return load_tower_reference(ckpt, HF_CLASSES[ckpt.config["model_type"]])
