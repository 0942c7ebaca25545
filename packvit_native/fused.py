"""Fused epilogues for eager CUDA forwards and backwards: residual add + norm, fc1 + bias + GELU-tanh, and the
layer-scaled residual add.

``add_norm``: a pre-norm block adds its attention branch to the residual stream (``x + gamma * branch`` with
layer scale) and reads the sum straight back for ``norm2``. In PyTorch ops that is a product, a sum and a norm,
each a full pass over the ``[T, D]`` tokens, and the backward adds as many again. One Triton kernel reads ``x``
and ``branch`` once and writes the new residual stream and its norm once; one backward kernel writes the
gradients of ``x`` and ``branch`` and per-program partial sums for those of the parameters (layer scale, norm
weight and bias), which a small sum finishes. In 16-bit dtypes the residual stream comes out bit for bit as the
PyTorch ops give it (the product is rounded to the activation dtype before the sum, as they round it; in fp32
the compiler may fuse the two into one FMA, which rounds once instead of twice). The norm is computed in fp32
from that rounded sum, as ``nn.LayerNorm`` and :class:`~packvit_native.layers.RMSNorm` compute it; under
autocast it applies to an fp32 residual stream (the bf16 branch is read as it is), whose norm autocast leaves
in fp32 too.

``linear_gelu_tanh``: ``torch._addmm_activation(bias, x, weight.t(), use_gelu=True)`` has cuBLASLt add the bias
and apply GELU in the GEMM's epilogue, on the fp32 accumulator, so the pre-activation is never written to
memory. On CUDA every path of that op computes the tanh form (pytorch/pytorch#104061); on the CPU it computes
the exact erf form, so it is used on CUDA only and for ``gelu_tanh`` models only. The op has no derivative
(autograd raises), so it runs only where no gradient is recorded; training keeps the unfused ops. It runs for
16-bit activations and weights outside autocast only (in fp32 the epilogue's GELU would replace PyTorch's,
whose precision it is not documented to match).

``scale_add``: a residual add with layer scale, ``x + gamma * branch`` (the MLP branch's, and the attention
branch's where ``add_norm`` does not apply), as one ``torch.addcmul``: one pass over the tokens in the forward
instead of a product and a sum; the backward is autograd's and gains nothing. It computes in fp32 and rounds
once, where the PyTorch ops round the product to the activation dtype first; in bf16 the two differ by at most
one rounding of the product, well inside what the GPU checks allow against the fp32 reference.

None applies under ``torch.compile`` (the compiler fuses the PyTorch ops itself), on the CPU, or without
Triton, nor to fp64; there the PyTorch ops run unchanged. All are on by default. ``PACKVIT_FUSED`` read at
import sets the default (``0`` none, ``1`` all, or a comma list of names from :data:`FUSIONS`);
:func:`set_fusions` and :func:`using_fusions` switch them at run time, e.g. to compare fused and unfused
forwards in one process (``benchmarks/fusions.py``). The switch is read as each forward runs: CUDA graphs keep
what was on when they were captured.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from .rope_kernel import _triton_importable

__all__ = [
    "FUSIONS",
    "add_norm",
    "add_norm_applies",
    "fusions_enabled",
    "linear_gelu_applies",
    "linear_gelu_tanh",
    "scale_add",
    "scale_add_applies",
    "set_fusions",
    "using_fusions",
]

FUSIONS = ("add_norm", "linear_gelu", "scale_add")

# A tile holds at most this many elements: at most 16 fp32 values per thread and tensor at 8 warps.
TILE_ELEMENTS = 4096
# Widest row the kernels take: one row per program, 16 warps.
MAX_DIM = 8192
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_KERNEL_DTYPES = (*_HALF_DTYPES, torch.float32)  # the kernels compute in fp32: never for fp64


def _parse(value: str) -> frozenset[str]:
    value = value.strip()
    if value in ("", "0"):
        return frozenset()
    if value == "1":
        return frozenset(FUSIONS)
    names = frozenset(name.strip() for name in value.split(","))
    unknown = sorted(names - set(FUSIONS))
    if unknown:
        raise ValueError(f"PACKVIT_FUSED: unknown fusion(s) {unknown}; use 0, 1 or a comma list of {FUSIONS}")
    return names


_enabled: frozenset[str] = _parse(os.environ.get("PACKVIT_FUSED", "1"))


def fusions_enabled() -> frozenset[str]:
    """The names of the fusions switched on (a subset of :data:`FUSIONS`)."""
    return _enabled


def set_fusions(enabled: bool | Iterable[str]) -> frozenset[str]:
    """Switch fusions on or off for the whole process; returns the previous set.

    Args:
        enabled: ``True`` (all of :data:`FUSIONS`), ``False`` (none) or the names to switch on.
    """
    global _enabled
    if isinstance(enabled, bool):
        names = frozenset(FUSIONS) if enabled else frozenset()
    else:
        names = frozenset(enabled)
        unknown = sorted(names - set(FUSIONS))
        if unknown:
            raise ValueError(f"unknown fusion(s) {unknown}; known: {FUSIONS}")
    previous, _enabled = _enabled, names
    return previous


@contextmanager
def using_fusions(enabled: bool | Iterable[str]) -> Iterator[None]:
    """:func:`set_fusions` for the duration of a ``with`` block."""
    previous = set_fusions(enabled)
    try:
        yield
    finally:
        set_fusions(previous)


def _eager_cuda(x: Tensor) -> bool:
    return x.is_cuda and not torch.compiler.is_compiling() and _triton_importable()


def _records_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# --------------------------------------------------------------------------------------------------------------
# x + gamma * branch


def scale_add_applies(x: Tensor, branch: Tensor, gamma: Tensor) -> bool:
    """Whether :func:`scale_add` may replace ``x + branch * gamma`` here."""
    return (
        "scale_add" in _enabled
        and _eager_cuda(x)
        and x.dtype in _KERNEL_DTYPES
        and x.dtype == branch.dtype == gamma.dtype
    )


def scale_add(x: Tensor, branch: Tensor, gamma: Tensor) -> Tensor:
    """``x + branch * gamma`` in one pass, rounded once."""
    return torch.addcmul(x, branch, gamma)


# --------------------------------------------------------------------------------------------------------------
# fc1 + bias + GELU-tanh


def linear_gelu_applies(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether :func:`linear_gelu_tanh` may replace ``gelu_tanh(F.linear(x, weight, bias))`` here."""
    return (
        "linear_gelu" in _enabled
        and _eager_cuda(x)
        and not torch.is_autocast_enabled(x.device.type)
        and bias is not None
        and x.dtype in _HALF_DTYPES
        and weight.dtype == x.dtype
        and bias.dtype == x.dtype
        and not _records_grad(x, weight, bias)
    )


def linear_gelu_tanh(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``gelu(x @ weight.T + bias, approximate="tanh")`` as one cuBLASLt GEMM (CUDA, no gradient)."""
    out = torch._addmm_activation(bias, x.reshape(-1, x.shape[-1]), weight.t(), use_gelu=True)
    return out.view(*x.shape[:-1], weight.shape[0])


# --------------------------------------------------------------------------------------------------------------
# residual add + norm


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def forward(x_ptr, br_ptr, g_ptr, w_ptr, b_ptr, s_ptr, h_ptr, mean_ptr, rstd_ptr, rows, dim, eps,
                HAS_GAMMA: tl.constexpr, HAS_BIAS: tl.constexpr, RMS: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
        # One program: BLOCK_T whole rows. int64: T * D passes 2**31 for a few million tokens.
        r = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]).to(tl.int64)  # [BLOCK_T, 1]
        c = tl.arange(0, BLOCK_D)[None, :]  # [1, BLOCK_D]
        cm = c < dim
        mask = (r < rows) & cm
        off = r * dim + c
        dtype = s_ptr.dtype.element_ty
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        br = tl.load(br_ptr + off, mask=mask, other=0.0)
        if HAS_GAMMA:
            g = tl.load(g_ptr + c, mask=cm, other=0.0).to(tl.float32)
            br = (br.to(tl.float32) * g).to(dtype)  # rounded as `branch * gamma` rounds it
        s = (x + br.to(tl.float32)).to(dtype)
        tl.store(s_ptr + off, s, mask=mask)
        s = s.to(tl.float32)
        w = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
        if RMS:
            rstd = 1.0 / tl.sqrt(tl.sum(s * s, axis=1) / dim + eps)  # [BLOCK_T]
            # RMSNorm casts the normalised fp32 value back before the weight multiplies it.
            h = (s * rstd[:, None]).to(dtype).to(tl.float32) * w
        else:
            mean = tl.sum(s, axis=1) / dim
            centred = tl.where(cm, s - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / dim + eps)
            h = centred * rstd[:, None] * w
            if HAS_BIAS:
                h += tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float32)
            tl.store(mean_ptr + r, mean[:, None], mask=r < rows)
        tl.store(h_ptr + off, h.to(dtype), mask=mask)
        tl.store(rstd_ptr + r, rstd[:, None], mask=r < rows)

    @triton.jit
    def backward(ds_ptr, dh_ptr, s_ptr, br_ptr, g_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dbr_ptr,
                 dw_ptr, db_ptr, dg_ptr, rows, dim, rows_per_program,
                 HAS_GAMMA: tl.constexpr, HAS_BIAS: tl.constexpr, RMS: tl.constexpr, DBRANCH: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
        # One program: `rows_per_program` consecutive rows, BLOCK_T at a time; it writes its own partial sums of
        # the parameters' gradients (one fp32 row each), which the caller adds up. Without DBRANCH the
        # branch's gradient is the residual's (no layer scale, one dtype) and is not written twice.
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        c = cols[None, :]
        cm = c < dim
        dtype = dx_ptr.dtype.element_ty
        w = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
        if HAS_GAMMA:
            g = tl.load(g_ptr + c, mask=cm, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_D], dtype=tl.float32)
        db = tl.zeros([BLOCK_D], dtype=tl.float32)
        dg = tl.zeros([BLOCK_D], dtype=tl.float32)
        first = pid * rows_per_program
        for start in range(first, first + rows_per_program, BLOCK_T):
            r = (start + tl.arange(0, BLOCK_T)[:, None]).to(tl.int64)
            rm = r < rows
            mask = rm & cm
            off = r * dim + c
            s = tl.load(s_ptr + off, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dh_ptr + off, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + r, mask=rm, other=0.0)  # [BLOCK_T, 1]
            dyw = dy * w
            if RMS:
                n = s * rstd
                dw += tl.sum(dy * n.to(dtype).to(tl.float32), axis=0)
                ds = rstd * (dyw - n * (tl.sum(dyw * n, axis=1)[:, None] / dim))
            else:
                mean = tl.load(mean_ptr + r, mask=rm, other=0.0)
                xhat = tl.where(cm, (s - mean) * rstd, 0.0)
                dw += tl.sum(dy * xhat, axis=0)
                if HAS_BIAS:
                    db += tl.sum(dy, axis=0)
                mean_dyw = tl.sum(dyw, axis=1)[:, None] / dim
                mean_dyw_xhat = tl.sum(dyw * xhat, axis=1)[:, None] / dim
                ds = rstd * (dyw - mean_dyw - xhat * mean_dyw_xhat)
            ds += tl.load(ds_ptr + off, mask=mask, other=0.0).to(tl.float32)
            tl.store(dx_ptr + off, ds.to(dtype), mask=mask)
            if HAS_GAMMA:
                br = tl.load(br_ptr + off, mask=mask, other=0.0).to(tl.float32)
                dg += tl.sum(ds * br, axis=0)
                ds *= g
            if DBRANCH:
                tl.store(dbr_ptr + off, ds.to(dbr_ptr.dtype.element_ty), mask=mask)
        part = pid.to(tl.int64) * dim + cols
        tl.store(dw_ptr + part, dw, mask=cols < dim)
        if HAS_BIAS:
            tl.store(db_ptr + part, db, mask=cols < dim)
        if HAS_GAMMA:
            tl.store(dg_ptr + part, dg, mask=cols < dim)

    return forward, backward


def _tiling(dim: int) -> tuple[int, int, int]:
    """``(BLOCK_T, BLOCK_D, num_warps)`` for rows of ``dim`` elements."""
    block_d = 1 << (dim - 1).bit_length()
    block_t = max(1, TILE_ELEMENTS // block_d)
    return block_t, block_d, min(16, max(4, block_t * block_d // 512))


def _device(x: Tensor) -> torch.cuda.device:
    # Triton launches on the current device. -1 selects none, for CPU tensors under TRITON_INTERPRET=1.
    return torch.cuda.device(x.device if x.is_cuda else -1)


@functools.cache
def _programs(device: torch.device) -> int:
    """Programs of the backward kernel: a few per SM, so each writes one row of partial sums."""
    if device.type != "cuda":
        return 4
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _forward(x: Tensor, branch: Tensor, gamma: Tensor | None, weight: Tensor, bias: Tensor | None, eps: float,
             rms: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    # The per-row statistics are written even when no backward will read them: 8 bytes a row, next to the
    # 4 * D * 2 bytes the row moves.
    rows, dim = x.shape
    s, h = torch.empty_like(x), torch.empty_like(x)
    mean = torch.empty(rows if not rms else 0, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        block_t, block_d, warps = _tiling(dim)
        with _device(x):
            _kernels()[0][(-(-rows // block_t),)](
                x, branch, weight if gamma is None else gamma, weight, weight if bias is None else bias, s, h,
                rstd if rms else mean, rstd, rows, dim, eps,
                HAS_GAMMA=gamma is not None, HAS_BIAS=bias is not None, RMS=rms,
                BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps,
            )  # fmt: skip
    return s, h, mean, rstd


def _backward(ds: Tensor, dh: Tensor, s: Tensor, branch: Tensor | None, gamma: Tensor | None, weight: Tensor,
              has_bias: bool, mean: Tensor, rstd: Tensor, rms: bool, branch_dtype: torch.dtype):  # fmt: skip
    rows, dim = s.shape
    block_t, block_d, warps = _tiling(dim)
    per_program = max(1, -(-rows // (_programs(s.device) * block_t))) * block_t  # whole tiles
    programs = -(-rows // per_program)  # 0 for no rows: the sums below are then zeros
    dx = torch.empty_like(s)
    separate = gamma is not None or branch_dtype != s.dtype
    dbranch = torch.empty_like(s, dtype=branch_dtype) if separate else dx
    parts = torch.empty(3, programs, dim, dtype=torch.float32, device=s.device)  # weight, bias, gamma
    if rows:
        with _device(s):
            _kernels()[1][(programs,)](
                ds, dh, s, s if branch is None else branch, weight if gamma is None else gamma, weight,
                rstd if rms else mean, rstd, dx, dbranch, parts[0], parts[1], parts[2],
                rows, dim, per_program,
                HAS_GAMMA=gamma is not None, HAS_BIAS=has_bias, RMS=rms, DBRANCH=separate,
                BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps,
            )  # fmt: skip
    dweight = parts[0].sum(0).to(weight.dtype)
    dbias = parts[1].sum(0).to(weight.dtype) if has_bias else None
    dgamma = parts[2].sum(0).to(weight.dtype) if gamma is not None else None
    return dx, dbranch, dgamma, dweight, dbias


class _AddNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, branch, gamma, weight, bias, eps, rms):
        s, h, mean, rstd = _forward(x, branch, gamma, weight, bias, eps, rms)
        ctx.save_for_backward(s, branch if gamma is not None else None, gamma, weight, mean, rstd)
        ctx.rms, ctx.has_bias, ctx.branch_dtype = rms, bias is not None, branch.dtype
        return s, h

    @staticmethod
    def backward(ctx, ds, dh):
        s, branch, gamma, weight, mean, rstd = ctx.saved_tensors
        grads = _backward(
            ds.contiguous(), dh.contiguous(), s, branch, gamma, weight, ctx.has_bias, mean, rstd, ctx.rms,
            ctx.branch_dtype,
        )  # fmt: skip
        return (
            *(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad, strict=False)),
            None,
            None,
        )


def add_norm_applies(x: Tensor, branch: Tensor, *params: Tensor | None) -> bool:
    """Whether :func:`add_norm` may replace the PyTorch ops for these tensors (``params``: the layer scale,
    norm weight and bias that will be passed, ``None`` where absent).

    The parameters must have the residual stream's dtype; the branch may be of a narrower one (an fp32 stream
    under autocast with a bf16 attention output), as type promotion then gives the stream's dtype too."""
    return (
        "add_norm" in _enabled
        and _eager_cuda(x)
        and x.dtype in _KERNEL_DTYPES
        # autocast runs norms in fp32: the same as here for an fp32 residual stream only
        and (x.dtype == torch.float32 or not torch.is_autocast_enabled(x.device.type))
        and x.shape == branch.shape
        and 0 < x.shape[-1] <= MAX_DIM
        and branch.is_floating_point()
        and torch.promote_types(branch.dtype, x.dtype) == x.dtype
        and all(p is None or (p.dtype == x.dtype and p.shape == x.shape[-1:]) for p in params)
    )


def add_norm(x: Tensor, branch: Tensor, gamma: Tensor | None, weight: Tensor, bias: Tensor | None, eps: float,
             rms: bool) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``s = x + gamma * branch`` (``x + branch`` without ``gamma``) and ``norm(s)``, in one kernel.

    Args:
        x, branch: ``[..., D]`` residual stream and the branch added to it (``branch`` of ``x``'s dtype or a
            narrower one).
        gamma: layer scale ``[D]`` or ``None``.
        weight, bias: the norm's ``[D]`` affine parameters (``bias`` ``None`` for none).
        eps: the norm's epsilon.
        rms: RMS norm as :class:`~packvit_native.layers.RMSNorm` computes it, else LayerNorm.

    Returns:
        ``(s, norm(s))``, both shaped and typed like ``x``; differentiable in every tensor argument.
    """
    shape = x.shape
    x2, b2 = x.reshape(-1, shape[-1]).contiguous(), branch.reshape(-1, shape[-1]).contiguous()
    if _records_grad(x, branch, gamma, weight, bias):
        s, h = _AddNorm.apply(x2, b2, gamma, weight, bias, eps, rms)
    else:
        s, h = _forward(x2, b2, gamma, weight, bias, eps, rms)[:2]
    return s.view(shape), h.view(shape)
