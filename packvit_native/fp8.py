"""FP8 inference: the transformer blocks' linear layers as float8 GEMMs, everything else in bf16.

:func:`convert_to_fp8` turns every block linear (the fused q/k/v projection and the attention output, the
MLP's two linears or SwiGLU's fused gate/up and down) into an :class:`Fp8Linear`: its weight is stored as
float8 e4m3 with one fp32 scale per output channel, computed once at conversion; its input is quantized per
row (per token) at every call, each row scaled by its own largest magnitude; the product is one
``torch._scaled_mm`` that applies both scales and the bias in its epilogue and writes bf16. Norms, attention,
positions, the patch embedding, heads, mergers and projections stay bf16: they hold a small share of the FLOPs,
and softmax and norm statistics are where 3 mantissa bits would hurt most.

Per-token scales make a token's result independent of what else is packed with it (a per-tensor scale would
let one bright image coarsen the quantization of every other image in the batch), and e4m3's exponent range
keeps small channels of a row with an outlier channel at full relative precision.

Quantizing the activations in PyTorch ops takes four passes over them (abs-max, divide, clamp, cast). In eager
CUDA forwards it is one Triton kernel (one read, one fp8 write); under ``torch.compile`` the PyTorch formula is
traced instead, for Inductor to fuse with the kernel that produced the input (the norm, the MLP activation).

Inference only: ``torch._scaled_mm`` has no backward. The weights are buffers, :func:`convert_to_fp8` freezes
every parameter of the model (so a plain forward records no graph), and an FP8 linear refuses an input that
needs a gradient.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .rope_kernel import _triton_importable

if TYPE_CHECKING:
    from .encoder import PackedVisionEncoder

__all__ = [
    "FP8_DTYPE",
    "Fp8Linear",
    "convert_to_fp8",
    "fp8_unavailable_reason",
    "fused_quantize_available",
    "quantize_rows",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
# Floor of a row's abs-max: an all-zero row gets a tiny positive scale instead of a division by zero (its
# quantized values are zeros either way).
AMAX_FLOOR = 1e-12
INV_FP8_MAX = 1 / FP8_MAX  # rounded to fp32 where it is used
# torch._scaled_mm needs the inner dimension and the output width in multiples of 16.
ALIGNMENT = 16
# Lowest CUDA compute capability with float8 tensor cores (Ada); Hopper and Blackwell have them too.
MIN_CAPABILITY = (8, 9)


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Quantize ``x`` ``[M, K]`` per row to float8 e4m3.

    Returns:
        ``(q [M, K] float8_e4m3fn, scale [M, 1] fp32)`` with ``x ≈ q * scale``; each row's largest magnitude
        maps to 448, the largest e4m3 value.
    """
    if fused_quantize_available(x):
        return _quantize_fused(x)
    # A product with the reciprocal, not a quotient: PyTorch divides by a scalar that way on CUDA and exactly on
    # the CPU, which gave scales one bit apart (and codes apart where a quotient falls on a rounding midpoint,
    # as bf16 inputs often do). A product rounds the same on every device, in Triton and under compile.
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=AMAX_FLOOR) * INV_FP8_MAX  # [M, 1]
    # The clamp keeps a quotient rounded just above 448 finite: float8 e4m3fn has no infinity.
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


@functools.cache
def _quantize_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def quantize(x_ptr, q_ptr, scale_ptr, cols, x_row, amax_floor, inv_fp8_max, fp8_max, BLOCK: tl.constexpr):
        # One program: one whole row. int64 offsets: a packed batch passes 2**31 elements at about 500k
        # tokens of an MLP's hidden width.
        row = tl.program_id(0).to(tl.int64)
        j = tl.arange(0, BLOCK)
        mask = j < cols
        x = tl.load(x_ptr + row * x_row + j, mask=mask, other=0.0).to(tl.float32)
        # A rounded product and a rounded division, so the scales and codes are those of the PyTorch formula.
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), amax_floor) * inv_fp8_max
        q = tl.clamp(tl.div_rn(x, scale), -fp8_max, fp8_max)
        tl.store(q_ptr + row * cols + j, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + row, scale)

    return quantize


def _quantize_fused(x: Tensor) -> tuple[Tensor, Tensor]:
    import triton

    rows, cols = x.shape
    q = torch.empty((rows, cols), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        block = triton.next_power_of_2(cols)
        with torch.cuda.device(x.device):  # Triton launches on the current device and its current stream
            _quantize_kernel()[(rows,)](
                x, q, scale, cols, x.stride(0), AMAX_FLOOR, INV_FP8_MAX, FP8_MAX, BLOCK=block,
                num_warps=max(1, min(16, block // 512)),
            )  # fmt: skip
    return q, scale


def fused_quantize_available(x: Tensor) -> bool:
    """Whether :func:`quantize_rows` runs the Triton kernel on ``x``: an eager CUDA forward with Triton."""
    return (
        x.is_cuda
        and x.ndim == 2
        and x.stride(-1) == 1
        and not torch.compiler.is_compiling()
        and _triton_importable()
    )


class Fp8Linear(nn.Module):
    """``y = x W^T + b`` with ``W`` in float8 e4m3 (one fp32 scale per output channel) and ``x`` quantized per
    row at each call; bf16 bias and output.

    Deliberately not an ``nn.Linear``: code that reads a linear's ``weight`` as a matrix it can multiply by
    (a fused MLP kernel, ``F.linear``) must not take this for one. Build it with :meth:`from_linear`.

    Args:
        in_features, out_features: the shape, each a multiple of 16.
        bias: whether it has a bias.
        fast_accum: let Hopper tensor cores accumulate in their faster, less precise mode.
        device, out_dtype: where the buffers live and the output (and bias) dtype.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, fast_accum: bool = True,
        device: torch.device | str | None = None, out_dtype: torch.dtype = torch.bfloat16,
    ) -> None:  # fmt: skip
        super().__init__()
        if in_features % ALIGNMENT or out_features % ALIGNMENT:
            raise ValueError(
                f"an FP8 linear needs in and out features in multiples of {ALIGNMENT}, got "
                f"{in_features} -> {out_features}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.fast_accum = fast_accum
        self.out_dtype = out_dtype
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale", torch.ones(1, out_features, dtype=torch.float32, device=device))
        self.register_buffer(
            "bias", torch.zeros(out_features, dtype=out_dtype, device=device) if bias else None
        )

    def _apply(self, fn, recurse: bool = True) -> Fp8Linear:
        # FP8 codes, their fp32 scales and the bias are a storage format, not values to convert: a model-wide
        # .to(dtype) / .float() / .half() would cast them and break the scaled matmul, so only device moves
        # apply here (the layer still takes any floating input and returns out_dtype).
        for name, buf in self._buffers.items():
            if buf is not None:
                moved = fn(buf)
                self._buffers[name] = moved if moved.dtype == buf.dtype else buf.to(moved.device)
        return self

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, fast_accum: bool = True) -> Fp8Linear:
        """Quantize ``linear``'s weight per output channel; its dtype becomes the output dtype."""
        w = linear.weight
        out = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            fast_accum=fast_accum,
            device=w.device,
            out_dtype=w.dtype,
        )
        q, scale = quantize_rows(w)
        out.weight.copy_(q)
        out.weight_scale.copy_(scale.reshape(1, -1))  # [1, N]: the layout _scaled_mm takes for the columns
        if linear.bias is not None:
            out.bias.copy_(linear.bias)
        return out

    def forward(self, x: Tensor) -> Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            raise RuntimeError(
                "FP8 linears are for inference only (torch._scaled_mm has no backward), and this input needs a "
                "gradient; run under torch.inference_mode(), or load the model without precision='fp8' to train"
            )
        q, scale = quantize_rows(x.reshape(-1, self.in_features))
        out = torch._scaled_mm(
            q, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, bias=self.bias,
            out_dtype=self.out_dtype, use_fast_accum=self.fast_accum,
        )  # fmt: skip
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"fast_accum={self.fast_accum}"
        )


def fp8_unavailable_reason(device: torch.device | str) -> str | None:
    """Why FP8 linears cannot run on ``device``, or ``None`` when they can."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA GPU is available"
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            name = torch.cuda.get_device_name(device)
            return (
                f"FP8 matmuls need a CUDA GPU of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or "
                f"newer (Ada, Hopper, Blackwell); {device} ({name}) is {capability[0]}.{capability[1]}"
            )
    elif device.type != "cpu":
        return f"FP8 linears run on CUDA GPUs and the CPU, not on {device.type}"
    if not _rowwise_fp8_runs(str(device)):
        return f"this PyTorch ({torch.__version__}) cannot multiply float8 matrices with per-row scales on {device}"
    return None


@functools.cache
def _rowwise_fp8_runs(device: str) -> bool:
    """Whether ``torch._scaled_mm`` with per-row scales and a bf16 output runs on ``device`` (a tiny product)."""
    a = torch.zeros(ALIGNMENT, ALIGNMENT, device=device).to(FP8_DTYPE)
    scale = torch.ones(ALIGNMENT, 1, device=device)
    try:
        torch._scaled_mm(a, a.t(), scale_a=scale, scale_b=scale.t(), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):  # older CPU builds, or a CUDA build without the kernels
        return False
    return True


def convert_to_fp8(model: PackedVisionEncoder, fast_accum: bool = True) -> PackedVisionEncoder:
    """Turn the linear layers of ``model.blocks`` into :class:`Fp8Linear`, in place, and freeze the model.

    Only the transformer blocks are converted; the patch embedding, heads, mergers and projection keep their
    dtype. A linear whose sizes are not multiples of 16 (``torch._scaled_mm``'s constraint; e.g. Qwen2.5-VL's
    MLP of width 3420) stays as it is. Every parameter gets ``requires_grad=False``: FP8 is inference only.

    Args:
        model: a :class:`~packvit_native.encoder.PackedVisionEncoder` in bfloat16, on a device where
            :func:`fp8_unavailable_reason` finds nothing missing.
        fast_accum: passed to every :class:`Fp8Linear`.

    Returns:
        ``model``, for chaining.

    Raises:
        ValueError: the block linears are not bfloat16, or the device cannot run FP8 matmuls.
    """
    linears = [
        (block, name, module)
        for block in model.blocks
        for name, module in block.named_modules()
        if isinstance(module, nn.Linear)
    ]
    if linears:
        weight = linears[0][2].weight
        if weight.dtype != torch.bfloat16:
            raise ValueError(
                f"convert_to_fp8 needs a bfloat16 model (its non-FP8 parts run in bf16), got {weight.dtype}; "
                "call model.to(torch.bfloat16) first"
            )
        reason = fp8_unavailable_reason(weight.device)
        if reason is not None:
            raise ValueError(f"cannot convert the model to FP8: {reason}")
    for block, name, linear in linears:
        if linear.in_features % ALIGNMENT or linear.out_features % ALIGNMENT:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = block.get_submodule(parent_name)
        setattr(parent, child, Fp8Linear.from_linear(linear, fast_accum))
    return model.requires_grad_(False)
