"""Training-step benchmark of the packed encoder: attention backends, activation checkpointing, torch.compile.

    python benchmarks/train_bench.py                        # GPU: a ViT-L/16-sized DINOv3, bf16 autocast
    python benchmarks/train_bench.py --device cpu --size tiny --steps 3

Every run is one forward and backward of a packed batch of mixed-size images (a fresh batch of sizes per
step, so the token total changes every time). Reported per configuration: the median step time, tokens per
second, the activation memory autograd keeps for the backward (bytes of distinct saved tensors, measured on any
device), the peak CUDA memory of a step, and for compiled runs how many graphs were compiled over all steps
(a number that stays flat as batches change means no recompiles).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch._dynamo.testing

import packvit_native as pv
from packvit_native.config import EncoderConfig
from weights_convert.presets import preset

SIZES = {
    "tiny": dict(hidden_size=64, num_layers=4, num_heads=4, mlp_hidden=128),
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, mlp_hidden=3072),
    "large": dict(hidden_size=1024, num_layers=24, num_heads=16, mlp_hidden=4096),
}


def config(size: str) -> EncoderConfig:
    return preset("dinov3_vitl16").config(drop_path_rate=0.1, **SIZES[size])


def batches(
    n: int, images: int, max_side: int, patch: int, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        grid = torch.cat(
            [
                torch.ones(images, 1, dtype=torch.int64),
                torch.randint(1, max_side + 1, (images, 2), generator=g),
            ],
            1,
        )
        out.append((torch.randn(int(grid.prod(1).sum()), 3 * patch * patch, generator=g), grid))
    return out


def step(model, patches, grid, device) -> None:
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    with autocast:
        out = model(patches.to(device, non_blocking=True), grid)
    out.float().square().mean().backward()
    model.zero_grad(set_to_none=True)


def saved_bytes(model, patches, grid, device) -> int:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(model, patches, grid, device)
    return sum(storages.values())


def measure(name, model, data, device, warmup: int) -> dict:
    for patches, grid in data[:warmup]:
        step(model, patches, grid, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, tokens = [], 0
    for patches, grid in data[warmup:]:
        t0 = time.perf_counter()
        step(model, patches, grid, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        tokens += len(patches)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {
        "name": name, "ms": 1e3 * statistics.median(times), "tok_s": tokens / sum(times),
        "act_gib": saved_bytes(model, *data[-1], device) / 2**30, "peak_gib": peak,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="large", choices=list(SIZES))
    parser.add_argument("--images", type=int, default=16, help="images per batch")
    parser.add_argument("--max-side", type=int, default=32, help="largest image side in patches")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--backends", nargs="*", default=None, help="default: every available backend")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg = config(args.size)
    data = batches(args.warmup + args.steps, args.images, args.max_side, cfg.patch_size)
    torch.manual_seed(0)
    base = pv.PackedVisionEncoder(cfg, device=device).train()
    backends = args.backends or pv.available_backends(device)
    rows = []
    for backend in backends:
        base.attn_backend = backend
        for every in (0, 2, 1):
            base.set_activation_checkpointing(every)
            rows.append(measure(f"{backend}, checkpoint every {every}", base, data, device, args.warmup))
    base.set_activation_checkpointing(0)
    if not args.no_compile:
        for backend in backends:
            torch._dynamo.reset()
            model = pv.PackedVisionEncoder(cfg, attn_backend=backend, device=device).train()
            model.load_state_dict(base.state_dict())
            counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
            model.compile_blocks(backend=counter)
            t0 = time.perf_counter()
            step(model, *data[0], device)
            first = time.perf_counter() - t0
            row = measure(f"{backend}, compiled", model, data, device, args.warmup)
            row["graphs"] = counter.frame_count
            row["first_s"] = first
            rows.append(row)
    n_tok = [len(p) for p, _ in data]
    print(f"{args.size} ({cfg.num_layers} x {cfg.hidden_size}), {device}, {args.images} images/batch, "
          f"{min(n_tok)}-{max(n_tok)} patches/batch, {len(data)} batches of different token totals")  # fmt: skip
    print(
        "| configuration | step ms | tokens/s | saved activations GiB | peak CUDA GiB | graphs (first step s) |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        extra = f"{r['graphs']} ({r['first_s']:.1f})" if "graphs" in r else ""
        print(
            f"| {r['name']} | {r['ms']:.1f} | {r['tok_s']:.0f} | {r['act_gib']:.3f} | {r['peak_gib']:.2f} | {extra} |"
        )


if __name__ == "__main__":
    main()
