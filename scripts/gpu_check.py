"""GPU check: every available attention backend agrees with the per-segment reference, forward and backward.

For each model (the published architecture, our own random initialisation: unit-scale layer scale and
fan-in-scaled linears, so every block changes the residual stream noticeably) a packed batch of mixed sizes
(non-square, a 1x1 grid, a 2-frame clip, large images) is encoded in fp32 with the per-segment reference ("sdpa"),
and in bf16 with every backend. "Within bf16 tolerance" is measured, not assumed: a backend passes when its
error against the fp32 reference is at most 1.5x (+ a small floor) the error of the bf16 run of the reference itself. The
same holds for the parameter gradients of a fixed random projection of the outputs. Each bf16 forward also runs
under CUDA's sync debug mode set to "error", so a host-device synchronisation in the forward would fail it.

    python scripts/gpu_check.py --models dinov3_vitl16,aimv2_l14,siglip2_so400m16
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from packvit_native import PackedVisionEncoder
from packvit_native.attention import available_backends
from weights_convert.presets import PRESETS as MODELS


def mixed_images(patch: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    grids = [(1, 14, 14), (1, 23, 41), (1, 1, 1), (2, 16, 12), (1, 64, 64), (1, 37, 9), (1, 30, 30)]
    out = []
    for t, h, w in grids:
        x = torch.randn(t, 3, h * patch, w * patch, generator=g)
        out.append(x if t > 1 else x[0])
    return out


def run(model, patches, grid, backend, probe, sync_check):
    model.zero_grad(set_to_none=True)
    if sync_check:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        out = model(patches, grid, return_dict=True, attn_backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    pooled = out.pooler_output if out.pooler_output is not None else out.last_hidden_state[:1]
    loss = (out.last_hidden_state.float() @ probe).square().mean() + pooled.float().square().mean()
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.last_hidden_state.float().detach(), grads


def compare(x, ref):
    return float((x - ref).abs().mean() / ref.abs().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="dinov3_vitl16")
    args = parser.parse_args()
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "backends": available_backends("cuda")}))  # fmt: skip
    failures = 0
    for key in args.models.split(","):
        spec = MODELS[key]
        config = spec.config()
        torch.manual_seed(0)
        model32 = PackedVisionEncoder(config, device="cuda").float()
        model16 = copy.deepcopy(model32).to(torch.bfloat16)
        images = mixed_images(config.patch_size)
        patches, grid = model32.patchify(images)
        patches = patches.cuda()
        probe = torch.randn(config.hidden_size, 16, device="cuda")
        ref, ref_grads = run(model32, patches, grid, "sdpa", probe, sync_check=False)
        base, base_grads = run(model16, patches.bfloat16(), grid, "sdpa", probe, sync_check=True)
        floor_out = compare(base, ref)
        floor_grad = max(compare(base_grads[n], ref_grads[n]) for n in ref_grads)
        for backend in available_backends("cuda"):
            out, grads = run(model16, patches.bfloat16(), grid, backend, probe, sync_check=True)
            err_out = compare(out, ref)
            err_grad = max(compare(grads[n], ref_grads[n]) for n in ref_grads)
            ok = err_out <= 1.5 * floor_out + 1e-3 and err_grad <= 1.5 * floor_grad + 1e-3
            failures += not ok
            print(json.dumps({"model": spec.title, "backend": backend, "patches": patches.shape[0],
                              "out_rel_err": round(err_out, 5), "bf16_sdpa_out_rel_err": round(floor_out, 5),
                              "worst_grad_rel_err": round(err_grad, 5), "bf16_sdpa_grad_rel_err": round(floor_grad, 5),
                              "no_host_sync": True, "ok": ok}), flush=True)  # fmt: skip
        del model32, model16
        torch.cuda.empty_cache()
    print("PASS" if not failures else f"FAIL ({failures})")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
