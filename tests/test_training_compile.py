"""Activation checkpointing and torch.compile of the blocks: same numbers, less memory, no recompiles."""

import copy

import pytest
import torch
import torch._dynamo.testing

import packvit_native as pv
from packvit_native.config import EncoderConfig

CONFIG = EncoderConfig(
    family="dinov3", patch_size=4, hidden_size=32, num_layers=4, num_heads=2, mlp_hidden=64, layer_scale=True,
    num_cls=1, num_registers=1, head="cls", key_bias=False, drop_path_rate=0.3, pos_embed_rescale=2.0,
)  # fmt: skip
BATCHES = [
    [(1, 3, 5), (2, 4, 4)],
    [(1, 6, 2), (1, 1, 1), (1, 7, 3), (1, 2, 2)],
    [(3, 5, 5), (1, 2, 9)],
    [(1, 8, 3), (2, 2, 6), (1, 4, 4)],
]
# A Qwen2.5-VL-shaped tower: temporal patches, windowed blocks next to a full one, RoPE in fp32, a merger head.
WINDOWED = EncoderConfig(
    family="qwen2_5_vl", patch_size=4, temporal_patch_size=2, hidden_size=32, num_layers=3, num_heads=2,
    mlp_hidden=48, mlp="swiglu", activation="silu", norm="rmsnorm", patch_bias=False, rope="index",
    rope_theta=10000.0, rope_fp32=True, window_size=4, full_attention_blocks=(1,), merge_size=2, final_norm=False,
    head="merger", out_hidden_size=24,
)  # fmt: skip
WINDOWED_BATCHES = [
    [(1, 2, 6), (2, 2, 2)],
    [(2, 4, 6), (1, 2, 2)],
    [(1, 10, 6), (1, 2, 8), (1, 4, 4)],
    [(1, 6, 6)],
]


def _step(model, grid, seed):
    """A training forward and backward under a fixed seed; returns the output and the parameter gradients."""
    g = torch.Generator().manual_seed(seed)
    patches = torch.randn(sum(t * h * w for t, h, w in grid), model.config.patch_dim, generator=g)
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(patches, torch.tensor(grid), return_dict=True)
    (out.last_hidden_state.square().mean() + out.pooler_output.sum()).backward()
    return out.last_hidden_state.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _saved_bytes(model, grid) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward of one forward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _step(model, grid, 0)
    return sum(storages.values())


@pytest.fixture
def model():
    torch.manual_seed(0)
    return pv.PackedVisionEncoder(CONFIG, attn_backend="sdpa").train()


@pytest.mark.parametrize("every", [1, 3])
def test_activation_checkpointing_same_numbers_less_memory(model, every):
    plain = copy.deepcopy(model)
    model.set_activation_checkpointing(every)
    assert [b.checkpointed for b in model.blocks] == [i % every == 0 for i in range(CONFIG.num_layers)]
    for seed, grid in enumerate(BATCHES):
        out_a, grads_a = _step(plain, grid, seed)
        out_b, grads_b = _step(model, grid, seed)
        torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
        for name in grads_a:
            torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-7, msg=name)
    assert _saved_bytes(model, BATCHES[2]) < 0.75 * _saved_bytes(plain, BATCHES[2])
    model.set_activation_checkpointing(0)
    assert not any(b.checkpointed for b in model.blocks)
    with pytest.raises(ValueError, match="every"):
        model.set_activation_checkpointing(-1)


@pytest.mark.parametrize(
    ("config", "batches", "checkpointing"),
    [(CONFIG, BATCHES, 0), (CONFIG, BATCHES, 2), (WINDOWED, WINDOWED_BATCHES, 0)],
    ids=["prefix", "prefix-checkpointed", "windowed-merger"],
)
def test_compiled_blocks_one_graph_no_recompiles(config, batches, checkpointing):
    """fullgraph: no graph break inside a block; new token totals and segment counts reuse the graph."""
    torch.manual_seed(0)
    model = pv.PackedVisionEncoder(config, attn_backend="sdpa").train()
    eager = copy.deepcopy(model)
    model.set_activation_checkpointing(checkpointing)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    model.compile_blocks(backend=counter, fullgraph=True)
    compiles = []
    for seed, grid in enumerate(batches):
        out_a, grads_a = _step(eager, grid, seed)
        out_b, grads_b = _step(model, grid, seed)
        torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-5)
        for name in grads_a:
            torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-5, atol=1e-5, msg=name)
        compiles.append(counter.frame_count)
    assert compiles[0] >= 1
    # A second batch may add one dynamic-shape variant (the GPU's CUDA kernels specialise on some sizes where
    # the CPU does not); after that, batches with new token totals and segment counts must reuse the graphs.
    assert compiles[1] <= 2 * compiles[0], f"graphs compiled after each batch: {compiles}"
    assert compiles[-1] == compiles[1], f"graphs compiled after each batch: {compiles}"
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in eager.named_parameters()]
