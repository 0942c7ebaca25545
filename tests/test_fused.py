"""Fused epilogues (packvit_native.fused) against the PyTorch ops they replace.

The kernel tests need a CUDA GPU, or Triton's interpreter on the CPU (``TRITON_INTERPRET=1`` with triton
installed), and are skipped otherwise. The tests of when a fusion is used, and that the CPU path is the PyTorch
ops exactly, run everywhere.
"""

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from packvit_native import fused
from packvit_native.config import EncoderConfig
from packvit_native.layers import Block, BlockContext, Mlp, RMSNorm
from packvit_native.packing import Segments

CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
KERNEL_DEVICE = "cuda" if CUDA else "cpu"
needs_kernels = pytest.mark.skipif(
    not (CUDA or INTERPRETED), reason="needs a CUDA GPU, or TRITON_INTERPRET=1 with triton installed"
)
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
# The interpreter runs every program in numpy: fewer rows keep it quick, and still cover partial tiles.
ROWS = 257 if CUDA else 37
# Relative error (max abs error / max abs value) allowed on top of what the unfused ops themselves make.
FLOOR = {torch.bfloat16: 8e-3, torch.float32: 2e-6}


def _reference(x, branch, gamma, weight, bias, eps, rms):
    """The block's PyTorch ops, in the dtype of the inputs."""
    s = x + (branch * gamma if gamma is not None else branch)
    if rms:
        s32 = s.float()
        h = weight * (s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + eps)).to(s.dtype)
    else:
        h = F.layer_norm(s, s.shape[-1:], weight, bias, eps)
    return s, h


def _exact(x, branch, gamma, weight, bias, eps, rms):
    """The same function in float64, with no rounding between the steps."""
    s = x + (branch * gamma if gamma is not None else branch)
    if rms:
        return s, weight * s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)
    return s, F.layer_norm(s, s.shape[-1:], weight, bias, eps)


def _leaves(dim, rows, dtype, layer_scale, rms, device, branch_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0, dtype=dtype):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(device, dtype)

    return {
        "x": rand(rows, dim, scale=2.0, shift=0.5),
        "branch": rand(rows, dim, dtype=branch_dtype or dtype),
        "gamma": rand(dim, scale=0.3, shift=1.0) if layer_scale else None,
        "weight": rand(dim, scale=0.1, shift=1.0),
        "bias": None if rms else rand(dim, scale=0.1),
    }


def _run(fn, leaves, eps, rms, grads, dtype=None):
    """``fn``'s outputs and the gradients of its tensor arguments (cast to ``dtype`` first, if given)."""
    inputs = {
        k: None if v is None else v.detach().to(dtype or v.dtype).requires_grad_() for k, v in leaves.items()
    }
    s, h = fn(*inputs.values(), eps, rms)
    torch.autograd.backward((s, h), tuple(g.to(s.dtype) for g in grads))
    return s, h, {k: v.grad for k, v in inputs.items() if v is not None}


def _rel(a, exact):
    a, exact = a.detach().double(), exact.detach().double()
    return float((a - exact).abs().max() / exact.abs().max().clamp_min(1e-30))


DTYPES = {  # residual stream and branch; the last as under autocast (fp32 parameters, a bf16 attention output)
    "bf16": (torch.bfloat16, torch.bfloat16),
    "fp32": (torch.float32, torch.float32),
    "fp32+bf16": (torch.float32, torch.bfloat16),
}


@needs_kernels
@pytest.mark.parametrize("dim", [1152, 1024, 1280, 1664])
@pytest.mark.parametrize("dtypes", sorted(DTYPES))
@pytest.mark.parametrize("layer_scale", [False, True], ids=["no_ls", "ls"])
@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
def test_add_norm_forward_and_backward_match_the_pytorch_ops(dim, dtypes, layer_scale, rms):
    dtype, branch_dtype = DTYPES[dtypes]
    eps = 1e-6 if rms else 1e-5
    leaves = _leaves(dim, ROWS, dtype, layer_scale, rms, KERNEL_DEVICE, branch_dtype)
    g = torch.Generator().manual_seed(1)
    grads = tuple(
        torch.randn(ROWS, dim, generator=g, dtype=torch.float64).to(KERNEL_DEVICE) for _ in range(2)
    )
    s, h, fused_grads = _run(fused.add_norm, leaves, eps, rms, grads)
    s_ref, h_ref, ref_grads = _run(_reference, leaves, eps, rms, grads)
    s_64, h_64, exact_grads = _run(_exact, leaves, eps, rms, grads, torch.float64)
    assert s.dtype == h.dtype == dtype and s.shape == h.shape == (ROWS, dim)
    # The residual stream is rounded as the PyTorch ops round it, bit for bit, except where the GPU compiler
    # fuses the layer-scale product and the sum into one FMA (rounded once instead of twice: measured on an
    # H200 in bf16 too), and where Triton's interpreter rounds to bf16 toward zero.
    if (dtype == torch.bfloat16) == CUDA and not layer_scale:
        assert torch.equal(s, s_ref)
    else:
        assert _rel(s, s_ref) <= FLOOR[dtype]
    # Every output and gradient is as close to the exact value as the unfused ops get, within a small floor;
    # twice that under Triton's interpreter in bf16, whose rounding toward zero errs by up to a whole unit.
    for name, ours, ref, exact in [
        ("s", s, s_ref, s_64),
        ("norm", h, h_ref, h_64),
        *((f"grad {k}", fused_grads[k], ref_grads[k], exact_grads[k]) for k in exact_grads),
    ]:
        assert ours.dtype == ref.dtype and ours.shape == ref.shape, name
        slack = 2.0 if ref.dtype == torch.bfloat16 and not CUDA else 1.0
        err, ref_err = _rel(ours, exact), _rel(ref, exact)
        assert err <= slack * max(1.5 * ref_err, FLOOR[ref.dtype]), (
            f"{name}: fused {err:.2e}, unfused {ref_err:.2e}"
        )


@needs_kernels
def test_add_norm_takes_any_leading_shape_and_no_rows():
    leaves = _leaves(72, 10, torch.float32, True, False, KERNEL_DEVICE)
    x, branch, *params = leaves.values()
    s, h = fused.add_norm(x.view(2, 5, 72), branch.view(2, 5, 72), *params, 1e-5, False)
    assert s.shape == h.shape == (2, 5, 72)
    torch.testing.assert_close(h.view(10, 72), _reference(x, branch, *params, 1e-5, False)[1])
    params = [p.clone().requires_grad_() for p in params]
    x, branch = x[:0].requires_grad_(), branch[:0].requires_grad_()
    s, h = fused.add_norm(x, branch, *params, 1e-5, False)
    assert s.shape == h.shape == (0, 72)
    (s.sum() + h.sum()).backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params)


def _config(
    norm: str, mlp: str, activation: str, layer_scale: bool, dim: int = 72, **changes
) -> EncoderConfig:
    return EncoderConfig(
        family="test", patch_size=2, hidden_size=dim, num_layers=1, num_heads=4, mlp_hidden=3 * dim + 5,
        mlp=mlp, activation=activation, norm=norm, layer_scale=layer_scale, **changes,
    )  # fmt: skip


CONFIGS = {  # the block kinds of the models the benchmark times, at an odd width
    "dinov3": _config("layernorm", "mlp", "gelu", True),
    "siglip2": _config("layernorm", "mlp", "gelu_tanh", False),
    "aimv2": _config("rmsnorm", "swiglu", "silu", False, mlp_bias=False, qkv_bias=False, proj_bias=False),
}


def _block(config, device, dtype, seed=0):
    torch.manual_seed(seed)
    block = Block(config, 0, device=device, dtype=dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() == 1 else p.shape[-1] ** -0.5) + (p.dim() == 1))
    return block


def _context(device, lengths=(11, 25, 1)):
    return BlockContext({"frames": Segments.from_lengths(lengths, torch.device(device))}, "sdpa")


def _step(block, x, ctx, forward=None):
    """Output, input gradient and parameter gradients of one forward and backward (``forward`` defaults to the
    block's own)."""
    x = x.detach().requires_grad_()
    block.zero_grad()
    out = (forward or block)(x, ctx)
    out.float().square().mean().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in block.named_parameters()}


@needs_cuda
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("precision", ["bf16", "fp32", "autocast"])
def test_fused_block_is_as_accurate_as_the_unfused_block(name, precision):
    """A whole block, forward (recording gradients and not) and backward: fusions on and off, each against the
    block in float64."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    block = _block(CONFIGS[name], "cuda", dtype)
    ctx = _context("cuda")
    x = torch.randn(37, block.norm1.weight.shape[0], device="cuda", dtype=dtype)
    results = {}
    for enabled in (False, True):
        with (
            fused.using_fusions(enabled),
            torch.autocast("cuda", torch.bfloat16, enabled=precision == "autocast"),
        ):
            out, dx, grads = _step(block, x, ctx)
            with torch.no_grad():
                results[enabled] = {"out": out, "no-grad out": block(x, ctx), "x": dx, **grads}
    exact_block = copy.deepcopy(block).double()
    out, dx, grads = _step(exact_block, x.double(), ctx)
    with torch.no_grad():
        exact = {"out": out, "no-grad out": exact_block(x.double(), ctx), "x": dx, **grads}
    floor = 1e-5 if precision == "fp32" else FLOOR[torch.bfloat16]
    for what, want in exact.items():
        err, ref_err = _rel(results[True][what], want), _rel(results[False][what], want)
        assert err <= max(1.5 * ref_err, floor), f"{name} {what}: fused {err:.2e}, unfused {ref_err:.2e}"


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_gelu_is_the_tanh_form_of_the_unfused_ops(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1000, 72, device="cuda", generator=g)
    weight = torch.randn(1152, 72, device="cuda", generator=g) * 72**-0.5
    bias = torch.randn(1152, device="cuda", generator=g) * 0.5
    pre = F.linear(x.double(), weight.double(), bias.double())
    x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    with torch.no_grad():
        assert fused.linear_gelu_applies(x, weight, bias)
        out = fused.linear_gelu_tanh(x, weight, bias)
        ref = F.gelu(F.linear(x, weight, bias), approximate="tanh")
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
    exact_tanh, exact_erf = F.gelu(pre, approximate="tanh"), F.gelu(pre)
    # No worse than the unfused ops (which round the pre-activation first) beyond what the epilogue's own tanh
    # may cost, and the tanh form, not erf.
    assert (out.double() - exact_tanh).abs().mean() <= 1.25 * (ref.double() - exact_tanh).abs().mean()
    assert (out.double() - exact_tanh).abs().mean() < (out.double() - exact_erf).abs().mean()


def test_switch_parses_and_restores():
    assert fused._parse("0") == fused._parse("") == frozenset()
    assert fused._parse("1") == frozenset(fused.FUSIONS)
    assert fused._parse("add_norm") == {"add_norm"}
    assert fused._parse(" linear_gelu , add_norm,scale_add ") == set(fused.FUSIONS)
    with pytest.raises(ValueError, match="unknown fusion"):
        fused._parse("add_nrom")
    before = fused.fusions_enabled()
    with fused.using_fusions(["linear_gelu"]):
        assert fused.fusions_enabled() == {"linear_gelu"}
        with fused.using_fusions(False):
            assert fused.fusions_enabled() == frozenset()
    assert fused.fusions_enabled() == before
    with pytest.raises(ValueError, match="unknown fusion"):
        fused.set_fusions(["gelu"])
    assert fused.fusions_enabled() == before


def _old_block(block, x, ctx):
    """Block's forward as it was written before the fusions."""

    def mlp(h):
        if isinstance(block.mlp, Mlp):
            return block.mlp.fc2(block.mlp.act(block.mlp.fc1(h)))
        gate, up = block.mlp.gate_up(h).chunk(2, dim=-1)
        return block.mlp.down(block.mlp.act(gate) * up)

    x = x + block.drop_path(block.ls1(block.attn(block.norm1(x), ctx)), ctx)
    return x + block.drop_path(block.ls2(mlp(block.norm2(x))), ctx)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_cpu_block_is_the_pytorch_ops_exactly(name, dtype):
    block = _block(CONFIGS[name], "cpu", dtype)
    ctx = _context("cpu")
    x = torch.randn(37, 72, dtype=dtype)
    assert fused.fusions_enabled() == set(fused.FUSIONS)  # on by default, and still a no-op on the CPU
    new = _step(block, x, ctx)
    old = _step(block, x, ctx, forward=lambda x, ctx: _old_block(block, x, ctx))
    assert torch.equal(new[0], old[0]) and torch.equal(new[1], old[1])
    assert all(torch.equal(new[2][n], g) for n, g in old[2].items())
    with torch.no_grad():
        assert torch.equal(block(x, ctx), _old_block(block, x, ctx))


@pytest.fixture
def spies(monkeypatch):
    """Pretend every tensor is on eager CUDA and count the fused calls, which compute the PyTorch ops."""
    calls = {"add_norm": 0, "linear_gelu": 0, "scale_add": 0}

    def scale_add(x, branch, gamma):
        calls["scale_add"] += 1
        return x + branch * gamma

    def add_norm(*args):
        calls["add_norm"] += 1
        return _reference(*args)

    def linear_gelu(x, weight, bias):
        calls["linear_gelu"] += 1
        return F.gelu(F.linear(x, weight, bias), approximate="tanh")

    monkeypatch.setattr(fused, "_eager_cuda", lambda x: True)
    monkeypatch.setattr(fused, "add_norm", add_norm)
    monkeypatch.setattr(fused, "linear_gelu_tanh", linear_gelu)
    monkeypatch.setattr(fused, "scale_add", scale_add)
    return calls


def _calls(spies, block, x, grad, token_segment=None):
    spies.update(add_norm=0, linear_gelu=0, scale_add=0)
    with torch.set_grad_enabled(grad):
        block(x, BlockContext(_context("cpu").segmentations, "sdpa", token_segment=token_segment))
    return dict(spies)


def test_where_each_fusion_applies(spies):
    x = torch.randn(37, 72, dtype=torch.bfloat16)
    siglip = _block(CONFIGS["siglip2"], "cpu", torch.bfloat16)
    none = {"add_norm": 0, "linear_gelu": 0, "scale_add": 0}
    assert _calls(spies, siglip, x, grad=False) == none | {"add_norm": 1, "linear_gelu": 1}
    # the GEMM epilogue has no derivative: not while recording a gradient
    assert _calls(spies, siglip, x, grad=True) == none | {"add_norm": 1}
    with fused.using_fusions(["linear_gelu"]):
        assert _calls(spies, siglip, x, grad=False) == none | {"linear_gelu": 1}
    with fused.using_fusions(False):
        assert _calls(spies, siglip, x, grad=False) == none
    # exact-erf GELU and SwiGLU never take the tanh epilogue; RMSNorm and layer scale fuse with the residual;
    # the last residual add takes the layer scale in one pass, with or without a gradient
    dinov3 = _block(CONFIGS["dinov3"], "cpu", torch.bfloat16)
    for grad in (False, True):
        assert _calls(spies, dinov3, x, grad=grad) == none | {"add_norm": 1, "scale_add": 1}
    with fused.using_fusions(["scale_add"]):  # the first residual add too, where add_norm is off
        assert _calls(spies, dinov3, x, grad=False) == none | {"scale_add": 2}
    aimv2 = _block(CONFIGS["aimv2"], "cpu", torch.bfloat16)
    assert _calls(spies, aimv2, x, grad=False) == none | {"add_norm": 1}
    # fp32 activations: the residual fusion only (the epilogue's GELU is not PyTorch's)
    assert _calls(spies, siglip.float(), x.float(), grad=False) == none | {"add_norm": 1}
    assert _calls(spies, dinov3.float(), x.float(), grad=False) == none | {"add_norm": 1, "scale_add": 1}


def test_where_the_fusions_stand_aside(spies):
    x = torch.randn(37, 72, dtype=torch.bfloat16)
    block = _block(CONFIGS["siglip2"], "cpu", torch.bfloat16)

    class Fp8LikeLinear(nn.Linear):
        pass

    other = Fp8LikeLinear(72, block.mlp.fc1.out_features, dtype=torch.bfloat16)
    block.mlp.fc1, fc1 = other, block.mlp.fc1
    assert _calls(spies, block, x, grad=False)["linear_gelu"] == 0
    block.mlp.fc1 = fc1
    block.mlp.fc1.bias = None
    assert _calls(spies, block, x, grad=False)["linear_gelu"] == 0
    block.norm2 = nn.LayerNorm(72, elementwise_affine=False, dtype=torch.bfloat16)
    assert _calls(spies, block, x, grad=False)["add_norm"] == 0
    block.norm2 = RMSNorm(72, 1e-6, dtype=torch.bfloat16)
    assert _calls(spies, block, x, grad=False)["add_norm"] == 1
    # parameters of another dtype or size than the activations, branches of another shape or wider dtype
    assert fused.add_norm_applies(x, x, None, torch.ones(72, dtype=torch.bfloat16), None)
    assert not fused.add_norm_applies(x, x, None, torch.ones(72), None)
    assert not fused.add_norm_applies(x, x, torch.ones(71, dtype=torch.bfloat16), x[0], None)
    assert not fused.add_norm_applies(x, x[1:], None, x[0], None)
    assert not fused.add_norm_applies(x, x.float(), None, x[0], None)
    x32, x64 = x.float(), x.double()
    assert fused.add_norm_applies(x32, x, None, x32[0], None)  # an fp32 stream takes a bf16 branch
    assert not fused.add_norm_applies(x64, x64, None, x64[0], None)  # the kernels compute in fp32
    with torch.autocast("cpu", torch.bfloat16):  # where autocast would run the norm in fp32 and we would not
        assert fused.add_norm_applies(x32, x, None, x32[0], None)
        assert not fused.add_norm_applies(x, x, None, x[0], None)
        assert not fused.linear_gelu_applies(x, x, x[0])
    assert fused.linear_gelu_applies(x, x, x[0])

    dropping = _block(_config("layernorm", "mlp", "gelu", True, drop_path_rate=0.5), "cpu", torch.bfloat16)
    segment = torch.repeat_interleave(torch.arange(3), torch.tensor([11, 25, 1]))
    dropped = _calls(spies, dropping.train(), x, grad=True, token_segment=segment)
    assert dropped["add_norm"] == dropped["scale_add"] == 0
    assert _calls(spies, dropping.eval(), x, grad=True) == {"add_norm": 1, "linear_gelu": 0, "scale_add": 1}
    assert not fused.scale_add_applies(x, x.float(), x[0])  # mixed dtypes (autocast): the PyTorch ops
    assert not fused.scale_add_applies(x.double(), x.double(), x[0].double())


@needs_cuda
def test_drop_path_in_training_gives_the_unfused_numbers():
    block = _block(
        _config("layernorm", "mlp", "gelu", True, drop_path_rate=0.5), "cuda", torch.bfloat16
    ).train()
    segment = torch.repeat_interleave(torch.arange(3), torch.tensor([11, 25, 1])).cuda()
    ctx = BlockContext(_context("cuda").segmentations, "sdpa", token_segment=segment)
    x = torch.randn(37, 72, device="cuda", dtype=torch.bfloat16)
    outs = []
    for enabled in (False, True):
        with fused.using_fusions(enabled):
            torch.manual_seed(3)
            outs.append(_step(block, x, ctx))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_benchmark_runs_on_the_cpu():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "fusions.py"
    done = subprocess.run(
        [sys.executable, str(script), "--device", "cpu"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "| DINOv3" in done.stdout and "| AIMv2" in done.stdout and "| SigLIP2" in done.stdout
