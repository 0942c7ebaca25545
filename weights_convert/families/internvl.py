"""InternViT (transformers ``InternVLVisionModel``), the vision tower of InternVL.

Chen & al., "InternVL: Scaling up Vision Foundation Models and Aligning for Generic Visual-Linguistic Tasks",
2024. Read from a whole ``InternVLForConditionalGeneration`` checkpoint (model_type ``internvl``; the tower under
``vision_tower.``, as the published -hf checkpoints hold it and transformers' save_pretrained writes it, or
``model.vision_tower.``, its module path; the language model is never read) or from the tower alone
(``internvl_vision``). All of it config data: a class token; a learned square table with a row of its own for
the class token, bicubically resized at every size but the trained square one, as transformers'
``interpolate_pos_encoding``, always on (transformers resizes in the weight dtype, we in fp32: the same in
fp32); LayerNorm (300M) or RMSNorm (6B) blocks with layer scale, q/k/v
biases from ``attention_bias`` (the output projection always has one) and, for 6B, RMS norms over all heads of
q and of k; with ``use_mean_pooling`` (every published config) no final norm, else a final LayerNorm.

Where we differ from transformers:

- its q/k norms use epsilon 1e-6 whatever ``layer_norm_eps`` says, ours ``norm_eps``: another epsilon with q/k
  norms is refused (every published config has 1e-6);
- its final norm is a LayerNorm even in an RMSNorm tower, ours the blocks' kind: ``rms_norm`` without mean
  pooling (no published checkpoint) is refused;
- **extension**: ``InternVLVisionModel`` returns no pooled output; ours is what its output docstring describes,
  the mean of each frame's patch tokens (``head="mean"``) with ``use_mean_pooling``, else the final-normed
  class token (``head="cls"``).

Preprocessing: ImageNet mean/std and bicubic resampling, as InternVL's processor; it cuts an image into 1 to 12
squashed ``image_size`` tiles plus a thumbnail, where our default rule keeps one image at its aspect ratio
within one tile's token budget (``(image_size / patch_size)^2`` patches).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
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
    load_vlm_tower_reference,
    per_frame,
    refuse_dropout,
    require,
    resample_of,
    split_prefix,
    square,
    tower_config,
    vlm_tower_keys,
    vlm_tower_tensors,
    with_defaults,
)
from .siglip import TINY_TEXT

NAME = "internvl"
MODEL_TYPES = ("internvl", "internvl_vision")
VARIANTS = ("vlm", "vision", "qk_norm_rms")
VISION_CLASS = "InternVLVisionModel"
VISION_TYPE = "internvl_vision"
TOWER_PREFIXES = ("model.vision_tower.", "vision_tower.")
NORMS = {"layer_norm": "layernorm", "rms_norm": "rmsnorm"}
QK_NORM_EPS = 1e-6  # InternVLVisionRMSNorm's default, which transformers' q/k norms use

# transformers' InternVLVisionConfig defaults (InternViT-300M).
DEFAULTS: dict[str, Any] = {
    "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "attention_bias": False,
    "use_qk_norm": False, "intermediate_size": 4096, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
    "attention_dropout": 0.0, "projection_dropout": 0.0, "norm_type": "layer_norm", "layer_norm_eps": 1e-6,
    "image_size": 448, "patch_size": 14, "num_channels": 3, "use_mask_token": False,
    "use_absolute_position_embeddings": True, "use_mean_pooling": True,
}  # fmt: skip


def _vision(cfg: dict[str, Any]) -> dict[str, Any]:
    return with_defaults(tower_config(cfg)[0], DEFAULTS)


def config_from_hf(
    cfg: dict[str, Any], preprocessor: dict[str, Any] | None, keys: Collection[str] = ()
) -> EncoderConfig:
    v = _vision(cfg)
    refuse_dropout(v, "hidden_dropout_prob", "attention_dropout", "projection_dropout")
    if v["norm_type"] not in NORMS:
        raise ConversionError(f"config.json norm_type = {v['norm_type']!r}; supported: {sorted(NORMS)}")
    eps, mean = float(v["layer_norm_eps"]), bool(v["use_mean_pooling"])
    if v["use_qk_norm"] and eps != QK_NORM_EPS:
        raise ConversionError(f"config.json layer_norm_eps = {eps}: with use_qk_norm only {QK_NORM_EPS} "
                              "(transformers' q/k norms always use 1e-6, ours the blocks' epsilon)")  # fmt: skip
    if v["norm_type"] == "rms_norm" and not mean:
        raise ConversionError("config.json norm_type 'rms_norm' with use_mean_pooling false: transformers' "
                              "final norm is then a LayerNorm, and ours is the blocks' kind")  # fmt: skip
    patch, learned = square(v["patch_size"], "patch_size"), bool(v["use_absolute_position_embeddings"])
    side = square(v["image_size"], "image_size") // patch
    return EncoderConfig(
        family=NAME, patch_size=patch, num_channels=require(v, "num_channels"),
        hidden_size=require(v, "hidden_size"), num_layers=require(v, "num_hidden_layers"),
        num_heads=require(v, "num_attention_heads"), mlp_hidden=require(v, "intermediate_size"),
        mlp="mlp", activation=activation(v["hidden_act"]), norm=NORMS[v["norm_type"]], norm_eps=eps,
        qkv_bias=bool(v["attention_bias"]), key_bias=bool(v["attention_bias"]), qk_norm=bool(v["use_qk_norm"]),
        layer_scale=True, num_cls=1, pos_embed="learned" if learned else "none",
        pos_grid=(side, side) if learned else None, pos_resize="bicubic" if learned else "none",
        pos_embed_cls=learned, final_norm=not mean, head="mean" if mean else "cls", resample=resample_of(preprocessor, "bicubic"),
        resize_max_patches=side * side, **image_stats(preprocessor, IMAGENET_STATS),
    ).validate()  # fmt: skip


def select_keys(keys: Iterable[str], cfg: dict[str, Any]) -> set[str]:
    return vlm_tower_keys(keys, cfg, TOWER_PREFIXES)


def _table(config: EncoderConfig, cfg: dict[str, Any]) -> dict[str, str | None]:
    layernorm = config.norm == "layernorm"
    t: dict[str, str | None] = {
        "embeddings.cls_token": "prefix",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.bias",
    }
    if config.pos_embed == "learned":
        t["embeddings.position_embeddings"] = "positions.table"  # class token's row, then the grid's
    if _vision(cfg)["use_mask_token"]:
        t["embeddings.mask_token"] = DROP  # masked-image modelling only
    if config.final_norm:
        t["layernorm.weight"], t["layernorm.bias"] = "norm.weight", "norm.bias"
    for i in range(config.num_layers):
        s, o = f"encoder.layer.{i}.", f"blocks.{i}."
        t[f"{s}lambda_1"], t[f"{s}lambda_2"] = f"{o}ls1.gamma", f"{o}ls2.gamma"
        for src, dst in (("layernorm_before", "norm1"), ("layernorm_after", "norm2")):
            t[f"{s}{src}.weight"] = f"{o}{dst}.weight"
            if layernorm:
                t[f"{s}{src}.bias"] = f"{o}{dst}.bias"
        pairs = [("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"), ("attention.projection_layer", "attn.proj")]
        pairs += [(f"attention.{n}_proj", f"attn.{n}") for n in "qkv"]
        for src, dst in pairs:
            t[f"{s}{src}.weight"] = f"{o}{dst}.weight"
            if config.qkv_bias or not src.endswith("_proj"):
                t[f"{s}{src}.bias"] = f"{o}{dst}.bias"
        for n in ("q_norm", "k_norm") if config.qk_norm else ():
            t[f"{s}attention.{n}.weight"] = f"{o}attn.{n}.weight"
    return t


def convert_state_dict(state: dict[str, Tensor], cfg: dict[str, Any], config: EncoderConfig) -> Converted:
    c = rename(vlm_tower_tensors(state, cfg, TOWER_PREFIXES), _table(config, cfg))
    c.conv_to_linear("patch_embed.weight")
    c.as_rows("prefix")  # [1, 1, D] -> [1, D]
    if config.pos_embed == "learned":
        c.as_rows("positions.table")  # [1, 1 + rows*cols, D] -> [1 + rows*cols, D]
        t, s = c.pop("positions.table")
        c.put("positions.cls", t[:1], s)
        c.put("positions.weight", t[1:], s)
    for i in range(config.num_layers):
        for kind in ("weight", "bias"):
            c.fuse([f"blocks.{i}.attn.{n}.{kind}" for n in "qkv"], f"blocks.{i}.attn.qkv.{kind}")
    return c


def tiny_hf_config(variant: str = "vlm") -> dict[str, Any]:
    """A small config, 3 blocks of width 64, patch 4, an 8x8 table: ``vlm`` (300M-style without mean pooling:
    final LayerNorm, class-token output; inside a whole ``InternVLForConditionalGeneration`` with a tiny
    language model), ``vision`` (300M-style: LayerNorm, q/k/v biases, mean pooling; the tower alone) or
    ``qk_norm_rms`` (6B-style as published: RMSNorm, q/k norms, no q/k/v biases, mean pooling)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown {NAME} variant {variant!r}; choose one of {list(VARIANTS)}")
    vision = {"model_type": VISION_TYPE, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
              "num_attention_heads": 4, "patch_size": 4, "image_size": 32, "attention_bias": True,
              "layer_scale_init_value": 0.5}  # fmt: skip
    if variant == "qk_norm_rms":
        vision |= {"norm_type": "rms_norm", "use_qk_norm": True, "attention_bias": False}
    if variant != "vlm":
        return {"architectures": [VISION_CLASS], **vision}
    text = {**TINY_TEXT, "model_type": "qwen2", "num_key_value_heads": 2}
    return {"model_type": NAME, "architectures": ["InternVLForConditionalGeneration"], "image_token_id": 3,
            "vision_config": {**vision, "use_mean_pooling": False}, "text_config": text}  # fmt: skip


def _frame_forward(model: Any, frame: Tensor) -> dict[str, Any]:
    """transformers' outputs for one ``[C, H, W]`` frame, split as ours are; the pooled output is our extension
    computed from transformers' tokens (patch-token mean, or the final-normed class token)."""
    out = split_prefix(model(pixel_values=frame[None], output_hidden_states=True), 1)
    tokens = out["last_hidden_state"]
    out["pooler_output"] = tokens.mean(0) if model.config.use_mean_pooling else out["prefix_tokens"][0]
    return out


reference_forward = per_frame(_frame_forward)


def load_reference(ckpt: Checkpoint) -> Any:
    return load_vlm_tower_reference(ckpt, VISION_CLASS, VISION_TYPE, TOWER_PREFIXES)
