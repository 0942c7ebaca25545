"""Gradients of a converted model against transformers, fp32 on the CPU, one packed call vs image by image."""

import pytest
import torch

import packvit_native as pv
from tests.grad_parity import REL_TOL, gradient_errors
from tests.parity import load_reference
from weights_convert.check import mixed_batch

# (family, variant). Further families join by adding a row.
CASES = [
    ("dinov3", "gelu"),
    ("dinov3", "swiglu"),
    ("aimv2", "native"),
    ("aimv2", "head"),
    ("siglip", "default"),
    ("siglip2", "default"),
    ("qwen2_5_vl", "vlm"),
    ("qwen3_vl", "vlm"),
    ("dinov2", "default"),
    ("dinov2", "registers"),
    ("dinov2", "swiglu"),
    ("mlcd", "default"),
    ("internvl", "vlm"),
    ("internvl", "vision"),
    ("internvl", "qk_norm_rms"),
    ("clip", "default"),
    ("clip", "with_projection"),
    ("clip", "two_tower"),
    ("metaclip_2", "default"),
    ("metaclip_2", "with_projection"),
    ("metaclip_2", "two_tower"),
]


@pytest.mark.parametrize(("family", "variant"), CASES)
def test_parameter_gradients_match_transformers(tiny_reference, family, variant):
    src = tiny_reference(family, variant)
    model = pv.from_pretrained(src, attn_backend="sdpa", dtype=torch.float32)
    hf_model = load_reference(src)
    images = mixed_batch(model.config)
    errors = gradient_errors(model, hf_model, images)
    assert set(errors) == {n for n, _ in model.named_parameters()}
    worst = max(errors, key=lambda n: errors[n][1])
    for name, (sources, err) in errors.items():
        assert err <= REL_TOL, f"{name} ({sources}): relative gradient error {err:.2e}; worst is {worst}"


def test_missing_key_bias_gets_no_gradient(tiny_reference):
    """DINOv3 has no key bias: its zero slice in the fused bias stays out of training, q and v biases train."""
    model = pv.from_pretrained(tiny_reference("dinov3", "gelu"), attn_backend="sdpa").train()
    assert not model.config.key_bias
    patches, grid = model.patchify(mixed_batch(model.config)[:3])
    model(patches, grid).square().sum().backward()
    d = model.config.hidden_size
    for block in model.blocks:
        g = block.attn.qkv.bias.grad
        assert torch.count_nonzero(g[d : 2 * d]) == 0
        assert torch.count_nonzero(g[:d]) > 0 and torch.count_nonzero(g[2 * d :]) > 0
