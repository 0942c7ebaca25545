"""GPU training checks: every fast attention backend's gradients against the reference, and compiled blocks.

These need CUDA; on a machine without one they are skipped (and reported as skipped).
"""

import copy

import pytest
import torch

import packvit_native as pv
from tests.grad_parity import output_weights, packed_loss
from weights_convert.check import mixed_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FAST = [
    b
    for b in ("fa4", "fa3", "flash_attn", "torch")
    if torch.cuda.is_available() and b in pv.available_backends("cuda")
]
BF16_REL_TOL = 3e-2


def _grads(model, images, weights):
    model.zero_grad()
    packed_loss(model, images, weights).backward()
    return {n: p.grad.float() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("variant", ["gelu", "swiglu"])
def test_bf16_gradients_match_reference(tiny_reference, backend, variant):
    model = pv.from_pretrained(tiny_reference("dinov3", variant), device="cuda", dtype=torch.bfloat16)
    images = [im.cuda().bfloat16() for im in mixed_batch(model.config)]
    weights = {k: v.cuda() for k, v in output_weights(model, images).items()}
    model.attn_backend = "sdpa"
    ref = _grads(model, images, weights)
    model.attn_backend = backend
    fast = _grads(model, images, weights)
    for name, g in ref.items():
        err = float((fast[name] - g).abs().max() / g.abs().max().clamp_min(1e-12))
        assert err <= BF16_REL_TOL, f"{backend}: {name} relative gradient error {err:.2e}"


@pytest.mark.parametrize("backend", FAST)
def test_compiled_blocks_on_gpu(tiny_reference, backend):
    model = pv.from_pretrained(
        tiny_reference("dinov3", "gelu"), device="cuda", dtype=torch.bfloat16, attn_backend=backend
    )
    compiled = copy.deepcopy(model).compile_blocks(fullgraph=True)
    for images in (mixed_batch(model.config)[:3], mixed_batch(model.config, seed=1)):
        patches, grid = model.patchify([im.cuda().bfloat16() for im in images])
        a = model(patches, grid)
        b = compiled(patches, grid)
        torch.testing.assert_close(b, a, rtol=3e-2, atol=3e-2)
        b.float().square().mean().backward()
    assert all(p.grad is not None for p in compiled.parameters())
