"""Merge-order tokens (``merge_size = 2``): patchify round trip, coordinates, and the model's equivariance."""

import pytest
import torch

import packvit_native as pv
from packvit_native.packing import Packing

GRID = [(1, 4, 6), (2, 2, 2), (1, 6, 2), (1, 8, 8)]


def _merge_permutation(grid, m: int) -> torch.Tensor:
    """Index into row-major patches that lists them in merge order (built without the library's code)."""
    out, start = [], 0
    for t, h, w in grid:
        for _ in range(t):
            idx = torch.arange(h * w).reshape(h // m, m, w // m, m).permute(0, 2, 1, 3).flatten()
            out.append(idx + start)
            start += h * w
    return torch.cat(out)


def _images(p: int, grid=GRID, channels: int = 3):
    g = torch.Generator().manual_seed(1)
    return [
        torch.randn(t, channels, h * p, w * p, generator=g)
        if t > 1
        else torch.randn(channels, h * p, w * p, generator=g)
        for t, h, w in grid
    ]


@pytest.mark.parametrize("layout", ["cpp", "ppc"])
def test_patchify_merge_order_round_trip(layout):
    images = _images(3)
    rows, grid = pv.patchify(images, 3, layout=layout)
    merged, grid_m = pv.patchify(images, 3, layout=layout, merge_size=2)
    assert torch.equal(grid, grid_m)
    assert torch.equal(merged, rows[_merge_permutation(GRID, 2)])
    back = pv.unpatchify(merged, grid_m, 3, layout=layout, merge_size=2)
    for a, b in zip(images, back, strict=True):
        assert torch.equal(a if a.ndim == 4 else a[None], b)


def test_packing_coords_follow_merge_order():
    rows = Packing.from_grid(GRID, num_prefix=2).patch_coords
    merged = Packing.from_grid(GRID, num_prefix=2, merge_size=2)
    assert merged.merge_size == 2
    assert torch.equal(merged.patch_coords, rows[_merge_permutation(GRID, 2)])
    # the first block of the 4x6 frame: (0,0) (0,1) (1,0) (1,1), then the block to its right
    assert merged.patch_coords[:6, :2].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3]]


def test_frames_not_divisible_by_merge_size_raise():
    with pytest.raises(ValueError, match="3x4 patches"):
        Packing.from_grid([(1, 4, 4), (1, 3, 4)], merge_size=2)
    with pytest.raises(ValueError, match="merge"):
        pv.patchify([torch.randn(3, 12, 8)], 4, merge_size=2)
    with pytest.raises(ValueError, match="merge_size"):
        Packing.from_grid([(1, 4, 4)], merge_size=0)


def _check_equivariant(row_model, merge_model):
    images = _images(row_model.config.patch_size, channels=row_model.config.num_channels)
    perm = _merge_permutation(GRID, 2)
    with torch.no_grad():
        a = row_model(*row_model.patchify(images), return_dict=True, output_hidden_states=True)
        b = merge_model(*merge_model.patchify(images), return_dict=True, output_hidden_states=True)
    torch.testing.assert_close(b.last_hidden_state, a.last_hidden_state[perm], rtol=0, atol=1e-5)
    for ha, hb in zip(a.hidden_states, b.hidden_states, strict=True):
        torch.testing.assert_close(hb, ha[perm], rtol=0, atol=1e-5)
    torch.testing.assert_close(b.prefix_tokens, a.prefix_tokens, rtol=0, atol=1e-5)
    if a.pooler_output is not None:
        torch.testing.assert_close(b.pooler_output, a.pooler_output, rtol=0, atol=1e-5)


def test_dinov3_features_in_merge_order_are_a_permutation(tiny_reference):
    src = tiny_reference("dinov3", "gelu")
    row_model = pv.from_pretrained(src, attn_backend="sdpa")
    merge_model = pv.from_pretrained(src, attn_backend="sdpa", merge_size=2)
    assert merge_model.config.merge_size == 2
    _check_equivariant(row_model, merge_model)
    # a packing built for the other order is refused rather than silently mis-positioned
    patches, grid = merge_model.patchify(_images(4))
    with pytest.raises(ValueError, match="merge_size"):
        merge_model(patches, packing=Packing.from_grid(grid, merge_model.config.num_prefix))


@pytest.mark.parametrize(
    "positions",
    [
        {"pos_embed": "sincos2d"},
        {"pos_embed": "learned", "pos_grid": (3, 3), "pos_resize": "bicubic"},
        {"pos_embed": "learned", "pos_grid": (3, 3), "pos_resize": "bilinear_corners", "rope": "index"},
    ],
)
def test_additive_positions_follow_merge_order(positions):
    config = pv.EncoderConfig(
        family="aimv2", patch_size=2, hidden_size=32, num_layers=2, num_heads=4, mlp_hidden=48, **positions
    )
    torch.manual_seed(0)
    row_model = pv.PackedVisionEncoder(config, attn_backend="sdpa").eval()
    merge_model = pv.PackedVisionEncoder(config.replace(merge_size=2), attn_backend="sdpa").eval()
    merge_model.load_state_dict(row_model.state_dict())
    _check_equivariant(row_model, merge_model)
