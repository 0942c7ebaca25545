"""``packvit``: command-line tools around packed encoders.

``packvit encode --model SRC --out DIR INPUT...`` encodes image files (or every image under folders) into
safetensors feature files, in batches filled up to a token budget. It is resumable: every output is written
under a temporary name, flushed to disk and renamed into place, a rerun skips every image already written (after
checking that its file is whole), and an unreadable image is reported by name while the others are still
encoded.

Output layouts (``--format``):

``per-image`` (default)
    ``DIR/<name>.safetensors`` per image, ``<name>`` being the file's path relative to the folder given (or its
    bare name for a file given directly) without the extension. Tensors: ``features [h*w, D]`` (with several
    ``--layers``: ``features.<layer>`` each), ``grid_thw [1, 3]``, and with ``--prefix`` also ``prefix [k, D]``
    (``prefix.<layer>``).
``packed``
    ``DIR/part-NNNNN.safetensors`` per batch: ``features [N, D]`` of all its images one after another,
    ``grid_thw [B, 3]``, ``prefix [B, k, D]`` with ``--prefix``; the image names, in order, are in the file's
    metadata under ``names`` (a JSON list).

Tokens are in the model's order: row-major, or merge order with ``--merge-size``. ``DIR/packvit-encode.json``
records the settings and a sha256 fingerprint of the model's config and weights; a rerun with other settings or
another model (whatever its path) is refused rather than mixing features.

Several runs may write into one ``DIR`` at once (e.g. one per GPU, each over its own share of the inputs): each
part number is claimed exclusively, so no run replaces another's part, and a per-image file is replaced only by
the same image's features. Two runs over the same images at once may both encode an image; with
``--format packed`` it is then stored in two parts, with the same features.

Webdataset tar shards and parquet files (paths or brace patterns such as ``data/{00000..00099}.tar``) are
encoded shard by shard into ``DIR/NAME.parquet`` (one row per image: key, ``grid_thw``, the per-image embedding,
kept metadata) and, with ``--tokens``, ``DIR/NAME.safetensors``; a rerun skips finished shards. ``--engine ray``
runs the same on Ray Data. See :mod:`packvit_native.shards` and :mod:`packvit_native.ray_data`.
``--num-shards N --shard-index I`` keeps the inputs whose name hashes to ``I`` modulo ``N``, so N runs cover
them once with no coordination beyond ``DIR``, however the inputs change between runs.

Exit codes: 0 everything encoded; 1 some images (samples) were unreadable, the rest were encoded; 2 a fatal
error (bad options, no images, an unusable ``--model`` or ``--out``, a full disk), reported in one line, with
everything written before it kept; 130 interrupted (Ctrl-C), with the same guarantee. Rerunning the same
command resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import numbers
import os
import queue
import sys
import threading
import time
import traceback
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from torch import Tensor
from tqdm.auto import tqdm

from . import atomic
from .gpu_decode import GpuDecoder, nvjpeg_decoder
from .loading import DTYPES
from .preprocess import MAX_DECODED_PIXELS, LoadingThreads
from .tensor_file import write_tensors
from .worker_processes import LoadingFailed, LoadingProcesses

__all__ = ["IMAGE_SUFFIXES", "find_images", "main"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# What --preview adds to an image's name in the output folder (OUT/<name>.pca.png).
PREVIEW_SUFFIX = ".pca.png"
MANIFEST = "packvit-encode.json"
# Version 1 manifests (no "packvit_encode" field) identified the model by its path only.
MANIFEST_VERSION = 2
# --graphs: the most frames a batch may hold to replay a graph (windowed towers get room for their windows too).
# FA4 launches for the tokens present plus a tile per segment, so a generous bound costs little; batches of
# more, smaller images run eagerly.
GRAPH_SEGMENTS = 128
# How long a thread may hold the interpreter lock while another waits for it. Every tensor operation releases
# the lock, and a thread that wants it back after one (the thread launching the forward, a loader, a pool's
# result thread) waits up to this long while another runs Python. Python's default of 5 ms let the loaders
# starve the thread that feeds the GPU: on one H100 (benchmarks/encode_pipeline.py --attn-backend fa4
# --graphs, 16 cores) 1 ms took --decode cpu from 212 to 254 img/s and --decode gpu from 455 to 483.
SWITCH_INTERVAL_S = 0.001


class Fatal(Exception):
    """Encoding cannot go on: reported as one line with exit code 2; what was written before stays valid."""


# Columns an encoded shard or dataset has besides the kept ones (the Ray engine's also "_"-names).
OUTPUT_COLUMNS = frozenset({"key", "grid_thw", "embedding", "image_embeds", "error"})
KEPT = "the features written before are kept, rerun the same command to resume"
MANIFEST_CLAIM_TRIES = 40  # 2 s: a claim by a live run takes moments


@dataclass(frozen=True)
class Item:
    """One input image: where it is read from and the name its features are stored under."""

    path: Path
    name: str

    @property
    def stem(self) -> str:
        """Where its own files are stored (``OUT/<stem>.safetensors``, ``.pca.png``): the name, shortened where
        it would not fit in a file name (see ``_storable``); packed parts keep the whole name."""
        return _storable(self.name)


def find_images(inputs: Iterable[str | os.PathLike], out: Path | None = None) -> list[Item]:
    """Expand files and folders into named images; ``ValueError`` for a missing input, a folder that cannot be
    listed, or clashing names. Folders are searched recursively, through linked folders too.

    Previews in ``out`` or in any other output folder of ``packvit encode`` (one holding its manifest) are left
    out: they are outputs, which a run into an output folder within its input would otherwise encode as images.

    A name keeps the bytes of a file name that are not UTF-8 as ``\\xNN`` text: output files and their headers
    (safetensors reads only UTF-8 paths and metadata) then hold it as it is shown."""
    items: list[Item] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            items += [
                Item(f, path_text(f.relative_to(path).with_suffix("").as_posix()))
                for f in _image_files(path, out)
            ]
        elif path.is_file():
            items.append(Item(path, path_text(path.stem)))
        else:
            raise ValueError(f"{raw}: no such file or folder")
    by_name: dict[str, list[Path]] = {}
    for item in items:
        by_name.setdefault(item.name, []).append(item.path)
    clashes = {n: p for n, p in by_name.items() if len(p) > 1}
    if clashes:
        shown = "; ".join(f"{n}: {', '.join(map(str, p))}" for n, p in list(clashes.items())[:5])
        raise ValueError(f"several inputs would be stored under the same name ({shown})")
    return items


# The longest suffix an output of an image gets (".safetensors.damaged.N", for the N-th damaged one moved
# aside, room left for 3 digits), and the longest file name file systems allow.
_LONGEST_SUFFIX, _NAME_MAX = len(".safetensors.damaged.999"), 255


def _storable(name: str) -> str:
    """``name`` with its last part shortened to its start and a hash of the whole where that part and an
    output's suffix would not fit in a file name (the ``source`` in each output names the image)."""
    folder, slash, last = name.rpartition("/")
    return folder + slash + atomic.fit_name(last, _NAME_MAX - _LONGEST_SUFFIX)


def _image_files(folder: Path, out: Path | None) -> list[Path]:
    """The image files under ``folder`` in sorted order, as :func:`find_images` describes; a linked folder that
    leads back to one it lies in is not entered again."""
    out_id = _folder_id(out) if out is not None else None
    found: list[Path] = []

    def walk(at: Path, ancestors: frozenset[tuple[int, int]], in_outputs: bool) -> None:
        here = _folder_id(at)
        if here is None or here in ancestors:
            return
        try:
            entries = sorted(os.scandir(at), key=lambda entry: entry.name)
        except OSError as e:
            raise ValueError(f"{at}: cannot list this folder ({reason(e)}); fix it or leave it out") from None
        in_outputs = in_outputs or here == out_id or any(e.name == MANIFEST for e in entries)
        for entry in entries:
            if entry.is_dir():  # links followed, as for files
                walk(Path(entry.path), ancestors | {here}, in_outputs)
            elif (
                entry.is_file()
                and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES
                and not (in_outputs and entry.name.endswith(PREVIEW_SUFFIX))
            ):
                found.append(Path(entry.path))

    walk(folder, frozenset(), False)
    return found


def _folder_id(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def reason(e: BaseException) -> str:
    """An OS error's own words without the temporary file name it carries; other errors as they read."""
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e)


# ---------------------------------------------------------------------------------------------------- writing


def save_tensors(
    path: Path,
    tensors: Mapping[str, Tensor | Sequence[Tensor]],
    metadata: dict[str, str],
    exclusive: bool = False,
) -> None:
    """Write one safetensors file all or nothing (see :func:`atomic.write_file`); ``Fatal`` if it fails.

    Written piece by piece into the locked temporary file itself (:func:`~packvit_native.tensor_file.
    write_tensors`: a tensor may be given as the pieces it concatenates, never joined in memory)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as file:
            write_tensors(file, tensors, metadata)

    try:
        atomic.write_file(path, write, exclusive=exclusive)
    except OSError as e:
        if exclusive and isinstance(e, FileExistsError):
            raise  # the name is taken: the caller claims another
        raise Fatal(f"cannot write {path}: {reason(e)}; {KEPT}") from None
    except ValueError as e:
        raise Fatal(f"cannot write {path}: {e}; {KEPT}") from None


def move_aside(path: Path, damage: ValueError) -> Path:
    """Rename a damaged file to ``NAME.damaged`` (``NAME.damaged.1``, ... where that is taken) and return that
    path: out of the way of readers of the folder, its bytes kept for a look (it may not even be ours), and no
    file moved aside before is overwritten."""
    taken = 0
    while True:
        aside = path.with_name(path.name + ".damaged" + (f".{taken}" if taken else ""))
        try:
            atomic.rename_new(path, aside)
            return aside
        except FileExistsError:
            taken += 1
        except FileNotFoundError:  # a concurrent run moved it first
            return aside
        except OSError as e:
            raise Fatal(f"{path} is damaged ({damage}) and cannot be moved aside: {reason(e)}") from None


def path_text(path: str | os.PathLike) -> str:
    """``path`` as text any file format can hold: bytes of a name that are not UTF-8 (which Python decodes to
    lone surrogates) shown as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


# The first and last bytes of an input stand for its content in a record: tar headers name the first member and
# carry its time, a parquet footer its schema and statistics, and most images are whole within them. Enough to
# tell another dataset's 00000.tar of the same size (tar files are padded to 10 KiB, so equal sizes are common)
# or another image of the same name, at two small reads an input.
ENDS_BYTES = 16384


def ends_digest(path: Path) -> str | None:
    """sha256 of ``path``'s first and last ``ENDS_BYTES`` bytes; ``None`` if it cannot be read."""
    try:
        with open(path, "rb") as file:
            head = file.read(ENDS_BYTES)
            file.seek(max(os.fstat(file.fileno()).st_size - ENDS_BYTES, 0))
            tail = file.read(ENDS_BYTES)
    except OSError:
        return None
    return hashlib.sha256(head + tail).hexdigest()


def source_id(path: Path) -> str | None:
    """An image file's size and :func:`ends_digest`: what an output records of the image it was made from."""
    try:
        size = path.stat().st_size
    except OSError:
        return None
    digest = ends_digest(path)
    return None if digest is None else f"{size}:{digest}"


def feature_keys(layers: list[int] | None) -> list[str]:
    return ["features"] if not layers or len(layers) == 1 else [f"features.{i}" for i in layers]


def expected_keys(args: argparse.Namespace) -> set[str]:
    """The tensors every output file of these settings holds."""
    features = feature_keys(args.layers)
    prefix = [k.replace("features", "prefix", 1) for k in features] if args.prefix else []
    return {"grid_thw", *features, *prefix}


class OtherSettings(ValueError):
    """A whole safetensors file that holds other tensors than these settings write: another run's (``ours``:
    its metadata names its source images, as every output of ``packvit encode`` does) or a file of someone
    else's that happens to have an output's name."""

    def __init__(self, message: str, ours: bool) -> None:
        super().__init__(message)
        self.ours = ours


def read_output(path: Path, keys: set[str], packed: bool) -> list[str] | None:
    """Check that ``path`` is a whole output file; return its image names (packed) or ``None`` (per image).

    Reads headers and ``grid_thw`` only, enough to catch what a torn write or a power cut leaves: a file that is
    empty, truncated or garbage, other tensors than expected, or feature rows that ``grid_thw`` does not
    account for. Raises ``ValueError`` saying which.
    """
    try:
        with safe_open(path, "pt") as f:
            found, metadata = set(f.keys()), f.metadata() or {}
            if found != keys:
                ours = "source" in metadata or "names" in metadata
                raise OtherSettings(f"holds tensors {sorted(found)}, expected {sorted(keys)}", ours)
            grid = f.get_tensor("grid_thw").clone()  # may map the file, which is closed below
            shapes = {k: f.get_slice(k).get_shape() for k in keys if k.startswith("features")}
    except (OSError, SafetensorError) as e:
        raise ValueError(f"not a readable safetensors file: {reason(e)}") from None
    images = grid.shape[0] if grid.ndim == 2 and grid.shape[1:] == (3,) else -1
    names = part_names(metadata) if packed else None
    if images < 1 or images != (len(names) if packed else 1) or bool((grid < 1).any()):
        raise ValueError(f"grid_thw {tuple(grid.shape)} does not describe its images")
    rows = int(grid.prod(1).sum())
    if any(len(shape) != 2 or shape[0] != rows for shape in shapes.values()):
        raise ValueError(f"features of shapes {sorted(map(tuple, shapes.values()))} do not match grid_thw")
    return names


def part_names(metadata: dict[str, str]) -> list[str]:
    try:
        names = json.loads(metadata["names"])
    except (KeyError, ValueError):
        raise ValueError("its metadata has no readable 'names'") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError("its metadata 'names' is not a list of names")
    return names


def _source(item: Item) -> str:
    """The image an output records: its absolute path with the folder's links resolved, so that a rerun given
    the folder by another path (relative, absolute, through a link) still recognises it. A link that is the
    image itself is kept as a name: re-pointed (git-annex, DVC), it is the same image, changed."""
    return path_text(item.path.parent.resolve() / item.path.name)


def _metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(path, "pt") as f:
            return f.metadata() or {}
    except (OSError, SafetensorError):
        return {}


def _listed(metadata: dict[str, str], key: str, count: int) -> list[str | None]:
    """A JSON list of ``count`` entries in ``metadata``; ``None`` for each where it is missing or malformed
    (parts written by earlier versions have no source ids)."""
    try:
        values = json.loads(metadata[key])
    except (KeyError, ValueError):
        return [None] * count
    if not isinstance(values, list) or len(values) != count:
        return [None] * count
    return [v if isinstance(v, str) else None for v in values]


class _Writer:
    """Where features go, and which images earlier runs wrote completely."""

    def __init__(self, out: Path, packed: bool, keys: set[str], say: Callable[[str], None]) -> None:
        self.out, self.packed, self.keys, self.say = out, packed, keys, say
        self.next_part = 0
        self.done: dict[str, tuple[str | None, str | None]] = {}  # packed: name -> its source and source id
        self.changed: list[Item] = []  # packed: images changed since their part was written
        if packed:
            self._scan_parts()

    def _scan_parts(self) -> None:
        for part in sorted(self.out.glob("part-*.safetensors")):
            number = part.stem.removeprefix("part-")
            if not number.isdigit():
                continue
            self.next_part = max(self.next_part, int(number) + 1)
            try:
                # path_text: earlier versions stored a name that is not UTF-8 with its bytes as surrogates
                names = list(map(path_text, read_output(part, self.keys, packed=True)))
                metadata = _metadata(part)
                sources, ids = (_listed(metadata, key, len(names)) for key in ("sources", "source_ids"))
                self.done.update(zip(names, zip(sources, ids, strict=True), strict=True))
            except OtherSettings as e:  # a concurrent run's with other settings, or not ours: never moved
                what = (
                    "it was written with other settings"
                    if e.ours
                    else "it is not an output of packvit encode"
                )
                raise Fatal(f"{part} {e}: {what}; use another --out") from None
            except ValueError as e:  # its images are simply not counted as done
                aside = move_aside(part, e)
                self.say(
                    f"packvit encode: {part} is damaged ({e}); moved to {aside.name}, its images are redone"
                )

    def written(self, item: Item) -> bool:
        """Whether ``item`` is encoded already: its output is whole and was made from this image. One made from
        an earlier version of the same file is redone (packed: listed in ``changed``); one made from another
        image of the same name is a ``Fatal`` clash, never replaced."""
        if self.packed:
            if item.name not in self.done:
                return False
            source, recorded = self.done[item.name]
            if self._same_image(item, source, recorded, self.out):
                return True
            self.changed.append(item)
            return True
        path = self.out / f"{item.stem}.safetensors"
        if not path.is_file():
            return False
        try:
            read_output(path, self.keys, packed=False)
        except OtherSettings as e:
            if not e.ours:  # e.g. a model's weights beside an image of the same name, encoded in place
                raise Fatal(
                    f"{path} is not an output of packvit encode ({e}); it is left as it is: move it away or "
                    f"encode into another --out"
                ) from None
            self.say(f"packvit encode: {path} {e}; encoding {item.path} again")
            return False
        except ValueError as e:  # damaged, or not a safetensors file at all (a Git LFS pointer)
            aside = move_aside(path, e)
            self.say(
                f"packvit encode: {path} is damaged ({e}); moved to {aside.name}, encoding {item.path} again"
            )
            return False
        metadata = _metadata(path)
        if self._same_image(item, metadata.get("source"), metadata.get("source_id"), path):
            return True
        self.say(f"packvit encode: {item.path} changed since {path.name} was made from it; encoding it again")
        (self.out / f"{item.stem}{PREVIEW_SUFFIX}").unlink(missing_ok=True)  # the old image's picture
        return False

    def _same_image(self, item: Item, source: str | None, recorded: str | None, where: Path) -> bool:
        """Whether the output in ``where`` recording ``source`` and ``recorded`` (its source id) was made from
        ``item``'s file as it is now; ``False`` if from an earlier version of it; ``Fatal`` if from another
        image (another folder's image of the same name, encoded into the same ``--out``)."""
        if not recorded:  # written by an earlier version, which recorded no source id
            return True
        if source_id(item.path) == recorded:
            return True  # the image, or a copy of it moved elsewhere
        if source in (_source(item), path_text(item.path)):  # resolved, or as given to an earlier run
            return False
        raise Fatal(
            f"{where} holds the features of {source}, a different image stored under the name {item.name!r}; "
            f"{item.path} would replace them: encode it into another --out"
        )

    def write(
        self, items: list[Item], grids: Tensor, outputs: dict[str, tuple[Tensor, Tensor | None]]
    ) -> None:
        """``outputs``: tensor name -> (``[N, D]`` patch tokens, ``[B, k, D]`` prefix tokens or ``None``)."""
        if self.packed:
            tensors = {"grid_thw": grids}
            for key, (patches, prefix) in outputs.items():
                tensors[key] = patches
                if prefix is not None:
                    tensors[key.replace("features", "prefix", 1)] = prefix
            meta = {
                "names": json.dumps([i.name for i in items]),
                "sources": json.dumps([_source(i) for i in items]),
                "source_ids": json.dumps([source_id(i.path) for i in items]),
            }
            self._claim_part(tensors, meta)
            return
        counts = grids.prod(1).tolist()
        start = 0
        for b, (item, n) in enumerate(zip(items, counts, strict=True)):
            tensors = {"grid_thw": grids[b : b + 1]}
            for key, (patches, prefix) in outputs.items():
                tensors[key] = patches[start : start + n]
                if prefix is not None:
                    tensors[key.replace("features", "prefix", 1)] = prefix[b]
            path = self.out / f"{item.stem}.safetensors"
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise Fatal(f"cannot create folder {path.parent}: {reason(e)}; {KEPT}") from None
            # Replacing is safe: another run writing this name writes the same image with the same model.
            save_tensors(path, tensors, {"source": _source(item), "source_id": source_id(item.path) or ""})
            start += n

    def _claim_part(self, tensors: dict[str, Tensor], meta: dict[str, str]) -> None:
        """Store a batch under the next free part number. Another run may claim a number first (its parts
        appear after this run's scan): the exclusive write then fails and the next number is tried, so no run
        ever replaces another's part."""
        while True:
            path = self.out / f"part-{self.next_part:05d}.safetensors"
            self.next_part += 1
            if path.exists():  # cheap skip of numbers taken meanwhile; the exclusive write is what decides
                continue
            try:
                save_tensors(path, tensors, meta, exclusive=True)
                return
            except FileExistsError:
                continue


# --------------------------------------------------------------------------------------------- the manifest


def sha256_state(config: Any, state: dict[str, Tensor]) -> str:
    """sha256 of a model's content: its config and tensors (name, dtype, shape, bytes, in sorted name order).

    Taken on the tensors as loaded (no copy) rather than on files, so that a checkpoint and its conversion
    with ``packvit-convert`` (same config, same tensors) have the same fingerprint, and a rerun may name either.
    """
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        digest.update(f"\0{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, bfloat16 included
    return digest.hexdigest()


def build_manifest(args: argparse.Namespace, sha256: str | None) -> dict[str, Any]:
    """What decides the features' values and layout; a resumed run must match it. ``sha256`` identifies the
    model by content; the source is recorded for messages only, so a moved model still resumes."""
    model = Path(args.model)
    settings: dict[str, Any] = {
        "layers": args.layers,
        "dtype": args.dtype,
        "format": args.format,
        "prefix": args.prefix,
        "merge_size": args.merge_size,
        "resize": {
            "max_patches": args.max_patches,
            "min_pixels": args.min_pixels,
            "max_pixels": args.max_pixels,
            "size": args.size,
            "resample": args.resample,
        },
    }
    # Keys added after version 2 appear only where they differ from what version 2 did, so folders written
    # before them resume.
    if args.format == "shards":
        settings["tokens"] = args.tokens
        settings["input"] = args.input
    if args.decode != "cpu":
        settings["decode"] = args.decode
    if args.fp8:
        settings["precision"] = "fp8"
    return {
        "packvit_encode": MANIFEST_VERSION,
        "model": {"source": str(model.resolve()) if model.is_dir() else args.model, "sha256": sha256},
        "settings": settings,
    }


def read_manifest(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise Fatal(f"{path} cannot be read ({reason(e)}); encode into a new --out") from None
    if not isinstance(data, dict) or "packvit_encode" not in data:
        raise Fatal(
            f"{out} was written by an older packvit encode that did not record which model made its features; "
            f"encode into a new --out"
        )
    model = data.get("model")
    if (
        data["packvit_encode"] != MANIFEST_VERSION
        or not isinstance(model, dict)
        or not isinstance(model.get("sha256"), str)
        or not isinstance(data.get("settings"), dict)
    ):
        raise Fatal(f"{path} is not a manifest this version of packvit encode reads; encode into a new --out")
    return data


def check_manifest(out: Path, previous: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to add to ``out`` what would not match its features (the model only once it is fingerprinted)."""
    before, now = previous["settings"], current["settings"]
    if before != now:
        diff = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        raise Fatal(
            f"{out} holds features made with other settings (differing: {', '.join(diff)}); "
            f"use another --out or the same settings"
        )
    old, new = previous["model"], current["model"]
    if new["sha256"] is not None and new["sha256"] != old["sha256"]:
        same_path = " (same path, other content)" if old.get("source") == new["source"] else ""
        raise Fatal(
            f"{out} holds features of model {old.get('source')} (sha256 {old['sha256'][:16]}), not of "
            f"--model {new['source']} (sha256 {new['sha256'][:16]}){same_path}; use another --out"
        )


def record_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest, or check the one a concurrent or earlier run wrote: it is never overwritten, so two
    runs with different models or settings cannot both go on in one folder."""
    text = json.dumps(manifest, indent=2) + "\n"
    for _ in range(MANIFEST_CLAIM_TRIES):
        try:
            atomic.write_file(out / MANIFEST, lambda tmp: tmp.write_text(text), exclusive=True)
            return
        except FileExistsError:
            previous = read_manifest(out)
            if previous is not None:
                check_manifest(out, previous, manifest)
                return
            # Not there: another run's claim is under way, or the manifest was deleted meanwhile.
            time.sleep(0.05)
        except OSError as e:
            raise Fatal(f"cannot write {out / MANIFEST}: {reason(e)}; {KEPT}") from None
    marker = atomic.claim_marker(out / MANIFEST)
    if not marker.exists():  # the name is taken by something that reads as no file: a dangling link
        raise Fatal(f"cannot record the manifest: {out / MANIFEST} exists but cannot be read; {KEPT}")
    raise Fatal(
        f"cannot record the manifest in {out}: {marker} stays, left by a run killed while claiming it; remove "
        f"it if no other packvit encode writes into {out}, then rerun; {KEPT}"
    )


# ------------------------------------------------------------------------------------------------- set-up


def find_inputs(inputs: list[str], out: Path) -> list[Item]:
    try:
        items = find_images(inputs, out)
    except ValueError as e:
        raise Fatal(str(e)) from None
    if not items:
        raise Fatal(f"no images found in {', '.join(inputs)} (looked for {' '.join(IMAGE_SUFFIXES)})")
    return items


def prepare_out(out: Path, say: Callable[[str], None]) -> None:
    """Create ``out`` and prove it writable before any model is loaded; remove temp files of killed runs."""
    if out.exists() and not out.is_dir():
        raise Fatal(f"--out {out} exists and is not a folder")
    # Named like any temp file, so that a kill right here leaves nothing the next run does not clean up.
    probe = out / atomic.temp_name("probe")
    try:
        out.mkdir(parents=True, exist_ok=True)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as e:
        raise Fatal(f"cannot write into --out {out}: {reason(e)}") from None
    folders = [Path(root) for root, _, _ in os.walk(out)]
    removed = [p for folder in folders for p in atomic.remove_stale(folder)]
    if removed:
        say(f"packvit encode: removed {plural(len(removed), 'temporary file')} left by an interrupted run")


def load_state(src: str) -> tuple[Any, dict[str, Tensor], str]:
    """Read ``--model`` as :func:`~packvit_native.from_pretrained` does: ``(config, tensors, sha256)``, the
    fingerprint taken on the tensors as read (before any cast), so the weights are read once."""
    from .hub import CONFIG_PATTERNS, locate, snapshot_of
    from .io import is_native_dir, load_native

    path = locate(src, CONFIG_PATTERNS)  # a hub id: the configs first, to learn what else to fetch
    if is_native_dir(path):
        config, state = load_native(snapshot_of(src, path)())
    else:
        from weights_convert.convert import convert_checkpoint

        config, state, _ = convert_checkpoint(src)  # fetches only the weights the family reads
    return config, state, sha256_state(config, state)


def load_model(args: argparse.Namespace, device: torch.device, check_only: bool = False) -> tuple[Any, str]:
    """Load ``--model`` onto ``device`` in ``--dtype`` with ``--merge-size``, ``--attn-backend`` and
    ``--fp8``; ``(model, sha256)``. ``check_only``: a Ray driver's load, to fingerprint the model and check the
    settings against it (reference attention and the checkpoint's precision, which run on its CPU)."""
    from .loading import build_model

    config, state, sha256 = load_state(args.model)
    model = build_model(
        config, state, device=device, dtype=DTYPES[args.dtype], merge_size=args.merge_size,
        attn_backend="sdpa" if check_only else args.attn_backend,
        precision="fp8" if args.fp8 and not check_only else None,
    )  # fmt: skip
    return model, sha256


def load_model_or_fail(
    args: argparse.Namespace, device: torch.device, check_only: bool = False
) -> tuple[Any, str]:
    """:func:`load_model`, any failure reported as one :class:`Fatal` line."""
    try:
        return load_model(args, device, check_only)
    except ValueError as e:  # CheckpointError and bad options: their messages name the file or the option
        raise Fatal(str(e)) from None
    except Exception as e:  # a damaged checkpoint can fail anywhere in its readers: one line, not a traceback
        raise Fatal(f"cannot load --model {args.model}: {type(e).__name__}: {reason(e)}") from None


def resize_rule(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    """The resize rule, checked once against the model before the first image."""
    from .preprocess import target_size

    rule = {"max_patches": args.max_patches, "min_pixels": args.min_pixels, "max_pixels": args.max_pixels}
    rule["size"] = tuple(args.size) if args.size else None
    try:
        target_size(64, 64, model.config, **rule)
        if args.layers:
            model._layer_indices(tuple(args.layers))
    except ValueError as e:
        raise Fatal(str(e)) from None
    fixed = model.config.fixed_size is not None
    if fixed and any(rule[k] is not None for k in ("max_patches", "min_pixels", "max_pixels")):
        raise Fatal(
            f"{args.model} runs only at its trained size of {model.config.pos_grid} patches; drop "
            f"--max-patches/--min-pixels/--max-pixels (its trained size is the default)"
        )
    return rule


# ----------------------------------------------------------------------------------------------- encoding


class Loads:
    """``load(item)`` on ``workers`` threads, for :func:`prefetch`."""

    def __init__(self, load: Callable[[Any], Any], workers: int) -> None:
        self.load, self.pool = load, LoadingThreads(workers)
        self.window = 2 * workers

    def submit(self, item: Any) -> Future:
        return self.pool.submit(self.load, item)

    def close(self) -> None:
        # after Ctrl-C, do not decode the queued images first
        self.pool.shutdown(wait=True, cancel_futures=True)


def read_ahead(items: Iterable[Any], depth: int) -> Iterator[Any]:
    """``items``, iterated in a thread of its own up to ``depth`` ahead of the caller, in order.

    Reading shards (tar headers parsed in Python, members read) then leaves the thread that feeds the GPU,
    and can go on while that thread waits for the device. An exception from ``items`` is raised here after
    the items before it. Closing the returned generator (or leaving it by an exception) stops the thread,
    which closes ``items`` (a generator: its open files) itself.
    """
    entries: queue.Queue[tuple[str, Any]] = queue.Queue(max(depth, 1))
    stop = threading.Event()

    def offer(entry: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                entries.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        source = iter(items)
        try:
            for item in source:
                if not offer(("item", item)):
                    return
            offer(("end", None))
        except BaseException as e:  # handed to the caller, in order
            offer(("error", e))
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=run, name="packvit-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = entries.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()


def prefetch(
    items: Iterable[Any], loads: Loads | GpuDecoder | LoadingProcesses
) -> Iterator[tuple[Any, Future]]:
    """Yield ``(item, loads.submit(item))`` in order, keeping at most ``loads.window`` loads in flight.

    ``loads`` is a :class:`Loads`, a :class:`~packvit_native.gpu_decode.GpuDecoder` or a
    :class:`~packvit_native.worker_processes.LoadingProcesses`; the caller closes it.
    ``items`` may be a lazy iterator (a stream of samples read from a shard): it is advanced in the caller's
    thread, one item ahead of each one handed out.
    """
    queue: deque[tuple[Any, Future]] = deque()
    ahead = iter(items)
    for item in ahead:
        queue.append((item, loads.submit(item)))
        if len(queue) >= loads.window:
            break
    while queue:
        item, future = queue.popleft()
        nxt = next(ahead, None)
        if nxt is not None:
            queue.append((nxt, loads.submit(nxt)))
        yield item, future


def token_outputs(
    result: Tensor | tuple[Tensor, ...], packing: Any, args: argparse.Namespace
) -> dict[str, tuple[Tensor, Tensor | None]]:
    """A forward's token tensors by stored name: ``{name: (patch tokens [N, D], prefix tokens [B, k, D] or
    None)}`` on the model's device, for the layers and ``--prefix`` of ``args``."""
    result = result if isinstance(result, tuple) else (result,)
    outputs = {}
    for key, tokens in zip(feature_keys(args.layers), result, strict=True):
        if args.prefix:
            outputs[key] = (packing.patch_tokens(tokens), packing.prefix_tokens(tokens))
        else:
            outputs[key] = (tokens, None)
    return outputs


def _map_tensors(fn: Callable[[Tensor], Tensor], tree: Any) -> Any:
    if isinstance(tree, Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: _map_tensors(fn, v) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(_map_tensors(fn, v) for v in tree)
    return tree


class Queued:
    """One batch's work queued on the device: started when made, finished by :meth:`outputs`, which queues the
    copy of its outputs to the host; :meth:`wait` returns them on the CPU with the seconds the batch spent in
    the model.

    On a CUDA device nothing waits until :meth:`wait`, so a loop that queues batch ``i + 1`` before waiting for
    batch ``i`` keeps the GPU busy while the host reads results, writes files and gathers the next batch; the
    model's time is then read from CUDA events around the batch's own work (input copy, forward, outputs).
    On the CPU every step runs when called and the time is the wall-clock time."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.result: Any = None
        if device.type == "cuda":
            self.stream = torch.cuda.current_stream(device)
            self.start = self.stream.record_event(torch.cuda.Event(enable_timing=True))
        else:
            self.started = time.perf_counter()

    def outputs(self, result: Any) -> Queued:
        """Copy ``result`` (tensors, possibly in dicts and tuples) to the host; returns ``self``."""
        if self.device.type == "cuda":
            # into pinned memory, so the copy waits for nothing on the host
            self.result = _map_tensors(lambda t: t.to("cpu", non_blocking=True), result)
            self.end = self.stream.record_event(torch.cuda.Event(enable_timing=True))
        else:
            self.result = _map_tensors(Tensor.cpu, result)
            self.seconds = time.perf_counter() - self.started
        return self

    def wait(self) -> tuple[Any, float]:
        """``(outputs on the CPU, seconds in the model)``, once the device has produced them."""
        if self.device.type == "cuda":
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000
        return self.result, self.seconds


def queue_model(
    model: Any, batch: list[tuple[Item, Tensor, Tensor]], args: argparse.Namespace, device: torch.device
) -> tuple[Tensor, Queued]:
    """Queue one batch's forward; ``(grid_thw, queued)``, whose outputs are ``{tensor name: (patch tokens,
    prefix tokens or None)}``."""
    queued = Queued(device)
    grids = torch.cat([g for _, _, g in batch])
    packing = model.pack(grids)
    # with --decode gpu, JPEGs come on the device and other images on the CPU
    patches = torch.cat([on_device(p, model.device) for _, p, _ in batch])
    layers = tuple(args.layers) if args.layers else None
    with torch.inference_mode():
        result = model(patches, packing=packing, output_layers=layers, return_prefix=args.prefix)
        return grids, queued.outputs(token_outputs(result, packing, args))


def on_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device`` (with its index, as ``model.device`` gives it), copied without waiting (from pinned
    memory) if it is elsewhere; a tensor already there is returned as it is, with no operation at which the
    interpreter could hand its lock to a loading thread."""
    return t if t.device == device else t.to(device, non_blocking=True)


def block_tokens(patches: Tensor, grid: Tensor, num_prefix: int) -> int:
    """An image's tokens in the blocks: its patches and each frame's prefix tokens. Read with ``tolist``, not
    tensor operations: each of those lets the loading threads take the interpreter lock, and this runs per
    image on the thread that feeds the GPU."""
    return patches.shape[0] + num_prefix * sum(t for t, _, _ in grid.tolist())


def throughput(images: int, wall_s: float, model_s: float) -> str:
    """The run summary's speeds: the whole pipeline (reading, decoding, encoding, writing) and the model alone
    (each batch's own time on the device, input and output copies included: see :class:`Queued`)."""
    whole = f"{images / wall_s:.1f} img/s end to end" if wall_s > 0 else "end to end not measured"
    alone = f"{images / model_s:.1f} img/s in the model alone" if model_s > 0 else "model time not measured"
    return f"{whole}, {alone}"


def resolve_device(args: argparse.Namespace) -> torch.device:
    """``--device`` (default: cuda if available), and from it the default ``--dtype``."""
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise Fatal(f"--device {args.device}: {e}") from None
    args.dtype = default_dtype(args, device)
    return device


def default_dtype(args: argparse.Namespace, device: torch.device) -> str:
    """``--dtype``, by default bfloat16 on cuda or with ``--fp8`` (whose other layers run in bfloat16), else
    float32."""
    return args.dtype or ("bfloat16" if device.type == "cuda" or args.fp8 else "float32")


def check_device(args: argparse.Namespace, device: torch.device) -> None:
    """Refuse a CUDA device without a GPU, an attention backend that cannot run on ``device``, and ``--decode
    gpu`` where torchvision's nvJPEG decoder cannot run on it."""
    from .attention import resolve_backend

    if device.type == "cuda" and not torch.cuda.is_available():
        raise Fatal(f"--device {device} asked for, but no CUDA GPU is available")
    if args.graphs and device.type != "cuda":
        raise Fatal(f"--graphs replays CUDA graphs; it needs a CUDA device, not {device}")
    try:
        resolve_backend(args.attn_backend, device)
    except ValueError as e:
        raise Fatal(str(e)) from None
    if args.decode == "gpu":
        try:
            nvjpeg_decoder(device)  # torchvision importable, and nvJPEG runs on this device
        except ValueError as e:
            raise Fatal(str(e)) from None


def staged(
    loaded: tuple[Tensor, Tensor], args: argparse.Namespace, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Host patches made ready for the device by the thread that made them: cast to ``--dtype`` (the cast the
    forward makes first, so the same values, and half the bytes to move in bfloat16) and, for a CUDA device,
    pinned, so that the main thread's copy is asynchronous instead of holding it while the GPU waits."""
    patches, grid = loaded
    patches = patches.to(DTYPES[args.dtype])
    return (patches.pin_memory() if device.type == "cuda" else patches), grid


def gpu_decoder(
    args: argparse.Namespace,
    config: Any,
    rule: dict[str, Any],
    device: torch.device,
    read: Callable[[Any], bytes | None],
    fallback: Callable[[bytes], tuple[Tensor, Tensor]],
) -> GpuDecoder:
    """The ``--decode gpu`` loads (:class:`~packvit_native.gpu_decode.GpuDecoder`), errors as ``Fatal``."""
    try:
        return GpuDecoder(config, args, rule, device, read, fallback)
    except ValueError as e:
        raise Fatal(str(e)) from None


def loading_processes(
    source: Callable[[Any], bytes | str | None],
    args: argparse.Namespace,
    config: Any,
    rule: dict[str, Any],
    device: torch.device,
) -> LoadingProcesses:
    """The ``--processes`` loads (:class:`~packvit_native.worker_processes.LoadingProcesses`), started; a
    failure to start as ``Fatal``."""
    try:
        return LoadingProcesses(source, args.workers, config, args, rule, pin=device.type == "cuda")
    except LoadingFailed as e:
        raise Fatal(str(e)) from None


def warm_up(model: Any, rule: dict[str, Any], device: torch.device) -> None:
    """One forward of a small blank image before the clock starts, so that the run's throughput figures leave
    out one-time costs (kernel compilation, library start-up), and a backend that fails on this device fails
    before anything is written."""
    from .preprocess import target_size

    c = model.config
    h, w = target_size(224, 224, c, **rule)
    frames = torch.zeros(c.temporal_patch_size, c.num_channels, h, w, device=device)
    patches, grid = model.patchify([frames])
    try:
        with torch.inference_mode():
            model(patches, grid)
    except (ValueError, RuntimeError) as e:
        raise Fatal(f"the model fails a first forward on {device}: {type(e).__name__}: {e}") from None


def capture_graphs(model: Any, args: argparse.Namespace) -> None:
    """``--graphs``: capture the blocks at ``--max-tokens`` and a quarter of it (a shard's last, smaller batch
    then pads to less), after :func:`warm_up` has compiled and loaded the kernels."""
    if not args.graphs:
        return
    budgets = sorted({max(args.max_tokens // 4, 1), args.max_tokens})
    segments = GRAPH_SEGMENTS
    window = model.config.window_size
    if window:  # a segment per attention window: a budget of whole windows, twice over for partial ones
        segments += 2 * args.max_tokens // (window * window)
    try:
        model.capture_graphs(budgets, max_segments=segments)
    except (ValueError, RuntimeError) as e:
        raise Fatal(f"--graphs: {e}") from None


def share(items: list[Any], num_shards: int, shard_index: int, name: Callable[[Any], str]) -> list[Any]:
    """This run's share of ``items`` under ``--num-shards N --shard-index I``: every item whose name hashes to
    ``I`` modulo ``N``. Runs with the same N and each I cover all items once, with no coordination, and an
    item's run depends on its name alone: a run repeated after inputs were added or removed still covers what
    the others left to it (by position in the sorted list, an added name moved every later one to another run)."""
    if num_shards == 1:
        return items
    return [item for item in items if share_index(name(item), num_shards) == shard_index]


def share_index(name: str, num_shards: int) -> int:
    """The ``--shard-index`` of the run that encodes the input named ``name`` among ``num_shards`` runs."""
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def encode(args: argparse.Namespace) -> int:
    """Run ``packvit encode``; returns the exit code, raises ``Fatal`` or ``KeyboardInterrupt``."""
    from . import shards

    kind = shards.input_kind(args.inputs)
    check_options(args, kind)
    with handoffs_every(SWITCH_INTERVAL_S if args.engine == "local" else None):
        if kind != "files":
            return shards.encode_shards(args, kind, _say)
        return _encode_files(args)


@contextlib.contextmanager
def handoffs_every(seconds: float | None) -> Iterator[None]:
    """Set the interpreter's switch interval for the block (``None``: leave it), and restore it after. The
    interval is the process's: two runs at once in one process (threads calling ``main``) leave the last
    restored value."""
    if seconds is None:
        yield
        return
    previous = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def check_options(args: argparse.Namespace, kind: str) -> None:
    """Options that do not fit the inputs or each other, refused before anything is read or written."""
    if args.engine == "local":
        args.workers = args.workers or 4
    if args.fp8 and args.dtype not in (None, "bfloat16"):
        raise Fatal(f"--fp8 runs the layers it leaves unquantized in bfloat16; drop --dtype {args.dtype}")
    if args.processes and (args.decode != "cpu" or args.engine != "local"):
        raise Fatal("--processes runs the decoding workers of --decode cpu --engine local as processes")
    if not 0 <= args.shard_index < args.num_shards:
        raise Fatal(f"--shard-index {args.shard_index} is not in 0..{args.num_shards - 1} (--num-shards)")
    shard_only = {
        "--image-column": args.image_column, "--key-column": args.key_column,
        "--keep-columns": args.keep_columns, "--tokens": args.tokens or None,
    }  # fmt: skip
    if kind == "files":
        given = [name for name, value in shard_only.items() if value is not None]
        if given:
            raise Fatal(f"{', '.join(given)} apply to webdataset or parquet shards, not to image files")
        if args.engine != "local":
            raise Fatal(
                "--engine ray reads webdataset or parquet shards; encode image files with --engine local"
            )
        args.format = args.format or "per-image"
        return
    if args.format is not None:
        raise Fatal(
            "--format applies to image files; shards are written as NAME.parquet (+ NAME.safetensors)"
        )
    args.format = "shards"
    if (args.layers or args.prefix) and not args.tokens:
        raise Fatal("--layers and --prefix choose the token features stored with --tokens; add --tokens")
    if kind != "parquet" and (args.image_column or args.key_column or args.keep_columns):
        raise Fatal("--image-column, --key-column and --keep-columns apply to parquet shards")
    taken = [
        c for c in args.keep_columns or [] if c in OUTPUT_COLUMNS or c.startswith(("_", "features", "prefix"))
    ]
    if taken:
        raise Fatal(
            f"--keep-columns {', '.join(taken)}: the outputs have columns of that name (key, grid_thw, "
            "embedding, image_embeds, error, features..., prefix..., and _-names Ray uses); rename the column "
            "in the input"
        )
    if args.engine == "local" and (args.address or args.gpus_per_worker is not None):
        raise Fatal("--address and --gpus-per-worker apply to --engine ray")
    if args.engine == "ray" and args.decode == "gpu":
        raise Fatal("--decode gpu applies to --engine local; --engine ray decodes in CPU tasks")


def _say(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)  # printed above the progress bar, not through it


def _encode_files(args: argparse.Namespace) -> int:
    """``packvit encode`` over image files and folders."""
    import packvit_native as pv

    say = _say
    out = Path(args.out)
    device = resolve_device(args)
    items = share(find_inputs(args.inputs, out), args.num_shards, args.shard_index, lambda i: i.name)
    check_device(args, device)  # before --out is made: a bad device or backend leaves nothing behind
    prepare_out(out, say)
    manifest = build_manifest(args, sha256=None)
    previous = read_manifest(out)
    if previous is not None:
        check_manifest(out, previous, manifest)  # settings now, before a possibly long model load
    writer = _Writer(out, args.format == "packed", expected_keys(args), say)

    def pictured(item: Item) -> bool:
        return not args.preview or (out / f"{item.stem}{PREVIEW_SUFFIX}").is_file()

    # An image encoded without --preview is encoded again for its picture, except into packed parts, where
    # it would then be stored twice: those are only counted.
    packed = args.format == "packed"
    done = [writer.written(i) for i in items]
    todo = [i for i, d in zip(items, done, strict=True) if not d or (not packed and not pictured(i))]
    skipped = len(items) - len(todo)
    if skipped:
        say(f"packvit encode: skipping {skipped} of {plural(len(items), 'image')}, already in {out}")
    if packed and (unpictured := sum(d and not pictured(i) for i, d in zip(items, done, strict=True))):
        say(
            f"packvit encode: note: {plural(unpictured, 'image')} encoded earlier without --preview "
            f"{'has' if unpictured == 1 else 'have'} no preview: packed parts are never rewritten, so encode "
            "into a new --out to picture them"
        )
    if writer.changed:
        shown = ", ".join(str(item.path) for item in writer.changed[:3])
        say(
            f"packvit encode: note: {plural(len(writer.changed), 'image')} changed since encoded into packed "
            f"parts ({shown}{', ...' if len(writer.changed) > 3 else ''}), which are never rewritten: their "
            "features are of the earlier files; encode into a new --out to redo them"
        )
    # Loaded even when nothing is left, so that a rerun with another model is refused, not reported as done.
    model, sha256 = load_model_or_fail(args, device)
    manifest["model"]["sha256"] = sha256
    if previous is not None:
        check_manifest(out, previous, manifest)
    if not todo:
        say("packvit encode: nothing left to encode")
        return 0
    rule = resize_rule(args, model)
    warm_up(model, rule, device)
    capture_graphs(model, args)

    if args.decode == "gpu":
        from .shards import preprocess_bytes

        loads: Loads | GpuDecoder | LoadingProcesses = gpu_decoder(
            args, model.config, rule, device, lambda item: item.path.read_bytes(),
            lambda data: staged(preprocess_bytes(data, model.config, args, rule), args, device),
        )  # fmt: skip
    elif args.processes:
        loads = loading_processes(lambda item: str(item.path), args, model.config, rule, device)
    else:

        def load(item: Item) -> tuple[Tensor, Tensor]:
            loaded = pv.preprocess(
                item.path, model, resample=args.resample, max_decoded_pixels=args.max_decoded_pixels, **rule
            )
            return staged(loaded, args, device)

        loads = Loads(load, args.workers)

    started = time.perf_counter()
    encoded, patch_tokens, failed, model_s = _encode_items(todo, loads, model, writer, manifest, args, device)
    wall_s = time.perf_counter() - started
    say(
        f"packvit encode: encoded {plural(encoded, 'image')} ({plural(patch_tokens, 'patch token')}) "
        f"in {wall_s:.1f}s into {out}"
        + (f"; {skipped} already there" if skipped else "")
        + f"; {throughput(encoded, wall_s, model_s)}"
        + (f"; {loads.summary()}" if isinstance(loads, GpuDecoder) else "")
    )
    if failed:
        say(f"packvit encode: {plural(len(failed), 'image')} unreadable: " + ", ".join(map(str, failed)))
        return 1
    return 0


def _encode_items(
    todo: list[Item],
    loads: Loads | GpuDecoder | LoadingProcesses,
    model: Any,
    writer: _Writer,
    manifest: dict[str, Any],
    args: argparse.Namespace,
    device: torch.device,
) -> tuple[int, int, list[Path], float]:
    """Decode ahead, fill batches up to ``--max-tokens`` (prefix tokens included), encode and write them.

    Returns the number of images encoded, their patch tokens, the unreadable files and the seconds spent in
    the model.
    """
    failed: list[Path] = []
    encoded = patch_tokens = 0
    model_s = 0.0
    num_prefix = model.config.num_prefix
    in_flight: list[tuple[list[tuple[Item, Tensor, Tensor]], Tensor, Queued]] = []  # at most one batch

    def fail(batch: list[tuple[Item, Tensor, Tensor]], e: BaseException) -> Fatal:
        # e.g. a size the model refuses, or out of memory
        return Fatal(f"encoding {len(batch)} images from {batch[0][0].path} failed: {e}; {KEPT}")

    def settle() -> None:
        """Wait for the batch in flight and write its outputs."""
        nonlocal encoded, patch_tokens, model_s
        if not in_flight:
            return
        batch, grids, queued = in_flight.pop()
        try:
            outputs, seconds = queued.wait()
        except RuntimeError as e:
            raise fail(batch, e) from None
        model_s += seconds
        if not encoded:
            # Recorded with the first features, so a run that fails before writing any leaves no manifest
            # behind and can be rerun with other settings.
            record_manifest(writer.out, manifest)
        items = [i for i, _, _ in batch]
        writer.write(items, grids, outputs)
        if args.preview:
            _write_previews(writer.out, items, grids, next(iter(outputs.values()))[0], model.config)
        encoded += len(batch)
        patch_tokens += int(grids.prod(1).sum())
        bar.update(len(batch))

    def flush(batch: list[tuple[Item, Tensor, Tensor]]) -> None:
        """Queue this batch, then write the one before it while the device works on this one."""
        try:
            grids, queued = queue_model(model, batch, args, device)
        except (ValueError, RuntimeError) as e:
            settle()
            raise fail(batch, e) from None
        settle()
        in_flight.append((batch, grids, queued))

    bar = tqdm(total=len(todo), unit="img", desc="encode", disable=None)  # shown on a terminal only
    with contextlib.closing(loads), contextlib.closing(prefetch(todo, loads)) as stream, bar:
        batch: list[tuple[Item, Tensor, Tensor]] = []
        batch_tokens = 0
        for item, future in stream:
            try:
                patches, grid = future.result()
            except LoadingFailed as e:
                settle()
                raise Fatal(f"{e}; {KEPT}") from None
            except ValueError as e:
                failed.append(item.path)
                reason = str(e) if str(item.path) in str(e) else f"{item.path}: {e}"
                writer.say(f"packvit encode: skipped, {reason}")
                bar.update(1)
                continue
            n = block_tokens(patches, grid, num_prefix)
            if batch and batch_tokens + n > args.max_tokens:
                flush(batch)
                batch, batch_tokens = [], 0
            batch.append((item, patches, grid))
            batch_tokens += n
        if batch:
            flush(batch)
        settle()
    return encoded, patch_tokens, failed, model_s


def _write_previews(out: Path, items: list[Item], grids: Tensor, tokens: Tensor, config: Any) -> None:
    """``OUT/<name>.pca.png`` per image: its patch tokens' first three principal components as RGB."""
    from .preview import pca_rgb, write_png

    start = 0
    for item, (t, h, w) in zip(items, grids.tolist(), strict=True):
        n = t * h * w
        rgb = pca_rgb(tokens[start : start + n], h, w, config.merge_size)  # the first frame of a clip
        start += n
        try:
            write_png(out / f"{item.stem}{PREVIEW_SUFFIX}", rgb, config.patch_size)
        except OSError as e:
            raise Fatal(f"cannot write the preview of {item.path}: {reason(e)}; {KEPT}") from None


# -------------------------------------------------------------------------------------------- command line


def _parse_layers(text: str) -> list[int]:
    try:
        layers = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated integers, got {text!r}") from None
    return layers


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="packvit", description="Packed, padding-free vision encoders.")
    sub = parser.add_subparsers(dest="command", required=True)
    _encode_options(
        sub.add_parser(
            "encode",
            help="encode image files into safetensors features",
            description=__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    return parser


def _encode_options(enc: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``packvit encode``'s arguments to ``enc``; returns it."""
    enc.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="image files or folders (searched recursively)"
    )
    enc.add_argument("--model", required=True, help="hub id, transformers directory or converted directory")
    enc.add_argument("--out", required=True, help="output folder (created; a rerun resumes into it)")
    enc.add_argument(
        "--layers", type=_parse_layers, default=None,
        help="comma-separated layers to store instead of the final output, numbered as hidden_states "
        "(0 = embeddings, -1 = last block before the final norm, -2 = the one before), e.g. --layers=-2",
    )  # fmt: skip
    enc.add_argument(
        "--format", choices=("per-image", "packed"), default=None,
        help="layout for image files (default per-image); shards are always written per shard",
    )  # fmt: skip
    enc.add_argument("--prefix", action="store_true", help="also store the prefix tokens (class, registers)")
    enc.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    enc.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="default: bfloat16 on cuda or with --fp8, else float32",
    )
    enc.add_argument("--attn-backend", default="auto", help="attention backend (default: auto)")
    enc.add_argument(
        "--fp8", action="store_true",
        help="run the transformer blocks' linear layers as FP8 GEMMs, the rest in bfloat16 (inference; needs "
        "a GPU of compute capability 8.9 or newer, or a PyTorch whose CPU build runs FP8 matmuls); recorded in the settings, as it changes the features",
    )  # fmt: skip
    enc.add_argument(
        "--graphs", action="store_true",
        help="CUDA: replay the transformer blocks from CUDA graphs captured at --max-tokens and a quarter of "
        "it: one launch per batch instead of hundreds, so the host threads that read and decode images slow "
        f"the model less. Batches of more than {GRAPH_SEGMENTS} images (frames), an image longer than "
        "--max-tokens, and every batch with --layers run as usual. Features equal the plain forward's up to "
        "bfloat16 rounding (best with --attn-backend fa4, whose kernels launch for the tokens present; other "
        "kernels launch for --max-tokens per image)",
    )  # fmt: skip
    enc.add_argument(
        "--max-tokens", type=_positive_int, default=16384,
        help="token budget of one batch, prefix tokens included (default 16384)",
    )  # fmt: skip
    enc.add_argument(
        "--max-patches", type=_positive_int, default=None, help="NaFlex resize: fill this many patches"
    )
    enc.add_argument("--min-pixels", type=int, default=None, help="smart resize: smallest pixel area")
    enc.add_argument("--max-pixels", type=int, default=None, help="smart resize: largest pixel area")
    enc.add_argument(
        "--size", type=int, nargs=2, default=None, metavar=("H", "W"), help="fixed resize in pixels"
    )
    enc.add_argument("--resample", choices=("bilinear", "bicubic"), default=None)
    enc.add_argument(
        "--merge-size", type=_positive_int, default=None, help="store tokens in m x m merge order"
    )
    enc.add_argument(
        "--workers", type=_positive_int, default=None,
        help="--engine local: threads (processes with --processes) reading and decoding images ahead (default "
        "4; with --decode gpu they "
        "parse headers and decode what the GPU does not); --engine ray: model actors (default: the cluster's "
        "GPUs / --gpus-per-worker, or 1 without GPUs)",
    )  # fmt: skip
    enc.add_argument(
        "--processes", action="store_true",
        help="--decode cpu, --engine local: run the --workers as processes instead of threads, so that decoding "
        "never competes for Python's interpreter lock with the thread that feeds the model (each process "
        "starts once; the patches come back through shared memory)",
    )  # fmt: skip
    enc.add_argument(
        "--max-decoded-pixels", type=_positive_int, default=MAX_DECODED_PIXELS, metavar="N",
        help="report an image file declaring more than N pixels (width x height) as unreadable instead of "
        f"decoding it (default {MAX_DECODED_PIXELS} = 8192 x 8192)",
    )  # fmt: skip
    shards = enc.add_argument_group(
        "shards", "webdataset tar shards (paths or brace patterns such as data/{00000..00099}.tar) and parquet "
        "files are encoded shard by shard into OUT/NAME.parquet (+ OUT/NAME.safetensors with --tokens)",
    )  # fmt: skip
    shards.add_argument(
        "--tokens", action="store_true", help="also store every image's token features in NAME.safetensors"
    )
    shards.add_argument(
        "--image-column", default=None, help="parquet: the image bytes column (default image)"
    )
    shards.add_argument("--key-column", default=None, help="parquet: the sample key column (default key)")
    shards.add_argument(
        "--keep-columns", type=_parse_names, default=None, metavar="A,B",
        help="parquet: other columns copied into the output rows (default none)",
    )  # fmt: skip
    shards.add_argument(
        "--num-shards", type=_positive_int, default=1, metavar="N",
        help="split the inputs (shards, or image files) by a hash of each name modulo N, so an input's run "
        "depends on its name alone; with --shard-index, for slurm arrays or torchrun (default 1)",
    )  # fmt: skip
    shards.add_argument(
        "--shard-index", type=int, default=0, metavar="I", help="this run's share, 0..N-1 (default 0)"
    )
    shards.add_argument(
        "--engine", choices=("local", "ray"), default="local",
        help="local: this process (default); ray: Ray Data, decoding in CPU tasks, the model in actors",
    )  # fmt: skip
    shards.add_argument(
        "--address", default=None, help="--engine ray: the Ray cluster (default: local/RAY_ADDRESS)"
    )
    shards.add_argument(
        "--gpus-per-worker", type=float, default=None, metavar="G",
        help="--engine ray: GPUs per model actor (default 1 if the cluster has GPUs, else 0)",
    )  # fmt: skip
    enc.add_argument(
        "--preview", action="store_true",
        help="write per image a PNG of the first three principal components of its patch features as RGB "
        "(OUT/<name>.pca.png, or OUT/NAME.pca/<key>.png for shards)",
    )  # fmt: skip
    enc.add_argument(
        "--decode", choices=("cpu", "gpu"), default="cpu",
        help="gpu (--engine local, CUDA devices): decode JPEGs in batches with nvJPEG "
        "(torchvision.io.decode_jpeg) and resize them on the device; other images, and JPEGs nvJPEG would not "
        "decode as PIL does, take the CPU path. Needs torchvision built for this torch with CUDA. Features "
        "are close to, not bit-identical with, the default PIL decoding, so it is recorded in the settings",
    )  # fmt: skip
    return enc


def _parse_names(text: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated column names, got {text!r}")
    return names


def encode_args(**given: Any) -> argparse.Namespace:
    """``packvit encode``'s settings with its defaults, for callers that are not the command line (the Ray
    entry point): one home for every default. Unknown names are a ``TypeError``; values the command line
    would refuse (a choice not offered, a count below 1, a flag that is not a bool) a ``ValueError``. ``None``
    leaves an option unset (``max_decoded_pixels=None``: no limit)."""
    options = _encode_options(argparse.ArgumentParser(prog="packvit encode"))
    args = options.parse_args(["--model", "-", "--out", "-", "-"])
    unknown = sorted(set(given) - set(vars(args)))
    if unknown:
        raise TypeError(f"unknown encode settings: {', '.join(unknown)}")
    for action in options._actions:  # argparse offers no public list of a parser's options
        value = given.get(action.dest)
        if value is not None:
            given[action.dest] = _setting(action, value)
    vars(args).update(given)
    return args


def _setting(action: argparse.Action, value: Any) -> Any:
    """``value`` for option ``action`` checked as the command line checks its text: ``ValueError`` if refused."""
    name = action.dest
    if action.nargs == 0:  # a flag
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
        return value
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, action.choices))}, got {value!r}")
    if isinstance(value, str) and action.type in (_parse_layers, _parse_names):
        try:
            return action.type(value)  # the command line's own text, e.g. layers="-2,-1"
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"{name}: {e}") from None
    if action.type is _parse_layers:
        layers = [value] if _is_int(value) else value
        if not isinstance(layers, (list, tuple)) or not all(_is_int(v) for v in layers):
            raise ValueError(f"layers must be an int or a list of ints, got {value!r}")
        return list(layers)
    if action.type is _parse_names:
        names = value
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"{name} must be a list of column names, got {value!r}")
        return list(names)
    if action.nargs == 2:  # --size H W
        if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_is_int(v) for v in value):
            raise ValueError(f"{name} must be a pair of integers, got {value!r}")
        return list(value)
    if action.type is _positive_int and not (_is_int(value) and value > 0):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if action.type is int and not _is_int(value):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if action.type is float and not (isinstance(value, numbers.Real) and not isinstance(value, bool)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return (
        int(value) if action.type in (int, _positive_int) else float(value) if action.type is float else value
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            # --max-decoded-pixels is checked before PIL's own, looser bomb check, whose warning is noise here
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return encode(args)
    except Fatal as e:
        message = " ".join(str(e).split())  # one line, whatever a library's message held
        print(f"packvit encode: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("packvit encode: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception:  # a defect of ours or a library's: never exit 1, which means "some images unreadable"
        traceback.print_exc()
        print(f"packvit encode: error: unexpected failure, traceback above; {KEPT}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # Run as `python -m packvit_native.cli`, this file is a second module beside packvit_native.cli, which the
    # shard code imports: run that one, so that its errors are the ones caught here.
    from packvit_native.cli import main as package_main

    sys.exit(package_main())
