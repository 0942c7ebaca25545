"""Write a safetensors file piece by piece, so that a shard's token features never exist twice in memory.

``safetensors.torch.save`` needs every tensor whole and returns the file as one ``bytes`` object: for a shard's
tokens that is the features of every image concatenated (one copy) and then serialized (another), three times
their size at the peak. :func:`write_tensors` takes a tensor as the sequence of pieces it is the concatenation
of, computes the header from their shapes, and writes each piece's bytes straight from its storage.

The format (as the safetensors project documents it): an unsigned 64-bit little-endian header length, the
header (JSON: per tensor its ``dtype``, ``shape`` and ``data_offsets`` into the data that follows, plus
``__metadata__``, a string-to-string map), padded with spaces to a multiple of 8 bytes, then the tensors' bytes,
little-endian, one after another with no gaps. Files written here read back with ``safetensors.safe_open``.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Mapping, Sequence
from typing import BinaryIO

import torch
from torch import Tensor

__all__ = ["write_tensors"]

DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
HEADER_ALIGNMENT = 8


def write_tensors(
    file: BinaryIO,
    tensors: Mapping[str, Tensor | Sequence[Tensor]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` to the open binary ``file`` in the safetensors format.

    Args:
        file: written from its current position.
        tensors: name -> a tensor, or a non-empty sequence of tensors of one dtype and equal trailing
            dimensions, stored as their concatenation along the first dimension (pass ``t[None]`` pieces for a
            stack). Pieces may be views of one storage; each is copied out only as far as it is not contiguous.
        metadata: the header's ``__metadata__``.

    Raises ``ValueError`` before anything is written for a dtype the format lacks, pieces that do not fit
    together or hold no data (sparse, meta), metadata that is not text the format can hold (UTF-8 strings), or
    a tensor named ``__metadata__``; ``OSError`` as the file's writes raise it (a full disk).
    """
    if sys.byteorder != "little":  # the format is little-endian and pieces are written as they are in memory
        raise ValueError("writing safetensors files needs a little-endian machine")
    header: dict[str, object] = {"__metadata__": _checked_metadata(metadata)} if metadata else {}
    if "__metadata__" in tensors:
        raise ValueError("a tensor cannot be named __metadata__: the format keeps that name for the metadata")
    pieces: list[Tensor] = []
    offset = 0
    for name, value in tensors.items():
        parts = [value] if isinstance(value, Tensor) else list(value)
        shape = _joined_shape(name, parts)
        size = sum(p.numel() for p in parts) * parts[0].element_size()
        header[name] = {
            "dtype": DTYPE_NAMES[parts[0].dtype],
            "shape": shape,
            "data_offsets": [offset, offset + size],
        }
        offset += size
        pieces += parts
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % HEADER_ALIGNMENT)
    file.write(struct.pack("<Q", len(encoded)))
    file.write(encoded)
    for piece in pieces:
        if piece.numel():
            file.write(piece.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def _checked_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """The metadata as it can be stored: the header is UTF-8 JSON, which holds no lone surrogates (what a file
    name that is not UTF-8 decodes to) and readers expect strings only."""
    for key, value in metadata.items():
        for text in (key, value):
            if not isinstance(text, str):
                raise ValueError(f"metadata {key!r}: {text!r} is not a string")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"metadata {key!r}: {text!r} is not valid UTF-8 text") from None
    return dict(metadata)


def _joined_shape(name: str, parts: list[Tensor]) -> list[int]:
    if not parts:
        raise ValueError(f"tensor {name!r}: no pieces")
    for part in parts:
        if part.layout != torch.strided or part.is_meta:
            raise ValueError(
                f"tensor {name!r}: a {part.layout} tensor on {part.device} holds no data to write"
            )
    first = parts[0]
    if first.dtype not in DTYPE_NAMES:
        raise ValueError(f"tensor {name!r}: safetensors has no dtype for {first.dtype}")
    if len(parts) == 1:
        return list(first.shape)
    for part in parts:
        if part.dim() == 0 or part.dtype != first.dtype or part.shape[1:] != first.shape[1:]:
            raise ValueError(
                f"tensor {name!r}: pieces {tuple(first.shape)} {first.dtype} and {tuple(part.shape)} {part.dtype} "
                "cannot be joined along the first dimension"
            )
    return [sum(p.shape[0] for p in parts), *first.shape[1:]]
