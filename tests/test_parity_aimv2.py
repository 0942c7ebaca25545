"""AIMv2: converted by our CLI, packed, and compared with transformers' Aimv2VisionModel image by image.

Also: the fixed-size (learned table) checkpoints, exact at their trained size and refused elsewhere unless the
interpolation extension is asked for; and Apple's original layout, written offline from a transformers model.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import packvit_native as pv
from tests.parity import ATOL, assert_packed_parity
from weights_convert.check import compare_with_reference, load_reference, mixed_batch, parity_images
from weights_convert.cli import main as convert_cli
from weights_convert.convert import convert_checkpoint
from weights_convert.errors import ConversionError


@pytest.mark.parametrize(
    ("variant", "outputs"),
    [
        ("native", ("last_hidden_state",)),
        ("head", ("last_hidden_state", "pooler_output")),
        ("two_tower", ("last_hidden_state", "pooler_output")),
    ],
)
def test_aimv2_parity_through_cli(tiny_reference, tmp_path, capsys, variant, outputs):
    src = tiny_reference("aimv2", variant)
    assert convert_cli([str(src), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert ("the text tower (text_model.*" in printed) == (variant == "two_tower")
    model = pv.from_pretrained(tmp_path / "out", attn_backend="sdpa")
    assert model.config.pos_embed == "sincos2d" and model.config.num_prefix == 0
    assert model.config.head == ("attention_pool" if variant != "native" else "none")
    assert_packed_parity(model, load_reference(src), expect=outputs)


def test_aimv2_learned_exact_at_trained_size(tiny_reference, tmp_path):
    src = tiny_reference("aimv2", "learned")
    assert convert_cli([str(src), str(tmp_path / "out")]) == 0
    model = pv.from_pretrained(tmp_path / "out", attn_backend="sdpa")
    assert model.config.pos_grid == (8, 8) and model.config.pos_resize == "none"
    images = parity_images(model.config)
    assert any(im.ndim == 4 and im.shape[0] > 1 for im in images)
    rows = compare_with_reference(model, load_reference(src), images)
    assert len(rows) == 3 and all(r["grid"].endswith("x8x8") for r in rows)
    for row in rows:
        assert max(row["last_hidden_state"], row["hidden_states"]) <= ATOL


def test_aimv2_learned_refuses_other_sizes(tiny_reference):
    model = pv.from_pretrained(tiny_reference("aimv2", "learned"), attn_backend="sdpa")
    patches, grid = model.patchify([torch.randn(3, 32, 32), torch.randn(3, 20, 44)])
    with pytest.raises(ValueError, match=r"learned position table is 8x8.*5x11.*pos_resize='bicubic'"):
        model(patches, grid)


class _InterpolatedAimv2:
    """transformers' AIMv2 with its learned table bicubic-resized to each image's grid before the forward:
    what the opt-in ``pos_resize="bicubic"`` extension means, stated on the reference model itself."""

    def __init__(self, hf_model):
        self.model = hf_model
        self.config = hf_model.config
        self.table = hf_model.embeddings.position_embedding.weight.detach().clone()  # [S*S, D]

    def __call__(self, pixel_values, **kwargs):
        p = self.config.patch_size
        h, w = pixel_values.shape[-2] // p, pixel_values.shape[-1] // p
        s = int(self.table.shape[0] ** 0.5)
        grid = self.table.reshape(1, s, s, -1).permute(0, 3, 1, 2)  # [1, D, S, S]
        resized = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        emb = self.model.embeddings
        emb.position_embedding = nn.Embedding.from_pretrained(resized.flatten(2)[0].T)  # [h*w, D]
        emb.position_ids = torch.arange(h * w)[None]
        return self.model(pixel_values=pixel_values, **kwargs)


def test_aimv2_learned_opt_in_interpolation(tiny_reference):
    src = tiny_reference("aimv2", "learned")
    model = pv.from_pretrained(src, attn_backend="sdpa", pos_resize="bicubic")
    assert model.config.pos_resize == "bicubic"
    assert_packed_parity(model, _InterpolatedAimv2(load_reference(src)))


def _apple_checkpoint(src, out, lit: bool):
    """Re-key a transformers AIMv2 checkpoint into Apple's original layout (remote-code config): vision-only
    without a head, or the LiT release (vision tower under ``image_encoder.``, with its pooling head)."""
    cfg = json.loads((src / "config.json").read_text())
    vision_cfg = cfg["vision_config"] if lit else cfg
    state = load_file(src / "model.safetensors")
    vision = {
        k.removeprefix("vision_model."): v
        for k, v in state.items()
        if not lit or k.startswith("vision_model.")
    }
    pre = "image_encoder." if lit else ""
    apple = {
        f"{pre}preprocessor.patchifier.proj.weight": vision["embeddings.patch_embed.weight"],
        f"{pre}preprocessor.patchifier.proj.bias": vision["embeddings.patch_embed.bias"],
        f"{pre}preprocessor.patchifier.norm.weight": vision["embeddings.rms_norm.weight"],
        f"{pre}trunk.post_trunk_norm.weight": vision["rms_norm.weight"],
    }
    if "embeddings.position_embedding.weight" in vision:
        apple[f"{pre}preprocessor.pos_embed"] = vision["embeddings.position_embedding.weight"][None]
    names = {"attention.out_proj": "attn.proj", "ffn.gate_proj": "mlp.fc1", "ffn.up_proj": "mlp.fc3",
             "ffn.down_proj": "mlp.fc2", "rms_norm1": "norm_1", "rms_norm2": "norm_2"}  # fmt: skip
    for i in range(vision_cfg["num_hidden_layers"]):
        s, o = f"encoder.layers.{i}.", f"{pre}trunk.blocks.{i}."
        for kind in ("weight", "bias"):
            if f"{s}attention.q_proj.{kind}" in vision:
                apple[f"{o}attn.qkv.{kind}"] = torch.cat(
                    [vision[f"{s}attention.{n}_proj.{kind}"] for n in "qkv"]
                )
            for hf_name, apple_name in names.items():
                if f"{s}{hf_name}.{kind}" in vision:
                    apple[f"{o}{apple_name}.{kind}"] = vision[f"{s}{hf_name}.{kind}"]
    head_names = {"head.k_proj.": "head.k.", "head.v_proj.": "head.v.", "head.output_proj.": "head.linear."}
    for key, value in vision.items():
        if key.startswith("head."):
            stem = next((n for n in head_names if key.startswith(n)), "")
            apple[pre + head_names.get(stem, "") + key.removeprefix(stem)] = value
    copied = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
              "image_size", "patch_size", "rms_norm_eps", "qkv_bias")  # fmt: skip
    apple_cfg = {
        "architectures": ["AIMv2Model"],
        "auto_map": {
            "AutoConfig": "configuration_aimv2.AIMv2Config",
            "AutoModel": "modeling_aimv2.AIMv2Model",
        },
        "model_type": "aimv2",
        **{k: vision_cfg[k] for k in copied},
        "use_bias": vision_cfg["mlp_bias"],  # Apple's one switch for the output-projection and MLP biases
    }
    if lit:
        apple["image_projector.weight"] = state["visual_projection.weight"]
        apple["log_logit_scale"] = state["logit_scale"]
        apple["text_encoder.preprocessor.text_embedding.weight"] = torch.zeros(4, 8)
        apple_cfg = {"architectures": ["AIMv2Model"], "model_type": "aimv2", "vision_config": apple_cfg}
    out.mkdir()
    (out / "config.json").write_text(json.dumps(apple_cfg))
    save_file(apple, out / "model.safetensors")
    return out


@pytest.mark.parametrize("variant", ["learned", "native", "two_tower"])
def test_aimv2_apple_layout_converts_identically(tiny_reference, tmp_path, capsys, variant):
    src = tiny_reference("aimv2", variant)
    apple = _apple_checkpoint(src, tmp_path / "apple", lit=variant == "two_tower")
    ours = pv.from_pretrained(src, attn_backend="sdpa")
    theirs = pv.from_pretrained(apple, attn_backend="sdpa")
    assert theirs.config == ours.config
    for (ka, va), (kb, vb) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka
    images = mixed_batch(ours.config) if variant != "learned" else parity_images(ours.config)
    patches, grid = ours.patchify(images)
    with torch.no_grad():
        a = ours(patches, grid, return_dict=True)
        b = theirs(patches, grid, return_dict=True)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, rtol=0, atol=0)
    if ours.config.head != "none":
        torch.testing.assert_close(a.pooler_output, b.pooler_output, rtol=0, atol=0)
    if variant == "two_tower":
        assert convert_cli([str(apple), str(tmp_path / "out")]) == 0
        assert "the text tower (text_encoder.*: 1 tensor)" in capsys.readouterr().out


def _write(tmp_path, cfg, state):
    tmp_path.mkdir()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file(state, tmp_path / "model.safetensors")
    return tmp_path


def test_aimv2_conversion_errors(tiny_reference, tmp_path):
    src = tiny_reference("aimv2", "head")
    cfg = json.loads((src / "config.json").read_text())
    state = load_file(src / "model.safetensors")

    bad = _write(tmp_path / "unknown", cfg, {**state, "encoder.layers.0.extra.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match=r"unknown checkpoint keys: encoder.layers.0.extra.weight"):
        convert_checkpoint(bad)
    missing = {k: v for k, v in state.items() if k != "head.output_proj.bias"}
    with pytest.raises(ConversionError, match=r"missing checkpoint keys: head.output_proj.bias"):
        convert_checkpoint(_write(tmp_path / "missing", cfg, missing))
    wrong = {**state, "encoder.layers.1.ffn.down_proj.weight": torch.zeros(64, 95)}
    with pytest.raises(ConversionError, match=r"encoder.layers.1.ffn.down_proj.weight has the wrong shape"):
        convert_checkpoint(_write(tmp_path / "wrong", cfg, wrong))
    neither = {**cfg, "model_type": "aimv2"}
    with pytest.raises(ConversionError, match=r"neither a vision_config .* nor architectures"):
        convert_checkpoint(_write(tmp_path / "neither", neither, state))


@pytest.mark.parametrize(("qkv_bias", "use_bias"), [(True, False), (False, True)])
def test_apple_bias_switches_are_independent(tiny_reference, tmp_path, qkv_bias, use_bias):
    """Apple's ``qkv_bias`` covers q/k/v only; ``use_bias`` covers the attention output and the MLP.

    transformers cannot express this split (its out_proj bias follows qkv_bias), so the mapping is checked on the
    converter's own terms: each switch decides exactly which bias keys are required and which are refused.
    """
    apple = _apple_checkpoint(tiny_reference("aimv2", "head"), tmp_path / "apple", lit=False)
    cfg = json.loads((apple / "config.json").read_text())
    cfg.update(qkv_bias=qkv_bias, use_bias=use_bias)
    (apple / "config.json").write_text(json.dumps(cfg))
    state = load_file(apple / "model.safetensors")
    drop = (
        ("attn.qkv.bias",)
        if not qkv_bias
        else ("attn.proj.bias", "mlp.fc1.bias", "mlp.fc2.bias", "mlp.fc3.bias")
    )
    # Apple's vision-only release has no pooling head (only its LiT release does).
    state = {k: v for k, v in state.items() if not k.endswith(drop) and not k.startswith("head.")}
    save_file(state, apple / "model.safetensors")
    config, tensors, _ = convert_checkpoint(apple)
    assert (config.qkv_bias, config.proj_bias, config.mlp_bias) == (qkv_bias, use_bias, use_bias)
    assert ("blocks.0.attn.qkv.bias" in tensors) == qkv_bias
    assert ("blocks.0.attn.proj.bias" in tensors) == use_bias
    assert ("blocks.0.mlp.gate_up.bias" in tensors) == use_bias
    # a bias the switches say is absent is refused, not silently dropped
    extra = "trunk.blocks.0.attn.qkv.bias" if not qkv_bias else "trunk.blocks.0.attn.proj.bias"
    save_file({**state, extra: torch.zeros(192 if not qkv_bias else 64)}, apple / "model.safetensors")
    with pytest.raises(ConversionError, match=f"unknown checkpoint keys: {extra}"):
        convert_checkpoint(apple)


def test_packvit_check_refuses_apple_layout_clearly(tiny_reference, tmp_path, capsys):
    from weights_convert.check import main as check_cli

    apple = _apple_checkpoint(tiny_reference("aimv2", "native"), tmp_path / "apple", lit=False)
    assert check_cli([str(apple)]) == 2
    assert "Apple's original AIMv2 layout" in capsys.readouterr().err
