"""MLCD: converted by our CLI, packed, and compared with transformers' ``MLCDVisionModel`` image by image; the
published key layout (under ``vision_model.``) and the converter's refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import packvit_native as pv
from tests.parity import assert_packed_parity, assert_packing_invariant, load_reference
from weights_convert.cli import main as convert_cli
from weights_convert.convert import convert_checkpoint
from weights_convert.errors import ConversionError
from weights_convert.families.common import CLIP_STATS


def _copy(src, dst, edit_state=None, edit_config=None):
    """A copy of a tiny checkpoint with its tensors and/or config edited."""
    dst.mkdir()
    state = load_file(src / "model.safetensors")
    save_file(edit_state(state) if edit_state else state, dst / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(edit_config(cfg) if edit_config else cfg))
    return dst


def test_mlcd_parity_through_cli(tiny_reference, tmp_path):
    src = tiny_reference("mlcd", "default")
    assert convert_cli([str(src), str(tmp_path / "out")]) == 0
    model = pv.from_pretrained(tmp_path / "out", attn_backend="sdpa")
    c = model.config
    assert (c.num_cls, c.pos_embed, c.rope, c.rope_fp32, c.rope_cls) == (1, "none", "index", True, True)
    assert (c.embed_norm, c.final_norm, c.head, c.patch_bias) == (True, False, "cls_norm", False)
    assert (c.resample, c.resize_max_patches, (c.image_mean, c.image_std)) == ("bicubic", 64, CLIP_STATS)
    rows = assert_packed_parity(
        model, load_reference(src), expect=("last_hidden_state", "prefix_tokens", "pooler_output")
    )
    assert any(r["grid"] == "1x1x1" for r in rows) and any(r["grid"].startswith("2x") for r in rows)


def test_class_token_angles_are_used(tiny_reference):
    """The class token's learned angles reach the blocks: zeroing them changes every output."""
    model = pv.from_pretrained(tiny_reference("mlcd", "default"), attn_backend="sdpa")
    patches, grid = model.patchify([torch.randn(3, 16, 12)])
    with torch.no_grad():
        before = model(patches, grid)
        model.positions.cls_angles.zero_()
        after = model(patches, grid)
    assert (before - after).abs().max() > 1e-3


def test_published_layout_under_vision_model(tiny_reference, tmp_path):
    """DeepGlint's published weights keep the tower under ``vision_model.`` (with transformers 4's buffers)."""
    src = tiny_reference("mlcd", "default")

    def prefixed(state):
        out = {f"vision_model.{k}": v for k, v in state.items()}
        return out | {"vision_model.embeddings.position_ids": torch.arange(65)[None]}

    published = _copy(src, tmp_path / "published", prefixed)
    a, b = pv.from_pretrained(src), pv.from_pretrained(published)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    both = _copy(
        src, tmp_path / "both", lambda s: s | {"vision_model.class_pos_emb": s["class_pos_emb"].clone()}
    )
    with pytest.raises(ConversionError, match="class_pos_emb appears both with and without"):
        convert_checkpoint(both)


def test_packing_invariance(tiny_reference):
    assert_packing_invariant(pv.from_pretrained(tiny_reference("mlcd", "default"), attn_backend="sdpa"))


@pytest.mark.parametrize(
    ("edit_state", "edit_config", "message"),
    [
        (lambda s: s | {"encoder.layers.0.self_attn.rel_bias": torch.zeros(4)}, None,
         r"unknown checkpoint keys: encoder\.layers\.0\.self_attn\.rel_bias"),
        (lambda s: s | {"class_pos_emb": torch.zeros(1, 16)}, None,
         r"class_pos_emb has the wrong shape: it gives positions\.cls_angles shape \(1, 16\), but the config "
         r"implies \(1, 8\)"),
        (lambda s: {k: v for k, v in s.items() if k != "pre_layrnorm.bias"}, None,
         r"missing checkpoint keys: pre_layrnorm\.bias"),
        (None, lambda c: c | {"num_key_value_groups": 2}, "num_key_value_groups = 2: only 1"),
        (None, lambda c: c | {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}},
         "rope_type = 'yarn'"),
    ],
    ids=["unknown-key", "wrong-shape", "missing-key", "kv-groups", "rope-type"],
)  # fmt: skip
def test_converter_refuses(tiny_reference, tmp_path, edit_state, edit_config, message):
    bad = _copy(tiny_reference("mlcd", "default"), tmp_path / "bad", edit_state, edit_config)
    with pytest.raises(ConversionError, match=message):
        convert_checkpoint(bad)


def test_rope_type_default_reads_as_axial_as_transformers_reads_it(tiny_reference):
    from weights_convert.families import mlcd

    cfg = json.loads((tiny_reference("mlcd", "default") / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    assert mlcd.config_from_hf(cfg, None).rope == "index"
