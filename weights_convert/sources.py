"""Read a checkpoint from a hub id or a local directory: its config and its tensors.

Our own files and transformers checkpoints are safetensors (single file or sharded with an index). A foreign
PyTorch pickle (``.bin`` / ``.pth``) is read with ``torch.load(weights_only=True)``, which refuses to run code;
``trust_remote_code`` is never used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .errors import ConversionError

__all__ = ["Checkpoint", "load_state_dict", "locate", "read_checkpoint"]

_HUB_PATTERNS = ["config.json", "preprocessor_config.json", "*.safetensors", "*.safetensors.index.json"]


@dataclass
class Checkpoint:
    """A checkpoint's directory, its ``config.json`` and (optionally) its preprocessor config."""

    path: Path
    config: dict[str, Any]
    preprocessor: dict[str, Any] | None


def locate(src: str | Path) -> Path:
    """A local directory as is; anything else is taken as a hub id and fetched through huggingface_hub.

    Only configs and safetensors are fetched. With ``HF_HUB_OFFLINE=1`` the hub cache (``HF_HUB_CACHE``) is read
    without network access.
    """
    path = Path(src)
    if path.is_dir():
        return path
    if path.exists():
        raise ConversionError(f"{src} is a file; pass the directory that holds config.json and the weights")
    if str(src).startswith((".", "/", "~")) or str(src).count("/") > 1:
        raise ConversionError(f"{src}: no such directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(str(src), allow_patterns=_HUB_PATTERNS))
    except HFValidationError as e:
        raise ConversionError(f"{src} is neither a local directory nor a valid hub id: {e}") from None
    except Exception as e:  # offline with an empty cache, unknown repo, network failure
        raise ConversionError(f"could not fetch {src!r} from the hub: {type(e).__name__}: {e}") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None


def read_checkpoint(src: str | Path) -> Checkpoint:
    path = locate(src)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{path} has no config.json")
    pre = path / "preprocessor_config.json"
    return Checkpoint(path, _read_json(config_path), _read_json(pre) if pre.is_file() else None)


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: ``model.safetensors``, a sharded index, or one foreign pickle."""
    index = sorted(path.glob("*.safetensors.index.json"))
    if index:
        weight_map = _read_json(index[0]).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConversionError(f"{index[0]} has no weight_map")
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = path / shard
            if not shard_path.is_file():
                raise ConversionError(f"shard {shard} named in {index[0].name} is missing")
            state.update(load_file(shard_path))
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise ConversionError(f"keys listed in {index[0].name} but absent from its shards: {missing[:5]}")
        return state
    files = sorted(path.glob("*.safetensors"))
    if len(files) == 1:
        return load_file(files[0])
    if len(files) > 1:
        raise ConversionError(
            f"{path} holds several safetensors files but no index: {[f.name for f in files]}"
        )
    pickles = sorted([*path.glob("*.bin"), *path.glob("*.pth"), *path.glob("*.pt")])
    if len(pickles) == 1:
        try:
            state = torch.load(pickles[0], map_location="cpu", weights_only=True)
        except Exception as e:
            raise ConversionError(
                f"{pickles[0]} cannot be read as plain weights (weights_only=True): {e}"
            ) from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConversionError(f"{pickles[0]} is not a flat dict of tensors")
        return state
    raise ConversionError(f"{path} has no weights (model.safetensors, a sharded index, or one .bin/.pth)")
