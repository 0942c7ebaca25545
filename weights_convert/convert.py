"""``source checkpoint -> (EncoderConfig, our state dict)``: a pure function, chosen by model_type, never guessed."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from packvit_native.config import FORMAT_NAME, EncoderConfig

from .errors import ConversionError
from .families import FAMILIES
from .keymap import check_against_model
from .sources import Checkpoint, load_state_dict, read_checkpoint

__all__ = [
    "FAMILIES",
    "convert_checkpoint",
    "convert_directory",
    "convert_loaded",
    "describe_dropped",
    "family_for",
    "family_named",
]

# Top-level names under which multimodal checkpoints keep what is not the vision tower.
OTHER_TOWERS = {
    "text_model": "the text tower",
    "text_encoder": "the text tower",
    "language_model": "the language model",
    "model.language_model": "the language model",
    "model.layers": "the language model",
    "model.embed_tokens": "the language model",
    "model.norm": "the language model",
    "lm_head": "the language model head",
}


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


def _model_type(hf_config: dict) -> str | None:
    model_type = hf_config.get("model_type")
    if not isinstance(model_type, (str, type(None))):
        raise ConversionError(f"config.json model_type = {model_type!r} is not a string")
    return model_type


def convert_loaded(
    hf_config: dict, preprocessor: dict | None, state: dict[str, Tensor], skipped: Iterable[str] = ()
) -> tuple[EncoderConfig, dict[str, Tensor], list[str]]:
    """Convert an in-memory transformers checkpoint. Returns our config, our tensors and the dropped keys
    (those the family dropped, plus ``skipped``: keys it never asked to read)."""
    fam = family_for(_model_type(hf_config))
    keys = frozenset(state) | frozenset(skipped)
    try:
        config = fam.config_from_hf(hf_config, preprocessor, keys)
    except (
        TypeError,
        KeyError,
        AttributeError,
        ArithmeticError,
    ) as e:  # a config value the family cannot read
        raise ConversionError(
            f"config.json cannot be read as a {fam.NAME} config: {type(e).__name__}: {e}"
        ) from None
    except ConversionError:
        raise
    except ValueError as e:  # EncoderConfig.validate refused the values
        raise ConversionError(f"config.json describes an invalid {fam.NAME} model: {e}") from None
    try:
        converted = fam.convert_state_dict(state, hf_config, config)
    except (IndexError, RuntimeError) as e:  # a reshape or concatenation of a tensor of some other layout
        raise ConversionError(
            f"its tensors do not have the layout of a {fam.NAME} checkpoint ({type(e).__name__}: {e})"
        ) from None
    return config, check_against_model(config, converted), sorted([*converted.dropped, *skipped])


def convert_directory(
    path: Path, ckpt: Checkpoint | None = None, dtype: torch.dtype | None = None
) -> tuple[EncoderConfig, dict[str, Tensor], list[str]]:
    """Convert a local transformers checkpoint directory, reading only the tensors its family asks for.

    Errors name the checkpoint: those about keys or config values are raised where only the parsed data is
    known, so the folder is put in front of them here.
    """
    ckpt = ckpt or read_checkpoint(path)
    if ckpt.config.get("format") == FORMAT_NAME:
        raise ConversionError(f"{path} is already a {FORMAT_NAME} checkpoint")
    try:
        fam = family_for(_model_type(ckpt.config))
        select = getattr(fam, "select_keys", None)
        state, skipped = load_state_dict(
            ckpt.path, None if select is None else lambda keys: select(keys, ckpt.config), ckpt.fetch
        )
        config, state, dropped = convert_loaded(ckpt.config, ckpt.preprocessor, state, skipped)
    except ConversionError as e:
        if str(ckpt.path) in str(e):
            raise
        raise type(e)(f"{ckpt.path}: {e}") from None
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    return config, state, dropped


def convert_checkpoint(
    src: str | os.PathLike, dtype: torch.dtype | None = None
) -> tuple[EncoderConfig, dict[str, Tensor], list[str]]:
    """Read a transformers checkpoint (hub id or local dir) and convert it; see :func:`convert_loaded`."""
    ckpt = read_checkpoint(src)
    return convert_directory(ckpt.path, ckpt, dtype)


def describe_dropped(dropped: list[str]) -> str:
    """One line naming what a conversion left out, other towers by name."""

    def count(n: int) -> str:
        return f"{n} tensor" + ("s" if n != 1 else "")

    towers: dict[str, dict[str, int]] = {}  # name -> {key prefix: tensors}
    groups: dict[str, list[str]] = {}
    for key in dropped:
        tower = next((t for t in OTHER_TOWERS if key.startswith(t + ".")), None)
        if tower is None:
            groups.setdefault(key.split(".")[0] if "." in key else key, []).append(key)
        else:
            prefixes = towers.setdefault(OTHER_TOWERS[tower], {})
            prefixes[tower] = prefixes.get(tower, 0) + 1
    parts = [
        f"{name} ({', '.join(f'{t}.*' for t in prefixes)}: {count(sum(prefixes.values()))})"
        for name, prefixes in towers.items()
    ]
    parts += [keys[0] if len(keys) == 1 else f"{top}.* ({count(len(keys))})" for top, keys in groups.items()]
    return f"dropped {count(len(dropped))} not part of the vision encoder: " + ", ".join(parts)
