"""Building blocks of the one pre-norm transformer block.

Everything here is pointwise on the packed ``[T, D]`` tensor except attention, which alone knows segment
boundaries (through :class:`~packvit_native.packing.Segments`). Optional parts (layer scale, biases) become
identities or zero-free linears, so a block is two residual lines with no branches.

Training: :class:`DropPath` drops a residual branch per packed image (segment), and a block can recompute its
activations in the backward instead of storing them (``Block.checkpointed``, set through
:meth:`~packvit_native.encoder.PackedVisionEncoder.set_activation_checkpointing`).

On eager CUDA, the first residual add and ``norm2`` run as one kernel, and a GELU-tanh MLP's ``fc1`` applies its
bias and activation in the GEMM when no gradient is recorded (:mod:`packvit_native.fused`, where they can be
switched off); everywhere else the PyTorch ops below run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import fused
from .attention import attend
from .config import EncoderConfig
from .packing import Segments
from .rope_kernel import fused_rope_available, rope_fused

__all__ = [
    "Attention",
    "Block",
    "BlockContext",
    "DropPath",
    "LayerScale",
    "Mlp",
    "RMSNorm",
    "SwiGLU",
    "make_norm",
]


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": _gelu_tanh,
    "silu": F.silu,
    "quick_gelu": _quick_gelu,
}


class RMSNorm(nn.Module):
    """RMS norm computed in fp32 whatever the input dtype, as AIMv2's reference does, then cast back."""

    def __init__(self, dim: int, eps: float, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(config: EncoderConfig, dim: int | None = None, device=None, dtype=None) -> nn.Module:
    """The model's norm (kind and epsilon from ``config``) over ``dim`` features (default ``hidden_size``)."""
    dim = dim or config.hidden_size
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.norm_eps, device=device, dtype=dtype)
    return nn.LayerNorm(dim, eps=config.norm_eps, device=device, dtype=dtype)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 1.0, device=None, dtype=None) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """fc1 -> activation -> fc2."""

    def __init__(self, config: EncoderConfig, device=None, dtype=None) -> None:
        super().__init__()
        d, h, bias = config.hidden_size, config.mlp_hidden, config.mlp_bias
        self.fc1 = nn.Linear(d, h, bias=bias, device=device, dtype=dtype)
        self.fc2 = nn.Linear(h, d, bias=bias, device=device, dtype=dtype)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: Tensor) -> Tensor:
        fc1 = self.fc1
        # Exactly nn.Linear: a subclass or another module (an fp8 linear) computes something else than its
        # weight and bias say.
        if (
            self.act is _gelu_tanh
            and type(fc1) is nn.Linear
            and fused.linear_gelu_applies(x, fc1.weight, fc1.bias)
        ):
            return self.fc2(fused.linear_gelu_tanh(x, fc1.weight, fc1.bias))
        return self.fc2(self.act(fc1(x)))


class SwiGLU(nn.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))``, with gate and up fused into one linear (gate rows first)."""

    def __init__(self, config: EncoderConfig, device=None, dtype=None) -> None:
        super().__init__()
        d, h, bias = config.hidden_size, config.mlp_hidden, config.mlp_bias
        self.gate_up = nn.Linear(d, 2 * h, bias=bias, device=device, dtype=dtype)
        self.down = nn.Linear(h, d, bias=bias, device=device, dtype=dtype)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # [T, h] each
        return self.down(self.act(gate) * up)


@dataclass(frozen=True, eq=False)
class BlockContext:
    """What every block of one forward shares, computed once before the layer loop.

    Attributes:
        segmentations: segment boundaries of the block sequence by name: ``"frames"`` always, ``"windows"``
            for a model with attention windows; each block attends within the one it was built for.
        backend: concrete attention backend name.
        rope: ``(cos, sin)`` each ``[T, 1, head_dim]``, or ``None``; q and k are rotated in their dtype.
        token_segment: ``[T]`` int64 frame of every token, prefix tokens included; only set when drop path
            is active (training with ``drop_path_rate > 0``).
    """

    segmentations: dict[str, Segments]
    backend: str
    rope: tuple[Tensor, Tensor] | None = None
    token_segment: Tensor | None = None


class DropPath(nn.Module):
    """Stochastic depth per packed image: in training, each segment's residual branch is dropped whole with
    probability ``p`` and the kept ones are scaled by ``1 / (1 - p)``; the identity in eval.

    DINOv3 drops per sample of a padded batch; a segment (one frame) is that sample here. The draw is made as
    the reference makes it (uniform in the activation dtype, ``floor(u + keep)``), one value per segment in
    segment order, so a one-image batch consumes the random stream exactly as transformers does.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    @property
    def active(self) -> bool:
        """Whether the forward drops anything (training with ``p > 0``); otherwise it is the identity."""
        return self.training and self.p != 0.0

    def forward(self, x: Tensor, ctx: BlockContext) -> Tensor:
        if not self.active:
            return x
        if ctx.token_segment is None:
            raise ValueError("drop path needs BlockContext.token_segment (the encoder sets it in training)")
        keep = 1.0 - self.p
        num_segments = ctx.segmentations["frames"].cu_seqlens.shape[0] - 1
        mask = torch.floor(torch.rand(num_segments, dtype=x.dtype, device=x.device) + keep)  # [S] of 0 / 1
        return x.div(keep) * mask[ctx.token_segment, None]

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``[T, H, Dh]`` by angles whose cos/sin are ``[T, 1, Dh]`` (halves layout), in the dtype of
    the angles (the fused CUDA kernel: in fp32), and return it in the dtype of ``x``."""
    if fused_rope_available(x, cos, sin):
        return rope_fused(x, cos, sin)
    xr = x.to(cos.dtype)
    return (xr * cos + _rotate_half(xr) * sin).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with a fused q/k/v projection and varlen attention over segments.

    Args:
        segmentation: which segmentation of the block sequence it attends within (``"frames"`` or
            ``"windows"``, see :class:`~packvit_native.packing.Packing`).
    """

    def __init__(self, config: EncoderConfig, segmentation: str = "frames", device=None, dtype=None) -> None:
        super().__init__()
        self.segmentation = segmentation
        d = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(d, 3 * d, bias=config.qkv_bias, device=device, dtype=dtype)
        # InternViT-6B norms q and k over all heads at once, before they are split into heads.
        qk_norm = (
            (lambda: RMSNorm(d, config.norm_eps, device=device, dtype=dtype))
            if config.qk_norm
            else nn.Identity
        )
        self.q_norm, self.k_norm = qk_norm(), qk_norm()
        self.proj = nn.Linear(d, d, bias=config.proj_bias, device=device, dtype=dtype)
        # A source without a key bias (DINOv3) gets a zero key slice in the fused bias, so one linear serves.
        # Softmax ignores a key bias without RoPE (it adds the same q.b to every score of a query), but after
        # RoPE the rotated bias differs per position and would receive a gradient. It is held at zero with no
        # gradient, so training stays on the source architecture and the result converts back to it.
        self.frozen_key_bias = config.qkv_bias and not config.key_bias

    def _qkv(self, x: Tensor) -> Tensor:
        if not isinstance(self.qkv, nn.Linear):  # an FP8 projection: inference only, no gradient to hold back
            return self.qkv(x)
        bias = self.qkv.bias
        if self.frozen_key_bias:
            d = bias.shape[0] // 3
            bias = torch.cat((bias[:d], bias[d : 2 * d].detach(), bias[2 * d :]))
        return F.linear(x, self.qkv.weight, bias)

    def forward(self, x: Tensor, ctx: BlockContext) -> Tensor:
        qkv = self._qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim))  # [T, 3, H, Dh]
        q, k, v = qkv.unbind(1)  # [T, H, Dh] each
        q = self.q_norm(q.flatten(1)).view_as(q)
        k = self.k_norm(k.flatten(1)).view_as(k)
        if ctx.rope is not None:
            q, k = apply_rope(q, *ctx.rope), apply_rope(k, *ctx.rope)
        segments = ctx.segmentations[self.segmentation]
        out = attend(q, k, v, segments, segments, ctx.backend, self.scale)  # [T, H, Dh]
        return self.proj(out.flatten(1))  # [T, D]


class Block(nn.Module):
    """Pre-norm transformer block: ``x + drop(ls1(attn(norm1(x))))``, then ``x + drop(ls2(mlp(norm2(x))))``.

    With ``checkpointed`` set, a forward that records gradients keeps only the block's input and recomputes
    the rest in the backward (non-reentrant checkpointing; the random state is restored, so drop path drops
    the same segments both times).
    """

    def __init__(self, config: EncoderConfig, index: int, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        windowed = config.window_size > 0 and index not in config.full_attention_blocks
        self.norm1 = make_norm(config, **dd)
        self.attn = Attention(config, "windows" if windowed else "frames", **dd)
        self.ls1 = LayerScale(config.hidden_size, **dd) if config.layer_scale else nn.Identity()
        self.norm2 = make_norm(config, **dd)
        self.mlp = SwiGLU(config, **dd) if config.mlp == "swiglu" else Mlp(config, **dd)
        self.ls2 = LayerScale(config.hidden_size, **dd) if config.layer_scale else nn.Identity()
        self.drop_path = DropPath(config.drop_path_rate)
        self.checkpointed = False

    def forward(self, x: Tensor, ctx: BlockContext) -> Tensor:
        if self.checkpointed and torch.is_grad_enabled():
            return checkpoint(self._residuals, x, ctx, use_reentrant=False)
        return self._residuals(x, ctx)

    def _residuals(self, x: Tensor, ctx: BlockContext) -> Tensor:
        x, h = self._add_norm2(x, self.attn(self.norm1(x), ctx), ctx)
        return self._add_branch(x, self.mlp(h), self.ls2, ctx)

    def _add_branch(self, x: Tensor, branch: Tensor, scale: nn.Module, ctx: BlockContext) -> Tensor:
        """``x + drop(scale(branch))``, one kernel where :func:`~.fused.scale_add_applies`."""
        if (
            type(scale) is LayerScale
            and not self.drop_path.active
            and fused.scale_add_applies(x, branch, scale.gamma)
        ):
            return fused.scale_add(x, branch, scale.gamma)
        return x + self.drop_path(scale(branch), ctx)

    def _add_norm2(self, x: Tensor, branch: Tensor, ctx: BlockContext) -> tuple[Tensor, Tensor]:
        """``x + drop(ls1(branch))`` and ``norm2`` of it: one kernel where :func:`~.fused.add_norm` applies."""
        norm = _fusable_norm(self.norm2)
        gamma = self.ls1.gamma if type(self.ls1) is LayerScale else None
        if (
            norm is not None
            and (gamma is not None or type(self.ls1) is nn.Identity)
            and not self.drop_path.active
            and fused.add_norm_applies(x, branch, gamma, norm[0], norm[1])
        ):
            return fused.add_norm(x, branch, gamma, *norm)
        x = self._add_branch(x, branch, self.ls1, ctx)
        return x, self.norm2(x)


def _fusable_norm(norm: nn.Module) -> tuple[Tensor, Tensor | None, float, bool] | None:
    """``(weight, bias, eps, rms)`` of a norm that :func:`~.fused.add_norm` computes, else ``None``."""
    if type(norm) is RMSNorm:
        return norm.weight, None, norm.eps, True
    if type(norm) is nn.LayerNorm and norm.weight is not None and len(norm.normalized_shape) == 1:
        return norm.weight, norm.bias, norm.eps, False
    return None
