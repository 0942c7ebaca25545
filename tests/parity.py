"""Shared assertions of the parity tests."""

from __future__ import annotations

import transformers

from packvit_native import PackedVisionEncoder
from weights_convert.check import compare_with_reference, mixed_batch

ATOL = 1e-4


def load_reference(path, class_name: str):
    return getattr(transformers, class_name).from_pretrained(path, attn_implementation="sdpa").eval()


def assert_packed_parity(model: PackedVisionEncoder, hf_model, images=None, expect=("last_hidden_state",)):
    """Pack a mixed batch, compare image by image with transformers; every listed output within ATOL."""
    images = images if images is not None else mixed_batch(model.config.patch_size, model.config.num_channels)
    grids = [(1, *im.shape[-2:]) if im.ndim == 3 else (im.shape[0], *im.shape[-2:]) for im in images]
    p = model.config.patch_size
    assert len(images) >= 5
    assert any(t > 1 for t, _, _ in grids), "the batch must hold a clip with t > 1"
    assert any(h == w == p for _, h, w in grids), "the batch must hold a 1x1 grid"
    assert any(h != w for _, h, w in grids), "the batch must hold a non-square image"
    rows = compare_with_reference(model, hf_model, images)
    assert len(rows) == sum(t for t, _, _ in grids)
    for row in rows:
        for key in (*expect, "hidden_states"):
            assert key in row, f"reference gave no {key}"
            assert row[key] <= ATOL, f"{key} differs by {row[key]:.2e} on a {row['size']} grid"
    return rows
