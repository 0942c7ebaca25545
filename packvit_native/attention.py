"""Variable-length attention over a packed sequence, behind one function and several swappable backends.

Every backend computes exact, unmasked softmax attention inside each segment and nothing across segments:
no padding and no masks anywhere. ``varlen_attention`` is the one entry point; a backend is named by a string
and resolved once (``"auto"`` picks the fastest one installed for the tensors' device).

Backends, in the order ``"auto"`` tries them on a CUDA device:

========== ============================================== ======================================================
name       kernel                                         install
========== ============================================== ======================================================
fa4        FlashAttention-4 ``flash_attn.cute``           ``pip install flash-attn-4`` (Hopper / Blackwell)
fa3        FlashAttention-3 ``flash_attn_interface``      build ``hopper/`` of the flash-attention repo (Hopper)
flash_attn FlashAttention-2 ``flash_attn``                ``pip install flash-attn --no-build-isolation``
torch      ``torch.nn.attention.varlen.varlen_attn``      PyTorch >= 2.10 with CUDA (ships FlashAttention-2)
sdpa       per-segment dense softmax in fp32              always available; the reference, runs on CPU too
========== ============================================== ======================================================

FA4 leads because it measured fastest on Hopper (see ``benchmarks/``); it needs compute capability 9.0 or
newer, so on older GPUs ``"auto"`` moves on to FA3 (also 9.0 only), FlashAttention-2 and PyTorch's kernel.
On the CPU only ``sdpa`` runs.

Training: every backend has a backward. Under ``torch.compile`` the FlashAttention-2/3 and PyTorch kernels are
custom ops of their own; FA4 and the reference are wrapped here as a forward/backward pair of custom ops
(:func:`define_varlen_op`), so a block traces into one graph whichever backend it uses, and a new batch
(other segment lengths, other segment count) reuses that graph under dynamic shapes.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .packing import Segments

__all__ = [
    "BACKENDS",
    "attend",
    "available_backends",
    "define_varlen_op",
    "resolve_backend",
    "varlen_attention",
]

# q, k, v: [T, H, D]; returns [Tq, H, D].
AttentionFn = Callable[[Tensor, Tensor, Tensor, Segments, Segments, float], Tensor]


# A varlen attention op as two custom ops joined by autograd, for kernels that have no compile-friendly entry
# of their own. Dynamo cannot see inside a custom op, so a compiled block keeps one graph around it, and the
# host-side work (reading segment boundaries, launching a CuTe kernel) happens at run time, not at trace time.
# Both ops take the same arguments: q [Tq, H, D], k [Tk, H, D], v [Tk, H, Dv], segment boundaries for q and
# k, the longest segment of each (ints, so they become symbolic under dynamic shapes) and the softmax scale.
VarlenForward = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, int, int, float], tuple[Tensor, Tensor]]
VarlenBackward = Callable[
    [Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, int, int, float],
    tuple[Tensor, Tensor, Tensor],
]


def _accumulation_dtype(q: Tensor) -> torch.dtype:
    return torch.promote_types(q.dtype, torch.float32)


def define_varlen_op(name: str, forward: VarlenForward, backward: VarlenBackward, device_types=None):
    """Register ``packvit::<name>`` (returns ``out, lse``) and ``packvit::<name>_backward`` (``dq, dk, dv``).

    Args:
        name: op name in the ``packvit`` namespace.
        forward: ``(q, k, v, cu_q, cu_k, max_q, max_k, scale) -> (out [Tq, H, Dv], lse [H, Tq])``, with the
            log-sum-exp in fp32 (fp64 for fp64 inputs).
        backward: ``(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale) -> (dq, dk, dv)``.
        device_types: restrict the kernel to these devices (``None``: any).

    Returns:
        The forward op; its output's first element is the attention output and carries gradients.
    """

    @torch.library.custom_op(f"packvit::{name}", mutates_args=(), device_types=device_types)
    def fwd_op(
        q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int, scale: float
    ) -> tuple[Tensor, Tensor]:
        out, lse = forward(q, k, v, cu_q, cu_k, max_q, max_k, scale)
        return out.contiguous(), lse.contiguous()  # the fake below promises contiguous outputs

    @fwd_op.register_fake
    def _(q, k, v, cu_q, cu_k, max_q, max_k, scale):
        # Shapes follow from q and v alone; max_q/max_k must not shape anything (they may be symbolic).
        lse = q.new_empty(q.shape[1], q.shape[0], dtype=_accumulation_dtype(q))
        return q.new_empty(*q.shape[:-1], v.shape[-1]), lse

    @torch.library.custom_op(f"packvit::{name}_backward", mutates_args=(), device_types=device_types)
    def bwd_op(
        dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_q: Tensor, cu_k: Tensor,
        max_q: int, max_k: int, scale: float,
    ) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        dq, dk, dv = backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale)
        return dq.contiguous(), dk.contiguous(), dv.contiguous()

    @bwd_op.register_fake
    def _(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def setup_context(ctx, inputs, output) -> None:
        q, k, v, cu_q, cu_k, max_q, max_k, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.max_q, ctx.max_k, ctx.scale = max_q, max_k, scale

    def grad(ctx, dout: Tensor, dlse: Tensor | None):
        # The log-sum-exp is an internal by-product (the public wrappers drop it), so dlse is never used.
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        dq, dk, dv = bwd_op(dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, ctx.max_q, ctx.max_k, ctx.scale)
        return dq, dk, dv, None, None, None, None, None

    fwd_op.register_autograd(grad, setup_context=setup_context)
    return fwd_op


def _segment_bounds(cu_q: Tensor, cu_k: Tensor) -> list[tuple[int, int, int, int]]:
    # Host tensors (Segments.host_cu_seqlens), so reading them never waits on a device.
    bq, bk = cu_q.tolist(), cu_k.tolist()
    return list(zip(bq[:-1], bq[1:], bk[:-1], bk[1:], strict=True))


def _reference_forward(
    q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int, scale: float
) -> tuple[Tensor, Tensor]:
    # Dense softmax per segment in fp32 (or fp64), keeping the log-sum-exp for the backward as flash kernels
    # do. It materialises each segment's [H, L, L] scores: a reference, not a kernel for large images.
    acc = _accumulation_dtype(q)
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    lse = q.new_empty(q.shape[1], q.shape[0], dtype=acc)
    for q0, q1, k0, k1 in _segment_bounds(cu_q, cu_k):
        s = torch.einsum("qhd,khd->hqk", q[q0:q1].to(acc), k[k0:k1].to(acc)) * scale  # [H, Lq, Lk]
        m = s.logsumexp(-1)  # [H, Lq]
        out[q0:q1] = torch.einsum("hqk,khd->qhd", (s - m[..., None]).exp(), v[k0:k1].to(acc)).to(out.dtype)
        lse[:, q0:q1] = m
    return out, lse


def _reference_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_q: Tensor, cu_k: Tensor,
    max_q: int, max_k: int, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    acc = _accumulation_dtype(q)
    dq, dk, dv = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    for q0, q1, k0, k1 in _segment_bounds(cu_q, cu_k):
        qf, kf, vf = q[q0:q1].to(acc), k[k0:k1].to(acc), v[k0:k1].to(acc)
        do, o = dout[q0:q1].to(acc), out[q0:q1].to(acc)
        p = (torch.einsum("qhd,khd->hqk", qf, kf) * scale - lse[:, q0:q1, None]).exp()  # [H, Lq, Lk]
        dp = torch.einsum("qhd,khd->hqk", do, vf)
        # Softmax backward: dS = P * (dP - rowsum(P * dP)), and rowsum(P * dP) = rowsum(dO * O).
        ds = p * (dp - (do * o).sum(-1).T[..., None])
        dq[q0:q1] = torch.einsum("hqk,khd->qhd", ds, kf) * scale
        dk[k0:k1] = torch.einsum("hqk,qhd->khd", ds, qf) * scale
        dv[k0:k1] = torch.einsum("hqk,qhd->khd", p, do)
    return dq, dk, dv


_reference_op = define_varlen_op("reference_varlen", _reference_forward, _reference_backward)


def _sdpa_reference(q: Tensor, k: Tensor, v: Tensor, qs: Segments, ks: Segments, scale: float) -> Tensor:
    # Exact, mask-free attention per segment: the ground truth the fast kernels are checked against. It splits
    # by host-side boundaries inside a custom op, so it never syncs and compiled blocks neither break their
    # graph nor recompile when the segment lengths change.
    return _reference_op(
        q, k, v, qs.host_cu_seqlens, ks.host_cu_seqlens, qs.max_seqlen, ks.max_seqlen, scale
    )[0]


def _torch_varlen(q: Tensor, k: Tensor, v: Tensor, qs: Segments, ks: Segments, scale: float) -> Tensor:
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, qs.cu_seqlens, ks.cu_seqlens, qs.max_seqlen, ks.max_seqlen, scale=scale)


def _flash_attn2(q: Tensor, k: Tensor, v: Tensor, qs: Segments, ks: Segments, scale: float) -> Tensor:
    from flash_attn.flash_attn_interface import flash_attn_varlen_func

    return flash_attn_varlen_func(
        q, k, v, qs.cu_seqlens, ks.cu_seqlens, qs.max_seqlen, ks.max_seqlen, softmax_scale=scale
    )


def _flash_attn3(q: Tensor, k: Tensor, v: Tensor, qs: Segments, ks: Segments, scale: float) -> Tensor:
    from flash_attn_interface import flash_attn_varlen_func

    out = flash_attn_varlen_func(
        q, k, v, qs.cu_seqlens, ks.cu_seqlens, qs.max_seqlen, ks.max_seqlen, softmax_scale=scale
    )
    # Older FA3 releases return (out, softmax_lse), newer ones just out.
    return out[0] if isinstance(out, tuple) else out


def _fa4_forward(
    q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int, scale: float
) -> tuple[Tensor, Tensor]:
    from flash_attn.cute.interface import _flash_attn_fwd

    # Autograd is off inside a custom op, so ask for the log-sum-exp explicitly: the backward needs it.
    out, lse = _flash_attn_fwd(
        q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
        softmax_scale=scale, causal=False, return_lse=True,
    )[:2]  # fmt: skip
    return out, lse


def _fa4_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_q: Tensor, cu_k: Tensor,
    max_q: int, max_k: int, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    from flash_attn.cute.interface import _flash_attn_bwd

    # flash-attn-4 4.0.0b36 on sm90 returns a wrong dq for head dims that are not multiples of 32 (72 and 80
    # measured: relative error 1.0; 64, 96 and 128 are right). Zero-padding the head dim is exact: padded q/k
    # columns add nothing to the scores, padded v/out/dout columns add nothing to dP or to rowsum(dout * out),
    # and the softmax scale is passed explicitly. So the backward runs at the next multiple of 32 and is sliced.
    q, k, v = (
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
    )  # the backward kernel is only run on dense inputs
    d, dv_dim = q.shape[-1], v.shape[-1]
    pad_qk, pad_v = -d % 32, -dv_dim % 32
    if pad_qk or pad_v:
        q, k = F.pad(q, (0, pad_qk)), F.pad(k, (0, pad_qk))
        v, out, dout = F.pad(v, (0, pad_v)), F.pad(out, (0, pad_v)), F.pad(dout, (0, pad_v))
    dq, dk, dv = _flash_attn_bwd(
        q, k, v, out, dout, lse, softmax_scale=scale, causal=False,
        cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q, max_seqlen_k=max_k,
    )[:3]  # fmt: skip
    return dq[..., :d], dk[..., :d], dv[..., :dv_dim]


# flash-attn-4 (4.0.0b36) registers no custom ops and its CuTe-DSL Python cannot be traced by Dynamo; this pair
# makes it an opaque, differentiable op with fakes, so blocks using it compile in one graph.
_fa4_op = define_varlen_op("fa4_varlen", _fa4_forward, _fa4_backward, device_types="cuda")


def _flash_attn4(q: Tensor, k: Tensor, v: Tensor, qs: Segments, ks: Segments, scale: float) -> Tensor:
    # q, k and v are strided views of the fused qkv projection; FA4's forward reads them in place (only the
    # head dim must be contiguous), which saves three copies of the activations per layer.
    return _fa4_op(q, k, v, qs.cu_seqlens, ks.cu_seqlens, qs.max_seqlen, ks.max_seqlen, scale)[0]


@dataclass(frozen=True)
class Backend:
    name: str
    fn: AttentionFn
    module: str | None  # the import that must succeed; None for built-ins
    min_capability: tuple[int, int] | None  # CUDA compute capability; None for the CPU-capable reference
    install: str

    def is_available(self, device: torch.device) -> bool:
        if self.min_capability is None:
            return True
        if (
            device.type != "cuda"
            or not torch.cuda.is_available()
            or _capability(device) < self.min_capability
        ):
            return False
        return _importable(self.module)


def _capability(device: torch.device) -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability_of(index)


@functools.cache
def _capability_of(index: int) -> tuple[int, int]:
    """A GPU's compute capability, asked once: the question comes with every forward."""
    return torch.cuda.get_device_capability(index)


@functools.cache
def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # a broken install (missing CUDA libs, ABI mismatch) counts as not installed
        return False
    return True


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("fa4", _flash_attn4, "flash_attn.cute", (9, 0), "pip install flash-attn-4  (Hopper/Blackwell GPUs)"),
        Backend("fa3", _flash_attn3, "flash_attn_interface", (9, 0), "build and install hopper/ from the flash-attention repository (Hopper GPUs)"),
        Backend("flash_attn", _flash_attn2, "flash_attn.flash_attn_interface", (8, 0), "pip install flash-attn --no-build-isolation  (Ampere or newer GPUs)"),
        Backend("torch", _torch_varlen, "torch.nn.attention.varlen", (8, 0), "PyTorch >= 2.10 built with CUDA, on an Ampere or newer GPU"),
        Backend("sdpa", _sdpa_reference, None, None, "built in"),
    )
}  # fmt: skip
AUTO_ORDER = ("fa4", "fa3", "flash_attn", "torch", "sdpa")


def available_backends(device: torch.device | str) -> list[str]:
    """Names of the backends that can run on ``device``, fastest first."""
    device = torch.device(device)
    return [name for name in AUTO_ORDER if BACKENDS[name].is_available(device)]


def resolve_backend(name: str, device: torch.device | str) -> str:
    """Turn a backend name (or ``"auto"``) into a concrete backend that runs on ``device``, or raise."""
    device = torch.device(device)
    if name == "auto":
        return available_backends(device)[0]
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {['auto', *BACKENDS]}")
    backend = BACKENDS[name]
    if not backend.is_available(device):
        if device.type != "cuda":
            why = f"it needs a CUDA GPU and the model is on {device}"
        else:
            why = f"it is not installed or this GPU (compute capability {_capability(device)}) is too old"
        raise ValueError(
            f"attention backend {name!r} is not available: {why}. To use it: {backend.install}. "
            f"Available here: {available_backends(device)}"
        )
    return name


def varlen_attention(
    q: Tensor, k: Tensor, v: Tensor, q_segments: Segments, k_segments: Segments, backend: str, scale: float
) -> Tensor:
    """Attention within each segment of a packed sequence.

    Args:
        q: ``[Tq, H, D]`` queries; segment ``i`` holds rows ``q_segments.cu_seqlens[i]:[i+1]``.
        k, v: ``[Tk, H, D]`` keys and values, segmented by ``k_segments`` (the same object for self-attention;
            different for pooling heads whose few queries attend over whole images).
        backend: a concrete backend name from :func:`resolve_backend`.
        scale: softmax scale, usually ``D ** -0.5``.

    Returns:
        ``[Tq, H, D]``.

    Raises:
        ValueError: the segments do not cover the rows exactly (rows outside every segment would come back
            uninitialised), the shapes disagree, or the backend is unknown. Checked on the host, from the
            segments' lengths.
    """
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3 or k.shape[:2] != v.shape[:2] or q.shape[1:] != k.shape[1:]:
        raise ValueError(
            f"q, k, v must be [T, H, D] with k and v of one length and q and k of one head shape; got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    for name, x, segments in (("q", q, q_segments), ("k", k, k_segments)):
        if segments.total != x.shape[0]:
            raise ValueError(f"{name}_segments cover {segments.total} rows but {name} has {x.shape[0]}")
    if len(q_segments.lengths) != len(k_segments.lengths):
        raise ValueError(
            f"q_segments has {len(q_segments.lengths)} segments and k_segments {len(k_segments.lengths)}; "
            "query segment i attends over key segment i"
        )
    return attend(q, k, v, q_segments, k_segments, backend, scale)


def attend(
    q: Tensor, k: Tensor, v: Tensor, q_segments: Segments, k_segments: Segments, backend: str, scale: float
) -> Tensor:
    """:func:`varlen_attention` without its input checks, for the model's own layers: their segments come from
    the packing their tokens were laid out by (or, replayed from a CUDA graph, carry no host-side lengths),
    and a check per layer would read host state inside every compiled block."""
    chosen = BACKENDS.get(backend)
    if chosen is None:
        raise ValueError(
            f"unknown attention backend {backend!r}: pass one of {sorted(BACKENDS)} (resolve_backend picks one "
            "for a device, 'auto' included)"
        )
    return chosen.fn(q, k, v, q_segments, k_segments, scale)
