"""CUDA graphs at token budgets: the padded fixed-size batch they replay gives the eager outputs.

The padding logic (buffers, padding segments, empty segments) is checked on the CPU by running the blocks
over a StaticBatch directly; the captured graphs themselves are checked on a GPU machine.
"""

import pytest
import torch

import packvit_native as pv
from packvit_native.attention import available_backends
from packvit_native.graphs import BatchGraphs, ModuleSnapshot, StaticBatch
from packvit_native.layers import BlockContext

CASES = [
    # family, variant, grids (each frame's rows and columns multiples of the merge size)
    ("dinov3", "gelu", [[(1, 3, 5), (1, 1, 1), (1, 4, 4)], [(1, 2, 2)]]),  # prefix tokens + RoPE
    ("qwen2_5_vl", "vlm", [[(1, 4, 6), (2, 2, 4)], [(1, 2, 2)]]),  # windows + merge order + frames
    ("siglip2", "default", [[(1, 3, 4), (1, 2, 2), (1, 1, 5)]]),  # learned positions, no prefix, no RoPE
]


def _changes(model):
    """Ways a model's blocks change after a capture, each made on a fresh copy: (name, change, graph stale)."""
    block = "blocks.0.attn.qkv"

    def replace_weight(m):
        m.blocks[0].attn.qkv.weight = torch.nn.Parameter(m.blocks[0].attn.qkv.weight.detach().clone())

    def replace_module(m):
        m.blocks[1].mlp.fc1 = torch.nn.Linear(
            m.blocks[1].mlp.fc1.in_features, m.blocks[1].mlp.fc1.out_features
        )

    def move_data(m):
        m.blocks[0].norm1.weight.data = m.blocks[0].norm1.weight.data.clone()

    def load_in_place(m):
        m.load_state_dict({k: v * 2 for k, v in m.state_dict().items()})

    def add_attribute(m):
        m.blocks[0].register_buffer("unused", torch.zeros(1))

    return [
        ("to float64", lambda m: m.to(torch.float64), True),
        (f"{block}.weight replaced", replace_weight, True),
        ("a linear layer replaced", replace_module, True),
        ("storage swapped under a parameter", move_data, True),
        ("weights loaded in place", load_in_place, False),
        ("a buffer no kernel reads added", add_attribute, False),
    ]


def test_module_snapshot_tells_a_stale_graph(tiny_reference):
    import copy

    model = pv.from_pretrained(tiny_reference("dinov3", "gelu"), attn_backend="sdpa")
    for name, change, stale in _changes(model):
        changed = copy.deepcopy(model)
        snapshot = ModuleSnapshot(changed.blocks)
        assert snapshot.unchanged()
        change(changed)
        assert snapshot.unchanged() is not stale, name


def _batch_for(model, budget, max_segments=8, max_seqlen=None):
    c = model.config
    rope = (c.head_dim, torch.float32) if c.rope != "none" else None
    names = ("frames", "windows") if c.window_size else ("frames",)
    seqlen = min(max_seqlen or budget, budget)
    return StaticBatch(budget, max_segments, seqlen, names, c.hidden_size, torch.float32, rope, model.device)


@pytest.mark.parametrize(("family", "variant", "batches"), CASES)
def test_padded_batch_gives_the_eager_tokens(tiny_reference, family, variant, batches):
    model = pv.from_pretrained(tiny_reference(family, variant), attn_backend="sdpa").eval()
    for budget, max_seqlen in ((256, None), (200, 64), (97, 40)):
        static = _batch_for(model, budget, max_seqlen=max_seqlen)
        for grid in batches:
            patches = torch.randn(sum(t * h * w for t, h, w in grid), model.config.patch_dim)
            packing = model.pack(grid)
            with torch.no_grad():
                x, ctx = model.embed(patches, packing, "sdpa")
                assert static.fits(x.shape[0], ctx)
                eager = model._all_blocks(x, ctx)
                static.load(x, ctx)
                padded = model._all_blocks(static.x, static.context("sdpa"))
            torch.testing.assert_close(padded[: x.shape[0]], eager, rtol=1e-5, atol=1e-5)
            assert torch.isfinite(padded).all()  # the padding segments hold finite values too


def test_boundaries_of_a_padded_batch():
    static = StaticBatch(20, 3, 8, ("frames",), 4, torch.float32, None, torch.device("cpu"))
    assert static.cu_seqlens["frames"].tolist() == [0, 8, 16, 20, 20, 20, 20]  # all padding at first
    segments = pv.Packing.from_grid([(1, 2, 3), (1, 1, 1)]).frames  # 6 + 1 tokens
    ctx = BlockContext({"frames": segments}, "sdpa")
    static.load(torch.ones(7, 4), ctx)
    # The real boundaries, then padding segments of at most 8 tokens up to the budget, then empty segments.
    assert static.cu_seqlens["frames"].tolist() == [0, 6, 7, 15, 20, 20, 20]
    assert static.x[7:].abs().sum() == 0 and static.x[:7].sum() == 28


def test_batches_a_budget_cannot_take_are_not_loaded():
    static = StaticBatch(20, 2, 8, ("frames",), 4, torch.float32, None, torch.device("cpu"))

    def ctx(grid):
        return BlockContext({"frames": pv.Packing.from_grid(grid).frames}, "sdpa")

    assert static.fits(12, ctx([(1, 2, 3), (1, 2, 3)]))
    assert not static.fits(21, ctx([(1, 3, 7)]))  # more tokens than the budget
    assert not static.fits(9, ctx([(1, 3, 3)]))  # a segment longer than max_seqlen
    assert not static.fits(3, ctx([(1, 1, 1)] * 3))  # more segments than captured
    windowed = BlockContext({"frames": ctx([(1, 1, 1)]).segmentations["frames"]} | {"windows": None}, "sdpa")
    assert not static.fits(1, windowed)  # another set of segmentations


def test_capture_graphs_says_what_it_needs(tiny_reference):
    model = pv.from_pretrained(tiny_reference("dinov3", "gelu"), attn_backend="sdpa").eval()
    with pytest.raises(ValueError, match="CUDA device"):
        model.capture_graphs([128])
    for bad in ([0], [1.5], [True]):
        with pytest.raises(ValueError, match="positive integer"):
            model.capture_graphs(bad)
    with pytest.raises(ValueError, match="max_segments"):
        model.capture_graphs([128], max_segments=0)
    with pytest.raises(ValueError, match="CUDA device"):
        model.capture_graphs(batches=[[(1, 2, 2)]])
    with pytest.raises(ValueError, match="grid_thw"):
        model.capture_graphs(batches=[[(1, 0, 2)]])
    assert model.capture_graphs([]) is model  # releasing nothing is fine anywhere
    assert model.capture_graphs() is model


@pytest.mark.parametrize(("family", "variant", "batches"), CASES)
def test_a_batch_graph_captures_the_default_forward(tiny_reference, family, variant, batches):
    """What a batch shape's graph captures, run eagerly, is the default forward's output bit for bit."""
    model = pv.from_pretrained(tiny_reference(family, variant), attn_backend="sdpa").eval()
    for grid in batches:
        patches = torch.randn(sum(t * h * w for t, h, w in grid), model.config.patch_dim)
        with torch.no_grad():
            expected = model(patches, grid)
            captured = model._final_patch_tokens(patches, model.pack(grid), "sdpa")
        assert torch.equal(captured, expected)


def test_batch_graphs_serve_only_the_default_output(tiny_reference):
    """A batch shape's graph returns the final patch tokens; every other request, a gradient or another
    backend runs the forward (or the block graphs) instead."""
    model = pv.from_pretrained(tiny_reference("dinov3", "gelu"), attn_backend="sdpa").eval()
    grid, patches = [(1, 3, 4), (1, 1, 1)], torch.randn(13, model.config.patch_dim)
    replays = []

    class Recording(BatchGraphs):
        def __call__(self, patches, packing):
            replays.append(packing.grid)
            return model._final_patch_tokens(patches, packing, "sdpa")

    model._batch_graphs = Recording({model.pack(grid).grid: None}, "sdpa")
    model._graph_model = ModuleSnapshot(model)
    with torch.no_grad():
        for kwargs in ({}, {"apply_final_norm": True}):
            model(patches, grid, **kwargs)
        assert len(replays) == 2
        for kwargs in (
            {"return_dict": True},
            {"output_layers": -1},
            {"return_prefix": True},
            {"apply_final_norm": False},
        ):
            model(patches, grid, **kwargs)
        model(patches[:12], [(1, 3, 4)])  # another batch shape
        with torch.autocast("cpu", dtype=torch.bfloat16):  # captured without autocast: not replayed under it
            model(patches, grid)
        assert not model._batch_graphs.serves(model.pack(grid), "torch")  # another backend
    model(patches, grid)  # gradients enabled
    assert len(replays) == 2
    model.to(torch.float64)
    with torch.no_grad(), pytest.raises(RuntimeError, match="capture_graphs"):
        model(patches.double(), grid)


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_gpu
@pytest.mark.parametrize(("family", "variant", "batches"), CASES)
def test_replayed_graphs_match_the_eager_forward(tiny_reference, family, variant, batches):
    backend = available_backends("cuda")[0]
    model = pv.from_pretrained(
        tiny_reference(family, variant), device="cuda", dtype=torch.bfloat16, attn_backend=backend
    ).eval()
    grids = [*batches, [(1, 8, 8)] * 3]  # the last needs more than the smallest budget
    inputs = [
        torch.randn(sum(t * h * w for t, h, w in g), model.config.patch_dim, device="cuda") for g in grids
    ]
    with torch.no_grad():
        eager = [model(p, g, return_dict=True) for p, g in zip(inputs, grids, strict=True)]
        model.capture_graphs([64, 256], max_segments=8, max_seqlen=96)
        for _ in range(2):  # the second round replays over buffers the first one dirtied
            for p, g, ref in zip(inputs, grids, eager, strict=True):
                out = model(p, g, return_dict=True)
                for name in ("last_hidden_state", "prefix_tokens", "pooler_output"):
                    a, b = getattr(out, name), getattr(ref, name)
                    if b is not None:
                        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
        assert model._graphs.budgets == (64, 256)
        too_big = [(1, 16, 16)] * 2  # no budget fits: eager, same function
        p = torch.randn(512, model.config.patch_dim, device="cuda")
        assert model._graphs(*model.embed(p, model.pack(too_big), backend)) is None
        model.to(torch.float32)
        with pytest.raises(RuntimeError, match="capture_graphs"):
            model(p.float(), too_big)


def test_the_sincos_term_a_graph_reads_is_kept_by_the_packing(tiny_reference):
    """AIMv2's fixed sin-cos tables come from a cache shared by all sizes, which evicts; a whole-forward graph
    must read a copy its packing keeps, made by the second eval-mode use (the capture's warm-up)."""
    from packvit_native import positions

    model = pv.from_pretrained(tiny_reference("aimv2", "native"), attn_backend="sdpa").eval()
    grid, patches = [(1, 3, 4), (1, 2, 2)], torch.randn(16, model.config.patch_dim)
    packing = model.pack(grid)
    with torch.no_grad():
        first = model(patches, packing=packing)
        model(patches, packing=packing)
        kept = [v for k, v in packing.memo.items() if k[0] == "sincos" and v is not None]
        assert len(kept) == 1
        positions._sincos_table.cache_clear()
        assert model.positions(packing, torch.float32).additive is kept[0]
        assert torch.equal(model(patches, packing=packing), first)


@needs_gpu
@pytest.mark.parametrize(
    ("family", "variant", "batches"), [*CASES, ("aimv2", "native", [[(1, 3, 4), (1, 2, 2)], [(1, 5, 5)]])]
)
def test_replayed_batch_graphs_match_the_eager_forward(tiny_reference, family, variant, batches, monkeypatch):
    backend = available_backends("cuda")[0]
    model = pv.from_pretrained(
        tiny_reference(family, variant), device="cuda", dtype=torch.bfloat16, attn_backend=backend
    ).eval()
    inputs = [
        torch.randn(sum(t * h * w for t, h, w in g), model.config.patch_dim, device="cuda") for g in batches
    ]
    replays = []
    real_call = BatchGraphs.__call__
    monkeypatch.setattr(
        BatchGraphs, "__call__", lambda self, p, k: replays.append(k.grid) or real_call(self, p, k)
    )
    with torch.no_grad():
        eager = [model(p, g) for p, g in zip(inputs, batches, strict=True)]
        model.capture_graphs([256], batches=batches, max_segments=8)
        assert model._batch_graphs.grids == tuple(model.pack(g).grid for g in batches)
        for _ in range(2):  # the second round replays over buffers the first one dirtied
            outs = [model(p, g) for p, g in zip(inputs, batches, strict=True)]
            for out, ref in zip(outs, eager, strict=True):
                torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
        assert len(replays) == 2 * len(batches)
        assert outs[0].data_ptr() != model(inputs[0], batches[0]).data_ptr()  # each call gets its own copy
        doubled = model(inputs[0] * 2, batches[0])  # the patches are copied in on every call
        torch.testing.assert_close(doubled.float(), model(inputs[0] * 2, batches[0], return_dict=True)
                                   .last_hidden_state.float(), rtol=2e-2, atol=2e-2)  # fmt: skip
        model.to(torch.float32)
        with pytest.raises(RuntimeError, match="capture_graphs"):
            model(inputs[0].float(), batches[0])


def test_graphs_replay_only_where_no_gradient_is_recorded(tiny_reference):
    """A replay has no autograd history: with gradients enabled (frozen stem, trainable blocks) the blocks run
    eagerly, so they get their gradients."""
    model = pv.from_pretrained(tiny_reference("dinov3", "gelu"), attn_backend="sdpa").eval()
    replays = []

    def replay(x, ctx):
        replays.append(x.shape)
        return model._all_blocks(x, ctx)

    model._graphs, model._graph_blocks = replay, ModuleSnapshot(model.blocks)
    patches, grid = torch.randn(12, model.config.patch_dim), [(1, 3, 4)]
    model.patch_embed.requires_grad_(False)
    model(patches, grid).sum().backward()
    assert not replays and model.blocks[0].mlp.fc1.weight.grad is not None
    with torch.no_grad():
        model(patches, grid)
    assert len(replays) == 1


@needs_gpu
def test_a_failed_capture_leaves_no_graphs_installed(tiny_reference, monkeypatch):
    backend = available_backends("cuda")[0]
    model = pv.from_pretrained(tiny_reference("dinov3", "gelu"), device="cuda", attn_backend=backend).eval()

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(BatchGraphs, "capture", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        model.capture_graphs([64], batches=[[(1, 2, 2)]])
    assert model._graphs is None and model._batch_graphs is None
