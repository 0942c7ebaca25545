"""``packvit-check``: convert a checkpoint, encode a packed batch of mixed sizes, and compare with transformers.

With no argument it runs on an embedded default: a small model of ``--family`` (DINOv3 unless told) and
``--variant``, built deterministically from a transformers config (no network, no GPU). Given a hub id or a
transformers directory it checks that checkpoint instead (a two-tower or vision-language checkpoint against
its vision tower). Every image of the packed batch is compared with transformers run on that image alone, in
fp32 on the CPU; a fixed-size model (learned table, no interpolation in transformers) is checked on images of
its trained size.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import Tensor

import packvit_native as pv
from packvit_native.errors import CheckpointError
from packvit_native.io import save_native

from .convert import FAMILIES, convert_checkpoint, describe_dropped, family_named
from .families.common import no_token_id_warnings
from .sources import read_checkpoint

__all__ = ["compare_with_reference", "load_reference", "mixed_batch", "parity_images", "save_tiny_reference"]

EXIT_MISMATCH = 1  # the comparison ran and a difference exceeds --atol
EXIT_ERROR = 2  # bad arguments, transformers missing, or a checkpoint that cannot be read or converted
EXIT_INTERRUPTED = 130  # Ctrl-C

# (frames, rows, cols) in units of merge blocks: square, non-square both ways, a single block, a 2-frame clip,
# a large one. Frames count temporal patches.
MIXED_GRIDS = ((1, 8, 8), (1, 5, 11), (1, 1, 1), (2, 6, 4), (1, 13, 3), (1, 12, 16))


def save_tiny_reference(family: str, variant: str, out_dir: Path, seed: int = 0) -> Path:
    """Build a small transformers model of ``family`` with seeded random weights and save_pretrained it.

    transformers initialises biases to zero and norm weights to one; those are perturbed too, so that a bias
    or norm weight mapped to the wrong place cannot go unnoticed. Tensors stored ``[1, n, D]`` (learned query,
    class and register tokens, some position tables) get unit scale, so that pooling heads attend sharply
    enough for a wrong attention to show, and registers or positions swapped or resized wrongly stand out.
    """
    import transformers

    fam = family_named(family)
    hf_cfg = fam.tiny_hf_config(variant)
    # The class by name: AutoConfig.for_model would build a throwaway default config first, and SigLIP's
    # default text config fails transformers' own token-id check (a warning about a config we never use).
    config_cls = transformers.CONFIG_MAPPING[hf_cfg["model_type"]]
    with no_token_id_warnings():  # transformers' own default text config, see there
        cfg = config_cls(**{k: v for k, v in hf_cfg.items() if k not in ("model_type", "architectures")})
    torch.manual_seed(seed)
    architectures = hf_cfg.get("architectures")
    model = (
        transformers_class(architectures[0])._from_config(cfg)
        if architectures
        else (transformers.AutoModel.from_config(cfg))
    )
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param), alpha=0.1)
            elif param.ndim == 3 and param.shape[0] == 1:  # tokens and tables stored [1, n, D]
                param.add_(torch.randn_like(param))
    model.save_pretrained(out_dir)
    return out_dir


def transformers_class(name: str) -> Any:
    """A transformers class by its exported name, or by ``module.ClassName`` under ``transformers.models``."""
    import importlib

    import transformers

    if "." not in name:
        return getattr(transformers, name)
    module, cls = name.rsplit(".", 1)
    return getattr(importlib.import_module(f"transformers.models.{module}"), cls)


def mixed_batch(config: pv.EncoderConfig, seed: int = 0) -> list[Tensor]:
    """Images that exercise packing (see :data:`MIXED_GRIDS`), sized for ``config``'s patch, merge block and
    temporal patch: a 1x1 grid of merge blocks, non-square sides, a clip of two temporal patches."""
    g = torch.Generator().manual_seed(seed)
    side = config.patch_size * config.merge_size
    images = []
    for t, h, w in MIXED_GRIDS:
        x = torch.randn(t * config.temporal_patch_size, config.num_channels, h * side, w * side, generator=g)
        images.append(x if t > 1 else x[0])
    return images


def parity_images(config: pv.EncoderConfig, seed: int = 0) -> list[Tensor]:
    """The batch to check a model with: :func:`mixed_batch`, or, for a learned table that accepts only its
    trained size (AIMv2 at fixed resolution, as transformers runs it), images and a clip of that size."""
    if config.fixed_size is not None:
        g = torch.Generator().manual_seed(seed)
        h, w = (n * config.patch_size for n in config.fixed_size)
        c = config.num_channels
        return [torch.randn(c, h, w, generator=g), torch.randn(2, c, h, w, generator=g),
                torch.randn(c, h, w, generator=g)]  # fmt: skip
    return mixed_batch(config, seed)


def _diff(a: Tensor, b: Tensor) -> float:
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch: ours {tuple(a.shape)} vs reference {tuple(b.shape)}")
    return float((a.float() - b.float()).abs().max())


def compare_with_reference(
    model: pv.PackedVisionEncoder, hf_model: Any, images: list[Tensor]
) -> list[dict[str, Any]]:
    """Max abs difference per image of every output, ours packed vs transformers one image at a time."""
    fam = family_named(model.config.family)
    config = model.config
    patches, grid = model.patchify(images)
    merged_rows = config.head == "merger"
    with torch.no_grad():
        ours = model(patches, grid, return_dict=True, output_hidden_states=True)
        rows = []
        start = seg = merged = 0
        for image, (t, h, w) in zip(images, grid.tolist(), strict=True):
            ref = fam.reference_forward(hf_model, image)
            n = t * h * w
            m = n // config.merge_size**2
            tokens = slice(start, start + n)
            row: dict[str, Any] = {
                "grid": f"{t}x{h}x{w}",
                "last_hidden_state": _diff(ours.last_hidden_state[tokens], ref["last_hidden_state"]),
                "hidden_states": max(
                    _diff(a[tokens], b) for a, b in zip(ours.hidden_states, ref["hidden_states"], strict=True)
                ),
            }
            if ref.get("prefix_tokens") is not None:
                row["prefix_tokens"] = _diff(ours.prefix_tokens[seg : seg + t], ref["prefix_tokens"])
            pooled = slice(merged, merged + m) if merged_rows else slice(seg, seg + t)
            if ref.get("pooler_output") is not None:
                row["pooler_output"] = _diff(ours.pooler_output[pooled], ref["pooler_output"])
            if ref.get("image_embeds") is not None:
                row["image_embeds"] = _diff(ours.image_embeds[seg : seg + t], ref["image_embeds"])
            if ref.get("deepstack_features"):
                row["deepstack_features"] = max(
                    _diff(a[merged : merged + m], b)
                    for a, b in zip(ours.deepstack_features, ref["deepstack_features"], strict=True)
                )
            rows.append(row)
            start, seg, merged = start + n, seg + t, merged + m
    return rows


def load_reference(path: str | Path) -> Any:
    """transformers' vision model of a checkpoint (directory or hub id), fp32, eval mode, SDPA attention."""
    from .convert import family_for

    ckpt = read_checkpoint(path)
    return family_for(ckpt.config.get("model_type")).load_reference(ckpt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="packvit-check", description=__doc__)
    parser.add_argument(
        "src", nargs="?", help="hub id or transformers directory (default: embedded tiny model)"
    )
    families = {fam.NAME: fam for fam in FAMILIES}
    parser.add_argument(
        "--family", default="dinov3", choices=sorted(families), help="family of the embedded default"
    )
    parser.add_argument(
        "--variant",
        help="variant of the embedded default (default: the family's first): "
        + "; ".join(f"{name}: {', '.join(fam.VARIANTS)}" for name, fam in families.items()),
    )
    parser.add_argument("--atol", type=float, default=1e-4, help="largest allowed max abs difference")
    args = parser.parse_args(argv)
    variant = args.variant or families[args.family].VARIANTS[0]
    if variant not in families[args.family].VARIANTS:
        parser.error(
            f"{args.family} has no variant {variant!r}; choose from {families[args.family].VARIANTS}"
        )
    try:
        import transformers
    except ImportError:
        print(
            "packvit-check: error: the comparison needs transformers; install it with "
            "pip install 'packvit-native[test]' (or pip install transformers==5.17.0)",
            file=sys.stderr,
        )
        return EXIT_ERROR
    transformers.utils.logging.disable_progress_bar()
    try:
        return _check(args.src, args.family, variant, args.atol)
    except (
        CheckpointError,
        OSError,
        SafetensorError,
    ) as e:  # OSError: the temporary folder cannot be written
        print(f"packvit-check: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("packvit-check: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _check(src: str | None, family: str, variant: str, atol: float) -> int:
    """Convert ``src`` (or a tiny reference of ``family``/``variant``), compare, print the table; 0 or 1."""
    with tempfile.TemporaryDirectory() as tmp:
        if src is None:
            path = save_tiny_reference(family, variant, Path(tmp) / "reference")
            print(f"built a tiny {family} ({variant}) with transformers, seed 0: {path.name}")
        else:
            path = read_checkpoint(src).path
        config, state, dropped = convert_checkpoint(path, dtype=torch.float32)
        if dropped:
            print(describe_dropped(dropped))
        out = save_native(Path(tmp) / "converted", config, state)
        try:
            hf_model = load_reference(path)
        except OSError as e:  # transformers' loader: weights it cannot read (a foreign .pth, ...)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"{path}: transformers cannot load it as the reference model ({first}); packvit-convert may "
                "still convert it, but this check needs weights transformers reads"
            ) from None
        model = pv.from_pretrained(out, attn_backend="sdpa", dtype=torch.float32)
        images = parity_images(config)
        rows = compare_with_reference(model, hf_model, images)
    frames = sum(int(r["grid"].split("x")[0]) for r in rows)
    print(
        f"converted -> packed forward of {len(images)} images ({frames} frames) vs transformers per image, fp32:"
    )
    keys = [k for k in rows[0] if k != "grid"]
    print(f"  {'t x h x w':>9}  " + "  ".join(f"{k:>18}" for k in keys))
    for r in rows:
        print(f"  {r['grid']:>9}  " + "  ".join(f"{r[k]:18.2e}" for k in keys))
    worst = max(r[k] for r in rows for k in keys)
    ok = worst <= atol
    print(f"max abs difference {worst:.2e} {'<=' if ok else '>'} {atol:.0e}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else EXIT_MISMATCH


if __name__ == "__main__":
    sys.exit(main())
