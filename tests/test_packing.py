"""Packing metadata and patch layouts."""

import pytest
import torch
from safetensors import SafetensorError

import packvit_native as pv
from packvit_native.encoder import RECENT_PACKINGS
from packvit_native.packing import Packing


def test_packing_segments_and_prefix_rows():
    packing = Packing.from_grid(torch.tensor([[1, 2, 3], [2, 1, 1], [1, 3, 1]]), num_prefix=2)
    assert packing.frame_sizes == ((2, 3), (1, 1), (1, 1), (3, 1))
    assert packing.frame_patches.lengths == (6, 1, 1, 3)
    assert packing.frames.lengths == (8, 3, 3, 5)
    assert packing.frames.cu_seqlens.dtype == torch.int32
    assert packing.frames.cu_seqlens.tolist() == [0, 8, 11, 14, 19]
    assert isinstance(packing.frames.max_seqlen, int) and packing.frames.max_seqlen == 8
    assert packing.prefix_rows.tolist() == [0, 1, 8, 9, 11, 12, 14, 15]
    assert packing.patch_rows.tolist() == [2, 3, 4, 5, 6, 7, 10, 13, 16, 17, 18]
    row, col, h, w = packing.patch_coords.T.tolist()
    assert row[:6] == [0, 0, 0, 1, 1, 1] and col[:6] == [0, 1, 2, 0, 1, 2]
    assert (h[-3:], w[-3:]) == ([3, 3, 3], [1, 1, 1])
    assert packing.patch_segment.tolist() == [0] * 6 + [1, 2] + [3] * 3


@pytest.mark.parametrize("merge_size", [1, 2])
def test_patch_indices_follow_each_frame_in_token_order(merge_size):
    """Per patch, what a loop over frames gives: row and column in token order (merge order for m > 1), the
    frame's size and index, and the row in one row-major table per distinct size (first appearance first)."""
    grid = [[1, 4, 6], [2, 2, 2], [1, 6, 4], [1, 4, 6], [1, 2, 8]]
    m = merge_size
    coords, segments, table_rows, tables = [], [], [], {}
    frames = [(h, w) for t, h, w in grid for _ in range(t)]
    for s, (h, w) in enumerate(frames):
        start = tables.setdefault((h, w), sum(a * b for a, b in tables) if tables else 0)
        for br in range(h // m):
            for bc in range(w // m):
                for i in range(m):
                    for j in range(m):
                        r, c = br * m + i, bc * m + j
                        coords.append([r, c, h, w])
                        segments.append(s)
                        table_rows.append(start + r * w + c)
    packing = Packing.from_grid(grid, num_prefix=1, merge_size=m)
    assert packing.patch_coords.dtype == torch.int32 and packing.patch_coords.tolist() == coords
    assert packing.patch_segment.tolist() == segments
    assert packing.size_table_rows.tolist() == table_rows
    assert packing.distinct_sizes == ((4, 6), (2, 2), (6, 4), (2, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("merge_size", "window_size"), [(1, 0), (2, 0), (2, 4)])
def test_a_cuda_packing_equals_the_cpu_one(merge_size, window_size):
    grid = [[1, 4, 6], [2, 2, 2], [1, 6, 4], [1, 10, 8]]
    prefix = 0 if window_size else 3
    cpu = Packing.from_grid(grid, prefix, "cpu", merge_size, window_size)
    cuda = Packing.from_grid(grid, prefix, "cuda", merge_size, window_size)
    for name in ("patch_rows", "prefix_rows", "block_order", "block_rows", "patch_coords", "patch_segment",
                 "size_table_rows"):  # fmt: skip
        here, there = getattr(cpu, name), getattr(cuda, name)
        assert (here is None) == (there is None), name
        if here is not None:
            assert (
                there.device.type == "cuda" and there.dtype == here.dtype and torch.equal(there.cpu(), here)
            )
    for name in ("frames", "frame_patches", "windows"):
        here, there = getattr(cpu, name), getattr(cuda, name)
        if here is not None:
            assert torch.equal(there.cu_seqlens.cpu(), here.cu_seqlens) and there.lengths == here.lengths


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_cuda_packing_never_waits_for_the_gpu():
    grid = [[1, 14, 20], [2, 8, 8], [1, 1, 1]]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        packing = Packing.from_grid(grid, 5, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert packing.patch_coords.device.type == "cuda"


def test_insert_and_remove_prefix_round_trip():
    packing = Packing.from_grid([[1, 2, 2], [1, 1, 3]], num_prefix=3)
    patches, prefix = torch.randn(7, 5), torch.randn(3, 5)
    tokens = packing.to_blocks(patches, prefix)
    assert tokens.shape == (7 + 2 * 3, 5)
    assert torch.equal(packing.patch_tokens(tokens), patches)
    assert torch.equal(packing.prefix_tokens(tokens), prefix.expand(2, 3, 5))


def test_no_prefix_is_identity():
    packing = Packing.from_grid([[1, 2, 2]], num_prefix=0)
    x = torch.randn(4, 3)
    assert packing.to_blocks(x, None) is x and packing.patch_tokens(x) is x and packing.to_sequence(x) is x
    assert packing.prefix_tokens(x).shape == (1, 0, 3)


def test_patchify_layouts_and_round_trip():
    images = [torch.randn(3, 8, 12), torch.randn(2, 3, 4, 4), torch.randn(3, 4, 8)]
    for layout in ("cpp", "ppc"):
        patches, grid = pv.patchify(images, 4, layout=layout)
        assert grid.tolist() == [[1, 2, 3], [2, 1, 1], [1, 1, 2]]
        assert patches.shape == (6 + 2 + 2, 48)
        back = pv.unpatchify(patches, grid, 4, layout=layout)
        assert torch.equal(back[0][0], images[0]) and torch.equal(back[1], images[1])
    # cpp: one patch is a Conv2d receptive field flattened as (c, py, px)
    patches, _ = pv.patchify([images[0]], 4, layout="cpp")
    assert torch.equal(patches[4], images[0][:, 4:8, 4:8].reshape(-1))
    patches, _ = pv.patchify([images[0]], 4, layout="ppc")
    assert torch.equal(patches[4], images[0][:, 4:8, 4:8].permute(1, 2, 0).reshape(-1))


def test_ppc_loading_permutes_the_patch_weight_once(tiny_reference):
    src = tiny_reference("dinov3", "gelu")
    cpp, ppc = pv.from_pretrained(src), pv.from_pretrained(src, patch_layout="ppc")
    assert ppc.config.patch_layout == "hwc"
    images = [torch.randn(3, 12, 8), torch.randn(3, 4, 4)]
    with torch.no_grad():
        a = cpp(*cpp.patchify(images))
        b = ppc(*ppc.patchify(images))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_save_pretrained_round_trip(tiny_reference, tmp_path):
    model = pv.from_pretrained(tiny_reference("dinov3", "gelu"), patch_layout="ppc")
    model.save_pretrained(tmp_path / "saved")
    again = pv.from_pretrained(tmp_path / "saved")
    assert again.config == model.config
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)


def test_failed_overwrite_keeps_the_previous_checkpoint(tiny_reference, tmp_path, monkeypatch):
    import errno

    import packvit_native.io as io

    model = pv.from_pretrained(tiny_reference("dinov3", "gelu"))
    out = model.save_pretrained(tmp_path / "saved")
    before = (out / "model.safetensors").read_bytes()

    def disk_full(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    def disk_full_as_safetensors_says(tensors, path, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    for failing in (disk_full, disk_full_as_safetensors_says):
        monkeypatch.setattr(io, "save_file", failing)
        with pytest.raises(io.CheckpointWriteError, match=f"{out}: cannot write .*No space left"):
            model.save_pretrained(out, force=True)
        assert (out / "model.safetensors").read_bytes() == before
        assert [p.name for p in tmp_path.iterdir()] == ["saved"], "no temporary directories left behind"


def test_recent_packings_are_reused_per_model(tiny_reference):
    model = pv.from_pretrained(tiny_reference("dinov3", "gelu"))
    grid = [(1, 2, 3), (1, 4, 4)]
    first = model.pack(grid)
    assert model.pack(torch.tensor(grid)) is first  # same sizes, however they are given
    patches = torch.randn(22, model.config.patch_dim)
    fresh = Packing.from_grid(grid, model.config.num_prefix)
    torch.testing.assert_close(model(patches, grid), model(patches, packing=fresh))
    for n in range(1, RECENT_PACKINGS + 1):  # as many other batches as are kept push the first one out
        model.pack([(1, 1, n)])
    assert model.pack(grid) is not first
    assert len(model._packings) == RECENT_PACKINGS
    other = pv.from_pretrained(tiny_reference("dinov3", "gelu"))
    assert other.pack(grid) is not model.pack(grid)  # kept per model


def test_rotary_tables_are_kept_from_the_second_eval_forward_over_a_packing(tiny_reference):
    model = pv.from_pretrained(tiny_reference("dinov3", "gelu")).eval()
    grid = torch.tensor([[1, 3, 5], [1, 1, 1]])
    patches = torch.randn(16, model.config.patch_dim)
    packing = model.pack(grid)
    with torch.inference_mode():
        first = model.positions(packing, torch.float32).rotary
        assert packing.memo and all(v is None for v in packing.memo.values())  # used once: a note only
        second = model.positions(packing, torch.float32).rotary
        third = model.positions(packing, torch.float32).rotary
        assert third[0] is second[0] and third[1] is second[1]  # kept from the second forward on
        assert torch.equal(first[0], third[0]) and torch.equal(first[1], third[1])
        kept = model(patches, packing=packing)
    # Grad mode gets tables of its own (inference tensors cannot be saved for backward), equal in value.
    for _ in range(2):
        x = patches.clone().requires_grad_()
        out = model(x, packing=packing)
        out.sum().backward()
        assert x.grad is not None and torch.equal(out.detach(), kept)
    model.train()
    fresh = pv.Packing.from_grid(grid, model.config.num_prefix)
    for _ in range(2):
        model.positions(fresh, torch.float32)
    assert not fresh.memo  # training (augmentation) keeps nothing


def test_a_checkpoint_replaced_while_being_read_is_read_again(tiny_reference, tmp_path, monkeypatch):
    """save_pretrained(force=True) between reading config.json and model.safetensors must not give one
    checkpoint's config with the other's weights: the loader notices the new folder and reads both again."""
    import packvit_native.io as io

    model = pv.from_pretrained(tiny_reference("dinov3", "gelu"))
    out = model.save_pretrained(tmp_path / "saved")
    newer = {k: v + 1 for k, v in model.state_dict().items()}
    real_load_weights, calls = io._load_weights, []

    def replaced_in_between(file):
        calls.append(file)
        if len(calls) == 1:
            io.save_native(out, model.config, newer, force=True)
        return real_load_weights(file)

    monkeypatch.setattr(io, "_load_weights", replaced_in_between)
    config, state = io.load_native(out)
    assert len(calls) == 2 and config == model.config
    assert all(torch.equal(state[k], newer[k]) for k in newer)


@pytest.mark.parametrize(
    ("family", "variant"), [("dinov3", "gelu"), ("siglip2", "default"), ("qwen2_5_vl", "vlm")]
)
def test_an_inference_mode_forward_leaves_training_possible(tiny_reference, family, variant):
    """The model keeps recent packings; one built in an inference-mode forward (an evaluation pass) must serve a
    later training step or input gradient over the same sizes."""
    model = pv.from_pretrained(tiny_reference(family, variant), attn_backend="sdpa").eval()
    grid = [(1, 4, 6), (1, 2, 2)]
    patches = torch.randn(sum(t * h * w for t, h, w in grid), model.config.patch_dim)
    with torch.inference_mode():
        expected = model(patches, grid)
    pixels = patches.clone().requires_grad_()
    torch.testing.assert_close(model(pixels, grid), expected)
    model(pixels, grid).sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    model.train()
    model(patches, grid).square().mean().backward()
    assert all(p.grad is not None for p in model.blocks[0].parameters())


def test_packing_refuses_prefix_counts_and_windows_that_are_not_counts():
    for bad in (-1, 3.0, True):
        with pytest.raises(ValueError, match="num_prefix"):
            pv.Packing.from_grid([(1, 2, 2)], num_prefix=bad)
    with pytest.raises(ValueError, match="window_size"):
        pv.Packing.from_grid([(1, 2, 2)], window_size=True)
