"""The fused RoPE kernel (CUDA) against the PyTorch formula, forward and backward (runs on a GPU machine)."""

import pytest
import torch

from packvit_native.layers import _rotate_half
from packvit_native.rope_kernel import fused_rope_available, rope_fused

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _reference(x, cos, sin):
    xf = x.double()
    return xf * cos.double() + _rotate_half(xf) * sin.double()


@pytest.mark.parametrize("head_dim", [64, 72, 80, 104])
@pytest.mark.parametrize("angles_dtype", [torch.float32, torch.bfloat16])
def test_fused_rope_matches_the_formula(head_dim, angles_dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    t, heads = 257, 6
    qkv = torch.randn(t, 3, heads, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    q = qkv[:, 0].clone().requires_grad_()
    strided = qkv.unbind(1)[1]  # a view of the fused projection, as the blocks pass it
    angles = torch.randn(t, 1, head_dim // 2, device="cuda", generator=g).tile(2) * 10
    cos, sin = angles.cos().to(angles_dtype), angles.sin().to(angles_dtype)
    assert fused_rope_available(strided, cos, sin)
    out = rope_fused(strided, cos, sin)
    ref = _reference(strided, cos, sin)
    assert out.dtype == torch.bfloat16 and out.shape == strided.shape
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)
    grad = torch.randn_like(out)
    rope_fused(q, cos, sin).backward(grad)
    q_ref = q.detach().double().requires_grad_()
    _reference(q_ref, cos, sin).backward(grad.double())
    torch.testing.assert_close(q.grad.double(), q_ref.grad, rtol=1e-2, atol=1e-2)


def test_learned_angles_fall_back_to_the_formula():
    x = torch.randn(4, 2, 8, device="cuda")
    cos = torch.ones(4, 1, 8, device="cuda", requires_grad=True)
    assert not fused_rope_available(x, cos, cos.detach())
    assert not fused_rope_available(x.cpu(), cos.detach().cpu(), cos.detach().cpu())
