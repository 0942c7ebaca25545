"""SigLIP2 NaFlex's position grid is resized as PIL resizes an image (bilinear, antialiased), also for grids one
patch wide or high.

transformers 5.17.0's own resize differs there on the CPU (by up to ~1.1 on a grid one patch wide): its tensor
takes a PyTorch CPU antialiased-resize path that is wrong at output width 1. Ours matches PIL, as transformers
>= 5.24 does; this pins our side so that a change of memory layout cannot move us onto that path.
"""

import numpy as np
import pytest
import torch
from PIL import Image

import packvit_native as pv


def _pil_resize(table: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``[gh, gw, D]`` -> ``[h * w, D]``, each channel resized by PIL as a 32-bit float image."""
    images = [Image.fromarray(np.ascontiguousarray(table[..., d].numpy())) for d in range(table.shape[-1])]
    assert all(im.mode == "F" for im in images)  # float32, resized in floating point
    channels = [np.asarray(im.resize((w, h), Image.Resampling.BILINEAR)) for im in images]
    return torch.from_numpy(np.stack(channels, axis=-1)).reshape(h * w, -1)


@pytest.fixture(scope="module")
def model(tiny_reference):
    return pv.from_pretrained(tiny_reference("siglip2", "default"), attn_backend="sdpa")


@pytest.mark.parametrize(
    "grid", [(5, 1), (16, 1), (2, 1), (24, 1), (1, 5), (1, 16), (1, 24), (1, 1), (3, 11), (13, 3), (8, 8)]
)
def test_position_grid_resize_matches_pil(model, grid):
    h, w = grid
    gh, gw = model.config.pos_grid
    table = model.positions.weight.detach().float().reshape(gh, gw, -1)
    with torch.no_grad():
        ours = model.positions(model.pack([[1, h, w]]), torch.float32).additive  # [h*w, D]
    torch.testing.assert_close(ours, _pil_resize(table, h, w), rtol=0, atol=1e-5)


def test_width_one_grids_in_a_packed_batch_match_pil(model):
    """The same inside a batch that also holds other sizes (one resize per distinct size)."""
    gh, gw = model.config.pos_grid
    table = model.positions.weight.detach().float().reshape(gh, gw, -1)
    grids = [(1, 7, 1), (1, 4, 6), (2, 1, 9), (1, 7, 1)]
    with torch.no_grad():
        ours = model.positions(model.pack(grids), torch.float32).additive
    expected = torch.cat([_pil_resize(table, h, w) for t, h, w in grids for _ in range(t)])
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
