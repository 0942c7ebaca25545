"""``source checkpoint -> (EncoderConfig, our state dict)``: a pure function, chosen by model_type, never guessed."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from packvit_native.config import FORMAT_NAME, EncoderConfig

from .errors import ConversionError
from .families import aimv2, dinov3, siglip, siglip2
from .keymap import check_against_model
from .sources import Checkpoint, load_state_dict, read_checkpoint

__all__ = ["FAMILIES", "convert_checkpoint", "describe_dropped", "family_for", "family_named"]

FAMILIES: tuple[ModuleType, ...] = (dinov3, aimv2, siglip, siglip2)

# Top-level names under which two-tower checkpoints keep their text tower.
TEXT_TOWERS = ("text_model", "text_encoder")


def family_for(model_type: str | None) -> ModuleType:
    for fam in FAMILIES:
        if model_type in fam.MODEL_TYPES:
            return fam
    supported = sorted(t for fam in FAMILIES for t in fam.MODEL_TYPES)
    raise ConversionError(f"unsupported model_type {model_type!r}; supported: {supported}")


def family_named(name: str) -> ModuleType:
    for fam in FAMILIES:
        if name == fam.NAME:
            return fam
    raise ConversionError(f"unknown family {name!r}; known: {[fam.NAME for fam in FAMILIES]}")


def is_native(ckpt: Checkpoint) -> bool:
    return ckpt.config.get("format") == FORMAT_NAME


def convert_loaded(
    hf_config: dict, preprocessor: dict | None, state: dict[str, Tensor]
) -> tuple[EncoderConfig, dict[str, Tensor], list[str]]:
    """Convert an in-memory transformers checkpoint. Returns our config, our tensors and the dropped keys."""
    fam = family_for(hf_config.get("model_type"))
    # Key names are passed for formats whose config leaves something out (Apple's AIMv2 does not say
    # whether its positions are learned or sin-cos; the presence of the table does).
    config = fam.config_from_hf(hf_config, preprocessor, frozenset(state))
    converted = fam.convert_state_dict(state, hf_config, config)
    return config, check_against_model(config, converted), converted.dropped


def convert_checkpoint(
    src: str | Path, dtype: torch.dtype | None = None
) -> tuple[EncoderConfig, dict[str, Tensor], list[str]]:
    """Read a transformers checkpoint (hub id or local dir) and convert it; see :func:`convert_loaded`."""
    ckpt = read_checkpoint(src)
    if is_native(ckpt):
        raise ConversionError(f"{src} is already a {FORMAT_NAME} checkpoint")
    config, state, dropped = convert_loaded(ckpt.config, ckpt.preprocessor, load_state_dict(ckpt.path))
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    return config, state, dropped


def describe_dropped(dropped: list[str]) -> str:
    """One line naming what a conversion left out, the text tower of a two-tower checkpoint by name."""

    def count(n: int) -> str:
        return f"{n} tensor" + ("s" if n != 1 else "")

    groups: dict[str, list[str]] = {}
    for key in dropped:
        groups.setdefault(key.split(".")[0] if "." in key else key, []).append(key)
    parts = []
    for top, keys in groups.items():
        if top in TEXT_TOWERS:
            parts.insert(0, f"the text tower ({top}.*, {count(len(keys))})")
        else:
            parts.append(keys[0] if len(keys) == 1 else f"{top}.* ({count(len(keys))})")
    return f"dropped {count(len(dropped))} not part of the vision encoder: " + ", ".join(parts)
