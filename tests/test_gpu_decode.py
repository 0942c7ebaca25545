"""``--decode gpu`` (:mod:`packvit_native.gpu_decode`) on the CPU: which files take the GPU path, EXIF
orientation, grouping and fallbacks, with PIL standing in for nvJPEG so that only the decoder's own steps are
compared with the CPU path; and the command line's errors without torchvision or a GPU. The comparison with
real nvJPEG on a GPU is in ``test_gpu_decode_cuda.py``."""

import argparse
import io
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file
from shard_data import photo_like, samples, write_webdataset

from packvit_native import cli, gpu_decode
from packvit_native.gpu_decode import GpuDecoder, gpu_route, orient
from packvit_native.preprocess import MAX_DECODED_PIXELS
from packvit_native.shards import preprocess_bytes
from weights_convert.presets import PRESETS

CONFIG = PRESETS["dinov3_vitl16"].config()  # patch 16, bilinear, ImageNet mean and std; no weights needed
RULE = {"max_patches": None, "min_pixels": None, "max_pixels": None, "size": None}
REFUSE = b"nvjpeg-refuses-this"


def jpeg(pixels: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90, **save)
    return buf.getvalue()


def with_orientation(pixels: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg(pixels, exif=exif)


def pil_decode(data: list[torch.Tensor]) -> list[torch.Tensor]:
    """Stands in for nvJPEG: libjpeg's pixels, no EXIF orientation applied (nvJPEG applies none); refuses
    files carrying the REFUSE comment, as nvJPEG refuses what it cannot decode."""
    out = []
    for raw in data:
        blob = raw.numpy().tobytes()
        if REFUSE in blob:
            raise RuntimeError("refused")
        with Image.open(io.BytesIO(blob)) as im:
            out.append(torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1))
    return out


def decoder(
    resample: str | None = None, workers: int = 2, rule: dict | None = None, dtype: str = "float32",
    decode_jpegs=pil_decode,
) -> GpuDecoder:  # fmt: skip
    args = argparse.Namespace(
        resample=resample, max_decoded_pixels=MAX_DECODED_PIXELS, workers=workers, dtype=dtype
    )
    rule = rule or RULE
    return GpuDecoder(
        CONFIG, args, rule, torch.device("cpu"), read=lambda data: data,
        fallback=lambda data: preprocess_bytes(data, CONFIG, args, rule), decode_jpegs=decode_jpegs,
    )  # fmt: skip


def decode_one(loads: GpuDecoder, data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        return loads.submit(data).result()
    finally:
        loads.close()


def cpu_path(
    data: bytes, resample: str | None = None, rule: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    args = argparse.Namespace(resample=resample, max_decoded_pixels=MAX_DECODED_PIXELS)
    return preprocess_bytes(data, CONFIG, args, rule or RULE)


def levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| of normalised patches in 8-bit levels (channel-first patches: column // p*p is the channel)."""
    p2 = CONFIG.patch_size**2
    std = torch.tensor(CONFIG.image_std).repeat_interleave(p2)
    return (a - b).abs() * std * 255


def test_gpu_route_takes_plain_jpegs_only():
    rng = np.random.default_rng(0)
    pixels = photo_like(rng, 48, 64)
    assert gpu_route(jpeg(pixels), MAX_DECODED_PIXELS) == (48, 64, 1)
    assert gpu_route(jpeg(pixels, progressive=True), MAX_DECODED_PIXELS) == (48, 64, 1)
    assert gpu_route(with_orientation(pixels, 6), MAX_DECODED_PIXELS) == (48, 64, 6)
    plain = jpeg(pixels)
    others = {
        "grayscale": jpeg(pixels[..., 0]),
        "cmyk": _saved(Image.fromarray(pixels).convert("CMYK"), "JPEG"),
        "png": _saved(Image.fromarray(pixels), "PNG"),
        "truncated": plain[: len(plain) // 2],
        "arithmetic-coded": plain.replace(b"\xff\xc0", b"\xff\xc9", 1),  # SOF9 instead of SOF0
        "not a jpeg": b"\xff\xd8\xff this is not a jpeg\xff\xd9",
    }
    for what, data in others.items():
        assert gpu_route(data, MAX_DECODED_PIXELS) is None, what
    assert gpu_route(plain, 48 * 64 - 1) is None  # over --max-decoded-pixels: the CPU path refuses it
    # libjpeg's colour-space rule for three components
    assert gpu_decode._ycbcr({"jfif": 257, "adobe": 100, "adobe_transform": 0}, (82, 71, 66))
    assert not gpu_decode._ycbcr({"adobe": 100, "adobe_transform": 0}, (1, 2, 3))
    assert gpu_decode._ycbcr({"adobe": 100, "adobe_transform": 1}, (82, 71, 66))
    assert not gpu_decode._ycbcr({}, (82, 71, 66))
    assert gpu_decode._ycbcr({}, (1, 2, 3))


def _saved(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_turns_as_exif_transpose(orientation):
    pixels = photo_like(np.random.default_rng(orientation), 24, 40)
    data = with_orientation(pixels, orientation)
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    got = orient(pil_decode([torch.frombuffer(bytearray(data), dtype=torch.uint8)])[0], orientation)
    np.testing.assert_array_equal(got.permute(1, 2, 0).numpy(), want)


@pytest.mark.parametrize("resample", [None, "bicubic"])
def test_decoder_matches_the_cpu_path(resample):
    """Given libjpeg's pixels, the GPU steps give the CPU path's patches: bit for bit where no resize is
    needed, and elsewhere within a level or so of PIL's fixed-point resize (Pillow 13 sometimes takes its two
    passes in the other order, and bicubic sharpening makes the intermediate rounding count up to 3 levels);
    other files take the CPU path itself."""
    rng = np.random.default_rng(1)
    exact = jpeg(photo_like(rng, 160, 224))  # whole patches within the pixel budget: not resized
    resized = {
        "shrunk": jpeg(photo_like(rng, 700, 900)),
        "grown": jpeg(photo_like(rng, 40, 50)),
        "large": jpeg(photo_like(rng, 1024, 768)),
        "rotated": with_orientation(photo_like(rng, 300, 170), 6),
        "mirrored": with_orientation(photo_like(rng, 130, 333), 2),
        "progressive": jpeg(photo_like(rng, 210, 190), progressive=True),
    }
    cpu_only = {
        "png": _saved(Image.fromarray(photo_like(rng, 50, 70)), "PNG"),
        "grayscale": jpeg(photo_like(rng, 64, 48)[..., 1]),
        "cmyk": _saved(Image.fromarray(photo_like(rng, 33, 65)).convert("CMYK"), "JPEG"),
        "refused by nvjpeg": jpeg(photo_like(rng, 77, 99), comment=REFUSE),
    }
    corrupt = b"\xff\xd8\xff this is not a jpeg"
    inputs = [exact, *resized.values(), *cpu_only.values(), corrupt]
    loads = decoder(resample)
    try:
        futures = [loads.submit(data) for data in inputs]  # all queued at once: decoded in groups
        results = [f.exception() or f.result() for f in futures]
    finally:
        loads.close()
    want = [cpu_path(data, resample) for data in inputs[:-1]]

    torch.testing.assert_close(results[0], want[0], rtol=0, atol=0)
    for i, name in enumerate(resized, start=1):
        (patches, grid), (want_patches, want_grid) = results[i], want[i]
        assert torch.equal(grid, want_grid), name
        diff = levels(patches, want_patches)
        assert diff.max() <= 3.01 and diff.mean() < 0.2, (name, float(diff.max()), float(diff.mean()))
    for i, name in enumerate(cpu_only, start=1 + len(resized)):
        torch.testing.assert_close(results[i], want[i], rtol=0, atol=0, msg=name)
    assert isinstance(results[-1], ValueError)
    with pytest.raises(ValueError) as cpu_error:
        cpu_path(corrupt)
    assert str(results[-1]) == str(cpu_error.value)
    n_gpu, n_cpu = 1 + len(resized), len(cpu_only)
    assert loads.summary() == f"--decode gpu: {n_gpu} JPEGs decoded on cpu, {n_cpu} images on the CPU"


@pytest.mark.parametrize("resample", ["bilinear", "bicubic"])
@pytest.mark.parametrize(("shape", "size"), [((208, 300), (208, 160)), ((120, 96), (240, 96))])
def test_one_axis_resize_matches_pil_nearly_bit_for_bit(resample, shape, size):
    """Resized along one axis (where the order of PIL's passes does not matter), all but a fraction of a
    percent of the values equal PIL's, the rest one level off."""
    data = jpeg(photo_like(np.random.default_rng(4), *shape))
    rule = {**RULE, "size": size}
    patches, grid = decode_one(decoder(resample, workers=1, rule=rule), data)
    want_patches, want_grid = cpu_path(data, resample, rule)
    assert torch.equal(grid, want_grid)
    diff = levels(patches, want_patches)
    assert diff.max() <= 1.01 and diff.mean() < 0.005, (float(diff.max()), float(diff.mean()))


def test_patches_come_in_the_model_dtype_with_the_cast_of_the_forward():
    data = jpeg(photo_like(np.random.default_rng(6), 160, 224))  # not resized
    patches, _ = decode_one(decoder(workers=1, dtype="bfloat16"), data)
    assert patches.dtype == torch.bfloat16 and torch.equal(patches, cpu_path(data)[0].to(torch.bfloat16))


def test_unforeseen_device_failure_falls_back_to_the_cpu_path():
    def broken(data):
        raise torch.cuda.OutOfMemoryError("pretend") if len(data) > 1 else ZeroDivisionError("pretend")

    loads = decoder(workers=1, decode_jpegs=broken)
    data = jpeg(photo_like(np.random.default_rng(2), 100, 120))
    got = decode_one(loads, data)
    torch.testing.assert_close(got, cpu_path(data), rtol=0, atol=0)
    assert "the GPU path failed 1 time(s), first: ZeroDivisionError: pretend" in loads.summary()


def test_decode_gpu_needs_torchvision_and_a_cuda_device(tmp_path, monkeypatch, capsys):
    image = tmp_path / "a.jpg"
    image.write_bytes(jpeg(photo_like(np.random.default_rng(3), 32, 32)))
    out = tmp_path / "out"
    argv = [
        "encode",
        "--model",
        "unused",
        "--out",
        str(out),
        str(image),
        "--decode",
        "gpu",
        "--device",
        "cpu",
    ]
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as where torchvision is not installed
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "torchvision cannot be imported" in err and "pip install torchvision" in err
    assert not out.exists() or not any(out.iterdir())

    fake = types.ModuleType("torchvision")
    fake.io = types.ModuleType("torchvision.io")
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    monkeypatch.setitem(sys.modules, "torchvision.io", fake.io)
    assert cli.main(argv) == 2
    assert (
        "--decode gpu decodes JPEGs on a CUDA device; this run's --device is cpu" in capsys.readouterr().err
    )


def test_command_line_wiring_with_pil_standing_in_for_nvjpeg(model_dir, tmp_path, monkeypatch, capsys):
    """Folders and webdataset shards through ``--decode gpu`` on the CPU: the same images encoded, features
    within the resize's rounding of ``--decode cpu``, the setting recorded, the summary counting each path."""
    pq = pytest.importorskip("pyarrow.parquet", reason="shards are written as parquet")
    monkeypatch.setattr(cli, "nvjpeg_decoder", lambda device: pil_decode)
    monkeypatch.setattr(gpu_decode, "nvjpeg_decoder", lambda device: pil_decode)
    shards = write_webdataset(tmp_path / "wds", shards=2, per_shard=5)
    folder = tmp_path / "files"
    folder.mkdir()
    for key, data, ext in samples(7, 6):
        (folder / f"{key.replace('/', '-')}.{ext}").write_bytes(data)
    common = ["--model", str(model_dir), "--device", "cpu", "--workers", "2", "--max-tokens", "300"]

    def run(*args: str) -> tuple[int, str]:
        code = cli.main(["encode", *common, *args])
        return code, capsys.readouterr().err

    for decode in ("cpu", "gpu"):  # samples: jpg, png, corrupt, jpg, png (, webp)
        code, err = run("--out", str(tmp_path / f"wds-{decode}"), *map(str, shards), "--decode", decode)
        assert code == 1 and "2 samples unreadable" in err  # the corrupt sample of each shard
        assert ("--decode gpu: 4 JPEGs decoded on cpu, 4 images on the CPU" in err) == (decode == "gpu")
        code, err = run("--out", str(tmp_path / f"files-{decode}"), str(folder), "--decode", decode)
        assert code == 1 and "1 image unreadable" in err
        assert ("--decode gpu: 2 JPEGs decoded on cpu, 3 images on the CPU" in err) == (decode == "gpu")
    for name in ("00000", "00001"):
        cpu = pq.read_table(tmp_path / "wds-cpu" / f"{name}.parquet").to_pydict()
        gpu = pq.read_table(tmp_path / "wds-gpu" / f"{name}.parquet").to_pydict()
        assert gpu["key"] == cpu["key"] and gpu["grid_thw"] == cpu["grid_thw"]
        np.testing.assert_allclose(np.array(gpu["embedding"]), np.array(cpu["embedding"]), atol=1e-3)
    for path in sorted((tmp_path / "files-cpu").rglob("*.safetensors")):
        other = tmp_path / "files-gpu" / path.relative_to(tmp_path / "files-cpu")
        cpu, gpu = load_file(path), load_file(other)
        assert torch.equal(cpu["grid_thw"], gpu["grid_thw"])
        torch.testing.assert_close(gpu["features"], cpu["features"], rtol=0, atol=0.05)
    # the decoder is a setting of the folder: a rerun with the other one is refused
    code, err = run("--out", str(tmp_path / "wds-gpu"), *map(str, shards))
    assert code == 2 and "differing: decode" in err
