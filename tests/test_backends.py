"""Every attention backend available on this machine agrees with the per-segment reference ("sdpa").

On a CPU-only machine only the reference exists, so the fast backends are reported as skipped here; the same
test runs them on a GPU machine (`python -m pytest tests/test_backends.py`), and scripts/gpu_check.py covers
real model sizes in bf16.
"""

import pytest
import torch

from packvit_native.attention import (
    AUTO_ORDER,
    BACKENDS,
    available_backends,
    resolve_backend,
    varlen_attention,
)
from packvit_native.packing import Segments

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _segments(lengths):
    return Segments.from_lengths(tuple(lengths), DEVICE)


def _naive(q, k, v, qlens, klens, scale):
    out, qs, ks = [], 0, 0
    for lq, lk in zip(qlens, klens, strict=True):
        s = torch.einsum("qhd,khd->hqk", q[qs : qs + lq].float(), k[ks : ks + lk].float()) * scale
        out.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), v[ks : ks + lk].float()))
        qs, ks = qs + lq, ks + lk
    return torch.cat(out)


def test_reference_is_exact_attention_per_segment():
    lengths = [5, 1, 17, 9]
    q, k, v = (torch.randn(sum(lengths), 3, 16, device=DEVICE) for _ in range(3))
    seg = _segments(lengths)
    out = varlen_attention(q, k, v, seg, seg, "sdpa", 0.25)
    torch.testing.assert_close(out, _naive(q, k, v, lengths, lengths, 0.25), atol=1e-5, rtol=1e-5)
    # cross-attention: one query per segment over that segment's keys (pooling heads)
    q1 = torch.randn(len(lengths), 3, 16, device=DEVICE)
    out = varlen_attention(q1, k, v, _segments([1] * 4), seg, "sdpa", 0.25)
    torch.testing.assert_close(out, _naive(q1, k, v, [1] * 4, lengths, 0.25), atol=1e-5, rtol=1e-5)


def test_auto_resolves_to_the_first_available():
    assert resolve_backend("auto", DEVICE) == available_backends(DEVICE)[0]
    assert "sdpa" in available_backends(DEVICE)
    assert set(AUTO_ORDER) == set(BACKENDS)


@pytest.mark.parametrize("backend", [b for b in AUTO_ORDER if b != "sdpa"])
@pytest.mark.parametrize("head_dim", [64, 72, 128])
def test_backend_matches_reference_in_bf16(backend, head_dim):
    if backend not in available_backends(DEVICE):
        pytest.skip(f"{backend} is not available on {DEVICE}")
    lengths = [197, 1, 64, 1029, 5]
    q, k, v = (torch.randn(sum(lengths), 8, head_dim, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
    seg = _segments(lengths)
    ref = varlen_attention(q, k, v, seg, seg, "sdpa", head_dim**-0.5)
    out = varlen_attention(q, k, v, seg, seg, backend, head_dim**-0.5)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
    q1 = torch.randn(len(lengths), 8, head_dim, device=DEVICE, dtype=torch.bfloat16)
    qseg = _segments([1] * len(lengths))
    ref = varlen_attention(q1, k, v, qseg, seg, "sdpa", head_dim**-0.5)
    out = varlen_attention(q1, k, v, qseg, seg, backend, head_dim**-0.5)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
