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
import math
import os
import pickle
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from packvit_native.hub import CONFIG_PATTERNS, is_local, locate, snapshot_of
from packvit_native.io import check_regular_file

from .errors import ConversionError

__all__ = ["Checkpoint", "KeySelector", "load_state_dict", "locate", "read_checkpoint"]

# Which of a checkpoint's tensor names to read; the others are reported as dropped without being read.
KeySelector = Callable[[Iterable[str]], set[str]]


@dataclass
class Checkpoint:
    """A checkpoint's directory, its ``config.json`` and (optionally) its preprocessor config."""

    path: Path
    config: dict[str, Any]
    preprocessor: dict[str, Any] | None
    fetch: Callable[[list[str]], Path] | None = None  # for a hub id: download these files into ``path``


def _check_readable_file(path: Path, what: str) -> None:
    """Refuse anything but a regular, readable, non-pointer file, before opening it (a FIFO would block)."""
    check_regular_file(path, what, ConversionError)


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


# Config values that must be finite numbers wherever they appear (top level, vision_config, rope_parameters).
# Families read them with float(), which would accept NaN and report other mistakes without the file or key.
_NUMBER_FIELDS = ("layer_norm_eps", "rms_norm_eps", "rope_theta", "layerscale_value")


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_image_stats(path: Path, preprocessor: dict[str, Any]) -> None:
    """Refuse normalisation stats that are not lists of finite numbers (std positive), naming this file:
    the family reads them later, when the error could no longer say where they came from."""
    for name in ("image_mean", "image_std"):
        if name not in preprocessor:
            continue
        values = preprocessor[name]
        numbers = isinstance(values, list) and all(_is_finite_number(v) for v in values)
        if not numbers or not values or (name == "image_std" and min(values) <= 0):
            kind = "positive numbers" if name == "image_std" else "finite numbers"
            raise ConversionError(f"{path}: {name} = {values!r} is not a list of {kind}, one per channel")
    mean, std = preprocessor.get("image_mean"), preprocessor.get("image_std")
    if mean is not None and std is not None and len(mean) != len(std):
        raise ConversionError(f"{path}: image_mean has {len(mean)} values but image_std {len(std)}")
    factor = preprocessor.get("rescale_factor")
    if factor is not None and not (_is_finite_number(factor) and factor > 0):
        raise ConversionError(f"{path}: rescale_factor = {factor!r} is not a positive number")
    for flag in ("do_normalize", "do_rescale"):
        if not isinstance(preprocessor.get(flag, True), bool):
            raise ConversionError(f"{path}: {flag} = {preprocessor[flag]!r} is not true or false")


def _check_numbers(path: Path, config: dict[str, Any]) -> None:
    """Refuse a :data:`_NUMBER_FIELDS` value that is not a finite number, naming the file and the key."""
    scopes: dict[str, Any] = {"": config, "vision_config.": config.get("vision_config")}
    for prefix, scope in list(scopes.items()):
        if isinstance(scope, dict):
            scopes[f"{prefix}rope_parameters."] = scope.get("rope_parameters")
    for prefix, scope in scopes.items():
        for key in _NUMBER_FIELDS if isinstance(scope, dict) else ():
            value = scope.get(key)
            if value is not None and not _is_finite_number(value):
                raise ConversionError(f"{path}: {prefix}{key} = {value!r} is not a finite number")


def _present(path: Path) -> bool:
    """A file there, or a link (a dangling one is reported when read, naming it)."""
    return path.exists() or path.is_symlink()


def read_checkpoint(src: str | os.PathLike) -> Checkpoint:
    """A checkpoint's directory and configs. For a hub id only the configs are fetched here; weights are
    fetched file by file as a converter asks for them (a vision tower's shards, not a language model's)."""
    path = locate(src, CONFIG_PATTERNS)
    fetch = None if is_local(src) else snapshot_of(src, path)
    config_path = path / "config.json"
    if not _present(config_path):
        raise ConversionError(f"{path} has no config.json")
    # transformers' order: the image processor nested in processor_config.json (what its Processor.save_pretrained
    # writes since version 5), else preprocessor_config.json.
    preprocessor, pre = None, path / "processor_config.json"
    if _present(pre):
        nested = _read_json_object(pre, "processor config").get("image_processor")
        preprocessor = nested if isinstance(nested, dict) else None
    if preprocessor is None and _present(path / "preprocessor_config.json"):
        pre = path / "preprocessor_config.json"
        preprocessor = _read_json_object(pre, "preprocessor config")
    if preprocessor is not None:
        _check_image_stats(pre, preprocessor)
    config = _read_json_object(config_path, "config")
    _check_numbers(config_path, config)
    return Checkpoint(path, config, preprocessor, fetch)


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
    path: Path, index: Path, select: KeySelector | None, fetch: Callable[[list[str]], Path] | None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    weight_map = _read_json_object(index, "shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{index} has no weight_map")
    files = {key: _shard_path(path, index, shard) for key, shard in weight_map.items()}
    wanted = set(files) if select is None else select(files)
    by_file: dict[Path, list[str]] = {}
    for key in sorted(wanted):
        by_file.setdefault(files[key], []).append(key)
    if fetch is not None:
        fetch(sorted(f.name for f in by_file))
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
    except pickle.UnpicklingError as e:  # torch's text is several lines of advice on unsafe loading
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise ConversionError(
            f"{file} holds Python objects besides tensors{what}, and only plain weights are read "
            "(weights_only=True): save its state dict alone, e.g. torch.save(checkpoint['model'], 'weights.pth')"
        ) from None
    except Exception as e:
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()[:1] or [type(e).__name__]
        raise ConversionError(
            f"{file} cannot be read as a torch checkpoint (truncated or damaged?): {first[0]}"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ConversionError(f"{file} is not a flat dict of named tensors")
    wanted = set(state) if select is None else select(state)
    return {k: state[k] for k in state if k in wanted}, sorted(set(state) - wanted)


# What transformers' Trainer saves beside the weights of a checkpoint folder: never weights.
TRAINING_STATE = re.compile(
    r"training_args\.bin|optimizer\.pt|scheduler\.pt|scaler\.pt|rng_state(_\d+)?\.pth"
)


def load_state_dict(
    path: Path, select: KeySelector | None = None, fetch: Callable[[list[str]], Path] | None = None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of a checkpoint directory that ``select`` picks (all by default), and the names it skipped.

    Reads ``model.safetensors`` (or the one ``*.safetensors`` file), a sharded ``*.safetensors.index.json``,
    or one foreign ``.bin`` / ``.pth`` / ``.pt`` pickle. ``fetch`` (a hub checkpoint's) downloads weight files
    by name first: of a sharded checkpoint only the shards that hold selected tensors.
    """
    # transformers' order: model.safetensors before an index, which its save_pretrained leaves behind when a
    # sharded checkpoint is saved again unsharded into the same folder (and the other way round).
    if fetch is not None and any(path.glob("*.safetensors.index.json")):
        fetch(["model.safetensors"])  # a hub checkpoint's, if it has one: only configs are here yet
    indexes = [] if (path / "model.safetensors").is_file() else sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise ConversionError(f"{path} holds several shard indexes: {[i.name for i in indexes]}")
    if indexes:
        return _load_sharded(path, indexes[0], select, fetch)
    if fetch is not None and not (path / "model.safetensors").is_file():
        fetch(["*.safetensors"])
    files = sorted(path.glob("*.safetensors"))
    if (path / "model.safetensors").is_file():  # beside other formats' files (e.g. open_clip's), this one
        files = [path / "model.safetensors"]
    if len(files) > 1:
        raise ConversionError(
            f"{path} holds several safetensors files but no index: {[f.name for f in files]}"
        )
    if files:
        keys = _safetensors_keys(files[0])
        wanted = set(keys) if select is None else select(keys)
        return _read_safetensors(files[0], [k for k in keys if k in wanted]), sorted(set(keys) - wanted)
    pickles = sorted(
        p
        for p in [*path.glob("*.bin"), *path.glob("*.pth"), *path.glob("*.pt")]
        if not TRAINING_STATE.fullmatch(p.name)
    )
    if (path / "pytorch_model.bin").is_file():  # transformers' name for its weights
        pickles = [path / "pytorch_model.bin"]
    if len(pickles) > 1:
        raise ConversionError(
            f"{path} holds several weight pickles ({[p.name for p in pickles]}) and no index; "
            "sharded pickles are not supported, convert them to safetensors first"
        )
    if pickles:
        return _load_pickle(pickles[0], select)
    raise ConversionError(f"{path} has no weights (model.safetensors, a sharded index, or one .bin/.pth)")
