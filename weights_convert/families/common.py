"""Reading values out of a transformers config, strictly."""

from __future__ import annotations

from typing import Any

from ..errors import ConversionError

__all__ = ["ACTIVATIONS", "activation", "image_stats", "require"]

# transformers' activation names -> ours.
ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
    "quick_gelu": "quick_gelu",
}


def require(cfg: dict[str, Any], key: str, kind: type | tuple[type, ...] = int) -> Any:
    if key not in cfg:
        raise ConversionError(f"config.json lacks {key!r}")
    value = cfg[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConversionError(f"config.json {key!r} = {value!r} has an unexpected type")
    return value


def activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ConversionError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def square(value: Any, key: str) -> int:
    """Patch or image sizes given as an int or a square pair."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConversionError(f"config.json {key!r} = {value!r}: only square sizes are supported")
        value = value[0]
    if not isinstance(value, int) or value < 1:
        raise ConversionError(f"config.json {key!r} = {value!r} is not a positive integer")
    return value


def image_stats(
    preprocessor: dict[str, Any] | None, default: tuple[tuple[float, ...], tuple[float, ...]]
) -> dict[str, tuple[float, ...]]:
    """The normalisation mean/std from a checkpoint's preprocessor config, else the family's published one."""
    mean, std = default
    if preprocessor:
        mean = tuple(float(v) for v in preprocessor.get("image_mean", mean))
        std = tuple(float(v) for v in preprocessor.get("image_std", std))
    return {"image_mean": mean, "image_std": std}
