"""``packvit encode`` over shards: webdataset tar files and parquet files, streamed, one output per shard.

Inputs (nothing is extracted to disk):

webdataset (``NAME.tar``, or a brace pattern such as ``data/{00000..00099}.tar``)
    Read in one pass with :mod:`tarfile` in streaming mode. Members are grouped into samples by key, the path up
    to the first dot of the file name (``a/b.c.jpg`` has key ``a/b``, extension ``c.jpg``), as webdataset
    does; a sample's members must be adjacent. The image is the ``jpg``, ``jpeg``, ``png`` or ``webp`` member (the
    first present, in that order); ``json`` and ``txt`` members are kept as text columns of the same names.
    Other members are ignored.
parquet (``NAME.parquet``)
    Read row group by row group. ``--image-column`` (default ``image``) holds encoded image bytes, either as
    a binary column or as a struct with a ``bytes`` field (the Hugging Face ``datasets`` image layout);
    ``--key-column`` (default ``key``) names each sample; ``--keep-columns`` are copied to the outputs.

Outputs, per input shard ``NAME`` in ``--out``:

``NAME.parquet``
    One row per encoded image, in the shard's order: ``key`` (string), ``grid_thw`` (``int64[3]``),
    ``embedding`` (``float32[D]``, see :func:`image_embeddings`), ``image_embeds`` (``float32[P]``, models
    with a projection only), then the kept metadata (``json``/``txt``, or ``--keep-columns``). Its schema
    metadata ``packvit`` is the shard's record (JSON): the settings and model fingerprint of the folder's
    manifest, the source shard, the number of images, the **error list** (``[{"key", "error"}]``, one entry per
    unreadable sample; what has no key, the rest of an archive, a parquet file, row group or row, has
    ``"key": null`` and names itself under ``"part"``) and the token file's write id.
``NAME.safetensors`` (with ``--tokens``)
    The layout of a packed part: ``features [N, D]`` (``features.<layer>`` per ``--layers``), ``prefix [B, k,
    D]`` with ``--prefix``, ``grid_thw [B, 3]``, and the index from key to rows: ``offsets [B + 1]`` (image
    ``i``'s tokens are rows ``offsets[i]:offsets[i+1]``) with the keys, in the same order, in the metadata under
    ``names`` (a JSON list). Written image by image from the encoded pieces, never joined in memory.
``NAME.pca/<key>.png`` (with ``--preview``)
    See :mod:`packvit_native.preview`; keys are percent-encoded into file names.

Each file is written atomically (:mod:`packvit_native.atomic`), the parquet file last: **a shard is finished
when its NAME.parquet exists** and its record matches the folder's manifest (and its token file, whole, carries
the same write id). A rerun skips finished shards and redoes the others from the start, replacing whatever an
interrupted attempt left, so no sample is ever stored twice. Unreadable samples are listed in the record and
reported, and the run goes on (exit code 1); a shard of which a part could not be read at all (an archive from
some point on, a parquet file or row group: ``"retry": true`` in its error entry) is read again by a rerun,
since the file may have been read while it was still being written. What stays wrong on every read (a row
without a key, a missing column, a corrupt image) is recorded once. An existing NAME.parquet without a record,
or NAME.safetensors without a write id, is not ours and is never replaced (the run stops first), and neither
is an input.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import itertools
import json
import re
import secrets
import tarfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from torch import Tensor
from tqdm.auto import tqdm

from . import atomic
from .cli import (
    KEPT,
    MANIFEST_VERSION,
    Fatal,
    Loads,
    Queued,
    block_tokens,
    build_manifest,
    capture_graphs,
    check_device,
    check_manifest,
    ends_digest,
    expected_keys,
    gpu_decoder,
    load_model_or_fail,
    loading_processes,
    move_aside,
    on_device,
    path_text,
    plural,
    prefetch,
    prepare_out,
    read_ahead,
    read_manifest,
    read_output,
    reason,
    record_manifest,
    resize_rule,
    resolve_device,
    share,
    staged,
    throughput,
    token_outputs,
    warm_up,
)
from .gpu_decode import GpuDecoder
from .preprocess import decode, refused_pixels
from .tensor_file import write_tensors
from .worker_processes import LoadingFailed, LoadingProcesses

__all__ = [
    "Sample",
    "Shard",
    "encode_shards",
    "expand_braces",
    "find_shards",
    "image_embeddings",
    "input_kind",
    "read_shard",
]

SHARD_KINDS = {".tar": "webdataset", ".parquet": "parquet"}
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # a sample's image member, first present wins
META_EXTENSIONS = ("json", "txt")  # kept as text columns
# Samples read ahead of the decoding, in a thread of their own (a few MB of encoded images at most).
READ_AHEAD = 256
RECORD_KEY = b"packvit"
# Columns every shard output has; kept metadata may not take these names.
BASE_COLUMNS = ("key", "grid_thw", "embedding", "image_embeds")


def _pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet  # the submodule, for pa.parquet below
    except ImportError:
        raise Fatal(
            'shards are written as parquet, which needs pyarrow: pip install "packvit-native[shards]"'
        ) from None
    return pa


# ------------------------------------------------------------------------------------------------- inputs

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")


# A typo such as {0..99999999} would otherwise build a list of a hundred million paths before anything is checked.
MAX_EXPANDED = 1_000_000
MAX_BRACES = 200  # brace groups in one pattern: each is a level of the expansion's recursion


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{a,b}`` lists and ``{000..099}`` ranges (zero-padded when a bound is), left to right, as a
    shell does: ``data/{0..1}-{a,b}.tar`` -> ``data/0-a.tar, data/0-b.tar, data/1-a.tar, data/1-b.tar``.
    ``ValueError`` for a malformed brace or a pattern naming more than ``MAX_EXPANDED`` paths (found while
    expanding lazily, before more than that many are built)."""
    # Each brace is one level of the expansion: a bound of our own, not the interpreter's recursion limit
    # (which libraries raise), keeps the refusal the same wherever it runs.
    if pattern.count("{") > MAX_BRACES:
        raise ValueError(f"{pattern[:80]}...: too many braces in one pattern (at most {MAX_BRACES})")
    paths = list(itertools.islice(_expand(pattern), MAX_EXPANDED + 1))
    if len(paths) > MAX_EXPANDED:
        raise ValueError(f"{pattern}: names more than {MAX_EXPANDED:,} paths; split the run")
    return paths


def _expand(pattern: str) -> Iterator[str]:
    match = _BRACE.search(pattern)
    if match is None:
        yield pattern
        return
    body = match.group(1)
    numbers = _RANGE.fullmatch(body)
    if numbers:
        lo, hi = (int(bound) for bound in numbers.groups())
        pad = max(map(len, numbers.groups())) if any(_zero_padded(b) for b in numbers.groups()) else 0
        values: Iterable[str] = (
            str(i).zfill(pad) for i in (range(lo, hi + 1) if hi >= lo else range(lo, hi - 1, -1))
        )
    elif "," in body:
        values = body.split(",")
    else:
        raise ValueError(f"{pattern}: cannot expand {{{body}}}; use {{a,b,c}} or {{000..099}}")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    for value in values:
        yield from _expand(head + value + tail)


def _zero_padded(bound: str) -> bool:
    digits = bound.lstrip("-")
    return len(digits) > 1 and digits[0] == "0"


def _expanded(inputs: list[str]) -> list[str]:
    try:
        return [path for raw in inputs for path in expand_braces(str(raw))]
    except ValueError as e:
        raise Fatal(str(e)) from None


def input_kind(inputs: list[str]) -> str:
    """``"webdataset"``, ``"parquet"`` (by the inputs' suffixes) or ``"files"`` (images and folders, as before
    shards existed); mixing kinds is refused."""
    kinds = {SHARD_KINDS.get(Path(path).suffix.lower(), "files") for path in _expanded(inputs)}
    if len(kinds) > 1:
        raise Fatal(f"inputs mix {' and '.join(sorted(kinds))}; encode each kind in its own run")
    return kinds.pop()


@dataclass(frozen=True)
class Shard:
    """One input shard: where it is read from, and the name its outputs are stored under."""

    path: Path
    name: str


def find_shards(inputs: list[str]) -> list[Shard]:
    """Expand brace patterns into shards sorted by name; ``Fatal`` for a missing file or clashing names."""
    shards: dict[str, Shard] = {}
    for raw in _expanded(inputs):
        path = Path(raw)
        if path.is_dir():
            raise Fatal(f"{raw}: a folder, not a shard file (give the shards inside it, e.g. {raw}/*.tar)")
        if not path.is_file():
            raise Fatal(f"{raw}: no such file")
        shard = Shard(path, path.name[: -len(path.suffix)])
        other = shards.setdefault(shard.name, shard)
        if other.path.resolve() != path.resolve():
            raise Fatal(f"{other.path} and {path} would both be stored as {shard.name}.parquet")
    return sorted(shards.values(), key=lambda s: s.name)


@dataclass
class Sample:
    """One sample of a shard: its position, key, image bytes and kept metadata, or why it cannot be read.
    ``part`` names what an error without a key stands for (the rest of an archive, a row, a row group);
    ``retry`` marks an error a later read may not meet (a file read while still being written, a failing
    mount), for which a rerun reads the shard again."""

    index: int
    key: str | None
    data: bytes | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    part: str = "archive"
    retry: bool = False


def _split_name(name: str) -> tuple[str, str] | None:
    """webdataset's rule: key = path up to the first dot of the file name, extension = the rest (lowercased)."""
    match = re.fullmatch(r"((?:.*/|)[^./][^.]*)\.([^/]*)", name)
    return (match.group(1), match.group(2).lower()) if match else None


def _watch_header_reads(tar: tarfile.TarFile, ends: dict[str, bool]) -> None:
    """Record whether the last block-sized read of ``tar`` was a whole end-of-archive block. tarfile reads
    every header as one block and ends a stream silently at a missing or cut header, which is how an archive
    cut short at a header looks; the last header read tells the two apart."""
    read = tar.fileobj.read

    def watched(size: int = -1) -> bytes:
        buf = read(size)
        if size == tarfile.BLOCKSIZE:
            ends["marker"] = len(buf) == tarfile.BLOCKSIZE and not buf.strip(tarfile.NUL)
        return buf

    tar.fileobj.read = watched


def read_webdataset(path: Path) -> Iterator[Sample]:
    """The samples of a webdataset tar file, streamed in one pass (see the module docstring)."""
    index, seen = 0, set()
    ends = {"marker": False}
    key: str | None = None
    members: dict[str, bytes] = {}
    repeated: str | None = None  # a member name of the current key seen twice

    def sample() -> Sample:
        nonlocal index
        index += 1
        if key in seen:
            return Sample(index - 1, key, error="duplicate key (its members are not adjacent in the archive)")
        seen.add(key)
        if repeated is not None:
            return Sample(index - 1, key, error=f"duplicate member {repeated} in the archive")
        meta = {
            ext: members[ext].decode("utf-8", "replace") if ext in members else None
            for ext in META_EXTENSIONS
        }
        image = next((ext for ext in IMAGE_EXTENSIONS if ext in members), None)
        if image is None:
            return Sample(index - 1, key, meta=meta, error=f"no image member ({', '.join(IMAGE_EXTENSIONS)})")
        return Sample(index - 1, key, members[image], meta)

    try:
        with tarfile.open(path, mode="r|*") as tar:
            # Opening read the first header already: with no member, it was a whole block of zeros (a cut
            # or missing one raises), the end of an empty archive.
            ends["marker"] = tar.firstmember is None
            _watch_header_reads(tar, ends)
            for member in tar:
                name = path_text(member.name)  # a name that is not UTF-8 could be stored nowhere
                parts = _split_name(name) if member.isfile() else None
                if parts is None:
                    continue
                if parts[0] != key:
                    if key is not None:
                        yield sample()
                    key, members, repeated = parts[0], {}, None
                if parts[1] in IMAGE_EXTENSIONS or parts[1] in META_EXTENSIONS:
                    if parts[1] in members:  # e.g. an archive appended to: which one is meant is unknown
                        repeated = name
                    members[parts[1]] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        if key is not None and members:
            yield sample()  # what was read whole before the damage; a cut image fails to decode
        message = f"archive unreadable after {plural(index, 'sample')}: {reason(e)}"
        yield Sample(index, None, error=message, retry=True)
        return
    if key is not None:
        yield sample()
    if not ends["marker"]:
        message = f"archive cut short after {plural(index, 'sample')}: no end-of-archive block"
        yield Sample(index, None, error=message, retry=True)


def parquet_columns(args: argparse.Namespace) -> tuple[str, str, list[str]]:
    """``(image column, key column, kept columns)``."""
    return args.image_column or "image", args.key_column or "key", list(args.keep_columns or [])


class UnreadableParquet(ValueError):
    """A parquet file whose schema cannot be read at all."""


def check_parquet_schema(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The kept columns' types; :class:`UnreadableParquet` if the file cannot be read, ``ValueError`` if a
    named column is missing or the image column holds no bytes."""
    pa = _pyarrow()
    image, key, keep = parquet_columns(args)
    try:
        schema = pa.parquet.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise UnreadableParquet(f"not a readable parquet file: {e}") from None
    missing = [c for c in (image, key, *keep) if c not in schema.names]
    if missing:
        raise ValueError(
            f"has no column {', '.join(map(repr, missing))} (it has {', '.join(schema.names)}); name them with "
            f"--image-column, --key-column, --keep-columns"
        )
    kind = schema.field(image).type
    if not (_is_bytes(pa, kind) or (pa.types.is_struct(kind) and _is_bytes(pa, _struct_bytes(kind)))):
        raise ValueError(
            f"its column {image!r} is {kind}, not image bytes (binary, or a struct with 'bytes')"
        )
    return {c: schema.field(c).type for c in keep}


def _is_bytes(pa: Any, kind: Any) -> bool:
    views = getattr(pa.types, "is_binary_view", lambda _: False)  # pyarrow 16 and later
    return kind is not None and (pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or views(kind))


def _struct_bytes(kind: Any) -> Any:
    index = kind.get_field_index("bytes")
    return kind.field(index).type if index >= 0 else None


def read_parquet(path: Path, args: argparse.Namespace) -> Iterator[Sample]:
    """The samples of a parquet file, read row group by row group (see the module docstring)."""
    pa = _pyarrow()
    image, key, keep = parquet_columns(args)
    try:
        check_parquet_schema(path, args)
        file = pa.parquet.ParquetFile(path)
    except (ValueError, OSError, pa.ArrowException) as e:
        # A missing or wrong column stays so on every read; a file that cannot be read may be whole later.
        wrong_columns = isinstance(e, ValueError) and not isinstance(
            e, (UnreadableParquet, pa.ArrowException)
        )
        yield Sample(0, None, error=str(e), part="file", retry=not wrong_columns)
        return
    index, seen = 0, set()
    for group in range(file.num_row_groups):
        try:
            table = file.read_row_group(group, columns=list(dict.fromkeys([key, image, *keep])))
        except (OSError, pa.ArrowException) as e:
            rows = file.metadata.row_group(group).num_rows
            yield Sample(
                index,
                None,
                error=f"unreadable: {e}",
                part=f"row group {group} (rows {index}-{index + rows - 1})",
                retry=True,
            )
            index += rows
            continue
        column = table.column(image).combine_chunks()
        data = (column.field("bytes") if pa.types.is_struct(column.type) else column).to_pylist()
        keys = table.column(key).to_pylist()
        kept = {c: table.column(c).to_pylist() for c in keep}
        for row, (name, blob) in enumerate(zip(keys, data, strict=True)):
            meta = {c: values[row] for c, values in kept.items()}
            if isinstance(
                name, bytes
            ):  # a binary key column: its text, with bytes that are not UTF-8 as \xNN
                name = path_text(name.decode("utf-8", "surrogateescape"))
            name = None if name is None else str(name)
            if name is None:
                sample = Sample(index, None, meta=meta, error="no key", part=f"row {index}")
            elif name in seen:
                sample = Sample(index, name, meta=meta, error="duplicate key")
            elif not blob:
                sample = Sample(index, name, meta=meta, error="no image bytes")
            else:
                sample = Sample(index, name, blob, meta)
            seen.add(name)
            index += 1
            yield sample


def read_shard(shard: Shard, args: argparse.Namespace) -> Iterator[Sample]:
    kind = SHARD_KINDS[shard.path.suffix.lower()]
    return read_webdataset(shard.path) if kind == "webdataset" else read_parquet(shard.path, args)


def meta_types(kind: str, args: argparse.Namespace, shards: list[Shard]) -> dict[str, Any]:
    """Kept metadata columns and their arrow types. For parquet, the columns are checked on the first shard
    whose schema can be read; the unreadable ones before it are reported when their turn comes."""
    pa = _pyarrow()
    if kind == "webdataset":
        return {ext: pa.string() for ext in META_EXTENSIONS}
    unreadable = None
    for shard in shards:
        try:
            types = check_parquet_schema(shard.path, args)
        except UnreadableParquet as e:
            unreadable = unreadable or f"{shard.path} {e}"
            continue
        except ValueError as e:
            raise Fatal(f"{shard.path} {e}") from None
        break
    else:
        raise Fatal(f"no parquet file can be read: {unreadable}" if len(shards) > 1 else unreadable)
    clash = [c for c in types if c in BASE_COLUMNS]
    if clash:
        raise Fatal(f"--keep-columns {', '.join(clash)}: outputs have columns of that name already")
    return types


# ----------------------------------------------------------------------------------------------- decoding


def decode_image(data: bytes, mode: str, max_decoded_pixels: int | None) -> Image.Image:
    """Decode image bytes as :func:`~packvit_native.preprocess.load_image` decodes a file (same size check
    before decoding, EXIF orientation applied), ``ValueError`` if they cannot be read."""
    try:
        return decode(io.BytesIO(data), mode, max_decoded_pixels)
    except ValueError as e:
        message = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(e))  # PIL names the buffer
        raise ValueError(f"cannot read image: {message}") from None


def preprocess_bytes(
    data: bytes, config: Any, args: argparse.Namespace, rule: dict[str, Any]
) -> tuple[Tensor, Tensor]:
    """Encoded image bytes -> ``(patches, grid_thw)`` on the CPU, exactly as :func:`packvit_native.preprocess`
    makes them from the same file; ``ValueError`` if they cannot be read. (``--decode gpu`` decodes JPEGs on
    the GPU instead: :mod:`packvit_native.gpu_decode`.)"""
    from .preprocess import preprocess

    try:
        image = decode_image(data, "RGB" if config.num_channels == 3 else "L", args.max_decoded_pixels)
        return preprocess(image, config, resample=args.resample, **rule)
    except ValueError:
        raise
    except Exception as e:  # a decoder's own failure: reported for this sample, never fatal to the run
        raise ValueError(f"cannot read image: {type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------------------------- encoding


def embedding_source(config: Any) -> str:
    """Which output is a model's per-image ``embedding`` (see :func:`image_embeddings`)."""
    if config.head not in ("none", "merger"):
        return "pooler_output"
    return "class_token" if config.num_cls else "mean_patch_tokens"


def image_embeddings(out: Any, config: Any, grids: Tensor) -> dict[str, Tensor]:
    """One row per image, float32 on the model's device: ``{"embedding": [B, D]}`` and, for models with a projection
    (CLIP's ``visual_projection``), ``"image_embeds": [B, P]``.

    ``embedding`` is, by model (:func:`embedding_source`):

    - ``pooler_output`` where the model has a pooling head (a head giving one row per image: the final-normed
      class token of DINOv2/DINOv3, CLIP's ``post_layernorm`` class token, SigLIP's attention pooling, AIMv2's
      attention pooling, InternViT's mean pooling);
    - else the final class token (after the final norm, if the model has one), for a model with one;
    - else the mean of the image's final patch tokens (Qwen-VL towers, whose merger gives one row per 2x2
      block, not per image).
    """
    if out.prefix_tokens.shape[0] != grids.shape[0]:
        raise ValueError("per-image embeddings need still images (one frame each)")
    source = embedding_source(config)
    if source == "pooler_output":
        embedding = out.pooler_output
    elif source == "class_token":
        embedding = out.prefix_tokens[:, 0]
    else:
        patches = (
            out.packing.patch_tokens(out.last_hidden_state) if config.num_prefix else out.last_hidden_state
        )
        counts = grids.prod(1).tolist()
        embedding = torch.stack([part.float().mean(0) for part in patches.split(counts)])
    rows = {"embedding": embedding.float()}
    if out.image_embeds is not None:
        rows["image_embeds"] = out.image_embeds.float()
    return rows


@dataclass
class Encoded:
    """One image's outputs: ``grid`` (t, h, w), float32 ``embedding`` (and ``image_embeds``), ``tokens``
    (stored name -> (patch tokens, prefix tokens or None), in the model's dtype, with ``--tokens``), and the
    ``preview`` picture with ``--preview``."""

    grid: list[int]
    rows: dict[str, np.ndarray]
    tokens: dict[str, tuple[Tensor, Tensor | None]] | None = None
    preview: np.ndarray | None = None


def _queue(
    model: Any, batch: list[tuple[Tensor, Tensor]], args: argparse.Namespace, device: torch.device
) -> tuple[Tensor, Queued]:
    queued = Queued(device)
    grids = torch.cat([g for _, g in batch])
    packing = model.pack(grids)
    patches = torch.cat([on_device(p, model.device) for p, _ in batch])
    layers = tuple(args.layers) if args.layers else None
    with torch.inference_mode():
        out = model(
            patches, packing=packing, output_layers=layers, return_prefix=args.prefix, return_dict=True
        )
        outputs: dict[str, Any] = {"rows": image_embeddings(out, model.config, grids)}
        if args.tokens or args.preview:
            outputs["tokens"] = token_outputs(out.layers if layers else out.last_hidden_state, packing, args)
        return grids, queued.outputs(outputs)


def _split(grids: Tensor, outputs: dict[str, Any], model: Any, args: argparse.Namespace) -> list[Encoded]:
    """A batch's outputs, on the CPU, per image."""
    rows, tokens = outputs["rows"], outputs.get("tokens")
    encoded, start = [], 0
    for b, grid in enumerate(grids.tolist()):
        n = grid[0] * grid[1] * grid[2]
        mine = None
        if tokens is not None:
            # clone: a slice would keep the whole batch's tensor alive, and safetensors refuses shared storage
            mine = {
                k: (p[start : start + n].clone(), None if q is None else q[b].clone())
                for k, (p, q) in tokens.items()
            }
        item = Encoded(grid, {k: v[b].numpy().copy() for k, v in rows.items()}, mine if args.tokens else None)
        if args.preview:
            from .preview import pca_rgb

            item.preview = pca_rgb(next(iter(mine.values()))[0], grid[1], grid[2], model.config.merge_size)
        encoded.append(item)
        start += n
    return encoded


def encode_later(
    model: Any, batch: list[tuple[Tensor, Tensor]], args: argparse.Namespace, device: torch.device
) -> Callable[[], tuple[list[Encoded | str], float]]:
    """Queue one token-budget batch on the device (see :class:`~packvit_native.cli.Queued`); the returned
    function waits for it and gives, per image, its :class:`Encoded` or why it failed, with the seconds spent in
    the model. A batch whose forward fails (a size the model refuses, out of memory) is retried image by image
    when its results are asked for, so one bad image fails alone."""
    try:
        grids, queued = _queue(model, batch, args, device)
    except (ValueError, RuntimeError) as e:
        error: Exception | None = e
    else:
        error = None

    def results() -> tuple[list[Encoded | str], float]:
        nonlocal error
        if error is None:
            try:
                outputs, seconds = queued.wait()
                return list(_split(grids, outputs, model, args)), seconds
            except (ValueError, RuntimeError) as e:
                error = e
        if len(batch) == 1:
            return [f"encoding failed: {type(error).__name__}: {error}"], 0.0
        ones = [encode_later(model, [one], args, device)() for one in batch]
        return [one[0][0] for one in ones], sum(one[1] for one in ones)

    return results


def encode_images(
    model: Any, batch: list[tuple[Tensor, Tensor]], args: argparse.Namespace, device: torch.device
) -> list[Encoded | str]:
    """Encode one token-budget batch and wait for it: :func:`encode_later`'s results, without the time."""
    return encode_later(model, batch, args, device)()[0]


# ------------------------------------------------------------------------------------------------ outputs


@dataclass
class ShardResult:
    """What one shard produced, gathered until the shard is written."""

    shard: Shard
    images: list[tuple[int, str, Encoded, dict[str, Any]]] = field(
        default_factory=list
    )  # index, key, ..., meta
    errors: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # index, record entry

    def fail(self, sample: Sample, error: str, say: Callable[[str], None]) -> None:
        entry: dict[str, Any] = {"key": sample.key, "error": error}
        if sample.key is None:
            entry |= {"part": sample.part} | ({"retry": True} if sample.retry else {})
        self.errors.append((sample.index, entry))
        what = f"sample {sample.key!r}" if sample.key is not None else sample.part
        say(f"packvit encode: {self.shard.path}: {what} skipped: {error}")


def _record(
    result: ShardResult, manifest: dict[str, Any], config: Any, tokens: dict | None
) -> dict[str, Any]:
    return {
        "packvit_encode": MANIFEST_VERSION,
        "shard": str(result.shard.path),
        "shard_bytes": _size(result.shard.path),
        "shard_ends_sha256": ends_digest(result.shard.path),
        "model": manifest["model"],
        "settings": manifest["settings"],
        "embedding": embedding_source(config),
        "images": len(result.images),
        "errors": [entry for _, entry in sorted(result.errors, key=lambda e: e[0])],
        "tokens": tokens,
    }


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def write_shard(
    out: Path,
    result: ShardResult,
    manifest: dict[str, Any],
    config: Any,
    metas: dict[str, Any],
    args: argparse.Namespace,
) -> None:
    """Write one shard's outputs (the module docstring lists them): the token file and the parquet file
    together (another run writing the same shard never leaves its file beside ours), the parquet file last."""
    pa = _pyarrow()
    name = result.shard.name
    images = sorted(result.images, key=lambda image: image[0])
    keys = [key for _, key, _, _ in images]
    tokens_file = out / f"{name}.safetensors"
    tokens = None
    files: list[tuple[Path, Callable[[Path], None]]] = []
    try:
        _make_way_for_tokens(tokens_file)
        if args.tokens and images:
            tokens = {"file": tokens_file.name, "write_id": secrets.token_hex(8)}
            tensors = _token_tensors([e for _, _, e, _ in images], args)
            metadata = {"names": json.dumps(keys), "write_id": tokens["write_id"]}

            def write_tokens(tmp: Path) -> None:
                with open(tmp, "wb") as file:
                    write_tensors(file, tensors, metadata)

            files.append((tokens_file, write_tokens))
        else:
            tokens_file.unlink(missing_ok=True)  # ours, from an earlier encode with other outcomes
        if args.preview:
            from .preview import write_png

            for _, key, encoded, _ in images:
                write_png(out / f"{name}.pca" / preview_name(key), encoded.preview, config.patch_size)
        columns = {
            "key": pa.array(keys, pa.string()),
            "grid_thw": _fixed_list(pa, np.array([e.grid for _, _, e, _ in images], np.int64).reshape(-1, 3)),
        }
        for column in ("embedding", "image_embeds"):
            if images and column in images[0][2].rows:
                columns[column] = _fixed_list(pa, np.stack([e.rows[column] for _, _, e, _ in images]))
            elif not images and column == "embedding":
                columns[column] = _fixed_list(pa, np.zeros((0, config.hidden_size), np.float32))
            elif not images and config.projection_dim is not None:  # every shard's file has the same columns
                columns[column] = _fixed_list(pa, np.zeros((0, config.projection_dim), np.float32))
        for column, kind in metas.items():
            try:
                columns[column] = pa.array([meta.get(column) for _, _, _, meta in images], kind)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as e:  # the type comes from the first shard
                raise Fatal(
                    f"--keep-columns {column}: {result.shard.path} holds values that do not fit the column's "
                    f"type in the first shard ({kind}): {e}; drop the column or encode such shards apart; "
                    f"{KEPT}"
                ) from None
        record = _record(result, manifest, config, tokens)
        table = pa.table(columns).replace_schema_metadata({RECORD_KEY: json.dumps(record)})
        files.append((out / f"{name}.parquet", lambda tmp: pa.parquet.write_table(table, tmp)))
        atomic.write_files(files)
        _prune_pictures(out / f"{name}.pca", {preview_name(key) for key in keys} if args.preview else set())
    except (OSError, ValueError) as e:  # ValueError: a token file safetensors cannot hold
        raise Fatal(f"cannot write the outputs of {result.shard.path}: {reason(e)}; {KEPT}") from None


def _make_way_for_tokens(path: Path) -> None:
    """Move a file at ``path`` that is not a whole token file of ours aside to ``NAME.damaged``, never deleting
    it: an attempt that was cut short leaves none (ours are written whole), so it may be a user's file (a Git
    LFS pointer) or one damaged on disk. Ours is left to be replaced or removed."""
    try:
        with safe_open(path, "pt") as f:
            if "write_id" in (f.metadata() or {}):
                return
        problem = "it carries no write id of packvit encode"
    except FileNotFoundError:
        return
    except (OSError, SafetensorError) as e:
        problem = f"it cannot be read as safetensors: {e}"
    move_aside(path, ValueError(problem))


def _prune_pictures(folder: Path, keep: set[str]) -> None:
    """Remove the pictures of an earlier encode of this shard that this one did not write: they show images
    the shard no longer holds, or (its input replaced) other images under the same keys."""
    try:
        pictures = [p for p in folder.iterdir() if p.suffix == ".png" and p.name not in keep]
    except FileNotFoundError:
        return
    for picture in pictures:
        picture.unlink(missing_ok=True)
    if not keep:
        with contextlib.suppress(OSError):  # kept while it holds anything else
            folder.rmdir()


# A file name may hold 255 bytes; the temporary name written first adds the host, pid and a random part.
PREVIEW_NAME_BYTES = 160


def preview_name(key: str) -> str:
    """``<key>.png`` with the key percent-encoded; a key too long for a file name keeps its first part and a
    hash of the whole, so every key still gets a file of its own."""
    quoted = quote(key, safe="")
    if len(quoted) > PREVIEW_NAME_BYTES:
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        quoted = f"{quoted[: PREVIEW_NAME_BYTES - 17].rstrip('%0123456789ABCDEF')}~{digest}"
    return f"{quoted}.png"


def _fixed_list(pa: Any, array: np.ndarray) -> Any:
    """``[B, D]`` numpy -> an arrow fixed-size-list array of ``B`` rows."""
    values = np.ascontiguousarray(array).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(values), array.shape[1])


def _token_tensors(encoded: list[Encoded], args: argparse.Namespace) -> dict[str, Tensor | list[Tensor]]:
    """The token file's tensors; the features as their per-image pieces, which are written one after another
    rather than joined (a shard's tokens can be many GB)."""
    grids = torch.tensor([e.grid for e in encoded], dtype=torch.int64)
    counts = grids.prod(1)
    tensors: dict[str, Tensor | list[Tensor]] = {
        "grid_thw": grids, "offsets": torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    }  # fmt: skip
    for key in encoded[0].tokens:
        tensors[key] = [e.tokens[key][0] for e in encoded]
        if args.prefix:
            tensors[key.replace("features", "prefix", 1)] = [e.tokens[key][1][None] for e in encoded]
    return tensors


def shard_status(out: Path, shard: Shard, manifest: dict[str, Any], args: argparse.Namespace) -> str | None:
    """``None`` if ``shard`` is finished in ``out`` with this manifest, else why it is (re)done (``""``: never
    started)."""
    pa = _pyarrow()
    path = out / f"{shard.name}.parquet"
    if not path.exists():
        return ""
    try:
        metadata = pa.parquet.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException) as e:
        return f"{path.name} is damaged ({e})"
    if RECORD_KEY not in metadata:  # ours are written whole, record included: this file is someone else's
        raise Fatal(f"{path} is not an output of packvit encode; move it away or encode into another --out")
    try:
        record = json.loads(metadata[RECORD_KEY])
        if (
            record["settings"] != manifest["settings"]
            or record["model"]["sha256"] != manifest["model"]["sha256"]
        ):
            return "it was made with other settings or another model"
        tokens = record["tokens"]
        size, ends = record.get("shard_bytes"), record.get("shard_ends_sha256")  # absent in earlier records
        unread = [e for e in record["errors"] if e["key"] is None and e.get("retry")]
    except (KeyError, TypeError, ValueError) as e:
        return f"{path.name} is damaged ({e})"
    if unread:  # the file may have been read while being copied, or over a failing mount: read it again
        entry = unread[0]
        return f"part of it could not be read last time ({entry.get('part', 'archive')}: {entry['error']})"
    if (size is not None and _size(shard.path) not in (None, size)) or (
        ends is not None and ends_digest(shard.path) not in (None, ends)
    ):  # another dataset's, or changed since
        return f"the input differs from the file it was made from ({record['shard']}, {size} bytes)"
    limit = args.max_decoded_pixels
    refused = [n for e in record["errors"] if (n := refused_pixels(str(e.get("error")))) is not None]
    if any(limit is None or n <= limit for n in refused):
        return "images refused for their size last time are within --max-decoded-pixels now"
    if args.preview and record["images"]:
        folder = out / f"{shard.name}.pca"
        pictures = sum(1 for p in folder.iterdir() if p.suffix == ".png") if folder.is_dir() else 0
        if pictures < record["images"]:
            return f"it was encoded without --preview ({pictures} of {record['images']} pictures in {folder.name})"
    if args.tokens and record["images"]:
        file = out / str((tokens or {}).get("file"))
        try:
            names = read_output(file, expected_keys(args) | {"offsets"}, packed=True)
            with safe_open(file, "pt") as f:
                write_id = (f.metadata() or {}).get("write_id")
        except (ValueError, OSError, SafetensorError) as e:
            return f"{file.name} is damaged or missing ({e})"
        if write_id != tokens.get("write_id") or len(names) != record["images"]:
            return f"{file.name} does not belong to {path.name}"
    return None


def check_outputs_free(shards: list[Shard], out: Path) -> None:
    """``Fatal`` if an output would replace an input shard (parquet files encoded into their own folder) or a
    safetensors file that is not a token file of ours (every one carries a write id). One that cannot be read
    is moved aside when its shard is written (``_make_way_for_tokens``)."""
    # By file identity, not by name: a link, or a case-insensitive file system, gives one file several names.
    inputs = {_file_identity(shard.path): shard.path for shard in shards}
    inputs.pop(None, None)  # unreadable inputs are reported when their turn comes
    for shard in shards:
        output = _file_identity(out / f"{shard.name}.parquet")
        taken = inputs.get(output) if output is not None else None
        if taken is not None:
            raise Fatal(f"the outputs of {shard.path} would replace the input {taken}; choose another --out")
        tokens = out / f"{shard.name}.safetensors"
        if not tokens.is_file():
            continue
        try:
            with safe_open(tokens, "pt") as f:
                metadata = f.metadata() or {}
        except (OSError, SafetensorError):
            continue
        if "write_id" not in metadata:
            raise Fatal(
                f"{tokens} is not an output of packvit encode, and the token file of {shard.path} would replace "
                "it; move it away or encode into another --out"
            )


def _file_identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


# ---------------------------------------------------------------------------------------------- the runs


@dataclass
class Plan:
    """What a shard run does, set up and checked before any shard is read."""

    out: Path
    todo: list[Shard]
    skipped: int
    manifest: dict[str, Any]
    config: Any
    sha256: str
    rule: dict[str, Any]
    metas: dict[str, Any]


def encode_shards(args: argparse.Namespace, kind: str, say: Callable[[str], None]) -> int:
    """``packvit encode`` over webdataset or parquet shards, with ``--engine local`` or ``ray``."""
    _pyarrow()
    out = Path(args.out)
    shards = share(find_shards(args.inputs), args.num_shards, args.shard_index, lambda s: s.name)
    if not shards:  # more runs than shards: this one has nothing to do, and must not fail its job array
        say(
            f"packvit encode: --shard-index {args.shard_index} of --num-shards {args.num_shards} has no shard "
            "to encode; nothing to do"
        )
        return 0
    if kind == "parquet":
        image, key, keep = parquet_columns(args)
        args.input = {"format": "parquet", "image_column": image, "key_column": key, "keep_columns": keep}
    else:
        args.input = {"format": "webdataset"}
    metas = meta_types(kind, args, shards)
    check_outputs_free(shards, out)
    if args.engine == "local":  # before --out is made: a bad device or backend leaves nothing behind
        device = model_device = resolve_device(args)
        check_device(args, device)
    prepare_out(out, say)
    if args.engine == "ray":
        from .ray_data import connect

        device = connect(
            args, say
        )  # sets --workers, --gpus-per-worker and the default --dtype for the actors
        model_device = torch.device("cpu")  # the driver loads the model to fingerprint it and check settings
    manifest = build_manifest(args, sha256=None)
    previous = read_manifest(out)
    if previous is not None:
        check_manifest(out, previous, manifest)
    model, sha256 = load_model_or_fail(args, model_device, check_only=args.engine == "ray")
    manifest["model"]["sha256"] = sha256
    if previous is not None:
        check_manifest(out, previous, manifest)
    rule = resize_rule(args, model)
    todo = []
    for shard in shards:
        why = shard_status(out, shard, manifest, args)
        if why is not None:
            if why:
                say(f"packvit encode: {shard.name} is redone: {why}")
            todo.append(shard)
    plan = Plan(out, todo, len(shards) - len(todo), manifest, model.config, sha256, rule, metas)
    if plan.skipped:
        say(f"packvit encode: skipping {plan.skipped} of {plural(len(shards), 'shard')}, already in {out}")
    if not todo:
        say("packvit encode: nothing left to encode")
        return 0
    if args.engine == "local":
        warm_up(model, rule, device)
        capture_graphs(model, args)
    started = time.perf_counter()
    if args.engine == "ray":
        from .ray_data import encode_shards_ray

        del model
        stats = encode_shards_ray(args, plan, say)
    else:
        stats = _encode_local(args, plan, model, device, say)
    wall_s = time.perf_counter() - started - stats.startup_s
    say(
        f"packvit encode: encoded {plural(stats.images, 'image')} ({plural(stats.patch_tokens, 'patch token')}) "
        f"of {plural(len(todo), 'shard')} in {wall_s:.1f}s into {out}"
        + (f"; {plan.skipped} already there" if plan.skipped else "")
        + f"; {throughput(stats.images, wall_s, stats.model_s)}"
        + (f" ({plural(stats.workers, 'worker')})" if stats.workers > 1 else "")
        + (f"; {stats.decode}" if stats.decode else "")
    )
    if stats.errors:
        say(
            f'packvit encode: {plural(stats.errors, "sample")} unreadable, listed above and under "errors" in '
            f"the shards' records (NAME.parquet metadata 'packvit')"
        )
        return 1
    return 0


@dataclass
class Stats:
    images: int = 0
    patch_tokens: int = 0
    errors: int = 0
    model_s: float = 0.0  # seconds in the forward, summed over workers; divided by them for the figure
    workers: int = 1
    decode: str = ""  # --decode gpu: how many images each path took
    startup_s: float = 0.0  # starting the loaders (worker processes, the GPU decoder): left out of the clock


class Writes:
    """Shard writes in one background thread, so the next shard's decoding and forwards go on meanwhile; at
    most one write waits, so at most two shards' outputs are held in memory."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(1)
        self.pending: Future | None = None

    def submit(self, write: Callable[[], None]) -> None:
        self.wait()
        self.pending = self.pool.submit(write)

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()  # a failed write raises here

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown(wait=True)


def finish_shard(
    result: ShardResult, plan: Plan, args: argparse.Namespace, writes: Writes, stats: Stats, first: list[bool]
) -> None:
    """Account for a complete shard and write it (the manifest first, with the first shard written)."""
    stats.images += len(result.images)
    stats.patch_tokens += sum(int(np.prod(e.grid)) for _, _, e, _ in result.images)
    stats.errors += len(result.errors)
    if first[0]:
        record_manifest(plan.out, plan.manifest)
        first[0] = False
    writes.submit(lambda: write_shard(plan.out, result, plan.manifest, plan.config, plan.metas, args))


def _encode_local(
    args: argparse.Namespace, plan: Plan, model: Any, device: torch.device, say: Callable[[str], None]
) -> Stats:
    """Read samples in this thread, decode ``--workers`` of them ahead in threads, encode in token-budget
    batches, write each shard in the background once its last batch is encoded. A batch never spans two
    shards."""
    stats, first = Stats(), [True]
    num_prefix = model.config.num_prefix

    def events() -> Iterator[tuple[ShardResult, Sample | None]]:
        for shard in plan.todo:
            result = ShardResult(shard)
            for sample in read_shard(shard, args):
                yield result, sample
            yield result, None  # the shard's end

    def read(event: tuple[ShardResult, Sample | None]) -> bytes | None:
        sample = event[1]
        return None if sample is None or sample.error is not None else sample.data

    def on_host(data: bytes) -> tuple[Tensor, Tensor]:
        return staged(preprocess_bytes(data, plan.config, args, plan.rule), args, device)

    def load(event: tuple[ShardResult, Sample | None]) -> tuple[Tensor, Tensor] | None:
        data = read(event)
        return None if data is None else on_host(data)

    begun = time.perf_counter()
    if args.decode == "gpu":
        loads: Loads | GpuDecoder | LoadingProcesses = gpu_decoder(
            args, plan.config, plan.rule, device, read, on_host
        )
    elif args.processes:
        loads = loading_processes(read, args, plan.config, plan.rule, device)
    else:
        loads = Loads(load, args.workers)
    stats.startup_s = time.perf_counter() - begun

    batch: list[tuple[Sample, Tensor, Tensor]] = []
    # The batch queued on the device and not yet collected, and the shards that ended behind it: a shard is
    # written once its last batch is collected, and that waits until the next batch is queued.
    in_flight: list[tuple[ShardResult, list[Sample], Callable[[], tuple[list[Encoded | str], float]]]] = []
    ended: list[ShardResult] = []

    def settle() -> None:
        if in_flight:
            result, samples, results = in_flight.pop()
            encoded, seconds = results()
            stats.model_s += seconds
            for sample, item in zip(samples, encoded, strict=True):
                if isinstance(item, str):
                    result.fail(sample, item, say)
                else:
                    result.images.append((sample.index, sample.key, item, sample.meta))
            bar.update(len(samples))
        for result in ended:
            finish_shard(result, plan, args, writes, stats, first)
        ended.clear()

    def flush(result: ShardResult) -> None:
        results = encode_later(model, [(p, g) for _, p, g in batch], args, device)
        settle()
        in_flight.append((result, [sample for sample, _, _ in batch], results))
        batch.clear()

    writes = Writes()
    bar = tqdm(unit="img", desc="encode", disable=None)
    try:
        samples = read_ahead(events(), READ_AHEAD)
        with (
            contextlib.closing(loads),
            contextlib.closing(samples),
            contextlib.closing(prefetch(samples, loads)) as stream,
            bar,
        ):
            tokens = 0
            for (result, sample), future in stream:
                if sample is None:
                    if batch:
                        flush(result)
                    tokens = 0
                    ended.append(result)
                    if not in_flight:
                        settle()
                    continue
                if sample.error is not None:
                    result.fail(sample, sample.error, say)
                    continue
                try:
                    patches, grid = future.result()
                except LoadingFailed as e:
                    settle()
                    raise Fatal(f"{e}; {KEPT}") from None
                except ValueError as e:
                    result.fail(sample, str(e), say)
                    bar.update(1)
                    continue
                n = block_tokens(patches, grid, num_prefix)
                if batch and tokens + n > args.max_tokens:
                    flush(result)
                    tokens = 0
                batch.append((sample, patches, grid))
                tokens += n
            settle()
    finally:
        writes.close()
    if isinstance(loads, GpuDecoder):
        stats.decode = loads.summary()
    return stats
