"""SigLIP2 NaFlex (transformers ``Siglip2VisionModel`` / ``Siglip2Model``).

Same trunk and head as SigLIP (see ``siglip.py``); what differs is the stem. The patch embedding is a
``Linear`` over (row, col, channel) patches, as the NaFlex processor emits them; the converter permutes it to
the (channel, row, col) order every family takes by default, and ``from_pretrained(..., patch_layout="ppc")``
permutes it back so processor patches go in unchanged. The learned ``S x S`` table is resized to every image
size (bilinear, antialiased, in fp32), even at ``S x S``.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import torch
from torch import Tensor

from packvit_native.config import EncoderConfig
from packvit_native.patchify import patchify

from ..errors import ConversionError
from ..keymap import Converted
from ..sources import Checkpoint
from .common import load_tower_reference, per_frame, resample_of, tower_config, with_defaults
from .siglip import DEFAULTS as SIGLIP_DEFAULTS
from .siglip import TINY_TEXT, convert_trunk, tiny_vision, trunk_config

NAME = "siglip2"
MODEL_TYPES = ("siglip2_vision_model", "siglip2")
HF_CLASS = "Siglip2VisionModel"
VARIANTS = ("default", "two_tower")
# What a version-1 config of this family left to the runtime's preprocessing tables (see
# families.version_1_defaults).
V1_DEFAULTS = {"resize_max_patches": 256}

# Siglip2VisionConfig: SigLIP's defaults, without image_size, with the table length num_patches.
DEFAULTS: dict[str, Any] = {
    **{k: v for k, v in SIGLIP_DEFAULTS.items() if k != "image_size"},
    "num_patches": 256,
}


def config_from_hf(
    cfg: dict[str, Any], preprocessor: dict[str, Any] | None, keys: Collection[str] = ()
) -> EncoderConfig:
    v = with_defaults(tower_config(cfg)[0], DEFAULTS)
    n = v["num_patches"]
    side = math.isqrt(n) if isinstance(n, int) and n > 0 else 0
    if side * side != n:
        raise ConversionError(f"config.json 'num_patches' = {n!r} is not a positive perfect square")
    budget = (preprocessor or {}).get("max_num_patches", 256)
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise ConversionError(
            f"preprocessor_config.json max_num_patches = {budget!r} is not a positive integer"
        )
    return trunk_config(
        v, preprocessor, family="siglip2", pos_grid=(side, side), pos_resize="bilinear_antialias",
        resample=resample_of(preprocessor, "bilinear"), resize_max_patches=budget,
    )  # fmt: skip


def convert_state_dict(state: dict[str, Tensor], cfg: dict[str, Any], config: EncoderConfig) -> Converted:
    c = convert_trunk(state, cfg, config)
    c.hwc_to_chw("patch_embed.weight", config.num_channels, config.patch_size)
    return c


def tiny_hf_config(variant: str = "default") -> dict[str, Any]:
    """A small transformers config with an 8x8 table: ``default`` or ``two_tower`` (in a ``Siglip2Model``)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown siglip2 variant {variant!r}; choose one of {list(VARIANTS)}")
    vision = tiny_vision(model_type="siglip2_vision_model", num_patches=64)
    if variant == "default":
        return vision
    return {"model_type": "siglip2", "vision_config": vision, "text_config": TINY_TEXT}


def processor_inputs(
    frames: list[Tensor], patch_size: int, max_patches: int | None = None
) -> dict[str, Tensor]:
    """What the NaFlex processor hands the model for already-sized frames ``[C, H, W]``: (row, col, channel)
    patches zero-padded to ``max_patches`` rows, the 0/1 attention mask and the (rows, cols) of each frame."""
    patches = [patchify([f], patch_size, layout="ppc")[0] for f in frames]  # [h*w, p*p*C] each
    n = max_patches or max(len(p) for p in patches)
    pixel_values = torch.zeros(len(frames), n, patches[0].shape[1])
    mask = torch.zeros(len(frames), n, dtype=torch.int32)
    for i, p in enumerate(patches):
        pixel_values[i, : len(p)] = p
        mask[i, : len(p)] = 1
    shapes = torch.tensor([[f.shape[1] // patch_size, f.shape[2] // patch_size] for f in frames])
    return {"pixel_values": pixel_values, "pixel_attention_mask": mask, "spatial_shapes": shapes}


def _frame_forward(model: Any, frame: Tensor) -> dict[str, Any]:
    """transformers' outputs for one ``[C, H, W]`` frame fed as the processor feeds it."""
    inputs = {k: v.to(frame.device) for k, v in processor_inputs([frame], model.config.patch_size).items()}
    out = model(**inputs, output_hidden_states=True)
    return {
        "last_hidden_state": out.last_hidden_state[0],
        "pooler_output": out.pooler_output[0] if out.pooler_output is not None else None,
        "hidden_states": [h[0] for h in out.hidden_states],
    }


reference_forward = per_frame(_frame_forward)


def load_reference(ckpt: Checkpoint) -> Any:
    return load_tower_reference(ckpt, HF_CLASS)
