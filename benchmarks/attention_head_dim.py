"""FA4 varlen attention at SigLIP2 so400m's head dim (72) against the same work zero-padded to 80, 96 and 128.

Padding the head dim with zeros is exact (padded q/k columns add nothing to the scores, padded v columns give
zero outputs that are sliced off), so the question is only which width the kernel runs fastest. The forward is
what ``packvit`` runs at 72; the backward always runs at the next multiple of 32 (see ``_fa4_backward``).
Segments are those of ``bench.py``'s ``mixed`` workload (32 images, 224-1024 px a side, patch 16), 16 heads.

    python benchmarks/attention_head_dim.py
"""

from __future__ import annotations

import itertools
import random
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F

HEADS, HEAD_DIM = 16, 72


def segment_lengths() -> list[int]:
    rng = random.Random(0)
    return [(rng.randint(224, 1024) // 16) * (rng.randint(224, 1024) // 16) for _ in range(32)]


def median_ms(fn: Callable[[], object], calls: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    lengths = segment_lengths()
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device="cuda")
    segments = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max(lengths), max_seqlen_k=max(lengths))
    q, k, v = (
        torch.randn(sum(lengths), HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(3)
    )
    flops = sum(4 * n * n * HEAD_DIM * HEADS for n in lengths)
    print(f"{torch.cuda.get_device_name()}; {sum(lengths)} tokens in {len(lengths)} segments, {HEADS} heads")
    reference = None
    for width in (72, 80, 96, 128):
        out, fwd_ms, bwd_ms = run_at(width, q, k, v, segments)
        reference = out if reference is None else reference
        diff = (out.float() - reference.float()).abs().max().item()
        print(
            f"run at {width:3d}: forward {fwd_ms:.3f} ms ({flops / fwd_ms / 1e9:.0f} useful TFLOP/s), "
            f"backward at {width + -width % 32} {bwd_ms:.3f} ms; largest difference to the run at 72: {diff:.3g}"
        )


def run_at(
    width: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: dict
) -> tuple[torch.Tensor, float, float]:
    """The output (sliced back to the head dim) and the forward and backward times with q, k, v padded to
    ``width``; the backward at the next multiple of 32, as ``packvit`` runs it."""
    from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd

    scale = HEAD_DIM**-0.5
    padded = [F.pad(t, (0, width - HEAD_DIM)) for t in (q, k, v)]

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        out, lse = _flash_attn_fwd(*padded, **segments, softmax_scale=scale, causal=False, return_lse=True)[
            :2
        ]
        return out, lse

    out, lse = forward()
    q2, k2, v2, out2 = (F.pad(t, (0, -width % 32)) for t in (*padded, out))
    dout = torch.randn_like(out2)

    def backward() -> object:
        return _flash_attn_bwd(q2, k2, v2, out2, dout, lse, softmax_scale=scale, causal=False, **segments)

    return out[..., :HEAD_DIM], median_ms(forward), median_ms(backward)


if __name__ == "__main__":
    main()
