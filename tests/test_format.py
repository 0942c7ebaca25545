"""Our checkpoint format: loading it needs the runtime alone, and version-1 folders (whose family defaults the
family modules keep) still load as before."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import packvit_native as pv

ROOT = Path(__file__).resolve().parents[1]

# What version 1 wrote for each family (the fields that changed meaning), and what they mean now.
V1 = {
    "dinov3": ({"positions": "rope2d", "patch_layout": "cpp"}, {"rope": "normalized", "pos_embed": "none",
               "resample": "bilinear", "resize_max_patches": None, "patch_layout": "chw"}),
    "siglip": ({"positions": "learned", "pos_grid": [8, 8], "pos_resize": "bicubic", "patch_layout": "cpp"},
               {"rope": "none", "pos_embed": "learned", "resample": "bicubic", "patch_layout": "chw"}),
    "siglip2": ({"positions": "learned", "pos_grid": [8, 8], "pos_resize": "bilinear_antialias", "patch_layout": "ppc"},
                {"pos_embed": "learned", "resample": "bilinear", "resize_max_patches": 256, "patch_layout": "hwc"}),
    "aimv2": ({"positions": "sincos2d", "patch_layout": "cpp"},
              {"pos_embed": "sincos2d", "rope": "none", "resample": "bicubic", "patch_layout": "chw"}),
}  # fmt: skip


NEW_IN_V2 = ("pos_embed", "rope", "rope_fp32", "resample", "resize_max_patches", "resize_min_pixels",
             "resize_max_pixels", "temporal_patch_size", "window_size", "full_attention_blocks", "out_hidden_size",
             "deepstack_layers")  # fmt: skip


@pytest.mark.parametrize("family", sorted(V1))
def test_version_1_configs_load_with_their_old_meaning(family):
    old, expected = V1[family]
    data = {"format": "packvit-native", "format_version": 1, "family": family, "patch_size": 4,
            "hidden_size": 32, "num_layers": 1, "num_heads": 2, "mlp_hidden": 48, **old}  # fmt: skip
    config = pv.EncoderConfig.from_dict(data)
    for field, value in expected.items():
        assert getattr(config, field) == value, field
    again = pv.EncoderConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and config.to_dict()["format_version"] == 2


def test_a_version_1_folder_gives_the_same_features(tiny_reference, tmp_path):
    model = pv.from_pretrained(tiny_reference("siglip2", "default"))
    out = model.save_pretrained(tmp_path / "v2")
    data = json.loads((out / "config.json").read_text())
    v1 = {k: v for k, v in data.items() if k not in NEW_IN_V2}
    v1 |= {"format_version": 1, "positions": "learned", "patch_layout": "cpp"}
    (out / "config.json").write_text(json.dumps(v1))
    old = pv.from_pretrained(out)
    assert old.config == model.config
    patches, grid = model.patchify([torch.randn(3, 12, 20)])
    with torch.no_grad():
        assert torch.equal(old(patches, grid), model(patches, grid))


def test_loading_our_format_never_imports_the_converter(tiny_reference, tmp_path):
    pv.from_pretrained(tiny_reference("dinov3", "gelu")).save_pretrained(tmp_path / "native")
    script = (
        "import sys, torch, packvit_native as pv\n"
        f"m = pv.from_pretrained({str(tmp_path / 'native')!r})\n"
        "m(*m.patchify([torch.randn(3, 8, 12)]))\n"
        "print(sorted(k for k in sys.modules if k.startswith(('weights_convert', 'transformers'))))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_earlier_names_keep_working():
    """Names code was written against before the segmentations and position terms were split up."""
    packing = pv.Packing.from_grid([[1, 2, 3], [2, 1, 1]], num_prefix=1)
    assert packing.tokens is packing.frames and packing.patches is packing.frame_patches
    x, prefix = torch.randn(8, 4), torch.randn(1, 4)
    assert torch.equal(packing.insert_prefix(x, prefix), packing.to_blocks(x, prefix))
    base = dict(family="x", patch_size=4, hidden_size=32, num_layers=1, num_heads=2, mlp_hidden=48)
    assert pv.EncoderConfig(**base, rope="normalized").positions == "rope2d"
    assert pv.EncoderConfig(**base, pos_embed="sincos2d").positions == "sincos2d"
    assert pv.EncoderConfig(**base, pos_embed="learned", pos_grid=(2, 2)).positions == "learned"
    assert pv.patchify([torch.randn(3, 8, 8)], 4, layout="ppc")[0].shape == (4, 48)
