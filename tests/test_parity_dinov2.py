"""DINOv2 with and without registers: converted by our CLI, packed, and compared with transformers'
Dinov2Model / Dinov2WithRegistersModel image by image; the position table's resizing on its own, against
transformers and (antialiased, for the registers model) against PIL; the converter's refusals."""

import json

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file

import packvit_native as pv
from packvit_native.preprocess import target_size
from tests.parity import assert_packed_parity, load_reference
from weights_convert.check import mixed_batch
from weights_convert.cli import main as convert_cli
from weights_convert.convert import convert_checkpoint
from weights_convert.errors import ConversionError
from weights_convert.families import dinov2
from weights_convert.families.common import IMAGENET_STATS

OUTPUTS = ("last_hidden_state", "prefix_tokens", "pooler_output")
# Grids one patch wide or high (where PyTorch's CPU antialiased resize has a wrong path for some memory
# layouts), 1x1, non-square both ways, the trained 8x8, and 4x16: as many patches as the table but not square.
GRIDS = [(5, 1), (16, 1), (2, 1), (1, 5), (1, 16), (1, 1), (3, 11), (13, 3), (8, 8), (4, 16), (12, 16)]


def _copy(src, dst, edit_state=None, **config_changes):
    """A copy of the checkpoint ``src`` with its tensors and config.json edited."""
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **config_changes}))
    state = load_file(src / "model.safetensors")
    save_file(edit_state(state) if edit_state else state, dst / "model.safetensors")
    return dst


def _sharpened(state):
    """Unit-scale registers and position table: the tiny reference leaves the registers at zero (two equal
    registers could swap unnoticed) and the table at std 0.02 (a wrong resize would show only faintly)."""
    g = torch.Generator().manual_seed(1)
    for key in ("embeddings.register_tokens", "embeddings.position_embeddings"):
        if key in state:
            state[key] = torch.randn(state[key].shape, generator=g)
    return state


@pytest.fixture(scope="module")
def sharp(tiny_reference, tmp_path_factory):
    """``sharp(variant)`` -> a tiny reference with :func:`_sharpened` tensors (built once per variant)."""
    cache = {}

    def make(variant):
        if variant not in cache:
            out = tmp_path_factory.mktemp(f"dinov2-{variant}") / "sharp"
            cache[variant] = _copy(tiny_reference("dinov2", variant), out, _sharpened)
        return cache[variant]

    return make


@pytest.mark.parametrize(
    ("variant", "registers", "mlp", "resize"),
    [("default", 0, "mlp", "bicubic"), ("registers", 2, "mlp", "bicubic_antialias"),
     ("swiglu", 0, "swiglu", "bicubic")],
)  # fmt: skip
def test_dinov2_parity_through_cli(sharp, tmp_path, capsys, variant, registers, mlp, resize):
    src = sharp(variant)
    assert convert_cli([str(src), str(tmp_path / "out")]) == 0
    assert "dropped 1 tensor not part of the vision encoder: embeddings.mask_token" in capsys.readouterr().out
    model = pv.from_pretrained(tmp_path / "out", attn_backend="sdpa")
    c = model.config
    assert (c.num_cls, c.num_registers, c.mlp, c.pos_resize) == (1, registers, mlp, resize)
    assert (c.pos_grid, c.pos_embed_cls, c.head, c.layer_scale) == ((8, 8), True, "cls", True)
    # int(64 * 2) = 128; SwiGLU: int(64 * 4) = 256, 2/3 of it 170, up to a multiple of 8: 176, always SiLU.
    assert (c.mlp_hidden, c.activation) == ((176, "silu") if mlp == "swiglu" else (128, "gelu"))
    assert_packed_parity(model, load_reference(src), expect=OUTPUTS)


@pytest.mark.parametrize("variant", ["default", "registers"])
def test_dinov2_grids_one_patch_wide_match_transformers(sharp, variant):
    """The whole forward on images one patch wide or high, packed with the mixed batch."""
    src = sharp(variant)
    model = pv.from_pretrained(src, attn_backend="sdpa")
    p = model.config.patch_size
    g = torch.Generator().manual_seed(2)
    extra = [torch.randn(3, h * p, w * p, generator=g) for h, w in [(5, 1), (16, 1), (1, 7), (2, 1)]]
    assert_packed_parity(model, load_reference(src), mixed_batch(model.config) + extra, expect=OUTPUTS)


def _ours(model, h, w):
    with torch.no_grad():
        return model.positions(model.pack([[1, h, w]]), torch.float32).additive  # [h*w, D]


def _transformers(hf_model, h, w):
    """transformers' own table for an image of ``h x w`` patches, class token's row first."""
    p, d = hf_model.config.patch_size, hf_model.config.hidden_size
    with torch.no_grad():
        return hf_model.embeddings.interpolate_pos_encoding(torch.zeros(1, 1 + h * w, d), h * p, w * p)[0]


@pytest.mark.parametrize("variant", ["default", "registers"])
@pytest.mark.parametrize("grid", GRIDS)
def test_dinov2_position_resize_matches_transformers(sharp, variant, grid):
    model = pv.from_pretrained(sharp(variant), attn_backend="sdpa")
    ref = _transformers(load_reference(sharp(variant)), *grid)
    torch.testing.assert_close(_ours(model, *grid), ref[1:], rtol=0, atol=1e-6)
    torch.testing.assert_close(model.positions.cls.detach(), ref[:1], rtol=0, atol=0)


def _pil_bicubic(table, h, w):
    """``[gh, gw, D]`` -> ``[h * w, D]``, each channel resized by PIL (bicubic, a = -0.5, antialiased when
    shrinking) as a 32-bit float image: an independent reference for PyTorch's antialiased bicubic."""
    images = [Image.fromarray(np.ascontiguousarray(table[..., d].numpy())) for d in range(table.shape[-1])]
    assert all(im.mode == "F" for im in images)
    channels = [np.asarray(im.resize((w, h), Image.Resampling.BICUBIC)) for im in images]
    return torch.from_numpy(np.stack(channels, axis=-1)).reshape(h * w, -1)


@pytest.mark.parametrize("grid", GRIDS)
def test_dinov2_registers_antialiased_resize_matches_pil(sharp, grid):
    """transformers 5.17.0 and we both take PyTorch's CPU path that is right at width 1 (the table's
    channel-last strides); a contiguous [1, D, h, w] table would take the one that is wrong there (off by
    ~1 on a unit-scale table). This pins our side to PIL so that a layout change cannot move us onto it."""
    model = pv.from_pretrained(sharp("registers"), attn_backend="sdpa")
    gh, gw = model.config.pos_grid
    table = model.positions.weight.detach().reshape(gh, gw, -1)
    torch.testing.assert_close(_ours(model, *grid), _pil_bicubic(table, *grid), rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["default", "registers"])
def test_dinov2_trained_size_uses_the_table_unchanged(sharp, variant):
    model = pv.from_pretrained(sharp(variant), attn_backend="sdpa")
    hf_model = load_reference(sharp(variant))
    assert torch.equal(_ours(model, 8, 8), model.positions.weight.detach())
    assert torch.equal(_transformers(hf_model, 8, 8), hf_model.embeddings.position_embeddings.detach()[0])
    assert not torch.allclose(_ours(model, 4, 16), model.positions.weight.detach())  # same count, resized


def test_dinov2_without_qkv_bias(tmp_path):
    """qkv_bias=False: no q/k/v biases in the checkpoint, none in the fused projection."""
    cfg = {k: v for k, v in dinov2.tiny_hf_config("registers").items() if k != "model_type"}
    torch.manual_seed(0)
    hf = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**cfg, qkv_bias=False))
    with torch.no_grad():
        for param in hf.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param), alpha=0.1)
    hf.save_pretrained(tmp_path / "hf")
    src = _copy(tmp_path / "hf", tmp_path / "sharp", _sharpened)
    model = pv.from_pretrained(src, attn_backend="sdpa")
    assert model.blocks[0].attn.qkv.bias is None
    assert_packed_parity(model, load_reference(src), expect=OUTPUTS)


def test_dinov2_preprocessing_follows_bit_image_processor():
    hub = {"crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "resample": 3,
           "size": {"shortest_edge": 256}, "image_mean": [0.5] * 3, "image_std": [0.25] * 3}  # fmt: skip
    giant = {"model_type": "dinov2", "hidden_size": 1536, "num_attention_heads": 24, "num_hidden_layers": 40,
             "use_swiglu_ffn": True, "image_size": 518}  # fmt: skip
    c = dinov2.config_from_hf(giant, hub)
    assert (c.mlp, c.mlp_hidden, c.activation) == ("swiglu", 4096, "silu")
    assert (c.pos_grid, c.patch_size, c.pos_resize) == ((37, 37), 14, "bicubic")
    assert (c.resample, c.resize_min_pixels, c.resize_max_pixels) == ("bicubic", 224 * 224, 224 * 224)
    assert (c.image_mean, c.image_std) == ((0.5,) * 3, (0.25,) * 3)
    # A square photo becomes exactly the reference's crop; others keep their aspect ratio at about its area.
    assert [target_size(h, w, c) for h, w in [(500, 500), (480, 640)]] == [(224, 224), (182, 252)]
    bare = dinov2.config_from_hf({"model_type": "dinov2_with_registers"}, None)
    assert (bare.patch_size, bare.num_registers, bare.pos_resize) == (16, 4, "bicubic_antialias")
    assert (bare.resample, bare.resize_min_pixels, bare.resize_max_pixels) == ("bicubic", 224**2, 224**2)
    assert (bare.image_mean, bare.image_std) == IMAGENET_STATS
    assert dinov2.config_from_hf(giant, {**hub, "do_center_crop": False}).resize_min_pixels == 256 * 256


@pytest.mark.parametrize(
    ("edit_state", "config_changes", "message"),
    [
        (lambda s: {**s, "encoder.layer.3.norm1.weight": torch.ones(64)}, {},
         r"unknown checkpoint keys: encoder\.layer\.3\.norm1\.weight"),
        (lambda s: {**s, "embeddings.register_tokens": torch.zeros(1, 2, 64)}, {},
         r"unknown checkpoint keys: embeddings\.register_tokens"),
        (lambda s: {k: v for k, v in s.items() if k != "encoder.layer.1.layer_scale2.lambda1"}, {},
         r"missing checkpoint keys: encoder\.layer\.1\.layer_scale2\.lambda1"),
        (lambda s: {**s, "embeddings.position_embeddings": s["embeddings.position_embeddings"][:, :-1]}, {},
         r"embeddings\.position_embeddings has the wrong shape: it gives positions\.weight shape \(63, 64\)"),
        (lambda s: {**s, "encoder.layer.0.mlp.fc1.weight": s["encoder.layer.0.mlp.fc1.weight"][:100]}, {},
         r"encoder\.layer\.0\.mlp\.fc1\.weight has the wrong shape"),
        (None, {"use_swiglu_ffn": True}, r"unknown checkpoint keys: encoder\.layer\.0\.mlp\.fc1\.bias"),
        (None, {"hidden_dropout_prob": 0.1}, r"hidden_dropout_prob = 0\.1: dropout is not supported"),
        (None, {"mlp_ratio": "4"}, r"mlp_ratio = '4' is not a non-negative number"),
    ],
)  # fmt: skip
def test_dinov2_converter_refuses(tiny_reference, tmp_path, capsys, edit_state, config_changes, message):
    src = _copy(tiny_reference("dinov2", "default"), tmp_path / "bad", edit_state, **config_changes)
    with pytest.raises(ConversionError, match=message):
        convert_checkpoint(src)
    assert convert_cli([str(src), str(tmp_path / "out")]) == 2
    assert "packvit-convert: error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_dinov2_refuses_an_unsupported_resampling_filter(tiny_reference, tmp_path):
    src = _copy(tiny_reference("dinov2", "default"), tmp_path / "lanczos")
    (src / "preprocessor_config.json").write_text(json.dumps({"resample": 1}))
    with pytest.raises(ConversionError, match=r"resample = 1: only bilinear \(2\) and bicubic \(3\)"):
        convert_checkpoint(src)
