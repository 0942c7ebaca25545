"""CLIP (transformers ``CLIPVisionModel``, ``CLIPVisionModelWithProjection``, ``CLIPModel``); Radford et al.,
"Learning Transferable Visual Models From Natural Language Supervision", 2021. MetaCLIP 2 reuses all of it.

A class token, a learned table with an entry of its own for it (``positions.cls``), ``pre_layrnorm`` over the
whole sequence (``embed_norm``), no final norm, and ``pooler_output = post_layernorm(class token)`` (the head's
own norm). ``CLIPVisionModelWithProjection`` is recognised from ``architectures`` (its model_type is the
vision model's); it and the two-tower ``CLIPModel`` keep their bias-free ``visual_projection`` as our
``projection`` (``image_embeds``). The text tower, ``text_projection`` and ``logit_scale`` are dropped.

Numerics match transformers with ``interpolate_pos_encoding=True``: the table as is at the trained square grid,
bicubic otherwise (non-square grids of as many patches included). A config with ``vision_config_dict`` is read
as transformers reads it: that dict over the *defaults* replaces ``vision_config``.

Preprocessing differs: ``CLIPImageProcessor`` resizes the short side to ``image_size`` (bicubic) and
centre-crops a square. We never crop; the default rule (``resize_max_patches``, the trained grid's patch count)
keeps the aspect ratio and fills that many patches. A square image gets exactly the processor's size; any
other keeps the whole image, at about the same number of patches, instead of its central square.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from torch import Tensor

from packvit_native.config import EncoderConfig

from ..errors import ConversionError
from ..keymap import Converted, rename
from ..sources import Checkpoint
from .common import (
    CLIP_STATS,
    activation,
    image_stats,
    no_token_id_warnings,
    per_frame,
    refuse_dropout,
    require,
    resample_of,
    split_prefix,
    square,
    tower_config,
)
from .siglip import TINY_TEXT, tiny_vision, trunk_table

NAME = "clip"
MODEL_TYPES = ("clip_vision_model", "clip")
CLASSES = ("CLIPVisionModel", "CLIPVisionModelWithProjection", "CLIPModel")  # vision, projected, two-tower
VARIANTS = ("default", "with_projection", "two_tower")
PROJECTION = "visual_projection.weight"
VISION_PREFIX = "vision_model."

# transformers' CLIPVisionConfig defaults (MetaClip2VisionConfig's are the same).
DEFAULTS: dict[str, Any] = {
    "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 512, "num_hidden_layers": 12,
    "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}  # fmt: skip


def vision_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    """The vision config with defaults filled in, ``vision_config_dict`` applied as transformers applies it."""
    v, two_tower = tower_config(cfg)
    legacy = cfg.get("vision_config_dict") if two_tower else None
    return {**v, **DEFAULTS, **legacy} if legacy is not None else {**DEFAULTS, **v}


def hf_class(cfg: dict[str, Any], classes: tuple[str, ...] = CLASSES) -> str:
    """The transformers class of a checkpoint, from its config: the two-tower model, or the vision model with
    projection if ``architectures`` names it (its model_type is the vision model's), else the vision model."""
    if "vision_config" in cfg:
        return classes[2]
    return classes[1] if classes[1] in (cfg.get("architectures") or ()) else classes[0]


def config_from_hf(
    cfg: dict[str, Any], preprocessor: dict[str, Any] | None, keys: Collection[str] = (), *,
    family: str = NAME, classes: tuple[str, ...] = CLASSES,
) -> EncoderConfig:  # fmt: skip
    v = vision_fields(cfg)
    refuse_dropout(v, "attention_dropout", "dropout")
    projection, cls = None, hf_class(cfg, classes)
    if cls == classes[2]:  # the two-tower model: its own projection_dim, not the vision config's
        projection = require({"projection_dim": DEFAULTS["projection_dim"], **cfg}, "projection_dim")
    elif cls == classes[1]:
        projection = require(v, "projection_dim")
    side = square(v["image_size"], "image_size") // square(v["patch_size"], "patch_size")
    return EncoderConfig(
        family=family, patch_size=square(v["patch_size"], "patch_size"), num_channels=require(v, "num_channels"),
        hidden_size=require(v, "hidden_size"), num_layers=require(v, "num_hidden_layers"),
        num_heads=require(v, "num_attention_heads"), mlp_hidden=require(v, "intermediate_size"),
        activation=activation(v["hidden_act"]), norm_eps=float(v["layer_norm_eps"]), patch_bias=False,
        embed_norm=True, num_cls=1, pos_embed="learned", pos_grid=(side, side), pos_resize="bicubic",
        pos_embed_cls=True, final_norm=False, head="cls_norm", projection_dim=projection, resample=resample_of(preprocessor, "bicubic"),
        resize_max_patches=side * side, **image_stats(preprocessor, CLIP_STATS),
    ).validate()  # fmt: skip


def _table(config: EncoderConfig) -> dict[str, str | None]:
    t = trunk_table(config)  # SigLIP's block names are CLIP's (transformers derived one from the other)
    del t["embeddings.patch_embedding.bias"], t["post_layernorm.weight"], t["post_layernorm.bias"]
    t.update({
        "embeddings.class_embedding": "prefix",
        "embeddings.position_embedding.weight": "positions.table",  # class token's row + the S*S grid
        "pre_layrnorm.weight": "embed_norm.weight", "pre_layrnorm.bias": "embed_norm.bias",
        "post_layernorm.weight": "head.norm.weight", "post_layernorm.bias": "head.norm.bias",
    })  # fmt: skip
    if config.projection_dim is not None:
        t[PROJECTION] = "projection.weight"
    return t


def convert_state_dict(state: dict[str, Tensor], cfg: dict[str, Any], config: EncoderConfig) -> Converted:
    vision: dict[str, Tensor] = {}
    dropped: list[str] = []
    for key, value in state.items():
        # The tower under ``vision_model.`` (a vision model may omit it), the projection beside it.
        name = key.removeprefix(VISION_PREFIX)
        if name == key and key != PROJECTION and "vision_config" in cfg:
            dropped.append(key)  # the text tower, text_projection, logit_scale
        elif name in vision:
            raise ConversionError(f"{name} appears both with and without the {VISION_PREFIX!r} prefix")
        else:
            vision[name] = value
    c = rename(vision, _table(config))
    c.dropped += dropped
    c.conv_to_linear("patch_embed.weight")
    cls, s = c.pop("prefix")
    c.put("prefix", cls.reshape(1, -1), s)  # [D] -> [1, D]
    table, s = c.pop("positions.table")
    if table.ndim != 2:
        raise ConversionError(f"{s[0]}: expected a table [1 + S*S, D], got shape {tuple(table.shape)}")
    c.put("positions.cls", table[:1], s)
    c.put("positions.weight", table[1:], s)
    for i in range(config.num_layers):
        for kind in ("weight", "bias"):
            c.fuse([f"blocks.{i}.attn.{n}.{kind}" for n in "qkv"], f"blocks.{i}.attn.qkv.{kind}")
    return c


def tiny_hf_config(
    variant: str = "default", *, model_types: tuple[str, ...] = MODEL_TYPES, classes: tuple[str, ...] = CLASSES
) -> dict[str, Any]:  # fmt: skip
    """An 8x8 table of 4-pixel patches: ``default`` (quick-GELU), ``with_projection`` (its vision model with
    projection) or ``two_tower`` (erf GELU, as LAION's CLIPs, inside the two-tower model with a tiny text tower)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown {model_types[1]} variant {variant!r}; choose one of {list(VARIANTS)}")
    vision = tiny_vision(model_type=model_types[0], image_size=32, projection_dim=24)
    if variant != "two_tower":
        return {**vision, "architectures": [classes[VARIANTS.index(variant)]]}
    vision["hidden_act"] = "gelu"
    return {"model_type": model_types[1], "architectures": [classes[2]], "vision_config": vision,
            "text_config": TINY_TEXT, "projection_dim": 24}  # fmt: skip


def _frame_forward(model: Any, frame: Tensor) -> dict[str, Any]:
    """transformers' tower on one ``[C, H, W]`` frame, split into the class token and the patch tokens."""
    tower = model.vision_model if hasattr(model, "visual_projection") else model
    out = tower(pixel_values=frame[None], output_hidden_states=True, interpolate_pos_encoding=True)
    return split_prefix(out, 1)


_tower_forward = per_frame(_frame_forward)


def reference_forward(model: Any, entry: Tensor) -> dict[str, Any]:
    out = _tower_forward(model, entry)
    if hasattr(model, "visual_projection"):  # each frame's pooled output alone, as transformers projects it
        out["image_embeds"] = torch.cat([model.visual_projection(p[None]) for p in out["pooler_output"]])
    return out


def load_reference(ckpt: Checkpoint, *, classes: tuple[str, ...] = CLASSES) -> Any:
    """The vision model, the vision model with projection, or the whole two-tower model (its projection sits
    outside its vision tower; ``reference_forward`` runs the tower and the projection only)."""
    import transformers

    cls = getattr(transformers, hf_class(ckpt.config, classes))
    with no_token_id_warnings():
        return cls.from_pretrained(ckpt.path, attn_implementation="sdpa").eval().float()
