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

Exit codes: 0 everything encoded; 1 some images were unreadable, the rest were encoded; 2 a fatal error (bad
options, no images, an unusable ``--model`` or ``--out``, a full disk), reported in one line, with everything
written before it kept; 130 interrupted (Ctrl-C), with the same guarantee. Rerunning the same command resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from . import atomic
from .loading import DTYPES
from .preprocess import MAX_DECODED_PIXELS

__all__ = ["IMAGE_SUFFIXES", "find_images", "main"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MANIFEST = "packvit-encode.json"
# Version 1 manifests (no "packvit_encode" field) identified the model by its path only.
MANIFEST_VERSION = 2


class _Fatal(Exception):
    """Encoding cannot go on: reported as one line with exit code 2; what was written before stays valid."""


_KEPT = "the features written before are kept, rerun the same command to resume"


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


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _reason(e: BaseException) -> str:
    """An OS error's own words without the temporary file name it carries; other errors as they read."""
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e)


# ---------------------------------------------------------------------------------------------------- writing


def _save(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str], exclusive: bool = False) -> None:
    """Write one safetensors file all or nothing (see :func:`atomic.write_file`); ``_Fatal`` if it fails."""
    try:
        atomic.write_file(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), exclusive=exclusive)
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as a SafetensorError
        if exclusive and isinstance(e, FileExistsError):
            raise  # the name is taken: the caller claims another
        raise _Fatal(f"cannot write {path}: {_reason(e)}; {_KEPT}") from None


def _feature_keys(layers: list[int] | None) -> list[str]:
    return ["features"] if not layers or len(layers) == 1 else [f"features.{i}" for i in layers]


def _expected_keys(args: argparse.Namespace) -> set[str]:
    """The tensors every output file of these settings holds."""
    features = _feature_keys(args.layers)
    prefix = [k.replace("features", "prefix", 1) for k in features] if args.prefix else []
    return {"grid_thw", *features, *prefix}


def _read_output(path: Path, keys: set[str], packed: bool) -> list[str] | None:
    """Check that ``path`` is a whole output file; return its image names (packed) or ``None`` (per image).

    Reads headers and ``grid_thw`` only, enough to catch what a torn write or a power cut leaves: a file that is
    empty, truncated or garbage, other tensors than expected, or feature rows that ``grid_thw`` does not
    account for. Raises ``ValueError`` saying which.
    """
    try:
        with safe_open(path, "pt") as f:
            found, metadata = set(f.keys()), f.metadata() or {}
            if found != keys:
                raise ValueError(f"holds tensors {sorted(found)}, expected {sorted(keys)}")
            grid = f.get_tensor("grid_thw").clone()  # may map the file, which is closed below
            shapes = {k: f.get_slice(k).get_shape() for k in keys if k.startswith("features")}
    except (OSError, SafetensorError) as e:
        raise ValueError(f"not a readable safetensors file: {_reason(e)}") from None
    images = grid.shape[0] if grid.ndim == 2 and grid.shape[1:] == (3,) else -1
    names = _part_names(metadata) if packed else None
    if images < 1 or images != (len(names) if packed else 1) or bool((grid < 1).any()):
        raise ValueError(f"grid_thw {tuple(grid.shape)} does not describe its images")
    rows = int(grid.prod(1).sum())
    if any(len(shape) != 2 or shape[0] != rows for shape in shapes.values()):
        raise ValueError(f"features of shapes {sorted(map(tuple, shapes.values()))} do not match grid_thw")
    return names


def _part_names(metadata: dict[str, str]) -> list[str]:
    try:
        names = json.loads(metadata["names"])
    except (KeyError, ValueError):
        raise ValueError("its metadata has no readable 'names'") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError("its metadata 'names' is not a list of names")
    return names


class _Writer:
    """Where features go, and which images earlier runs wrote completely."""

    def __init__(self, out: Path, packed: bool, keys: set[str], say: Callable[[str], None]) -> None:
        self.out, self.packed, self.keys, self.say = out, packed, keys, say
        self.next_part = 0
        self.done: set[str] = set()
        if packed:
            self._scan_parts()

    def _scan_parts(self) -> None:
        for part in sorted(self.out.glob("part-*.safetensors")):
            number = part.stem.removeprefix("part-")
            if not number.isdigit():
                continue
            self.next_part = max(self.next_part, int(number) + 1)
            try:
                self.done.update(_read_output(part, self.keys, packed=True))
            except ValueError as e:
                # Moved out of the way (not deleted) so readers of the folder do not trip over it and the
                # damaged bytes stay available for a look; its images are simply not counted as done.
                aside = part.with_name(part.name + ".damaged")
                with contextlib.suppress(FileNotFoundError):  # a concurrent run moved it first
                    os.replace(part, aside)
                self.say(
                    f"packvit encode: {part} is damaged ({e}); moved to {aside.name}, its images are redone"
                )

    def written(self, item: Item) -> bool:
        if self.packed:
            return item.name in self.done
        path = self.out / f"{item.name}.safetensors"
        if not path.is_file():
            return False
        try:
            _read_output(path, self.keys, packed=False)
        except ValueError as e:
            self.say(f"packvit encode: {path} is damaged ({e}); encoding {item.path} again")
            return False
        return True

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
            self._claim_part(tensors, meta)
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
            path = self.out / f"{item.name}.safetensors"
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise _Fatal(f"cannot create folder {path.parent}: {_reason(e)}; {_KEPT}") from None
            # Replacing is safe: another run writing this name writes the same image with the same model.
            _save(path, tensors, {"source": str(item.path)})
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
                _save(path, tensors, meta, exclusive=True)
                return
            except FileExistsError:
                continue


# --------------------------------------------------------------------------------------------- the manifest


def _sha256_state(config: Any, state: dict[str, Tensor]) -> str:
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


def _manifest(args: argparse.Namespace, sha256: str | None) -> dict[str, Any]:
    """What decides the features' values and layout; a resumed run must match it. ``sha256`` identifies the
    model by content; the source is recorded for messages only, so a moved model still resumes."""
    model = Path(args.model)
    return {
        "packvit_encode": MANIFEST_VERSION,
        "model": {"source": str(model.resolve()) if model.is_dir() else args.model, "sha256": sha256},
        "settings": {
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
        },
    }


def _read_manifest(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise _Fatal(f"{path} cannot be read ({_reason(e)}); encode into a new --out") from None
    if not isinstance(data, dict) or "packvit_encode" not in data:
        raise _Fatal(
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
        raise _Fatal(
            f"{path} is not a manifest this version of packvit encode reads; encode into a new --out"
        )
    return data


def _check_manifest(out: Path, previous: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to add to ``out`` what would not match its features (the model only once it is fingerprinted)."""
    before, now = previous["settings"], current["settings"]
    if before != now:
        diff = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        raise _Fatal(
            f"{out} holds features made with other settings (differing: {', '.join(diff)}); "
            f"use another --out or the same settings"
        )
    old, new = previous["model"], current["model"]
    if new["sha256"] is not None and new["sha256"] != old["sha256"]:
        same_path = " (same path, other content)" if old.get("source") == new["source"] else ""
        raise _Fatal(
            f"{out} holds features of model {old.get('source')} (sha256 {old['sha256'][:16]}), not of "
            f"--model {new['source']} (sha256 {new['sha256'][:16]}){same_path}; use another --out"
        )


def _record_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest, or check the one a concurrent or earlier run wrote: it is never overwritten, so two
    runs with different models or settings cannot both go on in one folder."""
    text = json.dumps(manifest, indent=2) + "\n"
    try:
        atomic.write_file(out / MANIFEST, lambda tmp: tmp.write_text(text), exclusive=True)
    except FileExistsError:
        previous = _read_manifest(out)
        if previous is not None:  # else it was deleted meanwhile: nothing to compare with
            _check_manifest(out, previous, manifest)
    except OSError as e:
        raise _Fatal(f"cannot write {out / MANIFEST}: {_reason(e)}; {_KEPT}") from None


# ------------------------------------------------------------------------------------------------- set-up


def _find_inputs(inputs: list[str]) -> list[Item]:
    try:
        items = find_images(inputs)
    except ValueError as e:
        raise _Fatal(str(e)) from None
    if not items:
        raise _Fatal(f"no images found in {', '.join(inputs)} (looked for {' '.join(IMAGE_SUFFIXES)})")
    return items


def _prepare_out(out: Path, say: Callable[[str], None]) -> None:
    """Create ``out`` and prove it writable before any model is loaded; remove temp files of killed runs."""
    if out.exists() and not out.is_dir():
        raise _Fatal(f"--out {out} exists and is not a folder")
    # Named like any temp file, so that a kill right here leaves nothing the next run does not clean up.
    probe = out / atomic.temp_name("probe")
    try:
        out.mkdir(parents=True, exist_ok=True)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        probe.unlink()
    except OSError as e:
        raise _Fatal(f"cannot write into --out {out}: {_reason(e)}") from None
    folders = [Path(root) for root, _, _ in os.walk(out)]
    removed = [p for folder in folders for p in atomic.remove_stale(folder)]
    if removed:
        say(f"packvit encode: removed {_plural(len(removed), 'temporary file')} left by an interrupted run")


def _load_model(args: argparse.Namespace, device: torch.device) -> tuple[Any, str]:
    """Load ``--model`` as :func:`~packvit_native.from_pretrained` does, and fingerprint its config and
    tensors in between (before the cast to ``--dtype``), so the weights are read once."""
    from .hub import locate
    from .io import is_native_dir, load_native
    from .loading import build_model

    path = locate(args.model)
    if is_native_dir(path):
        config, state = load_native(path)
    else:
        from weights_convert.convert import convert_directory

        config, state, _ = convert_directory(path)
    sha256 = _sha256_state(config, state)
    model = build_model(
        config, state, device=device, dtype=DTYPES[args.dtype], merge_size=args.merge_size,
        attn_backend=args.attn_backend,
    )  # fmt: skip
    return model, sha256


def _load_model_or_fail(args: argparse.Namespace, device: torch.device) -> tuple[Any, str]:
    try:
        return _load_model(args, device)
    except ValueError as e:  # CheckpointError and bad options: their messages name the file or the option
        raise _Fatal(str(e)) from None
    except Exception as e:  # a damaged checkpoint can fail anywhere in its readers: one line, not a traceback
        raise _Fatal(f"cannot load --model {args.model}: {type(e).__name__}: {_reason(e)}") from None


def _resize_rule(args: argparse.Namespace, model: Any) -> dict[str, Any]:
    """The resize rule, checked once against the model before the first image."""
    from .preprocess import target_size

    rule = {"max_patches": args.max_patches, "min_pixels": args.min_pixels, "max_pixels": args.max_pixels}
    rule["size"] = tuple(args.size) if args.size else None
    try:
        target_size(64, 64, model.config, **rule)
        if args.layers:
            model._layer_indices(tuple(args.layers))
    except ValueError as e:
        raise _Fatal(str(e)) from None
    fixed = model.config.fixed_size is not None
    if fixed and any(rule[k] is not None for k in ("max_patches", "min_pixels", "max_pixels")):
        raise _Fatal(
            f"{args.model} runs only at its trained size of {model.config.pos_grid} patches; drop "
            f"--max-patches/--min-pixels/--max-pixels (its trained size is the default)"
        )
    return rule


# ----------------------------------------------------------------------------------------------- encoding


def _prefetch(items: list[Item], load: Callable[[Item], Any], workers: int) -> Iterator[tuple[Item, Future]]:
    """Yield ``(item, future of load(item))`` in order, keeping at most ``2 * workers`` loads in flight."""
    pool = ThreadPoolExecutor(workers)
    try:
        queue: deque[tuple[Item, Future]] = deque()
        ahead = iter(items)
        for item in ahead:
            queue.append((item, pool.submit(load, item)))
            if len(queue) >= 2 * workers:
                break
        while queue:
            item, future = queue.popleft()
            nxt = next(ahead, None)
            if nxt is not None:
                queue.append((nxt, pool.submit(load, nxt)))
            yield item, future
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after Ctrl-C, do not decode the queued images first


def _run_model(
    model: Any, batch: list[tuple[Item, Tensor, Tensor]], args: argparse.Namespace, device: torch.device
) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor | None]]]:
    """Encode one batch; ``(grid_thw, {tensor name: (patch tokens, prefix tokens or None)})`` on the CPU."""
    grids = torch.cat([g for _, _, g in batch])
    packing = model.pack(grids)
    patches = torch.cat([p for _, p, _ in batch]).to(device, non_blocking=True)
    layers = tuple(args.layers) if args.layers else None
    with torch.inference_mode():
        result = model(patches, packing=packing, output_layers=layers, return_prefix=args.prefix)
    result = result if isinstance(result, tuple) else (result,)
    outputs = {}
    for key, tokens in zip(_feature_keys(args.layers), result, strict=True):
        if args.prefix:
            outputs[key] = (packing.patch_tokens(tokens).cpu(), packing.prefix_tokens(tokens).cpu())
        else:
            outputs[key] = (tokens.cpu(), None)
    return grids, outputs


def encode(args: argparse.Namespace) -> int:
    """Run ``packvit encode``; returns the exit code, raises ``_Fatal`` or ``KeyboardInterrupt``."""
    import packvit_native as pv

    from .attention import resolve_backend

    def say(msg: str) -> None:
        tqdm.write(msg, file=sys.stderr)  # printed above the progress bar, not through it

    out = Path(args.out)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise _Fatal(f"--device {args.device}: {e}") from None
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    items = _find_inputs(args.inputs)
    _prepare_out(out, say)
    manifest = _manifest(args, sha256=None)
    previous = _read_manifest(out)
    if previous is not None:
        _check_manifest(out, previous, manifest)  # settings now, before a possibly long model load
    writer = _Writer(out, args.format == "packed", _expected_keys(args), say)
    todo = [i for i in items if not writer.written(i)]
    skipped = len(items) - len(todo)
    if skipped:
        say(f"packvit encode: skipping {skipped} of {_plural(len(items), 'image')}, already in {out}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _Fatal(f"--device {device} asked for, but no CUDA GPU is available")
    try:
        resolve_backend(args.attn_backend, device)
    except ValueError as e:
        raise _Fatal(str(e)) from None
    # Loaded even when nothing is left, so that a rerun with another model is refused, not reported as done.
    model, sha256 = _load_model_or_fail(args, device)
    manifest["model"]["sha256"] = sha256
    if previous is not None:
        _check_manifest(out, previous, manifest)
    if not todo:
        say("packvit encode: nothing left to encode")
        return 0
    rule = _resize_rule(args, model)

    def load(item: Item) -> tuple[Tensor, Tensor]:
        return pv.preprocess(
            item.path, model, resample=args.resample, max_decoded_pixels=args.max_decoded_pixels, **rule
        )

    started = time.perf_counter()
    encoded, patch_tokens, failed = _encode_items(todo, load, model, writer, manifest, args, device)
    say(
        f"packvit encode: encoded {_plural(encoded, 'image')} ({_plural(patch_tokens, 'patch token')}) "
        f"in {time.perf_counter() - started:.1f}s into {out}"
        + (f"; {skipped} already there" if skipped else "")
    )
    if failed:
        say(f"packvit encode: {_plural(len(failed), 'image')} unreadable: " + ", ".join(map(str, failed)))
        return 1
    return 0


def _encode_items(
    todo: list[Item],
    load: Callable[[Item], tuple[Tensor, Tensor]],
    model: Any,
    writer: _Writer,
    manifest: dict[str, Any],
    args: argparse.Namespace,
    device: torch.device,
) -> tuple[int, int, list[Path]]:
    """Decode ahead, fill batches up to ``--max-tokens`` (prefix tokens included), encode and write them.

    Returns the number of images encoded, their patch tokens, and the unreadable files.
    """
    failed: list[Path] = []
    encoded = patch_tokens = 0
    num_prefix = model.config.num_prefix

    def flush(batch: list[tuple[Item, Tensor, Tensor]]) -> None:
        nonlocal encoded, patch_tokens
        try:
            grids, outputs = _run_model(model, batch, args, device)
        except (ValueError, RuntimeError) as e:  # e.g. a size the model refuses, or out of memory
            raise _Fatal(
                f"encoding {len(batch)} images from {batch[0][0].path} failed: {e}; {_KEPT}"
            ) from None
        if not encoded:
            # Recorded with the first features, so a run that fails before writing any leaves no manifest
            # behind and can be rerun with other settings.
            _record_manifest(writer.out, manifest)
        writer.write([i for i, _, _ in batch], grids, outputs)
        encoded += len(batch)
        patch_tokens += int(grids.prod(1).sum())
        bar.update(len(batch))

    bar = tqdm(total=len(todo), unit="img", desc="encode", disable=None)  # shown on a terminal only
    with contextlib.closing(_prefetch(todo, load, args.workers)) as loads, bar:
        batch: list[tuple[Item, Tensor, Tensor]] = []
        batch_tokens = 0
        for item, future in loads:
            try:
                patches, grid = future.result()
            except ValueError as e:
                failed.append(item.path)
                reason = str(e) if str(item.path) in str(e) else f"{item.path}: {e}"
                writer.say(f"packvit encode: skipped, {reason}")
                bar.update(1)
                continue
            n = patches.shape[0] + num_prefix * int(grid[:, 0].sum())  # prefix tokens per frame
            if batch and batch_tokens + n > args.max_tokens:
                flush(batch)
                batch, batch_tokens = [], 0
            batch.append((item, patches, grid))
            batch_tokens += n
        if batch:
            flush(batch)
    return encoded, patch_tokens, failed


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
        "--workers", type=_positive_int, default=4, help="threads decoding images ahead (default 4)"
    )
    enc.add_argument(
        "--max-decoded-pixels", type=_positive_int, default=MAX_DECODED_PIXELS, metavar="N",
        help="report an image file declaring more than N pixels (width x height) as unreadable instead of "
        f"decoding it (default {MAX_DECODED_PIXELS} = 8192 x 8192)",
    )  # fmt: skip
    return parser


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
    except _Fatal as e:
        message = " ".join(str(e).split())  # one line, whatever a library's message held
        print(f"packvit encode: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("packvit encode: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
