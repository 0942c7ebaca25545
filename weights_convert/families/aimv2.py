"""AIMv2 (transformers ``Aimv2VisionModel`` / ``Aimv2Model``, and Apple's original layout).

Three checkpoint layouts are accepted, told apart by their config, never by trial:

- transformers vision-only (model_type ``aimv2_vision_model``): keys ``embeddings.*``, ``encoder.layers.N.*``;
- transformers two-tower (model_type ``aimv2`` with a ``vision_config``): the same keys under ``vision_model.``;
  the text tower, projections and logit scale are dropped;
- Apple's original release (``architectures: ["AIMv2Model"]``, Apple's remote-code class): fused ``attn.qkv``,
  SwiGLU as ``mlp.fc1`` (gate) / ``mlp.fc3`` (up) / ``mlp.fc2`` (down). Its LiT checkpoint nests the vision
  config under ``vision_config`` and keeps the vision tower (with its pooling head) under ``image_encoder.``.
  Apple's configs do not record whether positions are learned or sin-cos: a checkpoint without
  ``preprocessor.pos_embed`` is the native (sin-cos) model.

transformers ties the attention output-projection bias to ``qkv_bias``; Apple's ``use_bias`` sets both the
output projection's and the MLP's biases.
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
    square,
    tower_config,
    tower_state,
    with_defaults,
)

NAME = "aimv2"
MODEL_TYPES = ("aimv2_vision_model", "aimv2")
HF_CLASS = "Aimv2VisionModel"
VARIANTS = ("native", "learned", "head", "two_tower")
# What a version-1 config of this family left to the runtime's preprocessing tables (see
# families.version_1_defaults).
V1_DEFAULTS = {"resample": "bicubic"}
APPLE_ARCHITECTURES = ["AIMv2Model"]  # Apple's remote-code class; transformers' own class is "Aimv2Model"

# transformers' Aimv2VisionConfig defaults (hub configs may omit them).
HF_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24, "num_attention_heads": 8,
    "num_channels": 3, "image_size": 224, "patch_size": 14, "hidden_act": "silu", "rms_norm_eps": 1e-5,
    "qkv_bias": False, "mlp_bias": False, "use_head": True, "is_native": False,
}  # fmt: skip
# Apple's remote-code AIMv2Config defaults.
APPLE_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24, "num_attention_heads": 8,
    "num_channels": 3, "image_size": 224, "patch_size": 14, "rms_norm_eps": 1e-5, "qkv_bias": False,
    "use_bias": False,
}  # fmt: skip


def is_apple(cfg: dict[str, Any]) -> bool:
    """Whether a config is Apple's original AIMv2 release (named by its remote-code architecture)."""
    return cfg.get("architectures") == APPLE_ARCHITECTURES


def _tower_prefix(cfg: dict[str, Any]) -> str:
    return "image_encoder." if is_apple(cfg) else "vision_model."


def config_from_hf(
    cfg: dict[str, Any], preprocessor: dict[str, Any] | None, keys: Collection[str] = ()
) -> EncoderConfig:
    vision, two_tower = tower_config(cfg)
    refuse_dropout(vision, "attention_dropout")
    apple = is_apple(cfg)
    if cfg.get("model_type") == "aimv2" and not two_tower and not apple:
        raise ConversionError(
            "config.json has model_type 'aimv2' but neither a vision_config (transformers' two-tower "
            f"Aimv2Model) nor architectures {APPLE_ARCHITECTURES} (Apple's original release)"
        )
    if apple:
        v = with_defaults(vision, APPLE_DEFAULTS)
        pos_key = (_tower_prefix(cfg) if two_tower else "") + "preprocessor.pos_embed"
        native, use_head = pos_key not in keys, two_tower  # only the LiT release has a pooling head
        qkv_bias = bool(v["qkv_bias"])
        proj_bias = mlp_bias = bool(v["use_bias"])
        act = "silu"
    else:
        v = with_defaults(vision, HF_DEFAULTS)
        native, use_head = bool(v["is_native"]), bool(v["use_head"])
        qkv_bias = proj_bias = bool(v["qkv_bias"])
        mlp_bias = bool(v["mlp_bias"])
        act = activation(v["hidden_act"])
    patch = square(v["patch_size"], "patch_size")
    side = square(v["image_size"], "image_size") // patch
    return EncoderConfig(
        family="aimv2",
        patch_size=patch,
        num_channels=require(v, "num_channels"),
        hidden_size=require(v, "hidden_size"),
        num_layers=require(v, "num_hidden_layers"),
        num_heads=require(v, "num_attention_heads"),
        mlp_hidden=require(v, "intermediate_size"),
        mlp="swiglu",
        activation=act,
        norm="rmsnorm",
        norm_eps=float(v["rms_norm_eps"]),
        qkv_bias=qkv_bias,
        proj_bias=proj_bias,
        mlp_bias=mlp_bias,
        patch_bias=True,
        patch_norm=True,
        pos_embed="sincos2d" if native else "learned",
        pos_grid=None if native else (side, side),
        pos_resize="none",
        final_norm=True,
        head="attention_pool" if use_head else "none",
        resample=resample_of(preprocessor, "bicubic"),
        **image_stats(preprocessor, CLIP_STATS),
    ).validate()


def _with_bias(t: dict[str, str | None], src: str, dst: str, bias: bool) -> None:
    t[f"{src}.weight"] = f"{dst}.weight"
    if bias:
        t[f"{src}.bias"] = f"{dst}.bias"


def _hf_table(config: EncoderConfig) -> dict[str, str | None]:
    t: dict[str, str | None] = {
        "embeddings.patch_embed.weight": "patch_embed.weight",
        "embeddings.patch_embed.bias": "patch_embed.bias",
        "embeddings.rms_norm.weight": "patch_norm.weight",
        "embeddings.position_ids": DROP,  # a non-persistent buffer some exports still carry
        "rms_norm.weight": "norm.weight",
    }
    if config.pos_embed == "learned":
        t["embeddings.position_embedding.weight"] = "positions.weight"
    for i in range(config.num_layers):
        s, o = f"encoder.layers.{i}.", f"blocks.{i}."
        t[f"{s}rms_norm1.weight"], t[f"{s}rms_norm2.weight"] = f"{o}norm1.weight", f"{o}norm2.weight"
        for n in "qkv":
            _with_bias(t, f"{s}attention.{n}_proj", f"{o}attn.{n}", config.qkv_bias)
        _with_bias(t, f"{s}attention.out_proj", f"{o}attn.proj", config.proj_bias)
        for src, dst in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
            _with_bias(t, f"{s}ffn.{src}", f"{o}mlp.{dst}", config.mlp_bias)
    if config.head == "attention_pool":
        t["head.cls_token"] = "head.query"
        _with_bias(t, "head.k_proj", "head.k", config.qkv_bias)
        _with_bias(t, "head.v_proj", "head.v", config.qkv_bias)
        _with_bias(t, "head.output_proj", "head.proj", True)
    return t


def _apple_table(config: EncoderConfig) -> dict[str, str | None]:
    t: dict[str, str | None] = {
        "preprocessor.patchifier.proj.weight": "patch_embed.weight",
        "preprocessor.patchifier.proj.bias": "patch_embed.bias",
        "preprocessor.patchifier.norm.weight": "patch_norm.weight",
        "trunk.post_trunk_norm.weight": "norm.weight",
    }
    if config.pos_embed == "learned":
        t["preprocessor.pos_embed"] = "positions.weight"
    for i in range(config.num_layers):
        s, o = f"trunk.blocks.{i}.", f"blocks.{i}."
        t[f"{s}norm_1.weight"], t[f"{s}norm_2.weight"] = f"{o}norm1.weight", f"{o}norm2.weight"
        _with_bias(t, f"{s}attn.qkv", f"{o}attn.qkv", config.qkv_bias)  # rows already q, k, v
        _with_bias(t, f"{s}attn.proj", f"{o}attn.proj", config.proj_bias)
        for src, dst in (("fc1", "gate"), ("fc3", "up"), ("fc2", "down")):
            _with_bias(t, f"{s}mlp.{src}", f"{o}mlp.{dst}", config.mlp_bias)
    if config.head == "attention_pool":
        t["head.cls_token"] = "head.query"
        _with_bias(t, "head.k", "head.k", config.qkv_bias)
        _with_bias(t, "head.v", "head.v", config.qkv_bias)
        _with_bias(t, "head.linear", "head.proj", True)
    return t


def convert_state_dict(state: dict[str, Tensor], cfg: dict[str, Any], config: EncoderConfig) -> Converted:
    apple = is_apple(cfg)
    vision, others = tower_state(state, tower_config(cfg)[1], _tower_prefix(cfg))
    c = rename(vision, _apple_table(config) if apple else _hf_table(config))
    c.dropped += others
    c.conv_to_linear("patch_embed.weight")
    if apple and config.pos_embed == "learned":
        c.as_rows("positions.weight")  # Apple stores [1, N, D]
    for i in range(config.num_layers):
        o = f"blocks.{i}."
        for kind in ("weight", "bias"):
            if not apple:
                c.fuse([f"{o}attn.{n}.{kind}" for n in "qkv"], f"{o}attn.qkv.{kind}")
            c.fuse([f"{o}mlp.gate.{kind}", f"{o}mlp.up.{kind}"], f"{o}mlp.gate_up.{kind}")
    if config.head == "attention_pool":
        c.as_rows("head.query")
        for kind in ("weight", "bias"):
            c.fuse([f"head.k.{kind}", f"head.v.{kind}"], f"head.kv.{kind}")
    return c


def tiny_hf_config(variant: str = "native") -> dict[str, Any]:
    """A small transformers config: ``native`` (sin-cos), ``learned`` (8x8 table), ``head`` (native, pooling
    head, all biases) or ``two_tower`` (``head`` inside a two-tower ``Aimv2Model`` with a tiny text tower)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown aimv2 variant {variant!r}; choose one of {list(VARIANTS)}")
    vision = {
        "model_type": "aimv2_vision_model",
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "patch_size": 4,
        "image_size": 32,
        "is_native": variant != "learned",
        "use_head": variant in ("head", "two_tower"),
        "qkv_bias": variant in ("head", "two_tower"),
        "mlp_bias": variant in ("head", "two_tower"),
    }
    if variant != "two_tower":
        return vision
    text = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
            "vocab_size": 64, "max_position_embeddings": 16, "eos_token_id": 2}  # fmt: skip
    return {"model_type": "aimv2", "vision_config": vision, "text_config": text, "projection_dim": 32}


def _frame_forward(model: Any, frame: Tensor) -> dict[str, Any]:
    """transformers' outputs for one ``[C, H, W]`` frame (AIMv2 has no prefix tokens)."""
    out = model(pixel_values=frame[None], output_hidden_states=True)
    return {
        "last_hidden_state": out.last_hidden_state[0],
        "pooler_output": out.pooler_output[0] if model.config.use_head else None,
        "hidden_states": [h[0] for h in out.hidden_states],
    }


reference_forward = per_frame(_frame_forward)


def load_reference(ckpt: Checkpoint) -> Any:
    if is_apple(ckpt.config):
        raise ConversionError(
            "this is Apple's original AIMv2 layout, which transformers cannot load as is, so there is no "
            "reference to compare with; packvit-convert converts it (its mapping is tested against a "
            "transformers checkpoint re-keyed to Apple's names)"
        )
    return load_tower_reference(ckpt, HF_CLASS)
