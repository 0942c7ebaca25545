"""Shared assertions of the parity tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from packvit_native import PackedVisionEncoder
from weights_convert.check import compare_with_reference, load_reference, mixed_batch

__all__ = [
    "ATOL",
    "assert_packed_parity",
    "assert_packing_invariant",
    "assert_same_weights",
    "load_reference",
    "tower_with_unreadable_lm",
]

ATOL = 1e-4


def assert_packed_parity(model: PackedVisionEncoder, hf_model, images=None, expect=("last_hidden_state",)):
    """Pack a mixed batch, compare image by image with transformers; every listed output within ATOL."""
    images = images if images is not None else mixed_batch(model.config)
    c = model.config
    grids = [model.patchify([im])[1][0].tolist() for im in images]
    side = c.merge_size
    assert len(images) >= 5
    assert any(t > 1 for t, _, _ in grids), "the batch must hold a clip of more than one (temporal) frame"
    assert any(h == w == side for _, h, w in grids), "the batch must hold a grid of one merge block"
    assert any(h != w for _, h, w in grids), "the batch must hold a non-square image"
    rows = compare_with_reference(model, hf_model, images)
    assert len(rows) == len(images)
    for row in rows:
        for key in (*expect, "hidden_states"):
            assert key in row, f"reference gave no {key}"
            assert row[key] <= ATOL, f"{key} differs by {row[key]:.2e} on a {row['grid']} grid"
    return rows


def _per_image(model, images):
    """Each image's (patch tokens, prefix tokens, pooled output) from one packed forward."""
    patches, grid = model.patchify(images)
    with torch.no_grad():
        out = model(patches, grid, return_dict=True)
    frames = grid[:, 0].tolist()
    parts = (out.last_hidden_state.split(grid.prod(1).tolist()), out.prefix_tokens.split(frames),
             out.pooler_output.split(frames))  # fmt: skip
    return list(zip(*parts, strict=True))


def assert_packing_invariant(model: PackedVisionEncoder) -> None:
    """Each image's outputs are the same packed with the others, in reverse order, or alone."""
    images = mixed_batch(model.config)
    packed, backwards = _per_image(model, images), _per_image(model, images[::-1])[::-1]
    for image, ours, reordered in zip(images, packed, backwards, strict=True):
        for a, b, alone in zip(ours, reordered, _per_image(model, [image])[0], strict=True):
            assert max((a - alone).abs().max(), (b - alone).abs().max()) <= 1e-5


def tower_with_unreadable_lm(src: Path, dst: Path, is_tower) -> dict:
    """A sharded copy of checkpoint ``src`` in ``dst``: the tensors ``is_tower(key)`` picks in one shard, the rest
    named in the index but in a shard that is not a safetensors file, so reading it would fail. Returns the
    tower's tensors; loading it then equals loading ``src``."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    state = load_file(src / "model.safetensors")
    tower = {k: v for k, v in state.items() if is_tower(k)}
    assert tower and len(tower) < len(state)
    save_file(tower, dst / "model-00001-of-00002.safetensors")
    (dst / "model-00002-of-00002.safetensors").write_bytes(b"not a safetensors file: reading it would fail")
    weight_map = {k: f"model-0000{1 if k in tower else 2}-of-00002.safetensors" for k in state}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tower


def assert_same_weights(a: PackedVisionEncoder, b: PackedVisionEncoder) -> None:
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
