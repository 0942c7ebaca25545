"""Shared machinery of every family's converter: a strict key table and named tensor steps.

A family describes its checkpoint as an exact table ``source key -> our key`` (``DROP`` for keys we knowingly
discard), enumerated from its config. :func:`rename` refuses a key the table does not name and reports every
required key the checkpoint lacks; the steps below fuse and reshape tensors while remembering which source keys
each of our tensors came from, so that :func:`check_against_model` can name them when a shape is wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from packvit_native.config import EncoderConfig
from packvit_native.encoder import PackedVisionEncoder
from packvit_native.patchify import patch_weight_layout

from .errors import ConversionError

__all__ = ["DROP", "Converted", "check_against_model", "rename"]

DROP = None  # table value: a source key we know and discard
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


@dataclass
class Converted:
    """Tensors under our names, each with the source keys it was made from."""

    tensors: dict[str, Tensor] = field(default_factory=dict)
    sources: dict[str, list[str]] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)

    def pop(self, key: str) -> tuple[Tensor, list[str]]:
        return self.tensors.pop(key), self.sources.pop(key)

    def put(self, key: str, tensor: Tensor, sources: list[str]) -> None:
        self.tensors[key] = tensor
        self.sources[key] = sources

    def fuse(self, parts: list[str], into: str, fill_missing: bool = False) -> None:
        """Concatenate ``parts`` along dim 0 into one tensor (q/k/v -> qkv, gate/up -> gate_up).

        With ``fill_missing`` (biases), a part absent from the checkpoint becomes zeros as long as the parts
        present; if every part is absent, nothing is written.
        """
        present = [p for p in parts if p in self.tensors]
        if not present:
            return
        if len(present) < len(parts) and not fill_missing:
            raise ConversionError(f"cannot build {into}: missing {sorted(set(parts) - set(present))}")
        ref = self.tensors[present[0]]
        tensors, sources = [], []
        for p in parts:
            if p in self.tensors:
                t, s = self.pop(p)
                tensors.append(t)
                sources += s
            else:
                tensors.append(torch.zeros_like(ref))
        if any(t.shape[1:] != ref.shape[1:] for t in tensors):
            raise ConversionError(
                f"cannot fuse {sources} into {into}: shapes {[tuple(t.shape) for t in tensors]}"
            )
        self.put(into, torch.cat(tensors), sources)

    def conv_to_linear(self, key: str, ndim: int = 4) -> None:
        """A patch-embedding ``Conv2d`` weight ``[D, C, p, p]`` (``ndim=5``: ``Conv3d`` ``[D, C, T, p, p]``) ->
        ``Linear`` ``[D, C*p*p]`` (``[D, C*T*p*p]``), channel-first."""
        w, s = self.pop(key)
        if w.ndim != ndim:
            expected = "[D, C, p, p]" if ndim == 4 else "[D, C, T, p, p]"
            raise ConversionError(
                f"{s[0]}: expected a {ndim}D conv weight {expected}, got shape {tuple(w.shape)}"
            )
        self.put(key, w.reshape(w.shape[0], -1), s)

    def split(self, key: str, parts: list[str]) -> None:
        """Cut one tensor into equal parts along dim 0 (a fused in-projection -> its q and k/v rows)."""
        t, s = self.pop(key)
        if t.shape[0] % len(parts):
            raise ConversionError(
                f"{s[0]}: cannot split shape {tuple(t.shape)} into {len(parts)} equal parts"
            )
        for name, chunk in zip(parts, t.chunk(len(parts)), strict=True):
            self.put(name, chunk, s)

    def as_rows(self, key: str) -> None:
        """A token or table stored with leading singleton axes (``[1, n, D]``) -> ``[n, D]``."""
        t, s = self.pop(key)
        if t.ndim < 2 or any(n != 1 for n in t.shape[:-2]):
            raise ConversionError(f"{s[0]}: expected shape [1, n, D] or [n, D], got {tuple(t.shape)}")
        self.put(key, t.reshape(-1, t.shape[-1]), s)

    def hwc_to_chw(self, key: str, channels: int, patch: int) -> None:
        """A patch ``Linear`` over (row, col, channel) inputs -> the same map over (channel, row, col)."""
        w, s = self.pop(key)
        if w.ndim != 2 or w.shape[1] != channels * patch * patch:
            raise ConversionError(
                f"{s[0]}: expected a linear patch weight [D, {patch}*{patch}*{channels}], got {tuple(w.shape)}"
            )
        self.put(key, patch_weight_layout(w, channels, patch, 1, "hwc", "chw"), s)


def rename(state: dict[str, Tensor], table: dict[str, str | None]) -> Converted:
    """Apply an exact key table; an unknown key or a missing required key is an error naming it."""
    unknown = sorted(k for k in state if k not in table)
    if unknown:
        raise ConversionError(f"unknown checkpoint keys: {_listing(unknown)}")
    missing = sorted(k for k, v in table.items() if v is not DROP and k not in state)
    if missing:
        raise ConversionError(f"missing checkpoint keys: {_listing(missing)}")
    out = Converted()
    for key, tensor in state.items():
        target = table[key]
        if target is not DROP and tensor.dtype not in WEIGHT_DTYPES:  # before fusing promotes it unnoticed
            raise ConversionError(
                f"{key} is {tensor.dtype}: only float32, bfloat16, float16 and float64 weights are converted "
                "(quantized checkpoints are not; convert the unquantized release)"
            )
        if target is not DROP and (tensor.ndim == 0 or tensor.numel() == 0):  # no weight of ours is either
            raise ConversionError(
                f"{key} has shape {tuple(tensor.shape)}: a weight cannot be empty or a scalar"
            )
        if target is DROP:
            out.dropped.append(key)
        else:
            out.put(target, tensor, [key])
    return out


def check_against_model(config: EncoderConfig, converted: Converted) -> dict[str, Tensor]:
    """Compare converted tensors with the model ``config`` describes: same keys, same shapes, float dtype."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in PackedVisionEncoder(config).state_dict().items()}
    have = converted.tensors
    extra = sorted(set(have) - set(expected))
    if extra:
        raise ConversionError(f"converter produced keys the model lacks: {_listing(extra)} (a converter bug)")
    missing = sorted(set(expected) - set(have))
    if missing:
        raise ConversionError(f"checkpoint provides nothing for: {_listing(missing)}")
    for key, shape in expected.items():
        if have[key].shape != shape:
            raise ConversionError(
                f"{' + '.join(converted.sources[key])} has the wrong shape: it gives {key} shape "
                f"{tuple(have[key].shape)}, but the config implies {tuple(shape)}"
            )
        if not have[key].is_floating_point():
            raise ConversionError(
                f"{' + '.join(converted.sources[key])} is {have[key].dtype}, not floating point"
            )
    return {k: v.to(_common_dtype(have)).contiguous() for k, v in have.items()}


def _common_dtype(tensors: dict[str, Tensor]) -> torch.dtype:
    """The dtype holding most of the elements: a checkpoint that mixes dtypes (a few fp32 tensors in a bf16
    release) is loaded in one, as transformers loads it in its config's dtype, since a forward needs one."""
    counts: dict[torch.dtype, int] = {}
    for t in tensors.values():
        counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.__getitem__)
