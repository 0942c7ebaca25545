"""Our checkpoint format: ``config.json`` (an :class:`EncoderConfig`) + ``model.safetensors``, written atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

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

    Files are written into a temporary sibling directory that is then renamed into place, so a failure at any
    point leaves ``out_dir`` as it was. An existing ``out_dir`` is replaced only with ``force``.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force (force=True) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        config.to_json(tmp / "config.json")
        tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "previous")
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old / "previous", out)  # put the previous checkpoint back before giving up
                shutil.rmtree(old, ignore_errors=True)
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_native(path: Path) -> tuple[EncoderConfig, dict[str, Tensor]]:
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{path} has a {FORMAT_NAME} config.json but no model.safetensors")
    return EncoderConfig.from_json(path / "config.json"), load_file(weights)
