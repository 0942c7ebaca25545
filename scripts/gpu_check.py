"""GPU check: every available attention backend against the fp32 reference, forward and backward, no host sync.

For each model (a published architecture with random weights, re-drawn so that every block changes the
residual stream noticeably: unit-scale layer scale, fan-in-scaled matrices, perturbed norms and biases) a
packed batch of mixed sizes (non-square, a single merge block, a clip of two temporal patches, large images)
is run three ways:

- transformers' own model, image by image, in fp32 (the reference) and in bf16 (the error transformers itself
  makes in bf16: its *floor*);
- ours in fp32 with the per-segment reference attention ("sdpa"), which must match the reference to fp32
  precision;
- ours in bf16 with every available backend, under CUDA's sync debug mode set to "error" (a host-device
  synchronisation in the forward fails it). A backend passes when the error of each output against the fp32
  reference is at most 1.1x transformers' bf16 error of that output (+1e-4: the same up to rounding noise, not
  strictly smaller), and its parameter gradients (of a fixed random projection of the outputs) are within
  1.5x (+1e-3) of those of our bf16 "sdpa" run against our fp32 run (worst parameter; a gradient below 1 % of
  the median parameter's is measured against that 1 %, see ``worst_grad_error``);
- ours with FP8 block linears (``precision="fp8"``: the bf16 model converted by
  ``packvit_native.fp8.convert_to_fp8``) with every available backend, forward only, under the same sync check.
  It passes when every output token's cosine similarity to the fp32 reference is at least 0.99; its largest
  absolute error is printed beside the same two figures for our bf16 run. A GPU without FP8 matmuls (compute
  capability below 8.9) skips it and says why.

Errors are mean absolute error over mean absolute reference value, per output over all images: patch tokens,
prefix tokens, the pooled output, image_embeds and deepstack features, where the model has them. Token figures
(``*_min_token_cos``, ``*_max_abs_err``) are per output row: patch or prefix token, pooled row, merged block.

    python scripts/gpu_check.py --models dinov3_vitl16,qwen2_5_vl_7b,qwen3_vl_8b
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from packvit_native.attention import available_backends
from packvit_native.fp8 import Fp8Linear, convert_to_fp8, fp8_unavailable_reason
from packvit_native.loading import build_model
from weights_convert.check import transformers_class
from weights_convert.convert import convert_loaded, family_named
from weights_convert.presets import PRESETS

# FP8 passes when no output row's cosine similarity to the fp32 reference is below this.
FP8_MIN_COS = 0.99

# (temporal patches, rows, cols) in patches, rounded up to whole merge blocks.
GRIDS = [(1, 14, 14), (1, 23, 41), (1, 1, 1), (2, 16, 12), (1, 64, 64), (1, 37, 9), (1, 30, 30)]


def mixed_images(config) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    m, p = config.merge_size, config.patch_size
    grids = [(t, -(-h // m) * m, -(-w // m) * m) for t, h, w in GRIDS]
    if config.fixed_size is not None:
        grids = [(1, *config.fixed_size), (2, *config.fixed_size)]
    out = []
    for t, h, w in grids:
        x = torch.randn(t * config.temporal_patch_size, config.num_channels, h * p, w * p, generator=g)
        out.append(x if x.shape[0] > 1 else x[0])
    return out


@torch.no_grad()
def redraw(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights under which every block matters: fan-in-scaled matrices, 1-D parameters near one."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        noise = torch.randn(p.shape, generator=g)
        if p.ndim >= 2:
            p.copy_(noise / math.sqrt(p[0].numel()))
        else:
            p.copy_(1 + 0.1 * noise)


def build_reference(spec) -> torch.nn.Module:
    import transformers

    cfg_cls = transformers.AutoConfig.for_model(spec.hf_config["model_type"]).__class__
    cfg = cfg_cls(**{k: v for k, v in spec.hf_config.items() if k != "model_type"})
    hf = transformers_class(spec.hf_class)._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    redraw(hf)
    return hf.cuda().eval()


def _flat(outputs: dict) -> dict[str, torch.Tensor]:
    """The outputs a check compares, by name, fp32: tokens, prefix tokens, pooled, projected, deepstack."""
    flat = {k: outputs[k] for k in ("last_hidden_state", "prefix_tokens", "pooler_output", "image_embeds")
            if outputs.get(k) is not None and outputs[k].numel()}  # fmt: skip
    if "prefix_tokens" in flat:  # [S, k, D] per frame -> [S * k, D]
        flat["prefix_tokens"] = flat["prefix_tokens"].reshape(-1, flat["prefix_tokens"].shape[-1])
    for j, feature in enumerate(outputs.get("deepstack_features") or ()):
        flat[f"deepstack.{j}"] = feature
    return {k: v.float() for k, v in flat.items()}


@torch.no_grad()
def reference_outputs(fam, hf, images) -> dict[str, torch.Tensor]:
    """transformers' outputs image by image, concatenated in packed order."""
    per_image = [_flat(fam.reference_forward(hf, im.cuda())) for im in images]
    return {k: torch.cat([o[k] for o in per_image]) for k in per_image[0]}


def forward(model, patches, grid, backend, sync_check):
    if sync_check:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        return model(patches, grid, return_dict=True, attn_backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _outputs(out) -> dict[str, torch.Tensor]:
    outputs = {"last_hidden_state": out.last_hidden_state, "prefix_tokens": out.prefix_tokens,
               "pooler_output": out.pooler_output, "image_embeds": out.image_embeds,
               "deepstack_features": out.deepstack_features}  # fmt: skip
    return {k: v.detach() for k, v in _flat(outputs).items()}


def run(model, patches, grid, backend, probe, sync_check):
    model.zero_grad(set_to_none=True)
    out = forward(model, patches, grid, backend, sync_check)
    pooled = out.pooler_output if out.pooler_output is not None else out.last_hidden_state[:1]
    loss = (out.last_hidden_state.float() @ probe).square().mean() + pooled.float().square().mean()
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return _outputs(out), grads


def compare(x, ref):
    return float((x - ref).abs().mean() / ref.abs().mean())


def worst_grad_error(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """The largest per-parameter gradient error, each relative to that parameter's gradient, or to 1 % of the
    median parameter's if smaller: a near-zero gradient (a pooling head's query under a saturated softmax)
    has a relative error that is only rounding noise, and two noise figures cannot be compared."""
    scale = 0.01 * statistics.median(float(g.abs().mean()) for g in ref.values())
    return max(float((grads[n] - ref[n]).abs().mean()) / max(float(ref[n].abs().mean()), scale) for n in ref)


def token_errors(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """Per output: the lowest cosine similarity of a row to its reference row, and the largest abs error."""
    cos = {k: float(torch.nn.functional.cosine_similarity(out[k], ref[k], dim=-1).min()) for k in ref}
    return cos, {k: float((out[k] - ref[k]).abs().max()) for k in ref}


def rounded(d: dict[str, float], digits: int = 5) -> dict[str, float]:
    return {k: round(v, digits) for k, v in d.items()}


def check(key: str) -> int:
    spec = PRESETS[key]
    hf32 = build_reference(spec)
    config, state, _ = convert_loaded(hf32.config.to_dict(), None, hf32.state_dict())
    model32 = build_model(config, state, device="cuda", dtype=torch.float32)
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    fam = family_named(config.family)
    images = mixed_images(config)
    ref = reference_outputs(fam, hf32, images)
    hf16 = reference_outputs(fam, copy.deepcopy(hf32).to(torch.bfloat16), [im.bfloat16() for im in images])
    hf_floor = {k: compare(hf16[k], ref[k]) for k in ref}
    del hf32
    torch.cuda.empty_cache()
    patches, grid = model32.patchify(images)
    patches = patches.cuda()
    probe = torch.randn(config.hidden_size, 16, device="cuda")
    ours32, grads32 = run(model32, patches, grid, "sdpa", probe, sync_check=False)
    assert ours32.keys() == ref.keys(), (sorted(ours32), sorted(ref))
    fp32_err = max(compare(ours32[k], ref[k]) for k in ref)
    _, sdpa16_grads = run(model16, patches.bfloat16(), grid, "sdpa", probe, sync_check=True)
    grad_floor = worst_grad_error(sdpa16_grads, grads32)
    failures = fp32_err > 1e-4
    fp8_missing = fp8_unavailable_reason("cuda")
    if fp8_missing is None:
        model16.zero_grad(set_to_none=True)
        model8 = convert_to_fp8(copy.deepcopy(model16))
        fp8_linears = sum(isinstance(m, Fp8Linear) for m in model8.modules())
        kept = sum(isinstance(m, torch.nn.Linear) for b in model8.blocks for m in b.modules())
    for backend in available_backends("cuda"):
        out, grads = run(model16, patches.bfloat16(), grid, backend, probe, sync_check=True)
        err_out = {k: compare(out[k], ref[k]) for k in ref}
        err_grad = worst_grad_error(grads, grads32)
        ok = all(err_out[k] <= 1.1 * hf_floor[k] + 1e-4 for k in ref)
        ok = ok and err_grad <= 1.5 * grad_floor + 1e-3 and fp32_err <= 1e-4
        bf16_cos, bf16_max = token_errors(out, ref)
        fp8 = {"fp8": f"skipped: {fp8_missing}"}
        if fp8_missing is None:
            with torch.inference_mode():
                out8 = _outputs(forward(model8, patches.bfloat16(), grid, backend, sync_check=True))
            fp8_cos, fp8_max = token_errors(out8, ref)
            fp8_ok = min(fp8_cos.values()) >= FP8_MIN_COS
            ok = ok and fp8_ok
            fp8 = {"fp8_min_token_cos": rounded(fp8_cos), "fp8_max_abs_err": rounded(fp8_max),
                   "fp8_rel_err": rounded({k: compare(out8[k], ref[k]) for k in ref}),
                   "fp8_linears": fp8_linears, "block_linears_kept_bf16": kept, "fp8_ok": fp8_ok}  # fmt: skip
        failures += not ok
        print(json.dumps({"model": spec.title, "backend": backend, "patches": patches.shape[0],
                          "fp32_rel_err": round(fp32_err, 7),
                          "bf16_rel_err": rounded(err_out),
                          "transformers_bf16_rel_err": rounded(hf_floor),
                          "worst_grad_rel_err": round(err_grad, 5), "bf16_sdpa_grad_rel_err": round(grad_floor, 5),
                          "bf16_min_token_cos": rounded(bf16_cos), "bf16_max_abs_err": rounded(bf16_max),
                          **fp8, "no_host_sync": True, "ok": ok}), flush=True)  # fmt: skip
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="dinov3_vitl16", help=f"comma list of {sorted(PRESETS)}")
    args = parser.parse_args()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    print(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "transformers": transformers.__version__, "backends": available_backends("cuda")}))  # fmt: skip
    failures = 0
    for key in args.models.split(","):
        failures += check(key)
        torch.cuda.empty_cache()
    print("PASS" if not failures else f"FAIL ({failures})")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
