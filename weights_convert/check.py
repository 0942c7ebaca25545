"""``packvit-check``: convert a checkpoint, encode a packed batch of mixed sizes, and compare with transformers.

With no argument it runs on an embedded default: a small DINOv3 built deterministically from a transformers
config (no network, no GPU). Given a hub id or a transformers directory it checks that checkpoint instead.
Every image of the packed batch is compared with transformers run on that image alone, in fp32 on the CPU.
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

from .convert import convert_checkpoint, family_for, family_named
from .errors import ConversionError
from .sources import read_checkpoint

__all__ = ["compare_with_reference", "mixed_batch", "save_tiny_reference"]


def save_tiny_reference(family: str, variant: str, out_dir: Path, seed: int = 0) -> Path:
    """Build a small transformers model of ``family`` with seeded random weights and save_pretrained it."""
    import transformers

    fam = family_named(family)
    hf_cfg = fam.tiny_hf_config(variant)
    config_cls = transformers.AutoConfig.for_model(hf_cfg["model_type"]).__class__
    cfg = config_cls(**{k: v for k, v in hf_cfg.items() if k != "model_type"})
    torch.manual_seed(seed)
    model = getattr(transformers, fam.HF_CLASS)(cfg)
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


def _load_reference(path: Path) -> Any:
    import transformers

    ckpt = read_checkpoint(path)
    fam = family_for(ckpt.config.get("model_type"))
    return (
        getattr(transformers, fam.HF_CLASS).from_pretrained(path, attn_implementation="sdpa").eval().float()
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="packvit-check", description=__doc__)
    parser.add_argument(
        "src", nargs="?", help="hub id or transformers directory (default: embedded tiny model)"
    )
    parser.add_argument("--family", default="dinov3", help="family of the embedded default (default: dinov3)")
    parser.add_argument(
        "--variant", default="gelu", help="variant of the embedded default, e.g. gelu or swiglu"
    )
    parser.add_argument("--atol", type=float, default=1e-4, help="largest allowed max abs difference")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if args.src is None:
                src = save_tiny_reference(args.family, args.variant, Path(tmp) / "reference")
                print(f"built a tiny {args.family} ({args.variant}) with transformers, seed 0: {src.name}")
            else:
                src = read_checkpoint(args.src).path
            config, state, _ = convert_checkpoint(src, dtype=torch.float32)
            out = pv.io.save_native(Path(tmp) / "converted", config, state)
        except ConversionError as e:
            print(f"packvit-check: error: {e}", file=sys.stderr)
            return 2
        model = pv.from_pretrained(out, attn_backend="sdpa", dtype=torch.float32)
        hf_model = _load_reference(src)
        images = mixed_batch(config.patch_size, config.num_channels)
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
