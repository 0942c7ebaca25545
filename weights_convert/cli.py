"""``packvit-convert SRC OUT_DIR``: convert a transformers checkpoint (hub id or local dir) to packvit-native."""

from __future__ import annotations

import argparse
import sys

from packvit_native.errors import CheckpointError
from packvit_native.io import save_native
from packvit_native.loading import DTYPES

from .convert import convert_checkpoint, describe_dropped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="packvit-convert", description=__doc__)
    parser.add_argument(
        "src", help="hub id (e.g. facebook/dinov3-vitl16-pretrain-lvd1689m) or local directory"
    )
    parser.add_argument("out_dir", help="directory to write config.json and model.safetensors into")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="cast weights (default: keep the source dtype)"
    )
    args = parser.parse_args(argv)
    try:
        config, state, dropped = convert_checkpoint(args.src, dtype=DTYPES.get(args.dtype))
        out = save_native(args.out_dir, config, state, force=args.force)
    except (CheckpointError, FileExistsError) as e:
        print(f"packvit-convert: error: {e}", file=sys.stderr)
        return 2
    n = sum(t.numel() for t in state.values())
    print(
        f"converted {config.family} ({config.num_layers} layers, width {config.hidden_size}, {n / 1e6:.1f}M params)"
    )
    if dropped:
        print(describe_dropped(dropped))
    print(f"wrote {out}/config.json and {out}/model.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
