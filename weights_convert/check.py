"""``packvit-check``: convert a checkpoint, encode a packed batch of mixed sizes, and compare with transformers.

With no argument it runs on an embedded default: a small model of ``--family`` (DINOv3 unless told) and
``--variant``, built deterministically from a transformers config (no network, no GPU). Given a hub id or a
transformers directory it checks that checkpoint instead (a two-tower checkpoint against its vision tower).
Every image of the packed batch is compared with transformers run on that image alone, in fp32 on the CPU; a
fixed-size AIMv2 (learned table, no interpolation in transformers) is checked on images of its trained size.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import packvit_native as pv

from .convert import FAMILIES, convert_checkpoint, describe_dropped, family_for, family_named
from .errors import ConversionError
from .families import aimv2
from .sources import read_checkpoint

__all__ = ["compare_with_reference", "load_reference", "mixed_batch", "parity_images", "save_tiny_reference"]


def save_tiny_reference(family: str, variant: str, out_dir: Path, seed: int = 0) -> Path:
    """Build a small transformers model of ``family`` with seeded random weights and save_pretrained it.

    transformers initialises biases to zero and norm weights to one; those are perturbed too, so that a bias
    or norm weight mapped to the wrong place cannot go unnoticed. Learned query tokens (``[1, 1, D]``) get unit
    scale, so that pooling heads attend sharply enough for a wrong attention to show.
    """
    import transformers

    fam = family_named(family)
    hf_cfg = fam.tiny_hf_config(variant)
    config_cls = transformers.AutoConfig.for_model(hf_cfg["model_type"]).__class__
    cfg = config_cls(**{k: v for k, v in hf_cfg.items() if k != "model_type"})
    torch.manual_seed(seed)
    model = transformers.AutoModel.from_config(cfg)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param), alpha=0.1)
            elif param.ndim == 3 and param.shape[:2] == (1, 1):
                param.add_(torch.randn_like(param))
    model.save_pretrained(out_dir)
    return out_dir


def mixed_batch(patch_size: int, channels: int = 3, seed: int = 0) -> list[Tensor]:
    """Images that exercise packing: square, non-square both ways, a 1x1 grid, a 2-frame clip, a large one."""
    g = torch.Generator().manual_seed(seed)
    p = patch_size
    shapes = [(1, 8, 8), (1, 5, 11), (1, 1, 1), (2, 6, 4), (1, 13, 3), (1, 12, 16)]
    images = []
    for t, h, w in shapes:
        x = torch.randn(t, channels, h * p, w * p, generator=g)
        images.append(x if t > 1 else x[0])
    return images


def parity_images(config: pv.EncoderConfig, seed: int = 0) -> list[Tensor]:
    """The batch to check a model with: :func:`mixed_batch`, or, for a learned table that accepts only its
    trained size (AIMv2 at fixed resolution, as transformers runs it), images and a clip of that size."""
    if config.positions == "learned" and config.pos_resize == "none":
        g = torch.Generator().manual_seed(seed)
        h, w = (n * config.patch_size for n in config.pos_grid)
        c = config.num_channels
        return [torch.randn(c, h, w, generator=g), torch.randn(2, c, h, w, generator=g),
                torch.randn(c, h, w, generator=g)]  # fmt: skip
    return mixed_batch(config.patch_size, config.num_channels, seed)


def compare_with_reference(
    model: pv.PackedVisionEncoder, hf_model: Any, images: list[Tensor]
) -> list[dict[str, float]]:
    """Max abs difference per image (per frame) of every output, ours packed vs transformers one by one."""
    fam = family_for(hf_model.config.model_type)
    patches, grid_thw = model.patchify(images)
    with torch.no_grad():
        ours = model(patches, grid_thw, return_dict=True, output_hidden_states=True)
        rows, start, seg = [], 0, 0
        for image in images:
            for frame in image if image.ndim == 4 else image[None]:
                ref = fam.reference_forward(hf_model, frame)
                n = ref["last_hidden_state"].shape[0]
                sl = slice(start, start + n)
                row = {
                    "size": f"{frame.shape[1] // model.config.patch_size}x{frame.shape[2] // model.config.patch_size}",
                    "last_hidden_state": _diff(ours.last_hidden_state[sl], ref["last_hidden_state"]),
                    "hidden_states": max(_diff(a[sl], b) for a, b in zip(ours.hidden_states, ref["hidden_states"], strict=True)),
                }  # fmt: skip
                if ref.get("prefix_tokens") is not None:
                    row["prefix_tokens"] = _diff(ours.prefix_tokens[seg], ref["prefix_tokens"])
                if ref.get("pooler_output") is not None:
                    row["pooler_output"] = _diff(ours.pooler_output[seg], ref["pooler_output"])
                rows.append(row)
                start, seg = start + n, seg + 1
    return rows


def _diff(a: Tensor, b: Tensor) -> float:
    if a.shape != b.shape:
        raise AssertionError(f"shape mismatch: ours {tuple(a.shape)} vs reference {tuple(b.shape)}")
    return float((a.float() - b.float()).abs().max())


def load_reference(path: Path) -> Any:
    """transformers' vision model of a checkpoint directory, in fp32 eval mode with SDPA attention."""
    import transformers

    ckpt = read_checkpoint(path)
    if aimv2.is_apple(ckpt.config):
        raise ConversionError(
            "this is Apple's original AIMv2 layout, which transformers cannot load as is, so there is no "
            "reference to compare with; packvit-convert converts it (its mapping is tested against a "
            "transformers checkpoint re-keyed to Apple's names)"
        )
    if "vision_config" in ckpt.config:
        # A two-tower checkpoint: load the whole model and keep its vision tower (transformers' vision-only
        # AIMv2 class would silently load nothing from it).
        full = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa")
        return full.vision_model.eval().float()
    fam = family_for(ckpt.config.get("model_type"))
    return (
        getattr(transformers, fam.HF_CLASS).from_pretrained(path, attn_implementation="sdpa").eval().float()
    )


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
    import transformers

    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if args.src is None:
                src = save_tiny_reference(args.family, variant, Path(tmp) / "reference")
                print(f"built a tiny {args.family} ({variant}) with transformers, seed 0: {src.name}")
            else:
                src = read_checkpoint(args.src).path
            config, state, dropped = convert_checkpoint(src, dtype=torch.float32)
            if dropped:
                print(describe_dropped(dropped))
            out = pv.io.save_native(Path(tmp) / "converted", config, state)
            hf_model = load_reference(src)
        except ConversionError as e:
            print(f"packvit-check: error: {e}", file=sys.stderr)
            return 2
        model = pv.from_pretrained(out, attn_backend="sdpa", dtype=torch.float32)
        images = parity_images(config)
        rows = compare_with_reference(model, hf_model, images)
    print(
        f"converted -> packed forward of {len(images)} images ({len(rows)} frames) vs transformers per image, fp32:"
    )
    keys = [k for k in rows[0] if k != "size"]
    print(f"  {'grid':>6}  " + "  ".join(f"{k:>17}" for k in keys))
    for r in rows:
        print(f"  {r['size']:>6}  " + "  ".join(f"{r[k]:17.2e}" for k in keys))
    worst = max(r[k] for r in rows for k in keys)
    ok = worst <= args.atol
    print(f"max abs difference {worst:.2e} {'<=' if ok else '>'} {args.atol:.0e}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
