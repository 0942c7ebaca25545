"""Where the time goes: a torch.profiler trace of one packed forward, summarised by kernel class.

    python benchmarks/profile_forward.py --model dinov3_vitl16 --workload mixed --backend fa4 [--compile]
    python benchmarks/profile_forward.py --model dinov3_vitl16 --workload batch8 --backend fa4 --compile \
        --graphs --peer

Prints the share of GPU time spent in GEMMs, attention, norms and the remaining elementwise kernels, the
number of kernels, and the top kernels, so a missed throughput target can be traced to what holds it back.
``--graphs`` replays our blocks from CUDA graphs (as ``bench.py --graphs``); ``--peer`` profiles
transformers' model on the same images the same way (compiled with ``--compile``), for a side-by-side account.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import MODELS, build_pair, hf_runner, images_for, timed, with_graphs, workload

# Checked in order: cuBLAS's Hopper GEMMs are named nvjet_sm90_*, so "sm90" alone must not mean attention.
CLASSES = (
    ("gemm", ("nvjet", "gemm", "cublas", "xmma", "matmul")),
    ("attention", ("flash", "fmha", "varlen", "attention")),
    ("norm", ("layer_norm", "layernorm", "rms")),
)


def classify(name: str) -> str:
    low = name.lower()
    for cls, needles in CLASSES:
        if any(n in low for n in needles):
            return cls
    return "elementwise/other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="dinov3_vitl16")
    parser.add_argument("--workload", default="mixed")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument(
        "--host", action="store_true", help="also time single calls and profile the host side"
    )
    parser.add_argument(
        "--graphs", action="store_true", help="replay our blocks from CUDA graphs captured for the workload"
    )
    parser.add_argument(
        "--peer", action="store_true", help="also profile transformers' model (compiled with --compile)"
    )
    args = parser.parse_args()
    spec = MODELS[args.model]
    hf, model = build_pair(spec)
    if args.compile:
        model.compile_blocks()
    images = images_for(workload(args.workload, model.config), model.config)
    patches, grid = model.patchify(images)
    grid = grid.cpu()
    if args.graphs:
        model = with_graphs(model, [[tuple(g) for g in grid.tolist()]], args.backend)

    def run():
        return model(patches, grid, attn_backend=args.backend)

    what = f"compile={args.compile}" + (", CUDA graphs" if args.graphs else "")
    account(run, f"{spec.title}, {args.workload}, ours, backend {args.backend}, {what}")
    if args.peer:
        peer = torch.compile(hf, dynamic=False) if args.compile else hf
        account(hf_runner(spec, peer, images, model)[0], f"transformers, compile={args.compile}")
    if args.host:
        host_profile(run)


def account(run, title: str) -> None:
    """Profile one call of ``run`` (after timing it) and print its GPU time by kernel class."""
    with torch.inference_mode():
        seconds = timed(run)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
    totals: dict[str, float] = {}
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    for e in kernels:
        totals[classify(e.key)] = totals.get(classify(e.key), 0.0) + e.self_device_time_total
    all_us = sum(totals.values())
    launches = sum(e.count for e in kernels)
    print(f"{title}: {seconds * 1e3:.2f} ms per call (wall), {all_us / 1e3:.2f} ms of kernels in {launches} "
          "kernels")  # fmt: skip
    for cls, us in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {cls:>18}: {us / 1e3:7.2f} ms  {us / all_us:6.1%}")
    print("  top kernels:")
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:12]:
        print(
            f"    {e.self_device_time_total / 1e3:7.2f} ms  x{e.count:<4} {classify(e.key):>18}  {e.key[:90]}"
        )


def host_profile(run) -> None:
    """Wall time of single calls (does it vary?) and where the host spends a call, by Python function."""
    import cProfile
    import pstats
    import time
    import warnings

    walls = []
    with torch.inference_mode():
        for _ in range(6):
            torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            torch.cuda.synchronize()
            walls.append((time.perf_counter() - start) * 1e3)
        print("  single calls (ms):", " ".join(f"{w:.1f}" for w in walls))
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        # PyTorch also warns that the debug mode is a prototype: only "called a synchronizing" is a sync.
        syncs = [str(w.message).splitlines()[0] for w in caught if "called a synchronizing" in str(w.message)]
        print(
            f"  host-device synchronisations in one call: {len(syncs)}", *sorted(set(syncs))[:5], sep="\n    "
        )
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(3):
            run()
        torch.cuda.synchronize()
        prof.disable()
    print("  host time over 3 calls, by function (tottime):")
    pstats.Stats(prof).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main()
