"""Training mode as DINOv3 defines it: RoPE coordinate augmentation and drop path, checked against transformers."""

import json

import pytest
import torch
import transformers

from packvit_native.layers import BlockContext, DropPath
from packvit_native.loading import build_model
from packvit_native.packing import Packing
from weights_convert.check import mixed_batch
from weights_convert.convert import convert_loaded
from weights_convert.errors import ConversionError
from weights_convert.families import dinov3
from weights_convert.sources import load_state_dict

AUGMENT = {"pos_embed_shift": 0.2, "pos_embed_jitter": 1.3, "pos_embed_rescale": 1.6}


def _pair(src, **overrides):
    """Ours and transformers' model from one checkpoint, with config fields overridden in both."""
    cfg = {**json.loads((src / "config.json").read_text()), **overrides}
    config, state, _ = convert_loaded(cfg, None, load_state_dict(src)[0])
    ours = build_model(config, state, attn_backend="sdpa")
    hf = transformers.DINOv3ViTModel.from_pretrained(src, attn_implementation="sdpa", **overrides)
    return ours, hf


def _reference(hf, frame):
    return dinov3.reference_forward(hf, frame)["last_hidden_state"]


def test_converter_maps_training_fields(tiny_reference):
    src = tiny_reference("dinov3", "gelu")
    ours, _ = _pair(src, drop_path_rate=0.25, **AUGMENT)
    c = ours.config
    assert (c.drop_path_rate, c.pos_embed_shift, c.pos_embed_jitter, c.pos_embed_rescale) == (
        0.25,
        0.2,
        1.3,
        1.6,
    )
    assert all(b.drop_path.p == 0.25 for b in ours.blocks)


def test_converter_refuses_attention_dropout(tiny_reference):
    cfg = {
        **json.loads((tiny_reference("dinov3", "gelu") / "config.json").read_text()),
        "attention_dropout": 0.1,
    }
    with pytest.raises(ConversionError, match="attention_dropout"):
        dinov3.config_from_hf(cfg, None)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_train_mode_matches_transformers_under_a_seed(tiny_reference, seed):
    """One image, same seed: RoPE augmentation and drop path draw the same numbers in the same order."""
    ours, hf = _pair(tiny_reference("dinov3", "swiglu"), drop_path_rate=0.4, **AUGMENT)
    ours.train(), hf.train()
    frame = torch.randn(3, 5 * 4, 7 * 4)
    patches, grid = ours.patchify([frame])
    with torch.no_grad():
        torch.manual_seed(seed)
        a = ours(patches, grid)
        torch.manual_seed(seed)
        b = _reference(hf, frame)
        eval_out = ours.eval()(patches, grid)
    assert (a - eval_out).abs().max() > 1e-2, "training mode changed nothing"
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def _queued_uniform(draws):
    """A stand-in for ``Tensor.uniform_`` that hands out prepared unit draws, scaled to the caller's range."""
    draws = list(draws)

    def uniform_(tensor, a=0.0, b=1.0, *, generator=None):
        u = draws.pop(0)
        assert u.shape == tensor.shape, (
            f"draw of shape {tuple(u.shape)} for a tensor of {tuple(tensor.shape)}"
        )
        return tensor.copy_(a + (b - a) * u)

    return uniform_


def test_packed_rope_augmentation_matches_transformers_per_image(tiny_reference, monkeypatch):
    """Every segment gets its own shift, jitter and rescale; each equals transformers given that image's draws."""
    ours, hf = _pair(tiny_reference("dinov3", "gelu"), **AUGMENT)
    ours.train(), hf.train()
    images = mixed_batch(ours.config)
    frames = [f for im in images for f in (im if im.ndim == 4 else im[None])]
    s = len(frames)
    g = torch.Generator().manual_seed(3)
    shift, jitter, rescale = (
        torch.rand(s, 2, generator=g),
        torch.rand(s, 2, generator=g),
        torch.rand(s, 1, generator=g),
    )
    patches, grid = ours.patchify(images)
    with torch.no_grad():
        monkeypatch.setattr(torch.Tensor, "uniform_", _queued_uniform([shift, jitter, rescale]))
        packed = ours(patches, grid)
        start = 0
        for i, frame in enumerate(frames):
            monkeypatch.setattr(
                torch.Tensor, "uniform_", _queued_uniform([shift[i : i + 1], jitter[i : i + 1], rescale[i]])
            )
            ref = _reference(hf, frame)
            torch.testing.assert_close(packed[start : start + len(ref)], ref, rtol=0, atol=1e-4)
            start += len(ref)
    assert start == len(packed)


def test_augmentation_is_off_in_eval_and_seeded_in_train(tiny_reference):
    ours, _ = _pair(tiny_reference("dinov3", "gelu"), **AUGMENT)
    packing = Packing.from_grid([(1, 3, 5), (2, 4, 4)], ours.config.num_prefix)
    positions = ours.positions

    def rope() -> tuple[torch.Tensor, torch.Tensor]:
        return positions(packing, torch.float32).rotary

    positions.eval()
    torch.manual_seed(0)
    plain = rope()
    assert all(torch.equal(x, y) for x, y in zip(plain, rope(), strict=True))
    positions.train()
    torch.manual_seed(5)
    a = rope()
    torch.manual_seed(5)
    b = rope()
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.allclose(a[1], plain[1])


def test_drop_path_drops_whole_segments():
    lengths = tuple(range(1, 41))
    packing = Packing.from_grid([(1, 1, n) for n in lengths], num_prefix=1)
    ctx = BlockContext({"frames": packing.frames}, "sdpa", None, packing.token_segment())
    x = torch.ones(packing.frames.total, 8)
    drop = DropPath(0.5).train()
    torch.manual_seed(0)
    y = drop(x, ctx)
    kept = []
    for seg in y.split(packing.frames.lengths):
        assert torch.all(seg == 0) or torch.all(seg == 2.0), "a segment was partly dropped"
        kept.append(bool(seg[0, 0]))
    assert 0 < sum(kept) < len(kept)
    assert torch.equal(drop.eval()(x, ctx), x)
    assert torch.equal(DropPath(0.0).train()(x, ctx), x)
