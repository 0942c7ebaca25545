"""Fixed-resolution SigLIP and SigLIP2 (transformers ``SiglipVisionModel`` / ``SiglipModel``).

The fixed-resolution SigLIP2 checkpoints use these same classes (model_type ``siglip``). Other image sizes follow
transformers' ``interpolate_pos_encoding=True``: the learned table unchanged at the trained square size, bicubic
otherwise. A two-tower checkpoint keeps the vision tower under ``vision_model.``; the text tower, ``logit_scale``
and ``logit_bias`` are dropped. The SigLIP2 NaFlex family (``siglip2.py``) shares the trunk and head tables here.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from torch import Tensor

from packvit_native.config import EncoderConfig

from ..keymap import DROP, Converted, rename
from ..sources import Checkpoint
from .common import (
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

NAME = "siglip"
MODEL_TYPES = ("siglip_vision_model", "siglip")
HF_CLASS = "SiglipVisionModel"
VARIANTS = ("default", "no_head", "two_tower")
# What a version-1 config of this family left to the runtime's preprocessing tables (see
# families.version_1_defaults).
V1_DEFAULTS = {"resample": "bicubic"}
SIGLIP_STATS = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
VISION_PREFIX = "vision_model."

# transformers' SiglipVisionConfig defaults; ``vision_use_head`` is read with getattr(..., True).
DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "num_channels": 3, "image_size": 224, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6, "vision_use_head": True,
}  # fmt: skip


def trunk_config(v: dict[str, Any], preprocessor: dict[str, Any] | None, **fields: Any) -> EncoderConfig:
    """The parts SigLIP and SigLIP2 share: LayerNorm pre-norm blocks with every bias, and the MAP head."""
    refuse_dropout(v, "attention_dropout")
    return EncoderConfig(
        patch_size=square(v["patch_size"], "patch_size"),
        num_channels=require(v, "num_channels"),
        hidden_size=require(v, "hidden_size"),
        num_layers=require(v, "num_hidden_layers"),
        num_heads=require(v, "num_attention_heads"),
        mlp_hidden=require(v, "intermediate_size"),
        mlp="mlp",
        activation=activation(v["hidden_act"]),
        norm="layernorm",
        norm_eps=float(v["layer_norm_eps"]),
        pos_embed="learned",
        final_norm=True,
        head="map" if v["vision_use_head"] else "none",
        **image_stats(preprocessor, SIGLIP_STATS),
        **fields,
    ).validate()


def config_from_hf(
    cfg: dict[str, Any], preprocessor: dict[str, Any] | None, keys: Collection[str] = ()
) -> EncoderConfig:
    v = with_defaults(tower_config(cfg)[0], DEFAULTS)
    side = square(v["image_size"], "image_size") // square(v["patch_size"], "patch_size")
    return trunk_config(
        v,
        preprocessor,
        family="siglip",
        pos_grid=(side, side),
        pos_resize="bicubic",
        resample=resample_of(preprocessor, "bicubic"),
    )


def trunk_table(config: EncoderConfig) -> dict[str, str | None]:
    """Source key -> our key for everything but the patch embedding's layout."""
    t: dict[str, str | None] = {
        "embeddings.patch_embedding.weight": "patch_embed.weight",
        "embeddings.patch_embedding.bias": "patch_embed.bias",
        "embeddings.position_embedding.weight": "positions.weight",
        "embeddings.position_ids": DROP,  # a non-persistent buffer older exports still carry
        "post_layernorm.weight": "norm.weight",
        "post_layernorm.bias": "norm.bias",
    }
    for i in range(config.num_layers):
        s, o = f"encoder.layers.{i}.", f"blocks.{i}."
        pairs = [("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("mlp.fc1", "mlp.fc1"),
                 ("mlp.fc2", "mlp.fc2"), ("self_attn.out_proj", "attn.proj")]  # fmt: skip
        pairs += [(f"self_attn.{n}_proj", f"attn.{n}") for n in "qkv"]
        for src, dst in pairs:
            t[f"{s}{src}.weight"], t[f"{s}{src}.bias"] = f"{o}{dst}.weight", f"{o}{dst}.bias"
    if config.head == "map":
        t["head.probe"] = "head.probe"
        t["head.attention.in_proj_weight"] = "head.in_proj.weight"
        t["head.attention.in_proj_bias"] = "head.in_proj.bias"
        for src, dst in (("attention.out_proj", "proj"), ("layernorm", "norm"), ("mlp.fc1", "mlp.fc1"),
                         ("mlp.fc2", "mlp.fc2")):  # fmt: skip
            t[f"head.{src}.weight"], t[f"head.{src}.bias"] = f"head.{dst}.weight", f"head.{dst}.bias"
    return t


def convert_trunk(state: dict[str, Tensor], cfg: dict[str, Any], config: EncoderConfig) -> Converted:
    """Rename the vision tower and fuse what our modules fuse; the patch weight is left as the source has it."""
    vision, others = tower_state(state, tower_config(cfg)[1], VISION_PREFIX)
    c = rename(vision, trunk_table(config))
    c.dropped += others
    for i in range(config.num_layers):
        o = f"blocks.{i}.attn."
        for kind in ("weight", "bias"):
            c.fuse([f"{o}{n}.{kind}" for n in "qkv"], f"{o}qkv.{kind}")
    if config.head == "map":
        c.as_rows("head.probe")
        for kind in ("weight", "bias"):
            # nn.MultiheadAttention stacks [Wq; Wk; Wv]: q projects the probe, k/v the tokens.
            c.split(f"head.in_proj.{kind}", [f"head.q.{kind}", f"head.k.{kind}", f"head.v.{kind}"])
            c.fuse([f"head.k.{kind}", f"head.v.{kind}"], f"head.kv.{kind}")
    return c


def convert_state_dict(state: dict[str, Tensor], cfg: dict[str, Any], config: EncoderConfig) -> Converted:
    c = convert_trunk(state, cfg, config)
    c.conv_to_linear("patch_embed.weight")
    return c


def tiny_vision(**fields: Any) -> dict[str, Any]:
    return {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "patch_size": 4, **fields}  # fmt: skip


TINY_TEXT = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4,
             "vocab_size": 64, "max_position_embeddings": 16, "bos_token_id": 1, "eos_token_id": 2,
             "pad_token_id": 0}  # fmt: skip


def tiny_hf_config(variant: str = "default") -> dict[str, Any]:
    """A small transformers config with an 8x8 position table: ``default`` (with the MAP head), ``no_head``
    (``vision_use_head=False``) or ``two_tower`` (``default`` inside a ``SiglipModel`` with a tiny text tower)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown siglip variant {variant!r}; choose one of {list(VARIANTS)}")
    vision = tiny_vision(model_type="siglip_vision_model", image_size=32)
    if variant == "no_head":
        vision["vision_use_head"] = False
    if variant != "two_tower":
        return vision
    return {"model_type": "siglip", "vision_config": vision, "text_config": TINY_TEXT}


def _frame_forward(model: Any, frame: Tensor) -> dict[str, Any]:
    """transformers' outputs for one ``[C, H, W]`` frame, with its position interpolation switched on."""
    out = model(pixel_values=frame[None], output_hidden_states=True, interpolate_pos_encoding=True)
    return {
        "last_hidden_state": out.last_hidden_state[0],
        "pooler_output": out.pooler_output[0] if out.pooler_output is not None else None,
        "hidden_states": [h[0] for h in out.hidden_states],
    }


reference_forward = per_frame(_frame_forward)


def load_reference(ckpt: Checkpoint) -> Any:
    return load_tower_reference(ckpt, HF_CLASS)
