"""Read a checkpoint from a hub id or a local directory: its config and the tensors a converter asks for.

Our own files and transformers checkpoints are safetensors (single file or sharded with an index). Tensors are
read by name, so a converter that needs only a vision tower never reads a language model's bytes: only the
shards that hold wanted tensors are opened, and only wanted tensors are read from them. A foreign PyTorch pickle
(``.bin`` / ``.pth``) is read with ``torch.load(weights_only=True)``, which refuses to run code;
``trust_remote_code`` is never used.

Every failure is a :class:`~weights_convert.errors.ConversionError` naming the file and the problem.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from packvit_native.hub import locate

from .errors import ConversionError

__all__ = ["Checkpoint", "KeySelector", "load_state_dict", "locate", "read_checkpoint"]

# Which of a checkpoint's tensor names to read; the others are reported as dropped without being read.
KeySelector = Callable[[Iterable[str]], set[str]]

_LFS_POINTER = b"version https://git-lfs"


@dataclass
class Checkpoint:
    """A checkpoint's directory, its ``config.json`` and (optionally) its preprocessor config."""

    path: Path
    config: dict[str, Any]
    preprocessor: dict[str, Any] | None


def _check_readable_file(path: Path, what: str) -> None:
    """Refuse anything but a regular, readable, non-pointer file, before opening it (a FIFO would block)."""
    try:
        mode = path.stat().st_mode
    except OSError as e:  # missing, a symlink loop, no permission on the folder
        raise ConversionError(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise ConversionError(f"{path}: the {what} is {kind}")
    try:
        with path.open("rb") as f:
            head = f.read(len(_LFS_POINTER))
    except OSError as e:
        raise ConversionError(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    if head == _LFS_POINTER:
        raise ConversionError(
            f"{path} is a Git LFS pointer, not the {what}: fetch the real file (`git lfs pull` in the clone, "
            "or download it with huggingface_hub)"
        )


def _read_json(path: Path, what: str) -> Any:
    _check_readable_file(path, what)
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise ConversionError(f"{path} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None


def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    data = _read_json(path, what)
    if not isinstance(data, dict):
        raise ConversionError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def read_checkpoint(src: str | os.PathLike) -> Checkpoint:
    """A checkpoint's directory and configs (hub ids are fetched into the local cache first)."""
    path = locate(src)
    config_path = path / "config.json"
    if not config_path.exists() and not config_path.is_symlink():
        raise ConversionError(f"{path} has no config.json")
    pre = path / "preprocessor_config.json"
    preprocessor = _read_json_object(pre, "preprocessor config") if pre.exists() else None
    return Checkpoint(path, _read_json_object(config_path, "config"), preprocessor)


def _safetensors_keys(file: Path) -> list[str]:
    _check_readable_file(file, "weights file")
    try:
        with safe_open(file, "pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise ConversionError(f"{file} is not a readable safetensors file: {e}") from None


def _read_safetensors(file: Path, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    try:
        with safe_open(file, "pt") as f:
            return {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:  # truncated data, unknown dtype
        raise ConversionError(f"{file} is not a readable safetensors file: {e}") from None


def _shard_path(root: Path, index: Path, shard: Any) -> Path:
    """A shard named in an index, refused unless it is a plain file name inside the checkpoint directory."""
    if not isinstance(shard, str) or not shard or Path(shard).name != shard or shard in (".", ".."):
        raise ConversionError(
            f"{index.name} names shard {shard!r}; shards must be files in the checkpoint directory itself"
        )
    return root / shard


def _load_sharded(
    path: Path, index: Path, select: KeySelector | None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    weight_map = _read_json_object(index, "shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{index} has no weight_map")
    files = {key: _shard_path(path, index, shard) for key, shard in weight_map.items()}
    wanted = set(files) if select is None else select(files)
    by_file: dict[Path, list[str]] = {}
    for key in sorted(wanted):
        by_file.setdefault(files[key], []).append(key)
    state: dict[str, torch.Tensor] = {}
    for file, keys in by_file.items():
        if not file.exists() and not file.is_symlink():
            raise ConversionError(f"shard {file.name} named in {index.name} is missing")
        present = set(_safetensors_keys(file))
        absent = sorted(set(keys) - present)
        if absent:
            raise ConversionError(f"{index.name} puts {absent[:5]} in {file.name}, which does not hold them")
        state.update(_read_safetensors(file, keys))
    return state, sorted(set(files) - wanted)


def _load_pickle(file: Path, select: KeySelector | None) -> tuple[dict[str, torch.Tensor], list[str]]:
    _check_readable_file(file, "weights file")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConversionError(f"{file} cannot be read as plain weights (weights_only=True): {e}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ConversionError(f"{file} is not a flat dict of named tensors")
    wanted = set(state) if select is None else select(state)
    return {k: state[k] for k in state if k in wanted}, sorted(set(state) - wanted)


def load_state_dict(
    path: Path, select: KeySelector | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of a checkpoint directory that ``select`` picks (all by default), and the names it skipped.

    Reads ``model.safetensors`` (or the one ``*.safetensors`` file), a sharded ``*.safetensors.index.json``,
    or one foreign ``.bin`` / ``.pth`` / ``.pt`` pickle.
    """
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise ConversionError(f"{path} holds several shard indexes: {[i.name for i in indexes]}")
    if indexes:
        return _load_sharded(path, indexes[0], select)
    files = sorted(path.glob("*.safetensors"))
    if len(files) > 1:
        raise ConversionError(
            f"{path} holds several safetensors files but no index: {[f.name for f in files]}"
        )
    if files:
        keys = _safetensors_keys(files[0])
        wanted = set(keys) if select is None else select(keys)
        return _read_safetensors(files[0], [k for k in keys if k in wanted]), sorted(set(keys) - wanted)
    pickles = sorted([*path.glob("*.bin"), *path.glob("*.pth"), *path.glob("*.pt")])
    if len(pickles) > 1:
        raise ConversionError(
            f"{path} holds several weight pickles ({[p.name for p in pickles]}) and no index; "
            "sharded pickles are not supported, convert them to safetensors first"
        )
    if pickles:
        return _load_pickle(pickles[0], select)
    raise ConversionError(f"{path} has no weights (model.safetensors, a sharded index, or one .bin/.pth)")
