"""Rotary embedding of q and k in one pass per tensor, as a Triton kernel, for eager CUDA forwards.

Written in PyTorch ops, ``x * cos + rotate_half(x) * sin`` costs a concatenation, two products and a sum per
tensor, each a full pass over memory, plus two dtype casts when the rotation runs in fp32 (Qwen-VL, MLCD): on
Qwen3-VL-8B's mixed workload this kernel took an eager forward from 168 to 118 ms. It reads q (or k) once,
rotates in fp32 and writes the result once. It reads q and k where the fused q/k/v projection left them
(strided), and its backward is the inverse rotation.

Used only where it applies: a CUDA tensor, Triton importable, angles that need no gradient, and not while
``torch.compile`` traces (the compiler fuses the PyTorch formula itself). Everywhere else the PyTorch formula in
:func:`packvit_native.layers.apply_rope` runs; the GPU checks compare the two.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["fused_rope_available", "rope_fused"]


TOKENS_PER_PROGRAM = 32


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rope(x_ptr, cos_ptr, sin_ptr, out_ptr, tokens, x_t, x_h, cs_t, heads, half,
             inverse: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
        # One program: BLOCK_T tokens of one head, the whole head dim (two halves of `half`).
        # int64: a packed batch's q/k offsets pass 2**31 from about 550k tokens at Qwen-VL widths.
        t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]).to(tl.int64)  # [BLOCK_T, 1]
        h = tl.program_id(1)
        j = tl.arange(0, BLOCK)[None, :]  # [1, BLOCK]
        mask = (t < tokens) & (j < half)
        c = tl.load(cos_ptr + t * cs_t + j, mask=mask).to(tl.float32)  # the halves of cos and sin are equal
        s = tl.load(sin_ptr + t * cs_t + j, mask=mask).to(tl.float32)
        if inverse:
            s = -s
        src = x_ptr + t * x_t + h * x_h + j
        x1 = tl.load(src, mask=mask).to(tl.float32)
        x2 = tl.load(src + half, mask=mask).to(tl.float32)
        dst = out_ptr + (t * heads + h) * 2 * half + j
        tl.store(dst, (x1 * c - x2 * s).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + half, (x2 * c + x1 * s).to(out_ptr.dtype.element_ty), mask=mask)

    return rope


def _launch(x: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> Tensor:
    """Rotate ``x`` ``[T, H, Dh]`` (last dim contiguous) by ``cos``/``sin`` ``[T, 1, Dh]``; returns a new tensor."""
    import triton

    t, heads, dh = x.shape
    out = torch.empty((t, heads, dh), dtype=x.dtype, device=x.device)
    if t:
        grid = (triton.cdiv(t, TOKENS_PER_PROGRAM), heads)
        with torch.cuda.device(x.device):  # Triton launches on the current device and its current stream
            _kernel()[grid](
                x, cos, sin, out, t, x.stride(0), x.stride(1), cos.stride(0), heads, dh // 2, inverse,
                BLOCK_T=TOKENS_PER_PROGRAM, BLOCK=triton.next_power_of_2(dh // 2),
            )  # fmt: skip
    return out


class _FusedRope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        return _launch(x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, grad: Tensor):
        cos, sin = ctx.saved_tensors
        return _launch(grad.contiguous(), cos, sin, inverse=True), None, None


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fused_rope_available(x: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """Whether :func:`rope_fused` applies to these tensors (see the module docstring)."""
    return (
        x.is_cuda
        and x.stride(-1) == 1
        and cos.is_contiguous()
        and sin.is_contiguous()
        and not (cos.requires_grad or sin.requires_grad)
        and not torch.compiler.is_compiling()
        and _triton_importable()
    )


def rope_fused(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` computed in fp32, returned in ``x``'s dtype (``[T, H, Dh]``)."""
    return _FusedRope.apply(x, cos, sin)
