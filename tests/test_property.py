"""Property test: for random batches, each image's outputs are the same packed or alone, and equal transformers.

A small, derandomized budget (the same examples every run), so CI time stays fixed and a failure reproduces.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import packvit_native as pv
from weights_convert.check import load_reference
from weights_convert.convert import family_named

PACKED_VS_ALONE = 1e-5
VS_TRANSFORMERS = 1e-4
FAMILIES = [("dinov3", "gelu"), ("siglip2", "default")]

grids = st.lists(
    st.tuples(st.integers(1, 3), st.integers(1, 24), st.integers(1, 24)),  # (frames, rows, cols)
    min_size=1,
    max_size=8,
)
BUDGET = settings(
    max_examples=25,
    derandomize=True,
    deadline=None,
    database=None,  # nothing written into the checkout
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture(scope="module", params=FAMILIES, ids=[f for f, _ in FAMILIES])
def models(request, tiny_reference):
    src = tiny_reference(*request.param)
    return pv.from_pretrained(src, attn_backend="sdpa", dtype=torch.float32), load_reference(src)


def _images(config: pv.EncoderConfig, grid: list[tuple[int, int, int]], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p, c = config.patch_size, config.num_channels
    images = [torch.randn(t, c, h * p, w * p, generator=g) for t, h, w in grid]
    return [x if x.shape[0] > 1 else x[0] for x in images]


def _outputs(out: pv.EncoderOutput) -> dict[str, torch.Tensor]:
    """The per-image outputs of a forward that are not empty (SigLIP2 has no prefix tokens)."""
    named = {"last_hidden_state": out.last_hidden_state, "prefix_tokens": out.prefix_tokens,
             "pooler_output": out.pooler_output}  # fmt: skip
    return {k: v for k, v in named.items() if v is not None and v.numel()}


def _known_reference_gap(family: str, h: int, w: int) -> bool:
    """transformers 5.17.0 resizes SigLIP2's position grid wrongly on the CPU at output width 1 (see
    test_siglip2_resize.py, which pins our side of those grids to PIL)."""
    return family == "siglip2" and w == 1 and h > 1


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    return float((a - b).abs().max())


@BUDGET
@given(grid=grids, seed=st.integers(0, 2**16))
def test_each_image_is_the_same_packed_or_alone_and_matches_transformers(models, grid, seed):
    model, hf_model = models
    fam = family_named(model.config.family)
    images = _images(model.config, grid, seed)
    with torch.no_grad():
        packed = _outputs(model(*model.patchify(images), return_dict=True))
        token = segment = 0
        for image, (t, h, w) in zip(images, grid, strict=True):
            rows = {"last_hidden_state": slice(token, token + t * h * w)}
            rows["prefix_tokens"] = rows["pooler_output"] = slice(segment, segment + t)
            ours = {name: value[rows[name]] for name, value in packed.items()}
            alone = _outputs(model(*model.patchify([image]), return_dict=True))
            for name, value in ours.items():
                diff = _max_diff(value, alone[name])
                assert diff <= PACKED_VS_ALONE, f"{name} of a {t}x{h}x{w} entry, packed vs alone: {diff:.2e}"
            if not _known_reference_gap(model.config.family, h, w):
                ref = fam.reference_forward(hf_model, image)
                for name, value in ours.items():
                    diff = _max_diff(value, ref[name].reshape(value.shape))
                    assert diff <= VS_TRANSFORMERS, (
                        f"{name} of a {t}x{h}x{w} entry vs transformers: {diff:.2e}"
                    )
            token, segment = token + t * h * w, segment + t
