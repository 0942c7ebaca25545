"""Side-by-side benchmark: packvit-native vs the peers a user would pick instead, same images, same GPU, one
process.

For every model and workload every contender encodes the same images: ours per attention backend (eager, and
with --compile compiled blocks; with --fp8 each also with FP8 block linears; with --graphs each also replayed
from CUDA graphs captured at the workload's token count rounded up to 256), transformers (and with
--peer-compile transformers compiled), and timm's own model where it has one (eager, and compiled with
--peer-compile; SigLIP2 NaFlex as timm's NaFlexViT on one padded batch). Contenders are timed in interleaved
rounds (every contender once per round, --rounds of them, --calls timed calls each after a warm-up), with the
bf16 GEMM peak measured in every round; we report the median of the round medians with min and max, flag a
spread above 10 %, and give images/s, tokens/s, achieved TFLOP/s (useful work only: padding is never counted),
its fraction of the GEMM peak, peak memory (for graph rows without the graph's pool, allocated at capture),
and ratios against the best peer of the row. Workloads: ``uniformN`` (N x N images), ``mixed`` (32 images,
224-1024 px a side), ``small`` (256 thumbnails, 64-224 px), ``batchN`` (N images at 448 x 448), ``stream``
(16 of the mixed images, one call each, for every contender). transformers runs its best way for each case: sdpa attention,
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
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import packvit_native as pv
from packvit_native.attention import available_backends
from packvit_native.fp8 import convert_to_fp8
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
    if name.startswith("batch"):  # a few images at 448 x 448: latency of small batches
        return [grid(448, 448)] * int(name.removeprefix("batch"))
    if name == "stream":  # online encoding: 16 mixed-size images (224-1024 px a side), one call each
        return workload("mixed", config)[:16]
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


# timm's own models at our presets' sizes (random weights; only their speed is compared). SigLIP2 NaFlex runs
# as timm's NaFlexViT, fed one padded batch of patches with their coordinates and a validity mask.
TIMM_MODELS = {
    "dinov3_vitl16": "vit_large_patch16_dinov3",
    "aimv2_l14": "aimv2_large_patch14_224",
    "siglip_so400m14_384": "vit_so400m_patch14_siglip_384",
    "siglip2_so400m16": "naflexvit_so400m_patch16_siglip",
    "clip_vitl14_336": "vit_large_patch14_clip_quickgelu_336",
    "dinov2_vitl14_reg": "vit_large_patch14_reg4_dinov2",
}


@dataclass
class Contender:
    """One way to encode a workload: ours with a backend, or a peer a user would pick instead."""

    impl: str
    run: Callable[[], Any]
    ours: bool
    padded_patches: int | None = None


def size_groups(images: list[torch.Tensor]) -> list[torch.Tensor]:
    """The images stacked into one batch per distinct size (what a padding-free user of a peer does)."""
    groups: dict[tuple[int, ...], list[torch.Tensor]] = {}
    for im in images:
        groups.setdefault(tuple(im.shape), []).append(im)
    return [torch.stack(g) for g in groups.values()]


def timm_runner(key: str, batches: list[list[torch.Tensor]], compiled: bool) -> Callable[[], Any] | None:
    """One timm model encoding each batch in turn (per distinct size, or NaFlexViT's padded batch)."""
    if key not in TIMM_MODELS:
        return None
    try:
        import timm
    except ImportError:
        return None
    name = TIMM_MODELS[key]
    naflex = name.startswith("naflexvit")
    model = timm.create_model(name, pretrained=False, **({} if naflex else {"dynamic_img_size": True}))
    model = model.to(device="cuda", dtype=DTYPE).eval()
    forward = torch.compile(model.forward_features, dynamic=True) if compiled else model.forward_features
    calls = []
    for images in batches:
        if naflex and len({im.shape for im in images}) > 1:
            calls.append(partial(forward, **naflex_batch(images, MODELS[key].hf_config["patch_size"])))
        else:
            calls += [partial(forward, b) for b in size_groups(images)]
    return lambda: [call() for call in calls]


def naflex_batch(images: list[torch.Tensor], patch: int) -> dict[str, torch.Tensor]:
    """timm NaFlexViT's input: ``[B, N, p*p*C]`` patches (row-major, channels last) padded to the longest
    image, their ``(y, x)`` coordinates and a validity mask."""
    patches, grid = pv.patchify(images, patch, layout="hwc")
    counts = (grid[:, 1] * grid[:, 2]).tolist()
    n = max(counts)
    out = {
        "patches": patches.new_zeros(len(images), n, patches.shape[1]),
        "patch_coord": torch.zeros(len(images), n, 2, dtype=torch.long, device="cuda"),
        "patch_valid": torch.zeros(len(images), n, dtype=torch.bool, device="cuda"),
    }
    for i, (chunk, (_, h, w)) in enumerate(zip(patches.split(counts), grid.tolist(), strict=True)):
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        out["patches"][i, : len(chunk)] = chunk
        out["patch_coord"][i, : len(chunk)] = torch.stack([rows.flatten(), cols.flatten()], 1).cuda()
        out["patch_valid"][i, : len(chunk)] = True
    return out


def with_graphs(model: pv.PackedVisionEncoder, batches: list[list[tuple[int, int, int]]], backend: str):
    """A view of ``model`` (same parameters) with CUDA graphs captured for a workload's batches: one budget per
    batch, its tokens rounded up to a multiple of 256 (what a deployment with a known batch shape or size
    ladder sets), segments up to the longest frame; and where every image has one size (a fixed serving
    resolution), the whole forward of each batch shape."""
    packings = [model.pack(grids) for grids in batches]
    budgets = sorted({-(-p.frames.total // 256) * 256 for p in packings})
    segmentations = [s for p in packings for s in (p.frames, p.windows) if s is not None]
    one_size = len({g for grids in batches for g in grids}) == 1
    view = copy.copy(model)  # shares parameters and submodules; only the graphs are its own
    return view.capture_graphs(
        budgets, batches=list({tuple(grids): None for grids in batches}) if one_size else (),
        max_segments=max(len(s.lengths) for s in segmentations),
        max_seqlen=max(s.max_seqlen for s in segmentations), attn_backend=backend,
    )  # fmt: skip


def contenders(
    key: str, spec: Preset, hf: Any, ours: pv.PackedVisionEncoder, compiled: pv.PackedVisionEncoder | None,
    images: list[torch.Tensor], backends: list[str], uniform: bool, peer_compile: bool, graphs: bool = False,
    per_image: bool = False, fp8: tuple[pv.PackedVisionEncoder, pv.PackedVisionEncoder | None] | None = None,
) -> list[Contender]:  # fmt: skip
    """Ours per backend (eager, compiled, replayed from CUDA graphs) and the peers: transformers and timm,
    eager and compiled. With ``per_image`` every contender encodes the images one call each (online
    encoding); otherwise the whole workload is one call. ``fp8``: our FP8 model, eager and compiled (or
    ``None``), measured as ``+fp8`` variants.

    Compiled peers run on uniform workloads only: compiling them per distinct image size of a mixed workload
    would measure recompilation, which no user of a compiled peer would accept either.
    """
    batches = [[im] for im in images] if per_image else [images]

    def sequence(runs: list[Callable[[], Any]]) -> Callable[[], Any]:
        return runs[0] if len(runs) == 1 else lambda: [r() for r in runs]

    peers = [hf_runner(spec, hf, b, ours) for b in batches]
    padded = None if per_image else peers[0][1]
    out = [Contender("transformers", sequence([r for r, _ in peers]), False, padded)]
    if peer_compile and uniform:
        compiled_hf = torch.compile(hf, dynamic=False)
        runs = [hf_runner(spec, compiled_hf, b, ours)[0] for b in batches]
        out.append(Contender("transformers+compile", sequence(runs), False, padded))
    for tag, compile_timm in (("timm", False), ("timm+compile", True)):
        if compile_timm and not (peer_compile and uniform):
            continue
        run = timm_runner(key, batches, compile_timm)
        if run is not None:
            out.append(Contender(tag, run, False))
    inputs = [(patches, grid.cpu()) for patches, grid in (ours.patchify(b) for b in batches)]
    grids = [[tuple(g) for g in grid.tolist()] for _, grid in inputs]
    for backend in backends:
        variants = [("", ours)] + ([("+compile", compiled)] if compiled is not None else [])
        if fp8 is not None:
            variants += [
                (f"{tag}+fp8", m) for tag, m in zip(("", "+compile"), fp8, strict=True) if m is not None
            ]
        if graphs and backend != "sdpa":
            variants += [(f"{tag}+graphs", with_graphs(model, grids, backend)) for tag, model in variants]
        for tag, model in variants:
            runs = [partial(model, patches, grid, attn_backend=backend) for patches, grid in inputs]
            out.append(Contender(f"packvit[{backend}{tag}]", sequence(runs), True))
    return out


def call_seconds(run: Callable[[], Any]) -> float:
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    run()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / 1e3


def measure_rounds(
    entries: list[Contender], rounds: int, calls: int
) -> tuple[dict[str, list[float]], list[float]]:
    """Per contender, the median seconds of ``calls`` timed calls in each of ``rounds`` interleaved rounds
    (every contender once per round, so drift of clocks and temperature hits all alike); and the GEMM peak
    measured in each round."""
    medians: dict[str, list[float]] = {c.impl: [] for c in entries}
    peaks = []
    with torch.inference_mode():
        for c in entries:  # warm-up: compilation, FA4's kernel builds, allocator growth
            for _ in range(3):
                c.run()
        torch.cuda.synchronize()
        for _ in range(rounds):
            peaks.append(gemm_peak())
            for c in entries:
                medians[c.impl].append(statistics.median(call_seconds(c.run) for _ in range(calls)))
    return medians, peaks


def peak_memory(run: Callable[[], Any]) -> float:
    """GiB allocated at the peak of one call, beyond what was allocated before it."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.inference_mode():
        run()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def result_rows(
    base: dict[str, Any], entries: list[Contender], medians: dict[str, list[float]], peak: float, flops: float
) -> list[dict[str, Any]]:
    rows = []
    for c in entries:
        runs = medians[c.impl]
        seconds = statistics.median(runs)
        rows.append({
            **base, "impl": c.impl, "ours": c.ours, "seconds": seconds, "round_seconds": runs,
            "img_per_s": base["images"] / seconds, "img_per_s_min": base["images"] / max(runs),
            "img_per_s_max": base["images"] / min(runs), "spread": (max(runs) - min(runs)) / seconds,
            "tok_per_s": base["patches"] / seconds, "tflops": flops / seconds / 1e12,
            "gemm_fraction": flops / seconds / 1e12 / peak, "peak_gib": peak_memory(c.run),
            "padded_patches": c.padded_patches,
        })  # fmt: skip
    best_peer = max((r for r in rows if not r["ours"]), key=lambda r: r["img_per_s"])
    by_impl = {r["impl"]: r for r in rows}
    for r in rows:
        r["vs_best_peer"] = r["img_per_s"] / best_peer["img_per_s"]
        if "+fp8" in r["impl"] and r["impl"].replace("+fp8", "") in by_impl:
            r["vs_bf16"] = r["img_per_s"] / by_impl[r["impl"].replace("+fp8", "")]["img_per_s"]
        r["best_peer"] = best_peer["impl"]
        r["mem_vs_best_peer"] = (
            r["peak_gib"] / best_peer["peak_gib"] if best_peer["peak_gib"] > 0 else float("nan")
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="dinov3_vitl16,aimv2_l14,siglip2_so400m16,dinov3_vit7b16")
    parser.add_argument("--workloads", default="uniform224,uniform448,uniform1024,mixed,small")
    parser.add_argument("--backends", default="auto", help="comma list of our attention backends, or 'auto'")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile'd blocks")
    parser.add_argument(
        "--peer-compile", action="store_true", help="also measure compiled peers (uniform workloads)"
    )
    parser.add_argument(
        "--graphs", action="store_true", help="also measure ours replayed from CUDA graphs (capture_graphs)"
    )
    parser.add_argument(
        "--fp8",
        action="store_true",
        help="also measure ours with FP8 block linears (precision='fp8'), as +fp8 variants of the others; "
        "TFLOP/s and the GEMM fraction stay relative to the bf16 peak",
    )
    parser.add_argument("--big-workloads", default="uniform448,mixed", help="workloads for the 7B model")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds (default 3)")
    parser.add_argument(
        "--calls", type=int, default=10, help="timed calls per contender and round (default 10)"
    )
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
        "timm": _timm_version(),
        "python": platform.python_version(),
        "command": "python " + " ".join(sys.argv),
        "available_backends": available_backends("cuda"),
        "rounds": args.rounds,
        "calls": args.calls,
    }
    print(json.dumps(env), flush=True)
    rows, peaks = [], []
    for key in args.models.split(","):
        spec = MODELS[key]
        hf, ours = build_pair(spec)
        cfg = ours.config
        backends = available_backends("cuda")[:1] if args.backends == "auto" else args.backends.split(",")
        backends = [b for b in backends if b in available_backends("cuda")]
        big = key == "dinov3_vit7b16"
        compiled = copy.deepcopy(ours).compile_blocks() if args.compile and not big else None
        fp8 = None
        if args.fp8:
            ours8 = convert_to_fp8(copy.deepcopy(ours))
            fp8 = (ours8, copy.deepcopy(ours8).compile_blocks() if compiled is not None else None)
        for wl in (args.big_workloads if big else args.workloads).split(","):
            if wl == "video" and not takes_packed_input(spec):
                continue  # only the Qwen-VL towers take clips of several temporal patches
            sizes = workload(wl, cfg)
            images = images_for(sizes, cfg)
            entries = contenders(
                key, spec, hf, ours, compiled, images, backends, len(set(sizes)) == 1, args.peer_compile,
                args.graphs, per_image=wl == "stream", fp8=fp8,
            )  # fmt: skip
            medians, round_peaks = measure_rounds(entries, args.rounds, args.calls)
            peaks += round_peaks
            base = {"model": spec.title, "workload": wl, "images": len(sizes),
                    "patches": sum(t * h * w for t, h, w in sizes)}  # fmt: skip
            new = result_rows(
                base, entries, medians, statistics.median(round_peaks), useful_flops(ours, sizes)
            )
            for r in new:
                print(
                    json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}),
                    flush=True,
                )
            rows += new
            env["gemm_peak_tflops"] = round(statistics.median(peaks), 1)
            write_results(args.out, env, rows)  # after every workload: a run cut short keeps what it measured
            del images, entries
        del hf, ours, compiled, fp8
        gc.collect()
        torch.cuda.empty_cache()
    if args.out:
        print((args.out / "results.md").read_text())


def write_results(out: Path | None, env: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    (out / "results.md").write_text(render_markdown(env, rows))


def _timm_version() -> str | None:
    try:
        import timm
    except ImportError:
        return None
    return timm.__version__


def render_markdown(env: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        f"GPU: {env['gpu']} · torch {env['torch']} · CUDA {env['cuda']} · transformers {env['transformers']} · "
        f"timm {env['timm']} · bf16 forward · bf16 GEMM peak measured in the same rounds: "
        f"{env['gemm_peak_tflops']} TFLOP/s",
        "",
        f"Command: `{env['command']}`",
        "",
        f"Each figure: the median over {env['rounds']} interleaved rounds of the median of {env['calls']} timed "
        "calls (after warm-up); min–max over the rounds; ⚠ marks a spread above 10 %. Ratios are against the best "
        "peer of the row (the fastest of transformers and timm, eager or compiled).",
        "",
        "| model | workload | images | implementation | img/s | min–max | TFLOP/s | of GEMM peak | peak GiB | vs best peer | memory vs best peer |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        flag = " ⚠" if r["spread"] > 0.10 else ""
        impl = r["impl"] + (f" (padded to {r['padded_patches']} patches)" if r.get("padded_patches") else "")
        impl += f" ({r['vs_bf16']:.2f}× bf16)" if "vs_bf16" in r else ""
        lines.append(
            f"| {r['model']} | {r['workload']} | {r['images']} | {impl} | {r['img_per_s']:.1f}{flag} | "
            f"{r['img_per_s_min']:.1f}–{r['img_per_s_max']:.1f} | {r['tflops']:.0f} | {r['gemm_fraction']:.2f} | "
            f"{r['peak_gib']:.2f} | {r['vs_best_peer']:.2f}× ({r['best_peer']}) | {r['mem_vs_best_peer']:.2f}× |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
