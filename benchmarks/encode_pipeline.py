"""Whole-pipeline throughput of ``packvit encode`` over webdataset shards of JPEGs, against the model alone.

Builds, in a temporary folder: ``--images`` photo-like JPEGs (PIL and numpy: a smooth colour field, shapes,
a slight blur and sensor-like noise; quality 90, 4:2:0; each side 224-1024 px, non-square) in ``--shards``
webdataset shards, and DINOv3 ViT-L/16 at its real size with random weights (the preset's architecture, built
by our encoder and saved with ``save_pretrained``; no network). Then, on one GPU:

(a) model only: the same images preprocessed once (the CPU path's patches), already on the GPU, in the
    batches ``packvit encode`` makes (``--max-tokens``, prefix tokens included, no batch spanning two
    shards); forwards timed back to back after two warm-up batches, the median of ``--rounds`` passes;
(b) ``packvit encode`` over the shards with ``--decode cpu`` and ``--workers`` decoding threads, and (b2)
    the same with ``--processes`` (decoding in worker processes);
(c) the same with ``--decode gpu`` (where torchvision with nvJPEG is installed);
(d) with two GPUs or more: two ``packvit encode`` processes at once, ``--num-shards 2 --shard-index i``,
    one GPU each (``CUDA_VISIBLE_DEVICES``), ``--workers`` shared between them, their images/s summed,
    against one GPU with the same decoding.

A ``packvit encode`` run is timed by its own summary line: from its first image read to its last shard
written, after the model is loaded and has run one warm-up forward. Targets: the pipeline at >= 0.8 of the
model alone; two GPUs at >= 1.8 x one.

    python benchmarks/encode_pipeline.py --out benchmarks/results   # 2000 images, about 5 minutes on an H200
    python benchmarks/encode_pipeline.py --attn-backend fa4 --fp8    # options passed to every run
    python benchmarks/encode_pipeline.py --attn-backend fa4 --graphs # encode --graphs; (a) replays them too
    python benchmarks/encode_pipeline.py --smoke                     # tiny model on the CPU, about a minute
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import packvit_native as pv  # noqa: E402
from packvit_native.attention import resolve_backend  # noqa: E402
from packvit_native.cli import capture_graphs  # noqa: E402
from packvit_native.preprocess import MAX_DECODED_PIXELS  # noqa: E402
from packvit_native.shards import preprocess_bytes  # noqa: E402
from weights_convert.presets import PRESETS  # noqa: E402

PIPELINE_TARGET, SCALING_TARGET = 0.8, 1.8
# The packvit encode runs on one GPU: (row, name as --decode takes it).
RUNS = (("b", "cpu"), ("b2", "processes"), ("c", "gpu"))
RUN_TITLES = {"cpu": "--decode cpu", "processes": "--decode cpu --processes", "gpu": "--decode gpu"}
# Runs packvit encode as the console script does, from this checkout (no install needed).
ENCODE = [sys.executable, "-c", "import sys; from packvit_native.cli import main; sys.exit(main())", "encode"]
SUMMARY = re.compile(
    r"encoded (?P<images>\d+) images? \((?P<tokens>\d+) patch tokens?\) of \d+ shards? in (?P<wall>[\d.]+)s"
    r".*?; (?P<e2e>[\d.]+) img/s end to end, (?P<model>[\d.]+) img/s in the model alone"
)
DECODED = re.compile(r"--decode gpu: (?P<gpu>\d+) JPEGs decoded on \S+, (?P<cpu>\d+) images on the CPU")


# ------------------------------------------------------------------------------------------------- inputs


def photo(seed: int, min_side: int, max_side: int) -> bytes:
    """One photo-like JPEG: what matters for decoding speed is its size and how it compresses, so it has a
    smooth colour field, a few shapes with sharp edges softened by a blur, and noise, as photos do."""
    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(min_side, max_side + 1, 2))
    field = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    image = Image.fromarray(field).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, x1 = sorted(int(v) for v in rng.integers(0, w, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, h, 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            draw.polygon([tuple(int(v) for v in p) for p in rng.integers(0, (w, h), (5, 2))], fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(1.2))
    noisy = np.asarray(image, np.float32) + rng.normal(0, 4, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shards(folder: Path, images: int, shards: int, min_side: int, max_side: int) -> list[list[bytes]]:
    """``folder/{00000..}.tar``, webdataset layout (``KEY.jpg``, ``KEY.json``); returns each shard's JPEGs."""
    folder.mkdir(parents=True)
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        jpegs = list(pool.map(photo, range(images), [min_side] * images, [max_side] * images, chunksize=16))
    per_shard = [jpegs[s::shards] for s in range(shards)]
    for s, members in enumerate(per_shard):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i, data in enumerate(members):
                key = f"{s:05d}/{i:06d}"
                for ext, blob in (("jpg", data), ("json", json.dumps({"key": key}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    return per_shard


def build_model(args: argparse.Namespace, folder: Path, device: torch.device) -> None:
    """The preset's architecture (or a tiny one with ``--smoke``) with random weights, saved in our format."""
    preset = PRESETS[args.model]
    config = (
        preset.config(hidden_size=64, num_heads=4, num_layers=2, mlp_hidden=128)
        if args.smoke
        else preset.config()
    )
    torch.manual_seed(0)
    model = pv.PackedVisionEncoder(
        config, device=device, dtype=torch.bfloat16 if device.type == "cuda" else None
    )
    model.save_pretrained(folder)


# ----------------------------------------------------------------------------------------- measurements


def model_only(
    args: argparse.Namespace, model_dir: Path, shards: list[list[bytes]], device: torch.device
) -> dict:
    """(a): forwards alone over the CLI's batches of the same images, inputs already on the device."""
    model = pv.from_pretrained(
        model_dir, device=device, dtype=args.dtype, attn_backend=args.attn_backend,
        precision="fp8" if args.fp8 else None,
    )  # fmt: skip
    capture_graphs(model, args)  # as packvit encode --graphs does
    config = model.config
    settings = argparse.Namespace(resample=None, max_decoded_pixels=MAX_DECODED_PIXELS)
    rule = {"max_patches": None, "min_pixels": None, "max_pixels": None, "size": None}
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        prepared = [
            list(pool.map(lambda d: preprocess_bytes(d, config, settings, rule), shard)) for shard in shards
        ]
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []
    for shard in prepared:  # packvit encode's batching: a token budget, prefix tokens counted, per shard
        batch, tokens = [], 0
        for patches, grid in shard:
            n = patches.shape[0] + config.num_prefix * int(grid[:, 0].sum())
            if batch and tokens + n > args.max_tokens:
                batches.append(_batch(batch, device))
                batch, tokens = [], 0
            batch.append((patches, grid))
            tokens += n
        if batch:
            batches.append(_batch(batch, device))
    images = sum(int(grid.shape[0]) for _, grid in batches)
    patch_tokens = sum(int(grid.prod(1).sum()) for _, grid in batches)

    def one_pass(todo: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        _sync(device)
        started = time.perf_counter()
        with torch.inference_mode():
            for patches, grid in todo:
                model(patches, packing=model.pack(grid), return_dict=True)
        _sync(device)
        return time.perf_counter() - started

    one_pass(batches[:2])  # warm-up: kernels compiled or loaded, libraries started
    seconds = statistics.median(one_pass(batches) for _ in range(args.rounds))
    return {
        "images": images, "patch_tokens": patch_tokens, "batches": len(batches), "seconds": seconds,
        "images_per_s": images / seconds, "backend": resolve_backend(args.attn_backend, device),
    }  # fmt: skip


def _batch(
    batch: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([p for p, _ in batch]).to(device), torch.cat([g for _, g in batch])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encode_command(
    args: argparse.Namespace, model_dir: Path, out: Path, pattern: str, *extra: str
) -> list[str]:
    options = [
        "--max-tokens",
        str(args.max_tokens),
        "--attn-backend",
        args.attn_backend,
        "--dtype",
        args.dtype,
    ]
    flags = [flag for flag, on in (("--fp8", args.fp8), ("--graphs", args.graphs)) if on]
    return [*ENCODE, "--model", str(model_dir), "--out", str(out), pattern, *options, *flags, *extra]


def child_env(**changes: str) -> dict[str, str]:
    """The environment of a packvit encode run: this checkout importable, whatever the working folder."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **changes}


def shown(command: list[str], paths: dict[str, str]) -> str:
    """A command as a reader would type it: ``packvit encode ...`` with the temporary paths named."""
    text = shlex.join(["packvit", *command[len(ENCODE) - 1 :]])
    for path, name in paths.items():
        text = text.replace(path, name)
    return text


def parse(stderr: str) -> dict[str, Any]:
    match = SUMMARY.search(stderr)
    if match is None:
        raise RuntimeError(f"packvit encode printed no summary:\n{stderr[-3000:]}")
    found = {
        "images": int(match["images"]),
        "patch_tokens": int(match["tokens"]),
        "seconds": float(match["wall"]),
    }
    found |= {"images_per_s": float(match["e2e"]), "model_alone_per_s": float(match["model"])}
    decoded = DECODED.search(stderr)
    if decoded:
        found |= {"decoded_on_gpu": int(decoded["gpu"]), "decoded_on_cpu": int(decoded["cpu"])}
    return found


def run_encode(command: list[str]) -> dict[str, Any]:
    """(b), (c): one packvit encode run, its summary line parsed."""
    done = subprocess.run(command, env=child_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"packvit encode exited {done.returncode}:\n{done.stderr[-3000:]}")
    return parse(done.stderr)


def run_two_gpus(commands: list[list[str]]) -> dict[str, Any]:
    """(d): the runs at once, one GPU each; their images/s summed."""
    procs = []
    for gpu, command in enumerate(commands):
        env = child_env(CUDA_VISIBLE_DEVICES=str(gpu))
        procs.append(
            subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        )
    runs = []
    for proc in procs:
        _, stderr = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"packvit encode exited {proc.returncode}:\n{stderr[-3000:]}")
        runs.append(parse(stderr))
    return {
        "images": sum(r["images"] for r in runs), "images_per_s": sum(r["images_per_s"] for r in runs),
        "per_process": [r["images_per_s"] for r in runs], "runs": runs,
    }  # fmt: skip


def gpu_decode_unavailable(device: torch.device) -> str | None:
    from packvit_native.gpu_decode import nvjpeg_decoder

    try:
        nvjpeg_decoder(device)
    except ValueError as e:
        return str(e)
    return None


# ------------------------------------------------------------------------------------------------ report


def render(
    env: dict[str, Any], rows: list[dict[str, Any]], ratios: list[tuple[str, float | None, float]]
) -> str:
    lines = [
        f"# packvit encode pipeline: {env['model_title']}, {env['images']} JPEGs in {env['shards']} shards",
        "",
        f"{env['device']}; torch {env['torch']}, torchvision {env['torchvision']}, Pillow {env['pillow']}, "
        f"Python {env['python']}, {env['cpus']} CPU cores. Attention: {env['backend']}; dtype {env['dtype']}"
        + (", FP8 block linears" if env["fp8"] else "")
        + (", blocks replayed from CUDA graphs (--graphs)" if env["graphs"] else "")
        + f"; --max-tokens {env['max_tokens']}. JPEGs: each side {env['min_side']}-{env['max_side']} px, "
        f"quality 90, {env['megabytes']:.0f} MB in all, {env['tokens_per_image']:.0f} patch tokens per image "
        "on average.",
        "",
        f"Command: `{env['command']}`",
        "",
        "| run | images | seconds | images/s | note |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['name']} | | | not run | {row['error']} |")
        else:
            figures = f"{row['images']} | {row['seconds']:.2f} | {row['images_per_s']:.1f}"
            lines.append(f"| {row['name']} | {figures} | {row['note']} |")
    lines += ["", "| ratio | value | target | met |", "|---|---|---|---|"]
    for name, value, target in ratios:
        shown_value = "not measured" if value is None else f"{value:.2f}"
        met = "" if value is None else ("yes" if value >= target else "**no**")
        lines.append(f"| {name} | {shown_value} | >= {target} | {met} |")
    lines += ["", "Commands of the runs (`MODEL`, `SHARDS`, `OUT` are the temporary folders):", ""]
    lines += [f"- {row['name']}: `{row['command']}`" for row in rows if row.get("command")]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=None, help="JPEGs to encode (default 2000; --smoke 32)")
    parser.add_argument("--shards", type=int, default=None, help="webdataset shards (default 8; --smoke 4)")
    parser.add_argument("--min-side", type=int, default=224)
    parser.add_argument("--max-side", type=int, default=None, help="default 1024 (--smoke 384)")
    parser.add_argument(
        "--model", default="dinov3_vitl16", choices=sorted(PRESETS), help="architecture preset"
    )
    parser.add_argument("--attn-backend", default="auto")
    parser.add_argument("--dtype", default=None, help="default bfloat16 on a GPU, float32 on the CPU")
    parser.add_argument(
        "--fp8", action="store_true", help="packvit encode --fp8 (and precision='fp8' in (a))"
    )
    parser.add_argument(
        "--graphs", action="store_true", help="packvit encode --graphs (and the same graphs in (a))"
    )
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count(), help="decoding threads (default: all cores)"
    )
    parser.add_argument(
        "--decode", type=lambda text: text.split(","), default=["cpu", "processes", "gpu"],
        help="the packvit encode runs, comma-separated: cpu (threads), processes (--decode cpu --processes), "
        "gpu (default: all three)",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="timed passes of the model alone (median)")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny model on the CPU: checks that the script runs"
    )
    parser.add_argument("--out", type=Path, help="directory for encode_pipeline.md and .json")
    parser.add_argument(
        "--keep", type=Path, help="build the inputs in this folder and keep them (default: temp)"
    )
    args = parser.parse_args()
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        sys.exit(
            "packvit encode writes the shards' outputs as parquet, which needs pyarrow: pip install pyarrow"
        )
    unknown = sorted(set(args.decode) - set(RUN_TITLES))
    if unknown:
        parser.error(f"--decode takes {', '.join(RUN_TITLES)}; not {', '.join(unknown)}")
    args.images = args.images or (32 if args.smoke else 2000)
    args.shards = args.shards or (4 if args.smoke else 8)
    args.max_side = args.max_side or (384 if args.smoke else 1024)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" or args.fp8 else "float32")
    args.rounds = max(args.rounds, 1) if device.type == "cuda" else 1
    if args.keep is not None and args.keep.exists() and any(args.keep.iterdir()):
        parser.error(f"--keep {args.keep} is not empty; give a new or empty folder")
    with tempfile.TemporaryDirectory(prefix="packvit-pipeline-") as tmp:
        work = args.keep or Path(tmp)
        run(args, work, device)


def environment(args: argparse.Namespace, device: torch.device, shards: list[list[bytes]]) -> dict[str, Any]:
    """What the report says about the machine, the software and the inputs."""
    try:
        import torchvision

        torchvision_version = torchvision.__version__
    except Exception:  # absent, or built for another torch
        torchvision_version = "not importable"
    cuda = device.type == "cuda"
    title = PRESETS[args.model].title + (" (tiny, --smoke)" if args.smoke else "")
    return {
        "device": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.machine()})",
        "gpus": torch.cuda.device_count() if cuda else 0,
        "torch": torch.__version__, "torchvision": torchvision_version, "pillow": Image.__version__,
        "python": platform.python_version(), "cpus": os.cpu_count(),
        "model_title": f"{title}, random weights",
        "images": args.images, "shards": args.shards, "min_side": args.min_side, "max_side": args.max_side,
        "megabytes": sum(len(d) for shard in shards for d in shard) / 2**20,
        "dtype": args.dtype, "fp8": args.fp8, "graphs": args.graphs, "max_tokens": args.max_tokens,
        "command": shlex.join(["python", "benchmarks/encode_pipeline.py", *sys.argv[1:]]),
    }  # fmt: skip


def run(args: argparse.Namespace, work: Path, device: torch.device) -> None:
    started = time.perf_counter()
    shard_dir, model_dir, runs = work / "shards", work / "model", work / "runs"
    print(f"building {args.images} JPEGs in {args.shards} shards and the model ...", flush=True)
    shards = write_shards(shard_dir, args.images, args.shards, args.min_side, args.max_side)
    build_model(args, model_dir, device)
    pattern = str(shard_dir / f"{{00000..{args.shards - 1:05d}}}.tar")
    paths = {str(model_dir): "MODEL", str(shard_dir): "SHARDS", str(runs): "OUT"}
    env = environment(args, device, shards)

    print("(a) model alone ...", flush=True)
    alone = model_only(args, model_dir, shards, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the runs below are other processes on the same GPU
    env["backend"] = alone["backend"]
    env["tokens_per_image"] = alone["patch_tokens"] / alone["images"]
    passes = f"{args.rounds} passes" if args.rounds > 1 else "1 pass"
    note = f"{alone['batches']} batches, inputs on the device, median of {passes}"
    rows: list[dict[str, Any]] = [{"name": "(a) model alone", **alone, "note": note}]

    one_gpu: dict[str, float] = {}
    for row, run_name in RUNS:
        decode = "gpu" if run_name == "gpu" else "cpu"
        extra = ["--processes"] if run_name == "processes" else []
        name = f"({row}) packvit encode --decode {decode}{' --processes' if extra else ''}"
        if run_name not in args.decode:
            rows.append({"name": name, "error": f"left out (--decode {','.join(args.decode)})"})
            continue
        why = gpu_decode_unavailable(device) if decode == "gpu" else None
        if why is not None:
            rows.append({"name": name, "error": why})
            continue
        print(f"{name} ...", flush=True)
        options = ["--device", str(device), "--decode", decode, "--workers", str(args.workers), *extra]
        command = encode_command(args, model_dir, runs / run_name, pattern, *options)
        result = run_encode(command)
        one_gpu[run_name] = result["images_per_s"]
        note = f"model alone in this run: {result['model_alone_per_s']:.1f} img/s; --workers {args.workers}"
        if "decoded_on_gpu" in result:
            on_gpu, on_cpu = result["decoded_on_gpu"], result["decoded_on_cpu"]
            note += f"; {on_gpu} JPEGs decoded on the GPU, {on_cpu} images on the CPU"
        rows.append({"name": name, **result, "note": note, "command": shown(command, paths)})

    scaling = None
    if device.type == "cuda" and torch.cuda.device_count() >= 2 and one_gpu:
        run_name = next(name for name in ("gpu", "processes", "cpu") if name in one_gpu)
        decode = "gpu" if run_name == "gpu" else "cpu"
        workers = max(1, args.workers // 2)
        options = ["--device", "cuda", "--decode", decode, "--workers", str(workers), "--num-shards", "2"]
        options += ["--processes"] if run_name == "processes" else []
        commands = [
            encode_command(args, model_dir, runs / "two-gpus", pattern, *options, "--shard-index", str(i))
            for i in range(2)
        ]
        name = f"(d) 2 GPUs, 2 processes, {RUN_TITLES[run_name]}"
        print(f"{name} ...", flush=True)
        both = run_two_gpus(commands)
        scaling = both["images_per_s"] / one_gpu[run_name]
        each = ", ".join(f"{v:.1f}" for v in both["per_process"])
        note = f"per process {each} img/s; --workers {workers} each"
        command = "CUDA_VISIBLE_DEVICES=I " + shown(commands[0], paths).replace(
            "--shard-index 0", "--shard-index I"
        )
        seconds = max(r["seconds"] for r in both["runs"])
        rows.append({"name": name, **both, "seconds": seconds, "note": note, "command": command})
    elif device.type == "cuda":
        rows.append({"name": "(d) 2 GPUs", "error": f"{torch.cuda.device_count()} GPU visible"})

    ratios: list[tuple[str, float | None, float]] = []
    for row, run_name in RUNS:
        value = one_gpu[run_name] / alone["images_per_s"] if run_name in one_gpu else None
        ratios.append(
            (f"({row}) / (a): pipeline, {RUN_TITLES[run_name]} / model alone", value, PIPELINE_TARGET)
        )
    ratios.append(("(d): 2 GPUs / 1 GPU, same decoding", scaling, SCALING_TARGET))
    report = render(env, rows, ratios)
    print("\n" + report)
    print(f"(benchmark took {time.perf_counter() - started:.0f}s)")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "encode_pipeline.md").write_text(report)
        ratio_rows = [{"name": n, "value": v, "target": t} for n, v, t in ratios]
        data = {"env": env, "rows": rows, "ratios": ratio_rows}
        (args.out / "encode_pipeline.json").write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
