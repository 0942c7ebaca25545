"""Our checkpoint format: ``config.json`` (an :class:`EncoderConfig`) + ``model.safetensors``, written atomically."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

from .atomic import replace_dir
from .config import FORMAT_NAME, EncoderConfig

__all__ = ["is_native_dir", "load_native", "save_native"]


def is_native_dir(path: Path) -> bool:
    """Whether ``path`` holds a checkpoint in our format (its config.json names the format)."""

    cfg = path / "config.json"
    try:
        return cfg.is_file() and json.loads(cfg.read_text()).get("format") == FORMAT_NAME
    except (json.JSONDecodeError, AttributeError):
        return False


def save_native(
    out_dir: str | Path, config: EncoderConfig, state: dict[str, Tensor], force: bool = False
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` into ``out_dir``, all or nothing.

    The folder is written and flushed under a temporary name and then put in place (see
    :func:`~packvit_native.atomic.replace_dir`): ``out_dir`` is at every instant absent, the complete previous
    checkpoint, or the complete new one. An existing ``out_dir`` is replaced only with ``force``.
    """
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}

    def fill(folder: Path) -> None:
        config.to_json(folder / "config.json")
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    return replace_dir(Path(out_dir), fill, force=force)


def load_native(path: Path) -> tuple[EncoderConfig, dict[str, Tensor]]:
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{path} has a {FORMAT_NAME} config.json but no model.safetensors")
    return EncoderConfig.from_json(path / "config.json"), load_file(weights)
