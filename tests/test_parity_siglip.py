"""SigLIP (fixed resolution) and SigLIP2 (NaFlex): converted by our CLI, packed, and compared with
transformers image by image; SigLIP2 also against transformers' own padded and masked batch, as its processor
builds it."""

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file

import packvit_native as pv
from tests.parity import ATOL, assert_packed_parity
from weights_convert.check import load_reference, mixed_batch
from weights_convert.cli import main as convert_cli
from weights_convert.convert import convert_checkpoint
from weights_convert.errors import ConversionError
from weights_convert.families.siglip2 import processor_inputs

POOLED = ("last_hidden_state", "pooler_output")


@pytest.mark.parametrize(
    ("family", "variant", "outputs"),
    [
        ("siglip", "default", POOLED),
        ("siglip", "no_head", ("last_hidden_state",)),
        ("siglip", "two_tower", POOLED),
        ("siglip2", "default", POOLED),
        ("siglip2", "two_tower", POOLED),
    ],
)
def test_siglip_parity_through_cli(tiny_reference, tmp_path, capsys, family, variant, outputs):
    src = tiny_reference(family, variant)
    assert convert_cli([str(src), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    if variant == "two_tower":
        assert "the text tower (text_model.*" in printed and "logit_bias" in printed
    model = pv.from_pretrained(tmp_path / "out", attn_backend="sdpa")
    assert model.config.pos_grid == (8, 8)
    assert model.config.pos_resize == ("bicubic" if family == "siglip" else "bilinear_antialias")
    assert_packed_parity(model, load_reference(src), expect=outputs)


def _compare_padded(model, hf_model, inputs, patches, grid_thw):
    """Ours on packed patches vs transformers on the padded batch, real tokens of each entry only."""
    with torch.no_grad():
        ours = model(patches, grid_thw, return_dict=True, output_hidden_states=True)
        ref = hf_model(**inputs, output_hidden_states=True)
    lengths = inputs["pixel_attention_mask"].sum(1).tolist()
    assert lengths == list(ours.packing.frame_patches.lengths)
    assert min(lengths) < inputs["pixel_values"].shape[1], "the batch must hold padding"
    start = 0
    for i, n in enumerate(lengths):
        sl = slice(start, start + n)
        worst = max(
            (ours.last_hidden_state[sl] - ref.last_hidden_state[i, :n]).abs().max(),
            (ours.pooler_output[i] - ref.pooler_output[i]).abs().max(),
            *(
                (a[sl] - b[i, :n]).abs().max()
                for a, b in zip(ours.hidden_states, ref.hidden_states, strict=True)
            ),
        )
        assert worst <= ATOL, f"entry {i} ({n} patches) differs by {worst:.2e}"
        start += n


def test_siglip2_processor_patches_go_in_unchanged(tiny_reference):
    """The NaFlex processor's channel-last patches, unpadded, into a model loaded with patch_layout="ppc"."""
    src = tiny_reference("siglip2", "default")
    model = pv.from_pretrained(src, attn_backend="sdpa", patch_layout="ppc")
    rng = np.random.default_rng(0)
    sizes = [(30, 50), (64, 16), (100, 100), (8, 120), (40, 24)]
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
    processor = transformers.Siglip2ImageProcessorPil(patch_size=4, max_num_patches=64)
    inputs = dict(processor(images=images, return_tensors="pt"))
    lengths = inputs["pixel_attention_mask"].sum(1)
    patches = torch.cat([pv_[:n] for pv_, n in zip(inputs["pixel_values"], lengths.tolist(), strict=True)])
    grid_thw = torch.cat([torch.ones(len(sizes), 1, dtype=torch.int64), inputs["spatial_shapes"]], dim=1)
    assert len(set(map(tuple, inputs["spatial_shapes"].tolist()))) >= 4
    _compare_padded(model, load_reference(src), inputs, patches, grid_thw)


def test_siglip2_mixed_batch_against_padded_batch(tiny_reference):
    """The mixed sizes (a 1x1 grid, a 2-frame clip) packed, vs one padded and masked transformers batch."""
    src = tiny_reference("siglip2", "default")
    model = pv.from_pretrained(src, attn_backend="sdpa", patch_layout="ppc")
    images = mixed_batch(model.config)
    frames = [f for im in images for f in (im if im.ndim == 4 else im[None])]
    inputs = processor_inputs(frames, 4, max_patches=max(f.shape[1] * f.shape[2] for f in frames) // 16 + 5)
    patches, grid_thw = model.patchify(images)
    assert model.config.patch_layout == "hwc" and (grid_thw[:, 0] == 2).any()
    _compare_padded(model, load_reference(src), inputs, patches, grid_thw)


def test_siglip2_patch_layouts_agree(tiny_reference):
    src = tiny_reference("siglip2", "default")
    cpp = pv.from_pretrained(src, attn_backend="sdpa")
    ppc = pv.from_pretrained(src, attn_backend="sdpa", patch_layout="ppc")
    assert cpp.config.patch_layout == "chw" and ppc.config.patch_layout == "hwc"
    images = mixed_batch(cpp.config)
    with torch.no_grad():
        a = cpp(*cpp.patchify(images))
        b = ppc(*ppc.patchify(images))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # the same sums in another order


def test_siglip2_rejects_non_square_table(tiny_reference, tmp_path):
    src = tiny_reference("siglip2", "default")
    out = tmp_path / "bad"
    out.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "num_patches": 60}))
    (out / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    with pytest.raises(ConversionError, match=r"'num_patches' = 60 is not a positive perfect square"):
        convert_checkpoint(out)


def test_siglip_head_in_proj_must_split_in_three(tiny_reference, tmp_path):
    src = tiny_reference("siglip", "default")
    state = load_file(src / "model.safetensors")
    state["head.attention.in_proj_bias"] = torch.zeros(190)
    out = tmp_path / "bad"
    out.mkdir()
    (out / "config.json").write_text((src / "config.json").read_text())
    save_file(state, out / "model.safetensors")
    with pytest.raises(ConversionError, match=r"head.attention.in_proj_bias: cannot split shape \(190,\)"):
        convert_checkpoint(out)
