"""Fused epilogues on and off (packvit_native.fused): one transformer block per model, forward and backward.

    python benchmarks/fusions.py                  # GPU: well under 2 minutes on an H200
    python benchmarks/fusions.py --device cpu     # smoke test: tiny blocks; the fusions are no-ops on a CPU

Each model's block (the published sizes, random weights, bf16) runs over 32 images of 785 tokens packed into one
sequence, with the attention backend ``auto`` picks. Timed per model: the forward under ``inference_mode`` (what
encoding runs) and the forward plus backward (a training step's share of one block), each with the fusions off,
each fusion alone, and all of them. The variants are timed in interleaved rounds (each variant once per round,
so drift in clocks and temperature hits all alike); a round's figure is the median of ``--calls`` timed calls,
and the table gives the median over ``--rounds`` rounds. ``linear_gelu`` applies to GELU-tanh MLPs (SigLIP2)
and to forwards that record no gradient only, ``scale_add`` to models with layer scale (DINOv3) only, so they
show as ``-`` elsewhere.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench import call_seconds
from packvit_native import fused
from packvit_native.attention import resolve_backend
from packvit_native.layers import Block, BlockContext
from packvit_native.packing import Segments
from weights_convert.presets import PRESETS

MODELS = {
    "DINOv3 ViT-L/16": "dinov3_vitl16",
    "SigLIP2 so400m/16": "siglip2_so400m16",
    "AIMv2-L/14": "aimv2_l14",
}
VARIANTS = {
    "unfused": False,
    "add_norm": ["add_norm"],
    "linear_gelu": ["linear_gelu"],
    "scale_add": ["scale_add"],
    "all": True,
}
DTYPE = torch.bfloat16
TINY = {"hidden_size": 64, "num_heads": 4, "mlp_hidden": 96}  # the CPU smoke run's width


def build(
    key: str, images: int, tokens: int, backend: str, device: torch.device
) -> tuple[Block, BlockContext, torch.Tensor]:
    """One block of the preset's architecture, its context and a packed input of ``images x tokens`` tokens;
    on the CPU at a tiny width."""
    config = PRESETS[key].config(**({} if device.type == "cuda" else TINY))
    torch.manual_seed(0)
    block = Block(config, 0, device=device, dtype=DTYPE)
    with torch.no_grad():
        for (
            p
        ) in block.parameters():  # weights as trained models have them: unit-scale norms, small projections
            p.copy_(torch.randn_like(p) * (0.1 if p.dim() == 1 else p.shape[-1] ** -0.5) + (p.dim() == 1))
    total = images * tokens
    rope = None
    if config.rope != "none":
        angles = torch.rand(total, 1, config.head_dim // 2, device=device).tile(2) * 6.0  # [T, 1, Dh]
        rope_dtype = torch.float32 if config.rope_fp32 else DTYPE
        rope = (angles.cos().to(rope_dtype), angles.sin().to(rope_dtype))
    segments = Segments.from_lengths((tokens,) * images, device)
    ctx = BlockContext({"frames": segments}, resolve_backend(backend, device), rope)
    return block, ctx, torch.randn(total, config.hidden_size, device=device, dtype=DTYPE)


def runners(block: Block, ctx: BlockContext, x: torch.Tensor) -> dict[str, Callable[[], None]]:
    leaf = x.detach().requires_grad_()
    grad = torch.randn_like(x)

    def forward() -> None:
        with torch.inference_mode():
            block(x, ctx)

    def forward_backward() -> None:
        for p in block.parameters():
            p.grad = None  # as an optimizer's zero_grad leaves them: no accumulation kernels
        leaf.grad = None
        block(leaf, ctx).backward(grad)

    return {"forward": forward, "forward+backward": forward_backward}


def seconds(run: Callable[[], None], device: torch.device) -> float:
    if device.type != "cuda":
        start = time.perf_counter()
        run()
        return time.perf_counter() - start
    return call_seconds(run)


def applies(variant: str, key: str, pass_name: str) -> bool:
    """Whether ``variant`` differs from ``unfused`` for this model and pass (else it is not timed)."""
    config = PRESETS[key].config()
    if variant == "scale_add":
        return config.layer_scale
    return variant != "linear_gelu" or (config.activation == "gelu_tanh" and pass_name == "forward")


def measure(key: str, args: argparse.Namespace, device: torch.device) -> dict[tuple[str, str], float]:
    """Median seconds per (pass, variant) over interleaved rounds."""
    block, ctx, x = build(key, args.images, args.tokens, args.backend, device)
    runs = runners(block, ctx, x)
    entries = [(p, v) for p in runs for v in VARIANTS if applies(v, key, p)]
    for pass_name, variant in entries:  # warm-up: Triton compiles, cuBLAS picks its kernels
        with fused.using_fusions(VARIANTS[variant]):
            for _ in range(args.warmup):
                runs[pass_name]()
    rounds: dict[tuple[str, str], list[float]] = {e: [] for e in entries}
    for _ in range(args.rounds):
        for pass_name, variant in entries:
            with fused.using_fusions(VARIANTS[variant]):
                calls = [seconds(runs[pass_name], device) for _ in range(args.calls)]
            rounds[pass_name, variant].append(statistics.median(calls))
    return {e: statistics.median(r) for e, r in rounds.items()}


def table(results: dict[str, dict[tuple[str, str], float]]) -> str:
    head = "| model | pass | " + " | ".join(f"{v} ms" for v in VARIANTS) + " | all vs unfused |"
    lines = [head, "|" + "---|" * (len(VARIANTS) + 3)]
    for title, times in results.items():
        for pass_name in ("forward", "forward+backward"):
            base = times[pass_name, "unfused"]
            cells = []
            for variant in VARIANTS:
                t = times.get((pass_name, variant))
                cells.append("-" if t is None else f"{t * 1e3:.3f}" if variant == "unfused" else
                             f"{t * 1e3:.3f} ({t / base - 1:+.1%})")  # fmt: skip
            speedup = base / times[pass_name, "all"]
            lines.append(f"| {title} | {pass_name} | " + " | ".join(cells) + f" | {speedup:.3f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a tiny smoke run)")
    parser.add_argument("--models", default=",".join(MODELS.values()), help="comma list of preset names")
    parser.add_argument("--backend", default="auto", help="attention backend (default auto: the fastest)")
    parser.add_argument("--images", type=int, help="images per packed batch (default 32; 2 on the CPU)")
    parser.add_argument("--tokens", type=int, help="tokens per image (default 785; 17 on the CPU)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 7; 1 on the CPU)")
    parser.add_argument(
        "--calls", type=int, help="timed calls per variant and round (default 10; 1 on the CPU)"
    )
    parser.add_argument(
        "--warmup", type=int, help="untimed calls per variant first (default 3; 1 on the CPU)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    defaults = (("images", 32, 2), ("tokens", 785, 17), ("rounds", 7, 1), ("calls", 10, 1), ("warmup", 3, 1))
    for name, on_gpu, on_cpu in defaults:
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if gpu else on_cpu)
    titles = {key: title for title, key in MODELS.items()}
    results = {}
    for key in args.models.split(","):
        results[titles.get(key, key)] = measure(key, args, device)
        if gpu:
            torch.cuda.empty_cache()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    where = (
        torch.cuda.get_device_name(device) if gpu else f"CPU ({platform.processor() or platform.machine()})"
    )
    print(f"## Fused epilogues, one block, {args.images} x {args.tokens} tokens, bf16\n")
    print(f"{where}; torch {torch.__version__}, CUDA {torch.version.cuda}, Triton {triton_version}; "
          f"attention backend {resolve_backend(args.backend, device)}; median of {args.rounds} interleaved rounds "
          f"of {args.calls} calls\n")  # fmt: skip
    print(f"`python {' '.join(sys.argv)}`\n")
    print(table(results))


if __name__ == "__main__":
    main()
