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
sdpa       per-segment ``scaled_dot_product_attention``   always available; the reference, runs on CPU too
========== ============================================== ======================================================

FA4 leads because it measured fastest on Hopper (see ``benchmarks/``); it needs compute capability 9.0 or
newer, so on older GPUs ``"auto"`` moves on to FA3 (also 9.0 only), FlashAttention-2 and PyTorch's kernel.
On the CPU only ``sdpa`` runs.
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

__all__ = ["BACKENDS", "available_backends", "resolve_backend", "varlen_attention"]

# q, k, v: [T, H, D]; returns [Tq, H, D].
AttentionFn = Callable[[Tensor, Tensor, Tensor, Segments, Segments, float], Tensor]


def _sdpa_reference(q: Tensor, k: Tensor, v: Tensor, qs: Segments, ks: Segments, scale: float) -> Tensor:
    # One dense SDPA call per segment: exact, mask-free, and the ground truth the fast kernels are checked
    # against. Segment lengths are host-side ints, so the split itself never syncs.
    outs = [
        F.scaled_dot_product_attention(
            qi.transpose(0, 1), ki.transpose(0, 1), vi.transpose(0, 1), scale=scale
        ).transpose(0, 1)  # [L, H, D]
        for qi, ki, vi in zip(q.split(qs.lengths), k.split(ks.lengths), v.split(ks.lengths), strict=True)
    ]
    return torch.cat(outs)


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


def _flash_attn4(q: Tensor, k: Tensor, v: Tensor, qs: Segments, ks: Segments, scale: float) -> Tensor:
    from flash_attn.cute import flash_attn_varlen_func

    out = flash_attn_varlen_func(
        q=q,
        k=k,
        v=v,
        cu_seqlens_q=qs.cu_seqlens,
        cu_seqlens_k=ks.cu_seqlens,
        max_seqlen_q=qs.max_seqlen,
        max_seqlen_k=ks.max_seqlen,
        softmax_scale=scale,
    )
    return out[0] if isinstance(out, tuple) else out


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
        if device.type != "cuda" or torch.cuda.get_device_capability(device) < self.min_capability:
            return False
        return _importable(self.module)


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
            why = f"it is not installed or this GPU (compute capability {torch.cuda.get_device_capability(device)}) is too old"
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
    """
    return BACKENDS[backend].fn(q, k, v, q_segments, k_segments, scale)
