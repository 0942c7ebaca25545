"""pv.preprocess against transformers' own image processors (PIL backends), plus its other input kinds."""

import io
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessorPil, Siglip2ImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
from transformers.models.siglip2.image_processing_pil_siglip2 import get_image_size_for_max_num_patches

import packvit_native as pv
from packvit_native.preprocess import (
    LOADING_NICENESS,
    LoadingThreads,
    default_resize,
    naflex_size,
    smart_size,
    target_size,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# square, wide, tall, tiny (upscaled), extreme aspect, already on the grid
SIZES = [(300, 500), (37, 91), (480, 320), (10, 10), (20, 400), (64, 64)]


def _config(**changes) -> pv.EncoderConfig:
    base = {
        "family": "dinov3",
        "patch_size": 16,
        "hidden_size": 32,
        "num_layers": 1,
        "num_heads": 4,
        "mlp_hidden": 48,
    }
    return pv.EncoderConfig(**{**base, **changes}).validate()


def _siglip2_config(**changes) -> pv.EncoderConfig:
    return _config(
        family="siglip2", pos_embed="learned", pos_grid=(4, 4), pos_resize="bilinear_antialias",
        patch_layout="hwc", image_mean=(0.5,) * 3, image_std=(0.5,) * 3, resize_max_patches=256, **changes,
    )  # fmt: skip


def _images(sizes=SIZES, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.mark.parametrize("max_patches", [64, 256])
def test_siglip2_naflex_matches_transformers_processor(max_patches):
    images = _images()
    ref = Siglip2ImageProcessorPil(max_num_patches=max_patches)(images, return_tensors="pt")
    patches, grid = pv.preprocess(images, _siglip2_config(), max_patches=max_patches)
    assert grid[:, 0].tolist() == [1] * len(images)
    assert grid[:, 1:].tolist() == ref["spatial_shapes"].tolist()
    counts = ref["pixel_attention_mask"].sum(1).tolist()
    expected = torch.cat([ref["pixel_values"][i, :n] for i, n in enumerate(counts)])
    assert torch.equal(patches, expected)


def test_siglip2_default_rule_is_256_patches():
    assert default_resize(_siglip2_config()) == {"max_patches": 256}
    images = _images(SIZES[:2])
    ref = Siglip2ImageProcessorPil()(images, return_tensors="pt")
    _, grid = pv.preprocess(images, _siglip2_config())
    assert grid[:, 1:].tolist() == ref["spatial_shapes"].tolist()


def test_naflex_and_smart_sizes_match_transformers():
    for h in range(1, 700, 23):
        for w in range(1, 1300, 41):
            for budget in (1, 16, 256, 1024):
                assert naflex_size(h, w, 16, budget) == get_image_size_for_max_num_patches(h, w, 16, budget)
            for lo, hi in ((56 * 56, 28 * 28 * 64), (28 * 28 * 40, 28 * 28 * 1280)):
                if max(h, w) / min(h, w) <= 200:  # transformers refuses wilder aspect ratios
                    assert smart_size(h, w, 28, lo, hi) == smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)


def test_qwen2vl_smart_resize_and_merge_order_match_transformers_processor():
    """Qwen2-VL's processor: smart resize to multiples of 28, bicubic, CLIP stats, patches in 2x2 merge order."""
    images = _images()
    lo, hi = 56 * 56, 28 * 28 * 64
    ref = Qwen2VLImageProcessorPil(min_pixels=lo, max_pixels=hi)(images, return_tensors="pt")
    config = _config(
        patch_size=14, merge_size=2, image_mean=CLIP_MEAN, image_std=CLIP_STD, resample="bicubic"
    )
    patches, grid = pv.preprocess(images, config, min_pixels=lo, max_pixels=hi)
    assert grid.tolist() == ref["image_grid_thw"].tolist()
    # A 2D model takes one temporal slot of Qwen's patches, (c, t, y, x) inside a patch: slot 0.
    expected = ref["pixel_values"].reshape(-1, 3, 2, 14, 14)[:, :, 0].reshape(-1, 3 * 14 * 14)
    assert torch.equal(patches, expected)
    # The Qwen-VL towers' own config (temporal patches of 2, the processor's pixel budget) takes its output
    # unchanged: each still image repeated over both temporal slots.
    qwen = config.replace(temporal_patch_size=2, resize_min_pixels=lo, resize_max_pixels=hi)
    patches, grid = pv.preprocess(images, qwen)
    assert grid.tolist() == ref["image_grid_thw"].tolist()
    assert torch.equal(patches, ref["pixel_values"])


def test_tensor_inputs_agree_with_pil():
    images = _images([(64, 48), (50, 70)])
    as_uint8 = [torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in images]
    config = _config()
    # on the grid already: no resize, so every input kind gives the same bits
    a, ga = pv.preprocess(images[0], config, size=(64, 48))
    b, gb = pv.preprocess(as_uint8[0], config, size=(64, 48))
    c, gc = pv.preprocess(as_uint8[0].float() / 255, config, size=(64, 48))
    assert torch.equal(a, b) and torch.equal(ga, gb) and torch.equal(gb, gc)
    torch.testing.assert_close(b, c, rtol=0, atol=1e-5)
    # resized: torch's antialiased bilinear follows PIL's up to PIL's 8-bit rounding
    a, ga = pv.preprocess(images, config, max_patches=40)
    b, gb = pv.preprocess(as_uint8, config, max_patches=40)
    assert torch.equal(ga, gb)
    assert (a - b).abs().max() <= 1.5 / 255 / min(config.image_std)
    # a batched [B, C, H, W] tensor is B images; a [T, C, H, W] clip in a list is one entry of t = T
    batch = torch.rand(2, 3, 32, 32)
    _, grid = pv.preprocess(batch, config, size=(32, 32))
    assert grid.tolist() == [[1, 2, 2], [1, 2, 2]]
    _, grid = pv.preprocess([batch], config, size=(32, 32))
    assert grid.tolist() == [[2, 2, 2]]


def test_paths_grayscale_and_model_argument(tmp_path, tiny_reference):
    images = _images([(40, 24)])
    images[0].save(tmp_path / "x.png")
    images[0].convert("L").save(tmp_path / "gray.png")
    model = pv.from_pretrained(tiny_reference("dinov3", "gelu"))
    from_path, g1 = pv.preprocess(str(tmp_path / "x.png"), model)
    from_pil, g2 = pv.preprocess(images[0], model.config)
    assert torch.equal(from_path, from_pil) and torch.equal(g1, g2)
    gray, grid = pv.preprocess(tmp_path / "gray.png", model)
    c = gray.reshape(gray.shape[0], 3, -1)  # DINOv3 patches are (c, y, x): equal pixels in every channel
    std, mean = torch.tensor(model.config.image_std), torch.tensor(model.config.image_mean)
    raw = c * std[:, None] + mean[:, None]
    torch.testing.assert_close(raw[:, 0], raw[:, 1], rtol=0, atol=1e-6)
    with torch.no_grad():
        assert model(gray, grid).shape == (int(grid.prod()), model.config.hidden_size)


def test_default_rules_per_position_kind():
    fixed = _config(pos_embed="learned", pos_grid=(3, 5), family="siglip")
    assert target_size(480, 640, fixed) == (48, 80)
    assert default_resize(_config()) == {"min_pixels": 16 * 16 * 16, "max_pixels": 1024 * 16 * 16}
    assert target_size(64, 96, _config()) == (64, 96)  # within budget: native size
    h, w = target_size(4000, 3000, _config())
    assert h % 16 == w % 16 == 0 and h * w <= 1024 * 256 and abs(h / w - 4 / 3) < 0.05


def test_bad_inputs_raise_value_error(tmp_path):
    config = _config()
    (tmp_path / "bad.jpg").write_bytes(b"\x00not an image")
    with pytest.raises(ValueError, match=r"bad\.jpg"):
        pv.preprocess(tmp_path / "bad.jpg", config)
    with pytest.raises(ValueError, match="one resize rule"):
        pv.preprocess(_images([(20, 20)]), config, max_patches=16, max_pixels=4096)
    with pytest.raises(ValueError, match="multiple of 16"):
        pv.preprocess(_images([(20, 20)]), config, size=(20, 20))
    with pytest.raises(ValueError, match="C = 3"):
        pv.preprocess(torch.rand(1, 4, 20, 20)[0, :2], config)
    with pytest.raises(ValueError, match="resample"):
        pv.preprocess(_images([(20, 20)]), config, resample="lanczos")
    with pytest.raises(ValueError, match="no images"):
        pv.preprocess([], config)
    for dtype in (
        torch.uint8,
        torch.float32,
    ):  # a clip of no frames, as a video reader gives for a broken file
        with pytest.raises(ValueError, match=r"image 1 is empty: shape \(0, 3, 32, 32\)"):
            pv.preprocess(
                [torch.zeros(3, 32, 32, dtype=dtype), torch.zeros(0, 3, 32, 32, dtype=dtype)], config
            )
    with pytest.raises(ValueError, match=r"image 0 is empty"):
        pv.patchify([torch.zeros(0, 3, 16, 16)], 16)
    with pytest.raises(ValueError, match="merge"):
        pv.preprocess(_images([(20, 20)]), config.replace(merge_size=2), size=(48, 64))


def test_a_damaged_exif_block_still_gives_the_upright_image(tmp_path):
    """A Make tag stored as a number (as some phones write) makes Pillow's exif_transpose raise; the orientation
    tag is then read alone, so the image is still turned upright, not refused or crashed on."""
    import io

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112], exif[0x010F] = 6, "Canon"  # orientation: rotated 90 degrees; Make
    exif[0x8769] = {0x9003: "2020:01:01 00:00:00"}  # an Exif sub-IFD: exif_transpose then rewrites the block
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes())
    data = bytearray(buffer.getvalue())
    make = data.index(b"\x01\x0f\x00\x02")  # the IFD entry of Make, type ASCII (2), big-endian
    data[make + 3] = 11  # -> FLOAT
    (tmp_path / "phone.jpg").write_bytes(bytes(data))
    from PIL import ImageOps

    with Image.open(tmp_path / "phone.jpg") as im, pytest.raises(Exception):  # noqa: B017 -- Pillow's failure
        im.load()
        ImageOps.exif_transpose(im)
    config = _config()
    got = pv.preprocess(tmp_path / "phone.jpg", config, size=(48, 32))
    stored = Image.open(tmp_path / "phone.jpg").convert("RGB")  # a PIL image is taken as it is, unturned
    want = pv.preprocess(stored.transpose(Image.Transpose.ROTATE_270), config, size=(48, 32))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_the_decoded_pixel_limit_is_ours_whatever_pillows_is(tmp_path, monkeypatch):
    from packvit_native.preprocess import refused_pixels

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses over 2000 pixels in Image.open
    Image.new("RGB", (100, 60)).save(tmp_path / "big.png")  # 6000 pixels
    config = _config()
    with pytest.raises(ValueError, match="declares 6000 pixels, over the limit of 500 decoded") as lower:
        pv.preprocess(tmp_path / "big.png", config, max_decoded_pixels=500)  # Pillow's refusal, said as ours
    assert refused_pixels(str(lower.value)) == 6000
    assert pv.preprocess(tmp_path / "big.png", config, max_decoded_pixels=7000)[1].tolist() == [[1, 4, 6]]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert pv.preprocess(tmp_path / "big.png", config, max_decoded_pixels=None)[1].tolist() == [[1, 4, 6]]
    assert Image.MAX_IMAGE_PIXELS == 1000  # lifted while that image was opened

    class Unseekable(io.RawIOBase):  # a pipe or socket: read once, never rewound
        def __init__(self, data: bytes) -> None:
            self.data = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            return self.data.readinto(buffer)

    from packvit_native.preprocess import decode

    stream = Unseekable((tmp_path / "big.png").read_bytes())
    assert decode(stream, max_decoded_pixels=None).size == (100, 60)


def test_smart_size_keeps_the_pixel_budget_at_extreme_aspect_ratios():
    for h, w in [(1, 100000), (100000, 1), (3, 5000), (16, 70000)]:
        out_h, out_w = smart_size(h, w, 16, 4096, 262144)
        assert out_h % 16 == 0 and out_w % 16 == 0 and min(out_h, out_w) >= 16
        assert out_h * out_w <= 262144, (h, w, out_h, out_w)


def test_float_pixels_must_be_in_unit_range_and_uint8_is_read_as_0_255():
    """A float tensor in 0-255 would be normalised to values near 1,000 without a word; it is refused."""
    config = _config()
    pixels = torch.randint(0, 256, (3, 32, 48), dtype=torch.uint8)
    with pytest.raises(
        ValueError, match=r"image 0: a floating-point tensor must hold pixels in \[0, 1\].*255"
    ):
        pv.preprocess(pixels.float(), config, size=(32, 48))
    with pytest.raises(ValueError, match=r"uint8 \(0-255\) or floating point"):
        pv.preprocess(pixels.to(torch.int32), config, size=(32, 48))
    a, _ = pv.preprocess(pixels, config, size=(32, 48))
    b, _ = pv.preprocess(pixels.double() / 255, config, size=(32, 48))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_loading_threads_run_torch_single_threaded_and_leave_the_process_count_alone():
    """Each loading thread runs PyTorch's CPU operators on one thread; the creating thread keeps its count, and
    threads started after the pool is shut down get the process's count again. In a fresh process, so the
    thread counts start known."""
    code = """
import threading, torch
from packvit_native.preprocess import LoadingThreads
torch.set_num_threads(3)
pool = LoadingThreads(2)
inside = list(pool.map(lambda _: (torch.get_num_threads(), torch.ones(10**6).sum().item()), range(4)))
during = torch.get_num_threads()
pool.shutdown()
later = []
thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
thread.start(); thread.join()
print([n for n, _ in inside], during, later)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split("\n")[0] == "[1, 1, 1, 1] 3 [3]"


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread priorities are Linux's")
def test_loading_threads_run_at_a_lower_priority_than_the_thread_that_made_them():
    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    mine = niceness()
    pool = LoadingThreads(2)
    try:
        seen = set(pool.map(lambda _: niceness(), range(8)))
    finally:
        pool.shutdown()
    assert seen == {min(mine + LOADING_NICENESS, 19)}
    assert niceness() == mine
