"""Qwen2.5-VL and Qwen3-VL vision towers: converted by our CLI from whole vision-language checkpoints (and
from the tower saved alone), packed, and compared with transformers' own towers image by image; windows,
processor inputs, packing invariance and bad input."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessorPil
from transformers.vision_utils import get_vision_window_index

import packvit_native as pv
from packvit_native.packing import Packing
from tests.parity import (
    ATOL,
    assert_packed_parity,
    assert_same_weights,
    load_reference,
    tower_with_unreadable_lm,
)
from weights_convert.check import mixed_batch
from weights_convert.cli import main as convert_cli

CASES = [
    ("qwen2_5_vl", "vlm", ("last_hidden_state", "pooler_output")),
    ("qwen2_5_vl", "vision", ("last_hidden_state", "pooler_output")),
    ("qwen3_vl", "vlm", ("last_hidden_state", "pooler_output", "deepstack_features")),
    ("qwen3_vl", "vision", ("last_hidden_state", "pooler_output", "deepstack_features")),
    ("qwen3_vl", "qwen3_5", ("last_hidden_state", "pooler_output")),
    ("qwen3_vl", "moe_vision", ("last_hidden_state", "pooler_output", "deepstack_features")),
]


@pytest.mark.parametrize(("family", "variant", "outputs"), CASES)
def test_qwen_parity_through_cli(tiny_reference, tmp_path, capsys, family, variant, outputs):
    src = tiny_reference(family, variant)
    assert convert_cli([str(src), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert ("the language model" in printed) == (variant == "vlm")
    model = pv.from_pretrained(tmp_path / "out", attn_backend="sdpa")
    c = model.config
    assert (c.merge_size, c.temporal_patch_size, c.head, c.final_norm) == (2, 2, "merger", False)
    assert c.window_size == (4 if family == "qwen2_5_vl" else 0)
    images = mixed_batch(c)
    packing = model.pack(model.patchify(images)[1])
    if c.window_size:  # the batch holds partial windows and an image that is a single window
        windows = packing.windows.lengths
        assert len(set(windows)) > 2 and any(n == 4 for n in windows) and c.window_size**2 in windows
    rows = assert_packed_parity(model, load_reference(src), images, expect=outputs)
    assert any(r["grid"].startswith("2x") for r in rows), "a video entry with T > 1 temporal patches"


@pytest.mark.parametrize(("family", "variant"), [("qwen2_5_vl", "vlm"), ("qwen3_vl", "vlm")])
def test_qwen_outputs_layers_and_packing_invariance(tiny_reference, family, variant):
    model = pv.from_pretrained(tiny_reference(family, variant), attn_backend="sdpa")
    images = mixed_batch(model.config)
    patches, grid = model.patchify(images)
    with torch.no_grad():
        out = model(patches, grid, return_dict=True, output_hidden_states=True)
        picked = model(patches, grid, output_layers=(1, -1))
        assert len(picked) == 2
        torch.testing.assert_close(picked[0], out.hidden_states[1], rtol=0, atol=0)
        torch.testing.assert_close(picked[1], out.last_hidden_state, rtol=0, atol=0)
        m2 = model.config.merge_size**2
        start = merged = 0
        for image, (t, h, w) in zip(images, grid.tolist(), strict=True):
            alone = model(*model.patchify([image]), return_dict=True)
            n = t * h * w
            torch.testing.assert_close(
                alone.last_hidden_state, out.last_hidden_state[start : start + n], rtol=0, atol=1e-5
            )
            torch.testing.assert_close(
                alone.pooler_output, out.pooler_output[merged : merged + n // m2], rtol=0, atol=1e-5
            )
            for a, b in zip(alone.deepstack_features or (), out.deepstack_features or (), strict=True):
                torch.testing.assert_close(a, b[merged : merged + n // m2], rtol=0, atol=1e-5)
            start, merged = start + n, merged + n // m2
    assert out.pooler_output.shape == (patches.shape[0] // 4, model.config.out_hidden_size)
    assert (out.deepstack_features is not None) == (family == "qwen3_vl")


def test_processor_output_goes_in_unchanged(tiny_reference):
    """What Qwen's image processor emits (pixel_values in merge order, grid_thw in temporal patches) is the
    packed input as it stands; features match transformers' tower fed the same tensors."""
    src = tiny_reference("qwen2_5_vl", "vlm")
    model = pv.from_pretrained(src, attn_backend="sdpa")
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in ((40, 64), (9, 30), (57, 57))
    ]
    processor = Qwen2VLImageProcessorPil(
        patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=64, max_pixels=4096
    )
    inputs = processor(images, return_tensors="pt")
    ours_patches, ours_grid = pv.preprocess(images, model, min_pixels=64, max_pixels=4096)
    assert torch.equal(ours_grid, inputs["image_grid_thw"]) and torch.equal(
        ours_patches, inputs["pixel_values"]
    )
    hf = load_reference(src)
    with torch.no_grad():
        ours = model(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
        ref = hf(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    assert (ours.pooler_output - ref.pooler_output).abs().max() <= ATOL


def test_windows_match_transformers_window_index():
    """Window boundaries and token order of a mixed batch, built on the host, equal transformers' own."""
    grid = torch.tensor([[1, 16, 16], [1, 10, 22], [1, 2, 2], [2, 12, 8], [1, 26, 6]])
    packing = Packing.from_grid(grid, merge_size=2, window_size=8)
    index, cu = get_vision_window_index(grid, spatial_merge_size=2, window_size=56, patch_size=7)
    tokens = (index[:, None] * 4 + torch.arange(4)).flatten()
    assert torch.equal(packing.block_order, tokens)
    assert packing.windows.cu_seqlens.tolist() == cu.tolist()
    assert packing.frames.lengths == (256, 220, 4, 96, 96, 156)
    x = torch.randn(int(grid.prod(1).sum()), 3)
    assert torch.equal(packing.to_sequence(packing.to_blocks(x)), x)


def test_vision_tower_read_alone_from_a_vlm_checkpoint(tiny_reference, tmp_path):
    """Only the tower's tensors are read: the language model's shard is never opened."""
    src, ckpt = tiny_reference("qwen3_vl", "vlm"), tmp_path / "ckpt"
    tower_with_unreadable_lm(src, ckpt, lambda k: ".visual." in f".{k}")
    assert_same_weights(pv.from_pretrained(src), pv.from_pretrained(ckpt))


def test_bad_input_names_the_problem(tiny_reference):
    model = pv.from_pretrained(tiny_reference("qwen2_5_vl", "vlm"), attn_backend="sdpa")
    with pytest.raises(ValueError, match=r"5x6 patches.*2x2 merge blocks"):
        model(torch.randn(30, 96), [[1, 5, 6]])
    with pytest.raises(ValueError, match=r"C\*T\*p\*p = 3\*2\*4\*4 = 96"):
        model(torch.randn(16, 48), [[1, 4, 4]])
    with pytest.raises(ValueError, match="3 frames, which is not a whole number of temporal patches of 2"):
        model.patchify([torch.randn(3, 3, 16, 16)])
    with pytest.raises(ValueError, match="merge_size=1 is not possible"):
        pv.from_pretrained(tiny_reference("qwen2_5_vl", "vlm"), merge_size=1)


def test_still_image_is_its_frame_repeated(tiny_reference):
    model = pv.from_pretrained(tiny_reference("qwen3_vl", "vlm"), attn_backend="sdpa")
    image = torch.randn(3, 16, 24)
    a, grid_a = model.patchify([image])
    b, grid_b = model.patchify([torch.stack([image, image])])
    assert torch.equal(a, b) and grid_a.tolist() == grid_b.tolist() == [[1, 4, 6]]
