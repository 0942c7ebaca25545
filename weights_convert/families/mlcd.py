"""MLCD (DeepGlint's RoPE ViT; transformers ``MLCDVisionModel``, model_type ``mlcd_vision_model``).

An & al., "Multi-label Cluster Discrimination for Visual Representation Learning", 2024. transformers has the
vision tower only (no two-tower class); ``mlcd`` is the model_type of DeepGlint's original hub configs, which
transformers reads as the same config. The published weights keep the tower under ``vision_model.``
(transformers 4 saved that prefix), what transformers 5 writes has none; both spellings are accepted.
What makes it this family, all of it config data:

- a class token with no additive positions: 2D RoPE on integer (row, col), rotated in fp32, and the class token
  rotated by learned angles of its own (``class_pos_emb``, ``head_dim / 2`` of them, used for both halves);
- a LayerNorm over the whole sequence before the blocks (``pre_layrnorm``); LayerNorm pre-norm blocks with
  every bias, an fc1/fc2 MLP; no final norm: the pooled output is the class token through ``post_layernorm``;
- a Conv2d patch embedding without bias.

Numerics: the same operations in the same order as transformers (angles, rotation in fp32, norms), so fp32
results agree to rounding. Preprocessing: CLIP's mean/std and bicubic resampling as the published
``CLIPImageProcessor`` configs; that processor resizes the short side to ``image_size`` and centre-crops a
square, while our default rule keeps the aspect ratio and fills the trained token budget
(``(image_size / patch_size)^2`` patches, ``resize_max_patches``), which the RoPE tower accepts at any size.
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
    CLIP_STATS,
    activation,
    image_stats,
    load_tower_reference,
    per_frame,
    refuse_dropout,
    require,
    resample_of,
    split_prefix,
    square,
    tower_state,
    with_defaults,
)
from .qwen2_5_vl import rope_theta

NAME = "mlcd"
MODEL_TYPES = ("mlcd_vision_model", "mlcd")
HF_CLASS = "MLCDVisionModel"
VARIANTS = ("default",)
PREFIX = "vision_model."

# transformers' MLCDVisionConfig defaults (the bigG/14 tower).
DEFAULTS: dict[str, Any] = {
    "hidden_size": 1664, "intermediate_size": 8192, "num_hidden_layers": 48, "num_attention_heads": 16,
    "num_key_value_groups": 1, "num_channels": 3, "image_size": 336, "patch_size": 14, "hidden_act": "gelu",
    "layer_norm_eps": 1e-5, "attention_dropout": 0.0,
}  # fmt: skip


def config_from_hf(
    cfg: dict[str, Any], preprocessor: dict[str, Any] | None, keys: Collection[str] = ()
) -> EncoderConfig:
    v = with_defaults(cfg, DEFAULTS)
    if v["num_key_value_groups"] != 1:  # transformers' own attention cannot run other values either
        raise ConversionError(f"config.json num_key_value_groups = {v['num_key_value_groups']!r}: only 1")
    refuse_dropout(v, "attention_dropout")
    rope_type = (v.get("rope_parameters") or {}).get("rope_type", "axial")
    if rope_type not in ("axial", "default"):  # transformers reads "default" as "axial"
        raise ConversionError(f"config.json rope_type = {rope_type!r}: MLCD's rotary embedding is 'axial'")
    patch = square(v["patch_size"], "patch_size")
    return EncoderConfig(
        family=NAME, patch_size=patch, num_channels=require(v, "num_channels"),
        hidden_size=require(v, "hidden_size"), num_layers=require(v, "num_hidden_layers"),
        num_heads=require(v, "num_attention_heads"), mlp_hidden=require(v, "intermediate_size"),
        mlp="mlp", activation=activation(v["hidden_act"]), norm="layernorm", norm_eps=float(v["layer_norm_eps"]),
        patch_bias=False, num_cls=1, rope="index", rope_theta=rope_theta(v), rope_fp32=True, rope_cls=True,
        embed_norm=True, final_norm=False, head="cls_norm", resample=resample_of(preprocessor, "bicubic"),
        resize_max_patches=(square(v["image_size"], "image_size") // patch) ** 2,
        **image_stats(preprocessor, CLIP_STATS),
    ).validate()  # fmt: skip


def _table(config: EncoderConfig) -> dict[str, str | None]:
    t: dict[str, str | None] = {
        "embeddings.class_embedding": "prefix",
        "embeddings.patch_embedding.weight": "patch_embed.weight",
        "class_pos_emb": "positions.cls_angles",
        # Non-persistent buffers older exports may carry; transformers rebuilds them from the config too.
        "embeddings.position_ids": DROP,
        "vision_rotary_embedding.inv_freq": DROP,
    }
    for src, dst in (("pre_layrnorm", "embed_norm"), ("post_layernorm", "head.norm")):
        t[f"{src}.weight"], t[f"{src}.bias"] = f"{dst}.weight", f"{dst}.bias"
    for i in range(config.num_layers):
        s, o = f"encoder.layers.{i}.", f"blocks.{i}."
        pairs = [("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("mlp.fc1", "mlp.fc1"),
                 ("mlp.fc2", "mlp.fc2"), ("self_attn.out_proj", "attn.proj")]  # fmt: skip
        pairs += [(f"self_attn.{n}_proj", f"attn.{n}") for n in "qkv"]
        for src, dst in pairs:
            t[f"{s}{src}.weight"], t[f"{s}{src}.bias"] = f"{o}{dst}.weight", f"{o}{dst}.bias"
    return t


def convert_state_dict(state: dict[str, Tensor], cfg: dict[str, Any], config: EncoderConfig) -> Converted:
    c = rename(tower_state(state, False, PREFIX)[0], _table(config))
    c.conv_to_linear("patch_embed.weight")
    t, s = c.pop("prefix")
    c.put("prefix", t.reshape(-1, t.shape[-1]), s)  # [D] -> [1, D]
    for i in range(config.num_layers):
        for kind in ("weight", "bias"):
            c.fuse([f"blocks.{i}.attn.{n}.{kind}" for n in "qkv"], f"blocks.{i}.attn.qkv.{kind}")
    return c


def tiny_hf_config(variant: str = "default") -> dict[str, Any]:
    """A small ``MLCDVisionModel`` config: 3 blocks, width 64, 4 heads, patch 4."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown {NAME} variant {variant!r}; choose one of {list(VARIANTS)}")
    return {"model_type": "mlcd_vision_model", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 3, "num_attention_heads": 4, "patch_size": 4, "image_size": 32,
            "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0}}  # fmt: skip


def _frame_forward(model: Any, frame: Tensor) -> dict[str, Any]:
    """transformers' outputs for one ``[C, H, W]`` frame, split as ours are (class token, patch tokens)."""
    out = model(pixel_values=frame[None], output_hidden_states=True)
    return split_prefix(out, 1)


reference_forward = per_frame(_frame_forward)


def load_reference(ckpt: Checkpoint) -> Any:
    return load_tower_reference(ckpt, HF_CLASS)
