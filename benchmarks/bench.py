"""Side-by-side benchmark: packvit-native vs transformers, same images, same GPU, one process.

For every model and workload both implementations encode the same images; we report images/s, tokens/s,
achieved TFLOP/s (useful work only: padding is never counted), its fraction of a bf16 GEMM measured in the same
run, peak memory and our/transformers ratios. transformers runs its best way for each case: sdpa attention,
one batch per distinct image size (a single batch for uniform workloads, mostly one image at a time for mixed
sizes), one padded and masked batch for SigLIP2 NaFlex, or the packed batch itself for the Qwen-VL towers,
which take ``grid_thw`` as we do. Qwen-VL workloads use the sizes Qwen's processor gives the same images, and
``video`` (4 clips of 16 frames at 448x448) runs for them only.

Random weights at the real model sizes (the published architectures); no network needed.

    python benchmarks/bench.py --out benchmarks/results          # everything, ~8 minutes on an H100
    python benchmarks/bench.py --models dinov3_vitl16 --workloads mixed --backends torch,fa4
    python benchmarks/bench.py --models qwen2_5_vl_7b,qwen3_vl_8b --workloads mixed,video --backends torch,fa4
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import packvit_native as pv
from packvit_native.attention import available_backends
from packvit_native.loading import build_model
from packvit_native.preprocess import smart_size
from weights_convert.check import transformers_class
from weights_convert.convert import convert_loaded
from weights_convert.presets import PRESETS, Preset

DTYPE = torch.bfloat16


MODELS = PRESETS


def is_naflex(spec: Preset) -> bool:
    """SigLIP2 NaFlex: transformers takes a padded, masked batch of patches."""
    return spec.hf_config["model_type"].startswith("siglip2")


def workload(name: str, config: pv.EncoderConfig) -> list[tuple[int, int, int]]:
    """Entries as (temporal patches, rows, cols). Mixed and small draw from a fixed seed; towers that smart-resize
    (Qwen-VL) get the sizes their processor would give those images."""
    rng = random.Random(0)
    p, m, tp = config.patch_size, config.merge_size, config.temporal_patch_size

    def grid(h: int, w: int, frames: int = 1) -> tuple[int, int, int]:
        if m > 1:  # Qwen's processor: smart resize to whole merge blocks within its pixel budget
            h, w = smart_size(h, w, p * m, config.resize_min_pixels or 0, config.resize_max_pixels or h * w)
        return (max(frames // tp, 1), h // p, w // p)

    if name.startswith("uniform"):
        side = int(name.removeprefix("uniform"))
        return [grid(side, side)] * (32 if side <= 448 else 8)
    if name == "mixed":  # 32 images, each side 224-1024 px
        return [grid(rng.randint(224, 1024), rng.randint(224, 1024)) for _ in range(32)]
    if name == "small":  # 256 thumbnails, each side 64-224 px
        return [grid(rng.randint(64, 224), rng.randint(64, 224)) for _ in range(256)]
    if name == "video":  # 4 clips of 16 frames, 448 x 448
        return [grid(448, 448, frames=16)] * 4
    raise ValueError(f"unknown workload {name}")


def useful_flops(model: pv.PackedVisionEncoder, grids: list[tuple[int, int, int]]) -> float:
    """Forward FLOPs of the real tokens: linears 2*T*params, attention 4*sum(L^2)*D over each block's
    segments (frames or windows), patch embedding and merger heads."""
    c = model.config
    packing = model.pack(grids)
    d, t = c.hidden_size, packing.frames.total
    mlp = (3 if c.mlp == "swiglu" else 2) * d * c.mlp_hidden
    flops = 2 * packing.num_patches * c.patch_dim * d
    for block in model.blocks:
        lengths = packing.segmentation(block.attn.segmentation).lengths
        flops += 2 * t * (4 * d * d + mlp) + 4 * sum(n * n for n in lengths) * d
    group = d * c.merge_size**2
    mergers = (c.head == "merger") + len(c.deepstack_layers)
    flops += (
        mergers * 2 * (packing.num_patches // c.merge_size**2) * group * (group + (c.out_hidden_size or 0))
    )
    return flops


def timed(fn, min_time: float = 1.0, max_iters: int = 30, warmup: int = 2) -> float:
    """Median seconds per call over enough calls to fill ``min_time``."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_iters and (time.perf_counter() - start < min_time or len(times) < 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def gemm_peak() -> float:
    best = 0.0
    for m, k, n in ((16384, 1024, 4096), (8192, 8192, 8192)):
        a, b = torch.randn(m, k, device="cuda", dtype=DTYPE), torch.randn(k, n, device="cuda", dtype=DTYPE)
        best = max(best, 2 * m * k * n / timed(lambda a=a, b=b: a @ b) / 1e12)
    return best


def build_pair(spec: Preset) -> tuple[Any, pv.PackedVisionEncoder]:
    import transformers

    cfg_cls = transformers.AutoConfig.for_model(spec.hf_config["model_type"]).__class__
    cfg = cfg_cls(**{k: v for k, v in spec.hf_config.items() if k != "model_type"})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = transformers_class(spec.hf_class)._from_config(cfg, dtype=DTYPE).eval()
    config, state, _ = convert_loaded(cfg.to_dict(), None, hf.state_dict())
    ours = build_model(config, state, device="cuda", dtype=DTYPE)
    return hf, ours


def images_for(grids: list[tuple[int, int, int]], config: pv.EncoderConfig) -> list[torch.Tensor]:
    """Random images ``[C, H, W]`` (clips ``[F, C, H, W]`` for entries of several temporal patches)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    p, tp, c = config.patch_size, config.temporal_patch_size, config.num_channels
    out = []
    for t, h, w in grids:
        x = torch.randn(t * tp, c, h * p, w * p, device="cuda", dtype=DTYPE, generator=g)
        out.append(x if t * tp > 1 else x[0])
    return out


def takes_packed_input(spec: Preset) -> bool:
    """Qwen-VL towers: transformers takes the packed patches and grid_thw itself."""
    return spec.hf_config["model_type"].startswith("qwen")


def hf_runner(spec: Preset, hf: Any, images: list[torch.Tensor], ours: pv.PackedVisionEncoder):
    patch = ours.config.patch_size
    if takes_packed_input(spec):
        patches, grid = ours.patchify(images)
        grid = grid.cuda()

        def run():
            return hf(patches, grid_thw=grid).last_hidden_state

        return run, None
    if is_naflex(spec):
        patches, grid = pv.patchify(images, patch, layout="hwc")
        counts = (grid[:, 1] * grid[:, 2]).tolist()
        n_max = max(counts)
        padded = patches.new_zeros(len(images), n_max, patches.shape[1])
        mask = torch.zeros(len(images), n_max, dtype=torch.int32, device="cuda")
        for i, chunk in enumerate(patches.split(counts)):
            padded[i, : len(chunk)] = chunk
            mask[i, : len(chunk)] = 1
        shapes = grid[:, 1:].cuda()

        def run():
            return hf(pixel_values=padded, pixel_attention_mask=mask, spatial_shapes=shapes).last_hidden_state

        return run, len(images) * n_max
    groups: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for im in images:
        groups.setdefault(tuple(im.shape), []).append(im)
    batches = [torch.stack(g) for g in groups.values()]

    # CLIP and SigLIP resize their position tables only when asked; DINOv2 and InternViT always do.
    takes_flag = "interpolate_pos_encoding" in inspect.signature(hf.forward).parameters
    kwargs = {"interpolate_pos_encoding": True} if takes_flag else {}

    def run():
        return [hf(pixel_values=b, **kwargs).last_hidden_state for b in batches]

    return run, None


def measure(fn) -> tuple[float, float]:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.inference_mode():
        seconds = timed(fn)
    return seconds, (torch.cuda.max_memory_allocated() - base) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="dinov3_vitl16,aimv2_l14,siglip2_so400m16,dinov3_vit7b16")
    parser.add_argument("--workloads", default="uniform224,uniform448,uniform1024,mixed,small")
    parser.add_argument("--backends", default="auto", help="comma list of our attention backends, or 'auto'")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile'd blocks")
    parser.add_argument("--big-workloads", default="uniform448,mixed", help="workloads for the 7B model")
    parser.add_argument("--out", type=Path, help="directory for results.json and results.md")
    args = parser.parse_args()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    torch.backends.cuda.matmul.allow_tf32 = True
    env = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "command": "python " + " ".join(sys.argv),
        "available_backends": available_backends("cuda"),
    }
    peak = gemm_peak()
    env["gemm_peak_tflops"] = round(peak, 1)
    print(json.dumps(env), flush=True)
    rows = []
    for key in args.models.split(","):
        spec = MODELS[key]
        hf, ours = build_pair(spec)
        cfg = ours.config
        backends = available_backends("cuda")[:1] if args.backends == "auto" else args.backends.split(",")
        backends = [b for b in backends if b in available_backends("cuda")]
        big = key == "dinov3_vit7b16"
        names = args.big_workloads if big else args.workloads
        compiled = None
        if args.compile and not big:
            compiled = copy.deepcopy(ours).compile_blocks()
        for wl in names.split(","):
            if wl == "video" and not takes_packed_input(spec):
                continue  # only the Qwen-VL towers take clips of several temporal patches
            sizes = workload(wl, cfg)
            images = images_for(sizes, cfg)
            flops = useful_flops(ours, sizes)
            n_tokens = sum(t * h * w for t, h, w in sizes)
            hf_fn, padded_tokens = hf_runner(spec, hf, images, ours)
            hf_s, hf_mem = measure(hf_fn)
            base = {"model": spec.title, "workload": wl, "images": len(sizes), "patches": n_tokens}
            hf_row = {**base, "impl": "transformers", "seconds": hf_s, "peak_gib": hf_mem,
                      "padded_patches": padded_tokens}  # fmt: skip
            rows.append(hf_row)
            patches, grid = ours.patchify(images)
            grid = grid.cpu()
            variants = [(b, ours, "") for b in backends] + [
                (b, compiled, "+compile") for b in backends if compiled
            ]
            for backend, model, tag in variants:
                s, mem = measure(lambda m=model, b=backend, x=patches, g=grid: m(x, g, attn_backend=b))
                rows.append({**base, "impl": f"packvit[{backend}{tag}]",
                             "seconds": s, "peak_gib": mem, "speedup": hf_s / s, "mem_ratio": mem / hf_mem})  # fmt: skip
            for r in rows[-(len(variants) + 1) :]:
                r["img_per_s"] = len(sizes) / r["seconds"]
                r["tok_per_s"] = n_tokens / r["seconds"]
                r["tflops"] = flops / r["seconds"] / 1e12
                r["gemm_fraction"] = r["tflops"] / peak
                print(
                    json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}),
                    flush=True,
                )
            del images, patches
        del hf, ours, compiled
        gc.collect()
        torch.cuda.empty_cache()
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
        (args.out / "results.md").write_text(render_markdown(env, rows))
        print((args.out / "results.md").read_text())


def render_markdown(env: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        f"GPU: {env['gpu']} · torch {env['torch']} · CUDA {env['cuda']} · transformers {env['transformers']} · "
        f"bf16 forward · bf16 GEMM peak measured in the same run: {env['gemm_peak_tflops']} TFLOP/s",
        "",
        f"Command: `{env['command']}`",
        "",
        "| model | workload | images | implementation | img/s | tokens/s | TFLOP/s | of GEMM peak | peak GiB | speedup | memory vs HF |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        speed = f"{r['speedup']:.2f}×" if "speedup" in r else ""
        mem = f"{r['mem_ratio']:.2f}×" if "mem_ratio" in r else ""
        impl = r["impl"] + (f" (padded to {r['padded_patches']} patches)" if r.get("padded_patches") else "")
        lines.append(
            f"| {r['model']} | {r['workload']} | {r['images']} | {impl} | {r['img_per_s']:.1f} | "
            f"{r['tok_per_s']:,.0f} | {r['tflops']:.0f} | {r['gemm_fraction']:.2f} | {r['peak_gib']:.2f} | {speed} | {mem} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
