"""GPU check: every available attention backend agrees with the per-segment SDPA reference, at real model sizes.

For each model (random weights at the published size, bf16) a packed batch of mixed sizes (non-square, a 1x1
grid, a 2-frame clip, large images) is encoded with every backend; outputs are compared with the "sdpa" run of
the same model. Each forward also runs under CUDA's sync debug mode set to "error", which proves it makes no
host-device synchronisation when grid_thw is on the CPU.

    python scripts/gpu_check.py --models dinov3_vitl16,aimv2_l14,siglip2_so400m16
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench import MODELS, build_pair

from packvit_native.attention import available_backends


def mixed_images(patch: int) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    grids = [(1, 14, 14), (1, 23, 41), (1, 1, 1), (2, 16, 12), (1, 64, 64), (1, 37, 9), (1, 30, 30)]
    out = []
    for t, h, w in grids:
        x = torch.randn(t, 3, h * patch, w * patch, device="cuda", dtype=torch.bfloat16, generator=g)
        out.append(x if t > 1 else x[0])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="dinov3_vitl16")
    args = parser.parse_args()
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "backends": available_backends("cuda")}))  # fmt: skip
    failures = 0
    for key in args.models.split(","):
        hf, model = build_pair(MODELS[key])
        del hf
        images = mixed_images(model.config.patch_size)
        patches, grid = model.patchify(images)
        grid = grid.cpu()
        with torch.inference_mode():
            ref = model(patches, grid, return_dict=True, attn_backend="sdpa")
            for backend in available_backends("cuda"):
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    out = model(patches, grid, return_dict=True, attn_backend=backend)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                scale = ref.last_hidden_state.float().abs().max()
                err = (out.last_hidden_state.float() - ref.last_hidden_state.float()).abs()
                row = {"model": MODELS[key].name, "backend": backend, "patches": patches.shape[0],
                       "max_abs": float(err.max()), "mean_abs": float(err.mean()), "ref_max": float(scale)}  # fmt: skip
                if ref.pooler_output is not None:
                    row["pooler_max_abs"] = float(
                        (out.pooler_output.float() - ref.pooler_output.float()).abs().max()
                    )
                # bf16 tolerance: the two runs differ only in attention kernels' rounding.
                ok = row["mean_abs"] <= 2e-2 * float(ref.last_hidden_state.float().abs().mean()) + 1e-3
                row["ok"] = bool(ok)
                failures += not ok
                print(json.dumps(row), flush=True)
        del model
        torch.cuda.empty_cache()
    print("PASS" if not failures else f"FAIL ({failures})")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
