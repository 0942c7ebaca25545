"""FP8 inference: quantization, the FP8 linear, which modules a conversion swaps, loading with
precision="fp8", and accuracy against fp32 (on the CPU where PyTorch runs FP8 matmuls there; on a GPU with the
Triton quantization kernel and compiled blocks)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import packvit_native as pv
from packvit_native.config import EncoderConfig
from packvit_native.fp8 import (
    FP8_DTYPE,
    Fp8Linear,
    convert_to_fp8,
    fp8_unavailable_reason,
    fused_quantize_available,
    quantize_rows,
)

cpu_fp8 = pytest.mark.skipif(
    fp8_unavailable_reason("cpu") is not None, reason="this PyTorch runs no FP8 matmuls on the CPU"
)
gpu_fp8 = pytest.mark.skipif(
    not torch.cuda.is_available() or fp8_unavailable_reason("cuda") is not None,
    reason="needs a CUDA GPU with FP8 matmuls (compute capability >= 8.9)",
)

# Every block linear of a converted model, relative to a block.
SWIGLU_LINEARS = {"attn.qkv", "attn.proj", "mlp.gate_up", "mlp.down"}
MLP_LINEARS = {"attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"}

# DINOv3-like: SwiGLU, a frozen zero key bias, RoPE, class token and registers, layer scale, a class head.
DINOV3 = dict(
    family="dinov3", patch_size=4, hidden_size=64, num_layers=2, num_heads=4, mlp_hidden=128, mlp="swiglu",
    activation="silu", key_bias=False, num_cls=1, num_registers=2, layer_scale=True, rope="normalized",
    head="cls",
)  # fmt: skip
# SigLIP-like: GELU-tanh MLP, a learned table resized per image, attention pooling and a projection.
SIGLIP = dict(
    family="siglip", patch_size=4, hidden_size=48, num_layers=2, num_heads=3, mlp_hidden=96,
    activation="gelu_tanh", pos_embed="learned", pos_grid=(4, 4), pos_resize="bicubic", head="map",
    projection_dim=32,
)  # fmt: skip
# Qwen2.5-VL-like: an MLP width that is no multiple of 16 (kept bf16), windows, a 2x2 merger head.
QWEN = dict(
    family="qwen", patch_size=4, hidden_size=32, num_layers=2, num_heads=2, mlp_hidden=36, mlp="swiglu",
    activation="silu", norm="rmsnorm", rope="index", window_size=4, merge_size=2, full_attention_blocks=(1,),
    final_norm=False, head="merger", out_hidden_size=48,
)  # fmt: skip
GRIDS = [(1, 6, 8), (1, 2, 2), (1, 10, 4), (2, 4, 4)]


def _model(fields: dict, dtype=torch.float32, seed: int = 0) -> pv.PackedVisionEncoder:
    torch.manual_seed(seed)
    model = pv.PackedVisionEncoder(EncoderConfig(**fields), attn_backend="sdpa").eval()
    with torch.no_grad():  # 1-D parameters away from their initial ones and zeros, as trained ones are
        for name, p in model.named_parameters():
            if p.ndim == 1 and not name.endswith("attn.qkv.bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype)


def _images(config: EncoderConfig, grids=GRIDS, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p, m = config.patch_size, config.merge_size
    out = []
    for t, h, w in grids:
        x = torch.randn(t, 3, h * m * p, w * m * p, generator=g)
        out.append(x if t > 1 else x[0])
    return out


def _min_token_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).min())


# Quantization.


def test_quantize_rows_scales_each_row_to_the_fp8_range():
    x = torch.randn(7, 96, dtype=torch.bfloat16) * torch.logspace(-3, 3, 7)[:, None].bfloat16()
    x[3] = 0  # an all-zero row: a tiny positive scale, zeros out, nothing divided by zero
    q, scale = quantize_rows(x)
    assert q.dtype == FP8_DTYPE and q.shape == x.shape and scale.dtype == torch.float32
    assert scale.shape == (7, 1) and bool((scale > 0).all())
    back = q.float() * scale
    assert bool(back.isfinite().all()) and bool((back[3] == 0).all())
    rows = [i for i in range(7) if i != 3]
    # Each row's largest magnitude maps to 448 exactly; e4m3 keeps every normal value within 2^-4 relative.
    torch.testing.assert_close(q.float().abs().amax(1)[rows], torch.full((6,), 448.0))
    normal = x.float().abs() >= scale * 2**-6
    assert bool(((back - x.float()).abs() <= 1.001 * 2**-4 * x.float().abs())[normal].all())


# The FP8 linear.


@cpu_fp8
@pytest.mark.parametrize("bias", [True, False])
def test_fp8_linear_matches_the_bf16_linear(bias):
    linear = nn.Linear(64, 48, bias=bias, dtype=torch.bfloat16)
    fp8 = Fp8Linear.from_linear(linear)
    assert not isinstance(fp8, nn.Linear), "fused kernels must not read its fp8 weight as a matrix"
    assert fp8.weight.dtype == FP8_DTYPE and fp8.weight_scale.shape == (1, 48)
    assert list(fp8.parameters()) == [] and "weight" in fp8.state_dict()
    x = torch.randn(2, 9, 64, dtype=torch.bfloat16)  # leading dimensions are kept
    with torch.no_grad():
        ref, out = linear(x), fp8(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 9, 48)
    assert _min_token_cos(out.flatten(0, 1), ref.flatten(0, 1)) > 0.998


def test_fp8_linear_needs_sizes_in_multiples_of_16():
    with pytest.raises(ValueError, match="multiples of 16, got 40 -> 48"):
        Fp8Linear(40, 48)


@cpu_fp8
def test_fp8_linear_refuses_an_input_that_needs_a_gradient():
    fp8 = Fp8Linear.from_linear(nn.Linear(32, 32, dtype=torch.bfloat16))
    x = torch.randn(4, 32, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(RuntimeError, match="inference only"):
        fp8(x)
    with torch.no_grad():
        assert fp8(x).shape == (4, 32)


# Conversion.


def _block_linears(model) -> dict[str, type]:
    return {
        name: type(m)
        for i, block in enumerate(model.blocks)
        for name, m in block.named_modules(prefix=f"blocks.{i}")
        if isinstance(m, (nn.Linear, Fp8Linear))
    }


@cpu_fp8
@pytest.mark.parametrize(("fields", "linears"), [(DINOV3, SWIGLU_LINEARS), (SIGLIP, MLP_LINEARS)])
def test_conversion_swaps_the_block_linears_only(fields, linears):
    model = convert_to_fp8(_model(fields, torch.bfloat16))
    swapped = _block_linears(model)
    assert swapped == {f"blocks.{i}.{n}": Fp8Linear for i in range(2) for n in linears}
    outside = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert "patch_embed" in outside, "the patch embedding, heads and projection stay bf16"
    assert all(not n.startswith("blocks.") for n in outside)
    assert not any(p.requires_grad for p in model.parameters()), "the converted model is frozen"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@cpu_fp8
def test_a_linear_of_unaligned_width_stays_bf16():
    model = convert_to_fp8(_model(QWEN, torch.bfloat16))
    swapped = _block_linears(model)
    for i in range(2):  # the MLP's width 36 is no multiple of 16; q/k/v and the projection convert
        assert swapped[f"blocks.{i}.attn.qkv"] is Fp8Linear and swapped[f"blocks.{i}.attn.proj"] is Fp8Linear
        assert (
            swapped[f"blocks.{i}.mlp.gate_up"] is nn.Linear and swapped[f"blocks.{i}.mlp.down"] is nn.Linear
        )
    assert isinstance(model.head.fc1, nn.Linear), "the merger stays bf16"
    with torch.no_grad():
        out = model(*model.patchify(_images(model.config)), return_dict=True)
    assert out.pooler_output.dtype == torch.bfloat16 and bool(out.pooler_output.isfinite().all())


def test_conversion_needs_a_bfloat16_model():
    with pytest.raises(ValueError, match=r"needs a bfloat16 model .* got torch.float32"):
        convert_to_fp8(_model(DINOV3))


# Accuracy: FP8 against fp32, on mixed sizes packed into one batch.


@cpu_fp8
@pytest.mark.parametrize("fields", [DINOV3, SIGLIP, QWEN], ids=["dinov3", "siglip", "qwen"])
def test_fp8_forward_is_close_to_fp32(fields):
    model32 = _model(fields)
    model8 = convert_to_fp8(copy.deepcopy(model32).to(torch.bfloat16))
    patches, grid = model32.patchify(_images(model32.config))
    with torch.no_grad():
        ref = model32(patches, grid, return_dict=True)
        out = model8(patches, grid, return_dict=True)
    for name in ("last_hidden_state", "prefix_tokens", "pooler_output", "image_embeds"):
        r, o = getattr(ref, name), getattr(out, name)
        if r is None or not r.numel():
            continue
        assert o.dtype == torch.bfloat16
        assert _min_token_cos(o.flatten(0, -2), r.flatten(0, -2)) >= 0.99, name


@cpu_fp8
def test_a_token_does_not_depend_on_what_it_is_packed_with():
    model = convert_to_fp8(_model(DINOV3, torch.bfloat16))
    images = _images(model.config)
    bright = [images[0] * 1000, *images[1:]]  # per-tensor scales would coarsen every other image
    patches, grid = model.patchify(bright)
    with torch.no_grad():
        alone = model(*model.patchify(images[1:]))
        packed = model(patches, grid)[int(grid[0].prod()) :]
    torch.testing.assert_close(packed, alone, rtol=1.6e-2, atol=1e-2)


@cpu_fp8
def test_a_plain_forward_records_no_graph_and_training_is_refused():
    model = convert_to_fp8(_model(DINOV3, torch.bfloat16))
    patches, grid = model.patchify(_images(model.config))
    out = model(patches, grid)  # no torch.no_grad(): the frozen model records nothing
    assert not out.requires_grad
    model.patch_embed.requires_grad_(True)
    with pytest.raises(RuntimeError, match="FP8 linears are for inference only"):
        model(patches, grid)


@cpu_fp8
def test_compiled_blocks_match_eager():
    model = convert_to_fp8(_model(DINOV3, torch.bfloat16))
    compiled = copy.deepcopy(model).compile_blocks()
    patches, grid = model.patchify(_images(model.config))
    with torch.no_grad():
        eager, fused = model(patches, grid), compiled(patches, grid)
    # Not bit-identical: compiled blocks keep the norm's output in fp32 up to the quantization, so a value
    # near a rounding boundary can land on the neighbouring FP8 code.
    assert _min_token_cos(fused, eager) >= 0.999


# Loading and saving.


@pytest.mark.parametrize(
    ("option", "match"),
    [
        ({"precision": "fp16"}, r"precision must be None or one of \['fp8'\], got 'fp16'"),
        ({"precision": "fp8", "dtype": "float32"}, "leave dtype unset or pass bfloat16, not torch.float32"),
    ],
)
def test_bad_precision_options_are_refused_before_reading(option, match, tmp_path):
    with pytest.raises(ValueError, match=match) as info:
        pv.from_pretrained(tmp_path / "not-there", **option)
    assert not isinstance(info.value, pv.CheckpointError)


def test_fp8_on_an_older_gpu_is_refused_at_load(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(
        ValueError, match=r"compute capability 8\.9 or newer .* \(NVIDIA A100-SXM4-80GB\) is 8\.0"
    ):
        pv.from_pretrained(tmp_path / "not-there", device="cuda", attn_backend="sdpa", precision="fp8")


@cpu_fp8
def test_from_pretrained_with_fp8(tmp_path):
    model32 = _model(DINOV3)
    model32.save_pretrained(tmp_path / "m")
    model = pv.from_pretrained(tmp_path / "m", attn_backend="sdpa", precision="fp8")
    assert not model.training and _block_linears(model)["blocks.0.mlp.down"] is Fp8Linear
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    patches, grid = model.patchify(_images(model.config))
    with torch.no_grad():
        assert _min_token_cos(model(patches, grid), model32(patches, grid)) >= 0.99
    with pytest.raises(ValueError, match="block linears are FP8"):
        model.save_pretrained(tmp_path / "fp8")
    assert not (tmp_path / "fp8").exists()


# On a GPU: the Triton quantization kernel, and a model of realistic width and depth.


@gpu_fp8
@pytest.mark.parametrize("cols", [72, 1024, 1152, 4304])
def test_triton_quantization_matches_the_formula(cols):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1000, cols + 16, device="cuda", dtype=torch.bfloat16, generator=g)[:, 16:]  # strided
    x[::7] *= 300
    x[5] = 0
    assert fused_quantize_available(x)
    q, scale = quantize_rows(x)
    ref_scale = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) * (1 / 448)
    ref_q = (x.float() / ref_scale).clamp(-448, 448).to(FP8_DTYPE)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))


@gpu_fp8
def test_fp8_at_realistic_size_on_the_gpu():
    """A DINOv3-L-like tower (24 blocks of width 1024, every matrix redrawn at fan-in scale) on mixed sizes:
    FP8 within cosine 0.98 of fp32, eager and compiled, with no host synchronisation.

    This synthetic tower is harsher than the real architectures: its eager FP8 run measured a lowest token
    cosine of 0.987 on an H200, where scripts/gpu_check.py measures 0.9989 for DINOv3-L and SigLIP2 so400m
    (the README's >= 0.99 claim)."""
    fields = {**DINOV3, "patch_size": 16, "hidden_size": 1024, "num_layers": 24, "num_heads": 16,
              "mlp_hidden": 2816}  # fmt: skip
    model32 = _model(fields).cuda()
    with torch.no_grad():  # fan-in-scaled matrices, so every block changes the residual stream
        for p in model32.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    model8 = convert_to_fp8(copy.deepcopy(model32).to(torch.bfloat16))
    model8.attn_backend = "auto"
    images = _images(model32.config, [(1, 28, 28), (1, 14, 41), (1, 1, 1), (2, 16, 12), (1, 64, 48)])
    patches, grid = model32.patchify(images)
    patches = patches.cuda()
    compiled = copy.deepcopy(model8).compile_blocks()
    with torch.inference_mode():
        ref = model32(patches, grid, return_dict=True, attn_backend="sdpa")
        for model in (model8, compiled):
            model(patches.bfloat16(), grid)  # warm-up: compilation, kernel builds
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                out = model(patches.bfloat16(), grid, return_dict=True)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert _min_token_cos(out.last_hidden_state, ref.last_hidden_state) >= 0.98
            assert _min_token_cos(out.pooler_output, ref.pooler_output) >= 0.98
