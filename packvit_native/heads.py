"""Output heads over the final tokens: a pooled vector per segment, or a merged row per ``m x m`` block.

Every head takes the normed *sequence* (frame by frame, prefix tokens then patches in input order; see
:class:`~packvit_native.packing.Packing`), the packing and the attention backend.

The two attention-pooling heads let one learned query per segment attend over that segment's tokens. The
queries form a packed sequence of their own (one row per segment) and the keys are the encoder's packed tokens,
so a single varlen cross-attention call pools the whole batch with no padding and no mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import attend
from .config import EncoderConfig
from .layers import Mlp, make_norm
from .packing import Packing, Segments, _to_device

__all__ = ["AttentionPoolHead", "ClsHead", "MapHead", "MeanHead", "Merger", "MergerHead", "build_head"]


class ClsHead(nn.Module):
    """The class token of each segment: after the final norm (DINOv3), or with ``own_norm`` through a norm of
    the head's own (CLIP's and MLCD's ``post_layernorm``, whose blocks have no final norm)."""

    def __init__(self, config: EncoderConfig, own_norm: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        self.norm = make_norm(config, device=device, dtype=dtype) if own_norm else nn.Identity()

    def forward(self, x: Tensor, packing: Packing, backend: str) -> Tensor:
        return self.norm(packing.prefix_tokens(x)[:, 0])  # [S, D]


class MeanHead(nn.Module):
    """The mean of each segment's patch tokens (InternViT's mean pooling), one vector per frame."""

    def forward(self, x: Tensor, packing: Packing, backend: str) -> Tensor:
        tokens = packing.patch_tokens(x).float()  # [N, D]; summed in fp32: a bf16 sum of 1,000 tokens drifts
        sums = tokens.new_zeros(packing.num_segments, tokens.shape[-1]).index_add_(
            0, packing.patch_segment, tokens
        )
        lengths = _to_device(torch.tensor(packing.frame_patches.lengths, dtype=torch.float32), tokens.device)
        return (sums / lengths[:, None]).to(x.dtype)  # [S, D]


class _QueryPool(nn.Module):
    """Shared part of the attention-pooling heads: one query per segment over that segment's tokens."""

    def __init__(self, config: EncoderConfig, device=None, dtype=None) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.kv = nn.Linear(d, 2 * d, bias=config.qkv_bias, device=device, dtype=dtype)

    def pool(self, query: Tensor, x: Tensor, packing: Packing, backend: str) -> Tensor:
        """``query [1, D]`` (already projected) attends over each segment of ``x [T, D]`` -> ``[S, D]``."""
        s = packing.num_segments
        # Built once per forward from host-side ints: one query row per segment, no device sync.
        q_segments = Segments.from_lengths((1,) * s, x.device)
        q = query.reshape(1, self.num_heads, self.head_dim).expand(s, -1, -1).contiguous()  # [S, H, Dh]
        k, v = self.kv(x).unflatten(-1, (2, self.num_heads, self.head_dim)).unbind(1)  # [T, H, Dh] each
        out = attend(q, k, v, q_segments, packing.frames, backend, self.scale)  # [S, H, Dh]
        return out.flatten(1)  # [S, D]


class MapHead(_QueryPool):
    """SigLIP's multi-head attention pooling: a learned probe, projected to a query, attends over the tokens;
    then ``a + mlp(norm(a))`` (the probe itself is not added back). Widths, activation and norm epsilon are
    the trunk's, as in SigLIP and SigLIP2.
    """

    def __init__(self, config: EncoderConfig, device=None, dtype=None) -> None:
        super().__init__(config, device=device, dtype=dtype)
        d = config.hidden_size
        self.probe = nn.Parameter(torch.zeros(1, d, device=device, dtype=dtype))
        self.q = nn.Linear(d, d, bias=config.qkv_bias, device=device, dtype=dtype)
        self.proj = nn.Linear(d, d, bias=config.proj_bias, device=device, dtype=dtype)
        self.norm = make_norm(config, device=device, dtype=dtype)
        self.mlp = Mlp(config, device=device, dtype=dtype)

    def forward(self, x: Tensor, packing: Packing, backend: str) -> Tensor:
        a = self.proj(self.pool(self.q(self.probe), x, packing, backend))  # [S, D]
        return a + self.mlp(self.norm(a))


class AttentionPoolHead(_QueryPool):
    """AIMv2's attention pooling: the raw learned query (no projection, no norm) attends over the tokens,
    followed by an output projection that always has a bias (key/value biases follow ``qkv_bias``).
    """

    def __init__(self, config: EncoderConfig, device=None, dtype=None) -> None:
        super().__init__(config, device=device, dtype=dtype)
        d = config.hidden_size
        self.query = nn.Parameter(torch.zeros(1, d, device=device, dtype=dtype))
        self.proj = nn.Linear(d, d, bias=True, device=device, dtype=dtype)

    def forward(self, x: Tensor, packing: Packing, backend: str) -> Tensor:
        return self.proj(self.pool(self.query.to(x.dtype), x, packing, backend))  # [S, D]


class Merger(nn.Module):
    """Qwen-VL's patch merger: each ``m x m`` block of patch tokens (contiguous in merge order) becomes one row.

    ``norm`` then ``fc2(gelu(fc1(concatenated block)))``, GELU with erf as both Qwen-VL towers use. The norm
    is the trunk's kind and epsilon; it runs over each token before the block is concatenated, or with
    ``postshuffle_norm`` over the concatenated block (Qwen3-VL's deepstack mergers).

    Args:
        postshuffle_norm: norm the concatenated ``m*m*D`` block instead of each ``D`` token.
    """

    def __init__(
        self, config: EncoderConfig, postshuffle_norm: bool = False, device=None, dtype=None
    ) -> None:
        super().__init__()
        self.group = config.hidden_size * config.merge_size**2
        self.postshuffle_norm = postshuffle_norm
        dd = {"device": device, "dtype": dtype}
        self.norm = make_norm(config, dim=self.group if postshuffle_norm else config.hidden_size, **dd)
        self.fc1 = nn.Linear(self.group, self.group, **dd)
        self.fc2 = nn.Linear(self.group, config.out_hidden_size, **dd)

    def forward(self, patch_tokens: Tensor) -> Tensor:
        """``[N, D]`` patch tokens in merge order -> ``[N / m^2, out_hidden_size]``, in the same order."""
        x = patch_tokens.reshape(-1, self.group) if self.postshuffle_norm else patch_tokens
        x = self.norm(x).reshape(-1, self.group)  # [N / m^2, m^2 * D]
        return self.fc2(F.gelu(self.fc1(x)))


class MergerHead(Merger):
    """The merger as the model's pooled output: one row per ``m x m`` block of every frame, in input order."""

    def forward(self, x: Tensor, packing: Packing, backend: str) -> Tensor:
        return super().forward(packing.patch_tokens(x))


def build_head(config: EncoderConfig, device=None, dtype=None) -> nn.Module | None:
    if config.head in ("cls", "cls_norm"):
        return ClsHead(config, own_norm=config.head == "cls_norm", device=device, dtype=dtype)
    if config.head == "mean":
        return MeanHead()
    if config.head == "map":
        return MapHead(config, device=device, dtype=dtype)
    if config.head == "attention_pool":
        return AttentionPoolHead(config, device=device, dtype=dtype)
    if config.head == "merger":
        return MergerHead(config, device=device, dtype=dtype)
    return None
