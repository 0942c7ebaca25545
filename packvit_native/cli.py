"""``packvit``: command-line tools around packed encoders.

``packvit encode --model SRC --out DIR INPUT...`` encodes image files (or every image under folders) into
safetensors feature files, in batches filled up to a token budget. It is resumable: outputs are written
atomically (a temporary file renamed into place), a rerun skips every image already written, and an unreadable
image is reported by name while the others are still encoded.

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
records the settings; a rerun with different ones is refused rather than mixing features.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from .loading import DTYPES

__all__ = ["IMAGE_SUFFIXES", "find_images", "main"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MANIFEST = "packvit-encode.json"


@dataclass(frozen=True)
class Item:
    """One input image: where it is read from and the name its features are stored under."""

    path: Path
    name: str


def find_images(inputs: Iterable[str | os.PathLike]) -> list[Item]:
    """Expand files and folders into named images; ``ValueError`` for a missing input or clashing names."""
    items: list[Item] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            items += [Item(f, f.relative_to(path).with_suffix("").as_posix()) for f in found]
        elif path.is_file():
            items.append(Item(path, path.stem))
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


def _write_atomic(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file so that ``path`` is either absent or complete, never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _parse_layers(text: str) -> list[int]:
    try:
        layers = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated integers, got {text!r}") from None
    return layers


def _prefetch(items: list[Item], load: Callable[[Item], Any], workers: int) -> Iterator[tuple[Item, Future]]:
    """Yield ``(item, future of load(item))`` in order, keeping at most ``2 * workers`` loads in flight."""
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        queue: deque[tuple[Item, Future]] = deque()
        ahead = iter(items)
        for item in ahead:
            queue.append((item, pool.submit(load, item)))
            if len(queue) >= 2 * max(workers, 1):
                break
        while queue:
            item, future = queue.popleft()
            nxt = next(ahead, None)
            if nxt is not None:
                queue.append((nxt, pool.submit(load, nxt)))
            yield item, future


class _Writer:
    """Where features go, and which images a previous run already wrote."""

    def __init__(self, out: Path, packed: bool) -> None:
        self.out, self.packed = out, packed
        self.manifest_written = (out / MANIFEST).is_file()
        self.next_part = 0
        self.done: set[str] = set()
        if packed:
            for part in sorted(out.glob("part-*.safetensors")):
                number = part.stem.removeprefix("part-")
                if not number.isdigit():
                    continue
                with safe_open(part, "pt") as f:
                    self.done.update(json.loads((f.metadata() or {}).get("names", "[]")))
                self.next_part = max(self.next_part, int(number) + 1)

    def written(self, item: Item) -> bool:
        if self.packed:
            return item.name in self.done
        return (self.out / f"{item.name}.safetensors").is_file()

    def write(
        self, items: list[Item], grids: Tensor, outputs: dict[str, tuple[Tensor, Tensor | None]]
    ) -> None:
        """``outputs``: tensor name -> (``[N, D]`` patch tokens, ``[B, k, D]`` prefix tokens or ``None``)."""
        if self.packed:
            tensors = {"grid_thw": grids.clone()}
            for key, (patches, prefix) in outputs.items():
                tensors[key] = patches.clone()
                if prefix is not None:
                    tensors[key.replace("features", "prefix", 1)] = prefix.clone()
            meta = {
                "names": json.dumps([i.name for i in items]),
                "sources": json.dumps([str(i.path) for i in items]),
            }
            _write_atomic(self.out / f"part-{self.next_part:05d}.safetensors", tensors, meta)
            self.next_part += 1
            return
        counts = grids.prod(1).tolist()
        start = 0
        for b, (item, n) in enumerate(zip(items, counts, strict=True)):
            tensors = {"grid_thw": grids[b : b + 1].clone()}
            for key, (patches, prefix) in outputs.items():
                # clone: safetensors refuses tensors that share storage, as slices of one batch do
                tensors[key] = patches[start : start + n].clone()
                if prefix is not None:
                    tensors[key.replace("features", "prefix", 1)] = prefix[b].clone()
            _write_atomic(self.out / f"{item.name}.safetensors", tensors, {"source": str(item.path)})
            start += n


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """What decides the features' values and layout; a resumed run must match it."""
    model = Path(args.model)
    return {
        "model": str(model.resolve()) if model.is_dir() else args.model,
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


def _check_manifest(out: Path, settings: dict[str, Any]) -> None:
    """Refuse to resume into ``out`` if its features were made with other settings."""
    path = out / MANIFEST
    if not path.is_file():
        return
    previous = json.loads(path.read_text())
    if previous != settings:
        diff = sorted(k for k in settings.keys() | previous.keys() if settings.get(k) != previous.get(k))
        raise ValueError(
            f"{out} holds features made with other settings (differing: {', '.join(diff)}); "
            f"use another --out or the same settings"
        )


def _write_manifest(out: Path, settings: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.", suffix=".tmp", dir=out)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(settings, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)


class _BatchFailed(Exception):
    """A batch could not be encoded; what was written before it stays valid and a rerun resumes."""


def encode(args: argparse.Namespace) -> int:
    import packvit_native as pv

    from .attention import resolve_backend
    from .preprocess import target_size

    def say(msg: str) -> None:
        tqdm.write(msg, file=sys.stderr)  # printed above the progress bar, not through it

    out = Path(args.out)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    args.dtype = dtype_name
    try:
        items = find_images(args.inputs)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} exists and is not a folder")
        settings = _settings(args)
        _check_manifest(out, settings)
        writer = _Writer(out, packed=args.format == "packed")
        todo = [i for i in items if not writer.written(i)]
        skipped = len(items) - len(todo)
        if skipped:
            say(f"packvit encode: {skipped} of {len(items)} images are already in {out}; skipping them")
        if not todo:
            say("packvit encode: nothing left to encode")
            return 0
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device} asked for, but no CUDA GPU is available")
        resolve_backend(args.attn_backend, device)
        model = pv.from_pretrained(
            args.model, device=device, dtype=DTYPES[dtype_name], merge_size=args.merge_size,
            attn_backend=args.attn_backend,
        )  # fmt: skip
        rule = {"max_patches": args.max_patches, "min_pixels": args.min_pixels, "max_pixels": args.max_pixels}
        rule["size"] = tuple(args.size) if args.size else None
        # Everything that can be checked before the first image is checked here, once.
        target_size(64, 64, model.config, **rule)
        if args.layers:
            model._layer_indices(tuple(args.layers))
        fixed = model.config.fixed_size is not None
        if fixed and any(rule[k] is not None for k in ("max_patches", "min_pixels", "max_pixels")):
            raise ValueError(
                f"{args.model} runs only at its trained size of {model.config.pos_grid} patches; drop "
                f"--max-patches/--min-pixels/--max-pixels (its trained size is the default)"
            )
    except ValueError as e:  # CheckpointError included
        print(f"packvit encode: error: {e}", file=sys.stderr)
        return 2

    config = model.config
    names = (
        ["features"] if not args.layers or len(args.layers) == 1 else [f"features.{i}" for i in args.layers]
    )
    layers = None if not args.layers else tuple(args.layers)

    def load(item: Item) -> tuple[Tensor, Tensor]:
        return pv.preprocess(item.path, model, resample=args.resample, **rule)

    def flush(batch: list[tuple[Item, Tensor, Tensor]]) -> int:
        grids = torch.cat([g for _, _, g in batch])
        packing = model.pack(grids)
        patches = torch.cat([p for _, p, _ in batch]).to(device, non_blocking=True)
        with torch.inference_mode():
            result = model(patches, packing=packing, output_layers=layers, return_prefix=args.prefix)
        result = result if isinstance(result, tuple) else (result,)
        outputs = {}
        for key, tokens in zip(names, result, strict=True):
            if args.prefix:
                outputs[key] = (packing.patch_tokens(tokens).cpu(), packing.prefix_tokens(tokens).cpu())
            else:
                outputs[key] = (tokens.cpu(), None)
        if not writer.manifest_written:
            # Recorded with the first features, so a run that fails before writing any leaves no manifest
            # behind and can be rerun with other settings.
            _write_manifest(out, settings)
            writer.manifest_written = True
        writer.write([i for i, _, _ in batch], grids, outputs)
        return packing.frames.total

    def guarded_flush(batch: list[tuple[Item, Tensor, Tensor]]) -> int:
        try:
            return flush(batch)
        except (ValueError, RuntimeError) as e:  # e.g. a size the model refuses, or out of memory
            bar.close()
            raise _BatchFailed(f"encoding {len(batch)} images from {batch[0][0].path} failed: {e}") from e

    failed: list[Item] = []
    encoded = tokens = 0
    started = time.perf_counter()
    bar = tqdm(total=len(todo), unit="img", desc="encode", disable=None)  # shown on a terminal only
    batch: list[tuple[Item, Tensor, Tensor]] = []
    batch_tokens = 0
    for item, future in _prefetch(todo, load, args.workers):
        try:
            patches, grid = future.result()
        except ValueError as e:
            failed.append(item)
            reason = str(e) if str(item.path) in str(e) else f"{item.path}: {e}"
            say(f"packvit encode: skipped, {reason}")
            bar.update(1)
            continue
        n = patches.shape[0] + config.num_prefix
        if batch and batch_tokens + n > args.max_tokens:
            tokens += guarded_flush(batch)
            encoded += len(batch)
            bar.update(len(batch))
            batch, batch_tokens = [], 0
        batch.append((item, patches, grid))
        batch_tokens += n
    if batch:
        tokens += guarded_flush(batch)
        encoded += len(batch)
        bar.update(len(batch))
    bar.close()
    seconds = time.perf_counter() - started
    say(
        f"packvit encode: encoded {encoded} images ({tokens} tokens) in {seconds:.1f}s into {out}"
        + (f"; {skipped} already there" if skipped else "")
    )
    if failed:
        say(f"packvit encode: {len(failed)} unreadable: " + ", ".join(str(i.path) for i in failed))
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="packvit", description="Packed, padding-free vision encoders.")
    sub = parser.add_subparsers(dest="command", required=True)
    enc = sub.add_parser(
        "encode",
        help="encode image files into safetensors features",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    enc.add_argument("--format", choices=("per-image", "packed"), default="per-image")
    enc.add_argument("--prefix", action="store_true", help="also store the prefix tokens (class, registers)")
    enc.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    enc.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on cuda, else float32"
    )
    enc.add_argument("--attn-backend", default="auto", help="attention backend (default: auto)")
    enc.add_argument(
        "--max-tokens", type=int, default=16384, help="token budget of one batch (default 16384)"
    )
    enc.add_argument("--max-patches", type=int, default=None, help="NaFlex resize: fill this many patches")
    enc.add_argument("--min-pixels", type=int, default=None, help="smart resize: smallest pixel area")
    enc.add_argument("--max-pixels", type=int, default=None, help="smart resize: largest pixel area")
    enc.add_argument(
        "--size", type=int, nargs=2, default=None, metavar=("H", "W"), help="fixed resize in pixels"
    )
    enc.add_argument("--resample", choices=("bilinear", "bicubic"), default=None)
    enc.add_argument("--merge-size", type=int, default=None, help="store tokens in m x m merge order")
    enc.add_argument("--workers", type=int, default=4, help="threads decoding images ahead (default 4)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "encode":
        if args.max_tokens < 1:
            print("packvit encode: error: --max-tokens must be positive", file=sys.stderr)
            return 2
        try:
            return encode(args)
        except _BatchFailed as e:
            print(
                f"packvit encode: error: {e}; features written before it are kept, rerun to resume",
                file=sys.stderr,
            )
            return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
