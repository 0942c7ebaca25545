"""InternViT: converted by our CLI from a whole InternVL checkpoint and from the tower saved alone, packed, and
compared with transformers' ``InternVLVisionModel`` image by image (the pooled output, our extension, against
the mean / class token of transformers' tokens); only the tower is read from a vision-language checkpoint;
the converter's refusals."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import packvit_native as pv
from tests.parity import (
    assert_packed_parity,
    assert_packing_invariant,
    assert_same_weights,
    load_reference,
    tower_with_unreadable_lm,
)
from weights_convert.cli import main as convert_cli
from weights_convert.convert import convert_checkpoint
from weights_convert.errors import ConversionError
from weights_convert.families.common import IMAGENET_STATS

POSITIONS = ("vision_tower.embeddings.position_embeddings", "embeddings.position_embeddings")


def _copy(src, dst, edit_state=None, edit_config=None):
    """A copy of a tiny checkpoint with its tensors and/or config edited."""
    dst.mkdir()
    state = load_file(src / "model.safetensors")
    save_file(edit_state(state) if edit_state else state, dst / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(edit_config(cfg) if edit_config else cfg))
    return dst


def _random_positions(state):
    """transformers initialises the position table to zeros: a wrong mapping of it would go unnoticed."""
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(v.shape, generator=g) if k in POSITIONS else v for k, v in state.items()}


@pytest.mark.parametrize(
    ("variant", "norm", "qk_norm", "head"),
    [("vlm", "layernorm", False, "cls"), ("vision", "layernorm", False, "mean"),
     ("qk_norm_rms", "rmsnorm", True, "mean")],
    ids=["vlm", "vision", "qk_norm_rms"],
)  # fmt: skip
def test_internvl_parity_through_cli(tiny_reference, tmp_path, capsys, variant, norm, qk_norm, head):
    src = _copy(tiny_reference("internvl", variant), tmp_path / "hf", _random_positions)
    assert convert_cli([str(src), str(tmp_path / "out")]) == 0
    assert ("the language model (language_model.*" in capsys.readouterr().out) == (variant == "vlm")
    model = pv.from_pretrained(tmp_path / "out", attn_backend="sdpa")
    c = model.config
    assert (c.norm, c.qk_norm, c.qkv_bias) == (norm, qk_norm, not qk_norm)
    assert (c.head, c.final_norm, c.layer_scale, c.num_cls) == (head, head == "cls", True, 1)
    assert (c.pos_grid, c.pos_resize, c.pos_embed_cls) == ((8, 8), "bicubic", True)
    assert (c.resample, c.resize_max_patches, (c.image_mean, c.image_std)) == ("bicubic", 64, IMAGENET_STATS)
    rows = assert_packed_parity(
        model, load_reference(src), expect=("last_hidden_state", "prefix_tokens", "pooler_output")
    )
    # The trained square size (table as is), other sizes (resized), a 1x1 grid and a 2-frame clip.
    assert {"1x8x8", "1x1x1", "2x6x4", "1x5x11"} <= {r["grid"] for r in rows}


def test_vision_tower_read_alone_from_a_vlm_checkpoint(tiny_reference, tmp_path):
    """Only the tower's tensors are read, by the converter and by the reference: the language model's shard
    is never opened."""
    src, ckpt = tiny_reference("internvl", "vlm"), tmp_path / "ckpt"
    vision = tower_with_unreadable_lm(src, ckpt, lambda k: k.startswith("vision_tower."))
    assert any(k.startswith("language_model.") for k in load_file(src / "model.safetensors"))
    assert_same_weights(pv.from_pretrained(src), pv.from_pretrained(ckpt))
    reference = load_reference(ckpt)
    assert torch.equal(reference.embeddings.cls_token, vision["vision_tower.embeddings.cls_token"])


def test_tower_under_its_module_path(tiny_reference, tmp_path):
    """``model.vision_tower.`` (transformers' module path) reads as ``vision_tower.`` (what save_pretrained
    writes); a key under both is refused."""
    src = tiny_reference("internvl", "vlm")
    moved = _copy(src, tmp_path / "moved", lambda s: {f"model.{k}" if k.startswith("vision_tower.") else k: v
                                                      for k, v in s.items()})  # fmt: skip
    a, b = pv.from_pretrained(src), pv.from_pretrained(moved)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    key = "vision_tower.embeddings.cls_token"
    both = _copy(src, tmp_path / "both", lambda s: s | {f"model.{key}": s[key].clone()})
    with pytest.raises(ConversionError, match=r"embeddings\.cls_token appears under more than one"):
        convert_checkpoint(both)


def _vision(**changes):
    return lambda c: c | {"vision_config": c["vision_config"] | changes}


@pytest.mark.parametrize("variant", ["vlm", "vision"])  # class-token and mean pooling
def test_packing_invariance(tiny_reference, variant):
    assert_packing_invariant(pv.from_pretrained(tiny_reference("internvl", variant), attn_backend="sdpa"))


@pytest.mark.parametrize(
    ("edit_state", "edit_config", "message"),
    [
        (lambda s: s | {"vision_tower.encoder.layer.0.attention.rel_bias": torch.zeros(4)}, None,
         r"unknown checkpoint keys: encoder\.layer\.0\.attention\.rel_bias"),
        (lambda s: s | {POSITIONS[0]: torch.zeros(1, 50, 64)}, None,
         r"embeddings\.position_embeddings has the wrong shape: it gives positions\.weight shape "
         r"\(49, 64\), but the config implies \(64, 64\)"),
        (lambda s: {k: v for k, v in s.items() if k != "vision_tower.layernorm.bias"}, None,
         r"missing checkpoint keys: layernorm\.bias"),
        (None, _vision(norm_type="rms_norm"), "'rms_norm' with use_mean_pooling false"),
        (None, _vision(use_qk_norm=True, layer_norm_eps=1e-5), "with use_qk_norm only 1e-06"),
        (None, _vision(attention_dropout=0.1), "attention_dropout = 0.1: dropout is not supported"),
        (None, _vision(image_size=[32, 48]), "only square sizes"),
    ],
    ids=["unknown-key", "wrong-shape", "missing-key", "rms-final-norm", "qk-norm-eps", "dropout", "non-square"],
)  # fmt: skip
def test_converter_refuses(tiny_reference, tmp_path, edit_state, edit_config, message):
    bad = _copy(tiny_reference("internvl", "vlm"), tmp_path / "bad", edit_state, edit_config)
    with pytest.raises(ConversionError, match=message):
        convert_checkpoint(bad)
