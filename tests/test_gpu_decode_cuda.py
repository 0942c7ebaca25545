"""``--decode gpu`` with real nvJPEG (torchvision on a CUDA GPU) against ``--decode cpu`` (PIL).

nvJPEG's IDCT and chroma upsampling are not libjpeg's, so the decoded pixels differ slightly; everything after
decoding follows the CPU path (``test_gpu_decode.py`` checks that part bit for bit on the CPU). Tolerances:

- patches, per image: mean difference at most 1.5 levels (of 255), and at most 2 % of the values more than 8
  levels apart (chroma edges are where nvJPEG's upsampling and libjpeg's differ most);
- features of a float32 model (the tiny test DINOv3 with random weights, reference attention): per image, the
  patch tokens' mean cosine similarity with ``--decode cpu``'s at least 0.9999 (on the CPU, simulated decoder
  differences worse than these tolerances gave 0.99997, and adding 3 levels to every pixel 0.9995; the pooled
  embedding of random weights hardly moves even when the channels are swapped, so it is checked too but
  proves little).

Every assertion message carries the measured figures, so a failure says by how much.
"""

import argparse
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from shard_data import photo_like

import packvit_native as pv
from packvit_native.cli import main
from packvit_native.gpu_decode import GpuDecoder, gpu_route, nvjpeg_decoder
from packvit_native.preprocess import MAX_DECODED_PIXELS
from packvit_native.shards import preprocess_bytes
from weights_convert.presets import PRESETS


def _nvjpeg_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    try:
        nvjpeg_decoder(torch.device("cuda"))
    except ValueError as e:
        return str(e)
    return None


UNAVAILABLE = _nvjpeg_reason()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"--decode gpu: {UNAVAILABLE}")

MEAN_LEVELS, FAR_LEVELS, FAR_SHARE, MIN_COSINE = 1.5, 8.0, 0.02, 0.9999


def _jpeg(pixels: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


def _images(seed: int = 0) -> dict[str, bytes]:
    """Photo-like JPEGs of mixed sizes (baseline, progressive, 4:4:4, EXIF-rotated), and files that take the
    CPU path (grayscale, CMYK, PNG)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(12):
        h, w = (int(v) for v in rng.integers(224, 1025, 2))
        out[f"jpeg-{i:02d}"] = _jpeg(
            photo_like(rng, h, w), progressive=i % 4 == 1, subsampling=2 if i % 3 else 0
        )
    exif = Image.Exif()
    exif[0x0112] = 6
    out["jpeg-rotated"] = _jpeg(photo_like(rng, 300, 500), exif=exif)
    out["cpu-grayscale"] = _jpeg(photo_like(rng, 256, 320)[..., 0])
    buf = io.BytesIO()
    Image.fromarray(photo_like(rng, 240, 200)).convert("CMYK").save(buf, format="JPEG")
    out["cpu-cmyk"] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(photo_like(rng, 200, 260)).save(buf, format="PNG")
    out["cpu-png"] = buf.getvalue()
    return out


def test_nvjpeg_patches_are_close_to_the_cpu_path():
    config = PRESETS["dinov3_vitl16"].config()  # real patch size and pixel budget; no weights needed
    rule = {"max_patches": None, "min_pixels": None, "max_pixels": None, "size": None}
    args = argparse.Namespace(
        resample=None, max_decoded_pixels=MAX_DECODED_PIXELS, workers=4, dtype="float32"
    )
    images = _images()
    loads = GpuDecoder(
        config, args, rule, torch.device("cuda"), read=lambda data: data,
        fallback=lambda data: preprocess_bytes(data, config, args, rule),
    )  # fmt: skip
    try:
        futures = {name: loads.submit(data) for name, data in images.items()}
        got = {name: f.result() for name, f in futures.items()}
    finally:
        loads.close()
    std = torch.tensor(config.image_std).repeat_interleave(config.patch_size**2)
    measured = {}
    for name, data in images.items():
        patches, grid = got[name]
        want, want_grid = preprocess_bytes(data, config, args, rule)
        assert torch.equal(grid, want_grid), name
        assert patches.device.type == ("cpu" if name.startswith("cpu-") else "cuda"), name
        assert (gpu_route(data, MAX_DECODED_PIXELS) is None) == name.startswith("cpu-"), name
        diff = (patches.cpu() - want).abs() * std * 255
        measured[name] = (round(float(diff.mean()), 3), round(float((diff > FAR_LEVELS).float().mean()), 4))
    report = f"(mean levels, share over {FAR_LEVELS:g} levels) per image: {measured}"
    assert all(v == (0, 0) for k, v in measured.items() if k.startswith("cpu-")), report
    assert all(mean <= MEAN_LEVELS and far <= FAR_SHARE for mean, far in measured.values()), report
    assert loads.counts == {"gpu": 13, "cpu": 3}, loads.summary()


def test_decode_gpu_features_match_decode_cpu(tmp_path, capsys):
    pq = pytest.importorskip("pyarrow.parquet", reason="shards are written as parquet")
    from weights_convert.check import save_tiny_reference

    model = pv.from_pretrained(save_tiny_reference("dinov3", "gelu", tmp_path / "hf"))
    model_dir = model.save_pretrained(tmp_path / "model")
    images = _images(seed=1)
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in images.items():
            ext = "png" if name.endswith("png") else "jpg"
            info = tarfile.TarInfo(f"{name}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    folder = tmp_path / "files"
    folder.mkdir()
    for name, data in images.items():
        (folder / f"{name}.{'png' if name.endswith('png') else 'jpg'}").write_bytes(data)
    common = ["--model", str(model_dir), "--device", "cuda", "--dtype", "float32", "--attn-backend", "sdpa"]
    counted = "--decode gpu: 13 JPEGs decoded on cuda, 3 images on the CPU"
    for decode in ("cpu", "gpu"):
        for inputs, out in ((shard, f"wds-{decode}"), (folder, f"files-{decode}")):
            tokens = ["--tokens"] if inputs == shard else []
            argv = ["encode", *common, *tokens, "--out", str(tmp_path / out), str(inputs), "--decode", decode]
            code = main(argv)
            err = capsys.readouterr().err
            assert code == 0, err
            assert (counted in err) == (decode == "gpu"), err
    cpu = pq.read_table(tmp_path / "wds-cpu" / "00000.parquet")
    gpu = pq.read_table(tmp_path / "wds-gpu" / "00000.parquet")
    assert json.loads(gpu.schema.metadata[b"packvit"])["settings"]["decode"] == "gpu"
    assert gpu.column("key").to_pylist() == cpu.column("key").to_pylist()
    assert gpu.column("grid_thw").to_pylist() == cpu.column("grid_thw").to_pylist()
    keys = cpu.column("key").to_pylist()
    tokens = {run: load_file(tmp_path / run / "00000.safetensors") for run in ("wds-cpu", "wds-gpu")}
    measured = {}
    for i, key in enumerate(keys):
        rows = slice(int(tokens["wds-cpu"]["offsets"][i]), int(tokens["wds-cpu"]["offsets"][i + 1]))
        from_shards = _cosine(tokens["wds-cpu"]["features"][rows], tokens["wds-gpu"]["features"][rows])
        files = [
            load_file(tmp_path / run / f"{key}.safetensors")["features"] for run in ("files-cpu", "files-gpu")
        ]
        measured[key] = (from_shards, _cosine(*files))
    report = f"mean token cosine (shards, files) per image: {measured}"
    assert all(min(v) >= MIN_COSINE for v in measured.values()), report
    assert all(min(v) >= 0.999999 for k, v in measured.items() if k.startswith("cpu-")), (
        report
    )  # the CPU path
    a, b = np.stack(cpu.to_pandas().embedding), np.stack(gpu.to_pandas().embedding)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() >= MIN_COSINE, dict(zip(keys, cosine.round(6).tolist(), strict=True))


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(float(torch.nn.functional.cosine_similarity(a, b, dim=1).mean()), 6)
