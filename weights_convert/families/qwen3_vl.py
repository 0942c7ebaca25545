"""Qwen3-VL's vision tower (transformers ``Qwen3VLVisionModel``), and Qwen3.5's (``Qwen3_5VisionModel``), the
same architecture without deepstack.

Read from a whole vision-language checkpoint (model_type ``qwen3_vl`` / ``qwen3_5``, the tower under
``model.visual.`` or ``visual.``; the language model is never read) or from the tower saved alone. Beside the
Qwen-VL stem and merger it shares with Qwen2.5-VL (see ``qwen2_5_vl.py``):

- the Conv3d stem has a bias; a learned ``S x S`` position grid is resized to every image (bilinear, aligned
  corners, as transformers' interpolation taps compute it) and added, *and* 2D RoPE rotates q and k;
- LayerNorm (eps 1e-6) and a GELU-tanh MLP with biases; full attention in every block;
- deepstack: the outputs of ``deepstack_visual_indexes`` blocks each go through a merger of their own whose
  norm runs over the concatenated 2x2 block.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

from torch import Tensor

from packvit_native.config import EncoderConfig

from ..errors import ConversionError
from ..keymap import Converted, rename
from ..sources import Checkpoint
from . import qwen2_5_vl as qwen
from .common import load_vlm_tower_reference, require, vlm_tower_tensors

NAME = "qwen3_vl"
# The mixture-of-experts language models (Qwen3-VL-30B-A3B / 235B-A22B, Qwen3.5 MoE) carry the same tower.
REFERENCES = {  # model_type of a checkpoint -> transformers' tower class and its config's model_type
    "qwen3_vl": ("Qwen3VLVisionModel", "qwen3_vl_vision"),
    "qwen3_vl_moe": ("Qwen3VLMoeVisionModel", "qwen3_vl_moe_vision"),
    "qwen3_5": ("Qwen3_5VisionModel", "qwen3_5_vision"),
    "qwen3_5_moe": ("Qwen3_5MoeVisionModel", "qwen3_5_moe_vision"),
}
MODEL_TYPES = tuple(t for vlm, (_, tower) in REFERENCES.items() for t in (vlm, tower))
VARIANTS = ("vlm", "vision", "qwen3_5", "moe_vision")
HALF_STATS = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # what every published Qwen3-VL preprocessor config holds
select_keys = qwen.select_keys

# transformers' Qwen3VLVisionConfig defaults (Qwen3_5VisionConfig: the same, without deepstack).
DEFAULTS: dict[str, Any] = {
    "depth": 27, "hidden_size": 1152, "hidden_act": "gelu_pytorch_tanh", "intermediate_size": 4304,
    "num_heads": 16, "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
    "out_hidden_size": 3584, "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24],
}  # fmt: skip


def _is_qwen3_5(cfg: dict[str, Any]) -> bool:
    return cfg.get("model_type", "").startswith("qwen3_5")


def config_from_hf(
    cfg: dict[str, Any], preprocessor: dict[str, Any] | None, keys: Collection[str] = ()
) -> EncoderConfig:
    v = qwen.vision_config(cfg, DEFAULTS)
    if _is_qwen3_5(cfg):  # Qwen3.5's tower has no deepstack mergers, whatever its config says
        v["deepstack_visual_indexes"] = []
    n = require(v, "num_position_embeddings")
    side = math.isqrt(n) if n > 0 else 0
    if side * side != n:
        raise ConversionError(f"config.json num_position_embeddings = {n!r} is not a positive perfect square")
    deepstack = v["deepstack_visual_indexes"]
    if not isinstance(deepstack, list | tuple) or not all(isinstance(i, int) for i in deepstack):
        raise ConversionError(
            f"config.json deepstack_visual_indexes = {deepstack!r} is not a list of block indices"
        )
    return EncoderConfig(
        family=NAME, mlp="mlp", norm="layernorm", patch_bias=True, pos_embed="learned", pos_grid=(side, side),
        pos_resize="bilinear_corners", deepstack_layers=tuple(i + 1 for i in deepstack),
        **qwen.stem_fields(v, preprocessor, HALF_STATS),
    ).validate()  # fmt: skip


def _merger(t: dict[str, str | None], src: str, dst: str) -> None:
    for a, b in (("norm", "norm"), ("linear_fc1", "fc1"), ("linear_fc2", "fc2")):
        t[f"{src}.{a}.weight"], t[f"{src}.{a}.bias"] = f"{dst}.{b}.weight", f"{dst}.{b}.bias"


def _table(config: EncoderConfig) -> dict[str, str | None]:
    t: dict[str, str | None] = {
        "patch_embed.proj.weight": "patch_embed.weight",
        "patch_embed.proj.bias": "patch_embed.bias",
        "pos_embed.weight": "positions.weight",
    }
    _merger(t, "merger", "head")
    for j in range(len(config.deepstack_layers)):
        _merger(t, f"deepstack_merger_list.{j}", f"deepstack.{j}")
    for i in range(config.num_layers):
        s = f"blocks.{i}."
        for src, dst in (("norm1", "norm1"), ("norm2", "norm2"), ("attn.qkv", "attn.qkv"), ("attn.proj", "attn.proj"),
                         ("mlp.linear_fc1", "mlp.fc1"), ("mlp.linear_fc2", "mlp.fc2")):  # fmt: skip
            t[f"{s}{src}.weight"], t[f"{s}{src}.bias"] = f"{s}{dst}.weight", f"{s}{dst}.bias"
    return t


def convert_state_dict(state: dict[str, Tensor], cfg: dict[str, Any], config: EncoderConfig) -> Converted:
    c = rename(vlm_tower_tensors(state, cfg, qwen.TOWER_PREFIXES), _table(config))
    c.conv_to_linear("patch_embed.weight", ndim=5)
    return c


def tiny_hf_config(variant: str = "vlm") -> dict[str, Any]:
    """A small config: 3 blocks, deepstack after blocks 0 and 2, an 8x8 position grid, out width 48; ``vlm``
    inside a whole ``Qwen3VLForConditionalGeneration``, ``vision`` the tower alone, ``qwen3_5`` a Qwen3.5 tower,
    ``moe_vision`` the tower of the mixture-of-experts Qwen3-VL."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown {NAME} variant {variant!r}; choose one of {list(VARIANTS)}")
    vision = {"depth": 3, "hidden_size": 64, "intermediate_size": 96, "num_heads": 4, "patch_size": 4,
              "out_hidden_size": 48, "num_position_embeddings": 64}  # fmt: skip
    if variant == "qwen3_5":
        return {"model_type": "qwen3_5_vision", "architectures": ["Qwen3_5VisionModel"], **vision}
    vision["deepstack_visual_indexes"] = [0, 2]
    if variant in ("vision", "moe_vision"):
        name, model_type = REFERENCES["qwen3_vl_moe" if variant == "moe_vision" else "qwen3_vl"]
        return {"model_type": model_type, "architectures": [name], **vision}
    text = {"hidden_size": 48, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 12, "vocab_size": 64,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]}}  # fmt: skip
    return {"model_type": NAME, "architectures": ["Qwen3VLForConditionalGeneration"],
            "vision_config": vision, "text_config": text}  # fmt: skip


def reference_forward(model: Any, entry: Tensor) -> dict[str, Any]:
    pixels, grid = qwen.processor_patches(model, entry)
    out = model(pixels, grid_thw=grid, output_hidden_states=True)
    return {
        "last_hidden_state": out.last_hidden_state,
        "hidden_states": list(out.hidden_states),
        "pooler_output": out.pooler_output,
        "deepstack_features": list(getattr(out, "deepstack_features", None) or []),
    }


def load_reference(ckpt: Checkpoint) -> Any:
    kind = ckpt.config["model_type"].removesuffix("_vision")
    name, config_type = REFERENCES[kind]
    return load_vlm_tower_reference(ckpt, name, config_type, qwen.TOWER_PREFIXES)
