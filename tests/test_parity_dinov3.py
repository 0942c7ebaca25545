"""DINOv3: converted by our CLI, packed, and compared with transformers' DINOv3ViTModel image by image."""

import pytest
import torch
from safetensors.torch import load_file, save_file

import packvit_native as pv
from tests.parity import assert_packed_parity, load_reference
from weights_convert.cli import main as convert_cli

OUTPUTS = ("last_hidden_state", "prefix_tokens", "pooler_output")


@pytest.mark.parametrize("variant", ["gelu", "swiglu"])
def test_dinov3_parity_through_cli(tiny_reference, tmp_path, variant):
    src = tiny_reference("dinov3", variant)
    assert convert_cli([str(src), str(tmp_path / "out")]) == 0
    model = pv.from_pretrained(tmp_path / "out", attn_backend="sdpa")
    assert model.config.mlp == ("swiglu" if variant == "swiglu" else "mlp")
    assert model.config.num_prefix == 3
    assert_packed_parity(model, load_reference(src), expect=OUTPUTS)


def test_dinov3_direct_from_transformers_dir_matches_converted(tiny_reference, tmp_path):
    src = tiny_reference("dinov3", "gelu")
    convert_cli([str(src), str(tmp_path / "out")])
    a, b = pv.from_pretrained(src), pv.from_pretrained(tmp_path / "out")
    patches, grid = a.patchify([torch.randn(3, 20, 12), torch.randn(3, 8, 8)])
    with torch.no_grad():
        torch.testing.assert_close(a(patches, grid), b(patches, grid), rtol=0, atol=0)


def test_dinov3_model_layer_spelling(tiny_reference, tmp_path):
    """transformers 5 names blocks ``model.layer.N``; published checkpoints say ``layer.N``. Both convert alike."""
    src = tiny_reference("dinov3", "gelu")
    respelled = tmp_path / "respelled"
    respelled.mkdir()
    (respelled / "config.json").write_text((src / "config.json").read_text())
    state = load_file(src / "model.safetensors")
    assert any(k.startswith("layer.") for k in state)
    save_file(
        {("model." + k if k.startswith("layer.") else k): v for k, v in state.items()},
        respelled / "model.safetensors",
    )
    a, b = pv.from_pretrained(src), pv.from_pretrained(respelled)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
