"""Qwen2.5-VL's vision tower (transformers ``Qwen2_5_VisionTransformerPretrainedModel``).

Read from a whole vision-language checkpoint (model_type ``qwen2_5_vl``: the tower under ``visual.`` as
published, or ``model.visual.`` as transformers 5 saves it; the language model is never read) or from the
tower saved alone (``qwen2_5_vl_vision``). What makes it this family, all of it config data:

- a Conv3d stem over ``temporal_patch_size`` frames (no bias): a linear over ``C*T*p*p`` patch values;
- 2D RoPE on integer (row, col), applied in fp32; RMSNorm (eps 1e-6) and SwiGLU with biases;
- attention in windows of ``window_size`` pixels (whole 2x2 merge blocks, partial at the edges) except in
  ``fullatt_block_indexes``;
- no final norm: the patch merger (RMSNorm, then an MLP over each 2x2 block) is the pooled output.

transformers returns ``last_hidden_state`` in its window order; ours is in input (merge) order.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Any

import torch
from torch import Tensor

from packvit_native.config import EncoderConfig
from packvit_native.patchify import patchify

from ..errors import ConversionError
from ..keymap import Converted, rename
from ..sources import Checkpoint
from .common import (
    CLIP_STATS,
    activation,
    image_stats,
    load_vlm_tower_reference,
    require,
    resample_of,
    square,
    tower_config,
    vlm_tower_keys,
    vlm_tower_tensors,
    with_defaults,
)

NAME = "qwen2_5_vl"
MODEL_TYPES = ("qwen2_5_vl", "qwen2_5_vl_vision")
VARIANTS = ("vlm", "vision")
VISION_CLASS = "qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel"
VISION_TYPE = "qwen2_5_vl_vision"
TOWER_PREFIXES = ("model.visual.", "visual.")
PIXELS = (56 * 56, 28 * 28 * 1280)  # Qwen2VLImageProcessor's default min_pixels, max_pixels

# transformers' Qwen2_5_VLVisionConfig defaults (hub configs may omit them).
DEFAULTS: dict[str, Any] = {
    "depth": 32, "hidden_size": 3584, "hidden_act": "silu", "intermediate_size": 3420, "num_heads": 16,
    "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
    "out_hidden_size": 3584, "fullatt_block_indexes": [7, 15, 23, 31],
}  # fmt: skip


def vision_config(cfg: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The tower's config with transformers' defaults filled in (``in_chans``, as published, read too)."""
    v = with_defaults(tower_config(cfg)[0], defaults)
    if "in_chans" in v and "in_channels" not in tower_config(cfg)[0]:
        v["in_channels"] = v["in_chans"]
    return v


def rope_theta(v: dict[str, Any]) -> float:
    theta = (v.get("rope_parameters") or {}).get("rope_theta", v.get("rope_theta", 10000.0))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool):
        raise ConversionError(f"config.json rope_theta = {theta!r} is not a number")
    return float(theta)


def pixel_budget(preprocessor: dict[str, Any] | None) -> dict[str, int]:
    """The processor's min/max pixel area: ``min_pixels``/``max_pixels``, or ``size.shortest/longest_edge``."""
    pre = preprocessor or {}
    size = pre.get("size") if isinstance(pre.get("size"), dict) else {}
    lo = pre.get("min_pixels", size.get("shortest_edge", PIXELS[0]))
    hi = pre.get("max_pixels", size.get("longest_edge", PIXELS[1]))
    for name, value in (("min_pixels", lo), ("max_pixels", hi)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConversionError(f"preprocessor_config.json {name} = {value!r} is not a positive integer")
    return {"resize_min_pixels": lo, "resize_max_pixels": hi}


def stem_fields(v: dict[str, Any], preprocessor: dict[str, Any] | None, stats) -> dict[str, Any]:
    """What both Qwen-VL towers share: Conv3d stem, integer 2D RoPE in fp32, merger head, smart resize."""
    return {
        "patch_size": square(v["patch_size"], "patch_size"),
        "num_channels": require(v, "in_channels"),
        "temporal_patch_size": require(v, "temporal_patch_size"),
        "hidden_size": require(v, "hidden_size"),
        "num_layers": require(v, "depth"),
        "num_heads": require(v, "num_heads"),
        "mlp_hidden": require(v, "intermediate_size"),
        "activation": activation(v["hidden_act"]),
        "norm_eps": 1e-6,
        "rope": "index",
        "rope_theta": rope_theta(v),
        "rope_fp32": True,
        "final_norm": False,
        "head": "merger",
        "out_hidden_size": require(v, "out_hidden_size"),
        "merge_size": require(v, "spatial_merge_size"),
        "resample": resample_of(preprocessor, "bicubic"),
        **pixel_budget(preprocessor),
        **image_stats(preprocessor, stats),
    }


def config_from_hf(
    cfg: dict[str, Any], preprocessor: dict[str, Any] | None, keys: Collection[str] = ()
) -> EncoderConfig:
    v = vision_config(cfg, DEFAULTS)
    fields = stem_fields(v, preprocessor, CLIP_STATS)
    units = require(v, "window_size") // fields["merge_size"] // fields["patch_size"]
    if units < 1:
        raise ConversionError(f"config.json window_size = {v['window_size']} is smaller than one merge block")
    full = v["fullatt_block_indexes"]
    if not isinstance(full, list | tuple) or not all(isinstance(i, int) for i in full):
        raise ConversionError(f"config.json fullatt_block_indexes = {full!r} is not a list of block indices")
    return EncoderConfig(
        family=NAME, mlp="swiglu", norm="rmsnorm", patch_bias=False, window_size=units * fields["merge_size"],
        full_attention_blocks=tuple(full), **fields,
    ).validate()  # fmt: skip


def select_keys(keys: Iterable[str], cfg: dict[str, Any]) -> set[str]:
    return vlm_tower_keys(keys, cfg, TOWER_PREFIXES)


def _table(config: EncoderConfig) -> dict[str, str | None]:
    t: dict[str, str | None] = {
        "patch_embed.proj.weight": "patch_embed.weight",
        "merger.ln_q.weight": "head.norm.weight",
    }
    for src, dst in (("merger.mlp.0", "head.fc1"), ("merger.mlp.2", "head.fc2")):
        t[f"{src}.weight"], t[f"{src}.bias"] = f"{dst}.weight", f"{dst}.bias"
    for i in range(config.num_layers):
        s = f"blocks.{i}."
        t[f"{s}norm1.weight"], t[f"{s}norm2.weight"] = f"{s}norm1.weight", f"{s}norm2.weight"
        for src in ("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            dst = {"mlp.down_proj": "mlp.down"}.get(src, src)
            t[f"{s}{src}.weight"], t[f"{s}{src}.bias"] = f"{s}{dst}.weight", f"{s}{dst}.bias"
    return t


def convert_state_dict(state: dict[str, Tensor], cfg: dict[str, Any], config: EncoderConfig) -> Converted:
    c = rename(vlm_tower_tensors(state, cfg, TOWER_PREFIXES), _table(config))
    c.conv_to_linear("patch_embed.weight", ndim=5)
    for i in range(config.num_layers):
        for kind in ("weight", "bias"):
            c.fuse(
                [f"blocks.{i}.mlp.gate_proj.{kind}", f"blocks.{i}.mlp.up_proj.{kind}"],
                f"blocks.{i}.mlp.gate_up.{kind}",
            )
    return c


def tiny_hf_config(variant: str = "vlm") -> dict[str, Any]:
    """A small config: 4 blocks (1 and 3 full), 4x4-patch windows, out width 48; ``vlm`` inside a whole
    ``Qwen2_5_VLForConditionalGeneration`` with a tiny language model, ``vision`` the tower alone."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown {NAME} variant {variant!r}; choose one of {list(VARIANTS)}")
    vision = {"depth": 4, "hidden_size": 64, "intermediate_size": 96, "num_heads": 4, "patch_size": 4,
              "window_size": 16, "out_hidden_size": 48, "fullatt_block_indexes": [1, 3]}  # fmt: skip
    if variant == "vision":
        return {"model_type": VISION_TYPE, "architectures": [VISION_CLASS], **vision}
    # Token ids inside the tiny vocabulary: the defaults (151643, 151645) would make transformers warn.
    text = {"hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": 64, "bos_token_id": 1, "eos_token_id": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]}}  # fmt: skip
    return {"model_type": NAME, "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "vision_config": vision, "text_config": text}  # fmt: skip


def processor_patches(model: Any, entry: Tensor) -> tuple[Tensor, Tensor]:
    """What Qwen's processor hands the tower for one normalised, sized entry: ``[n, C*T*p*p]`` patches in
    (channel, frame, row, col) order and 2x2 merge order, and ``grid_thw [1, 3]``."""
    c = model.config
    patches, grid = patchify([entry], c.patch_size, "chw", c.spatial_merge_size, c.temporal_patch_size)
    return patches, grid.to(entry.device)


def reference_forward(model: Any, entry: Tensor) -> dict[str, Any]:
    from transformers.vision_utils import get_vision_window_index

    pixels, grid = processor_patches(model, entry)
    out = model(pixels, grid_thw=grid, output_hidden_states=True)
    c = model.config
    window_index, _ = get_vision_window_index(grid, c.spatial_merge_size, c.window_size, c.patch_size)
    unit = c.spatial_merge_size**2
    inverse = torch.argsort(window_index).to(entry.device)

    def input_order(x: Tensor) -> Tensor:  # transformers' window order -> merge order
        return x.reshape(-1, unit, x.shape[-1])[inverse].reshape(x.shape)

    return {
        "last_hidden_state": input_order(out.last_hidden_state),
        "hidden_states": [input_order(h) for h in out.hidden_states],
        "pooler_output": out.pooler_output,
    }


def load_reference(ckpt: Checkpoint) -> Any:
    return load_vlm_tower_reference(ckpt, VISION_CLASS, VISION_TYPE, TOWER_PREFIXES)
