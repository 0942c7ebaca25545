"""Forward output options: output_layers, return_prefix, apply_final_norm (checked against transformers too)."""

import pytest
import torch

import packvit_native as pv
from tests.parity import load_reference
from weights_convert.check import mixed_batch


@pytest.fixture(scope="module")
def setup(tiny_reference):
    src = tiny_reference("dinov3", "gelu")
    model = pv.from_pretrained(src, attn_backend="sdpa")
    patches, grid = model.patchify(mixed_batch(model.config))
    with torch.no_grad():
        full = model(patches, grid, return_dict=True, output_hidden_states=True, return_prefix=True)
    return src, model, patches, grid, full


def test_output_layers_pick_hidden_states(setup):
    _, model, patches, grid, full = setup
    packing = full.packing
    with torch.no_grad():
        one = model(patches, grid, output_layers=-2)
        several = model(patches, grid, output_layers=(0, -1, 1))
        as_dict = model(patches, grid, output_layers=[-2], return_dict=True)
    hs = [packing.patch_tokens(h) for h in full.hidden_states]
    assert isinstance(one, torch.Tensor) and torch.equal(one, hs[-2])
    assert isinstance(several, tuple) and len(several) == 3
    for got, want in zip(several, (hs[0], hs[-1], hs[1]), strict=True):
        assert torch.equal(got, want)
    assert as_dict.hidden_states is None and torch.equal(as_dict.layers[0], hs[-2])
    assert torch.equal(as_dict.last_hidden_state, packing.patch_tokens(full.last_hidden_state))


def test_output_layers_match_transformers_hidden_states(setup):
    """What LLaVA-style code takes: transformers' hidden_states[-2], patch tokens only, image by image."""
    src, model, patches, grid, full = setup
    hf = load_reference(src)
    images = mixed_batch(model.config)
    k = model.config.num_prefix
    with torch.no_grad():
        ours = model(patches, grid, output_layers=-2, return_prefix=True)
        seqs = ours.split(list(full.packing.frames.lengths))
        frames = [f for im in images for f in (im if im.ndim == 4 else im[None])]
        for frame, seq in zip(frames, seqs, strict=True):
            ref = hf(pixel_values=frame[None], output_hidden_states=True).hidden_states[-2][0]
            assert (seq - ref).abs().max() <= 1e-4  # the whole segment: prefix tokens first, then patches
            assert (
                seq.shape[0]
                == ref.shape[0]
                == k + frame.shape[1] * frame.shape[2] // model.config.patch_size**2
            )


def test_return_prefix_and_final_norm(setup):
    _, model, patches, grid, full = setup
    packing = full.packing
    with torch.no_grad():
        plain = model(patches, grid)
        with_prefix = model(patches, grid, return_prefix=True)
        raw = model(patches, grid, apply_final_norm=False)
        raw_dict = model(patches, grid, apply_final_norm=False, return_dict=True)
        normed_layers = model(patches, grid, output_layers=(-2, -1), apply_final_norm=True)
    assert with_prefix.shape[0] == packing.frames.total
    assert torch.equal(with_prefix, full.last_hidden_state)
    assert torch.equal(packing.patch_tokens(with_prefix), plain)
    assert torch.equal(packing.prefix_tokens(with_prefix), full.prefix_tokens)
    assert torch.equal(raw, packing.patch_tokens(full.hidden_states[-1]))
    assert torch.equal(raw_dict.last_hidden_state, raw)
    assert torch.equal(raw_dict.pooler_output, full.pooler_output)  # the head still sees normed tokens
    assert torch.equal(normed_layers[1], plain)
    assert torch.equal(normed_layers[0], packing.patch_tokens(model.norm(full.hidden_states[-2])))


def test_output_layers_skip_later_blocks_and_keep_only_asked(setup):
    _, model, patches, grid, _ = setup
    ran = []
    hooks = [b.register_forward_hook(lambda m, i, o, n=n: ran.append(n)) for n, b in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            model(patches, grid, output_layers=1)
            assert ran == [0]
            ran.clear()
            out = model(patches, grid, output_layers=1, return_dict=True)
            assert ran == list(range(model.config.num_layers)) and len(out.layers) == 1
    finally:
        for h in hooks:
            h.remove()


def test_bad_output_options_raise(setup):
    _, model, patches, grid, _ = setup
    n = model.config.num_layers
    for bad in (n + 1, -(n + 2), (), (0, 1.5), True):
        with pytest.raises(ValueError, match="output_layers"):
            model(patches, grid, output_layers=bad)
    with pytest.raises(ValueError, match="apply_final_norm"):
        model(patches, grid, apply_final_norm="yes")
