"""Shared assertions of the parity tests."""

from __future__ import annotations

from packvit_native import PackedVisionEncoder
from weights_convert.check import compare_with_reference, load_reference, mixed_batch

__all__ = ["ATOL", "assert_packed_parity", "load_reference"]

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
