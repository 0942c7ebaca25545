"""Packing metadata: everything a forward needs to know about where each image sits in the packed sequence.

A batch of ``B`` entries described by ``grid_thw`` (frames, rows, columns in patches) becomes one sequence.
Every frame of every entry is its own attention *segment*; each segment holds the family's prefix tokens
(CLS, registers) followed by that frame's patches::

    [p0 .. pk-1 | patches of frame 0] [p0 .. pk-1 | patches of frame 1] ...

Patches of a frame are row-major, or with ``merge_size = m > 1`` in *merge order*: the frame is cut into
``m x m`` blocks, blocks are visited row-major and each block's ``m*m`` patches come out row-major and
contiguous (what a Qwen-style patch merger reshapes into ``[N / m^2, m^2 * D]`` without a gather). Position
encodings read each patch's ``(row, col)`` from :attr:`Packing.patch_coords`, so they follow either order.

All of it is built once per forward, before the layer loop, from host-side integers: ``cu_seqlens`` is int32,
``max_seqlen`` a Python int, and the index tensors are made on the CPU and copied to the device without
waiting, so a forward whose ``grid_thw`` lives on the CPU makes no host-device synchronisation. Blocks then
reuse the same metadata instead of recomputing it (or reading ``max_seqlen`` back from the GPU) per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["Packing", "Segments", "check_merge_size", "validate_grid_thw"]


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Copy a freshly built CPU tensor to ``device`` without making the host wait for the GPU."""
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


@dataclass(frozen=True, eq=False)
class Segments:
    """Boundaries of variable-length segments in a packed sequence.

    Attributes:
        cu_seqlens: int32 ``[S + 1]`` cumulative lengths, on the model's device (what varlen kernels take).
        max_seqlen: the longest segment, a Python int, so no kernel launch has to read it back from the GPU.
        lengths: host-side segment lengths, for shape bookkeeping.
        host_cu_seqlens: the same boundaries as ``cu_seqlens`` in a CPU tensor. The per-segment reference
            attention splits by them; as a tensor (not a tuple of ints) it lets a compiled graph take batches
            of any segment count and length without recompiling.
    """

    cu_seqlens: Tensor
    max_seqlen: int
    lengths: tuple[int, ...]
    host_cu_seqlens: Tensor

    @classmethod
    def from_lengths(cls, lengths: tuple[int, ...], device: torch.device) -> Segments:
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0).to(torch.int32)
        return cls(_to_device(cu, device), max(lengths), lengths, cu)

    @property
    def total(self) -> int:
        return sum(self.lengths)


def validate_grid_thw(grid_thw: Tensor | list | tuple) -> tuple[tuple[int, int, int], ...]:
    """Check ``grid_thw`` and return it as host-side ``(t, h, w)`` triples.

    A CUDA ``grid_thw`` costs one device-to-host copy here (once per forward); keep it on the CPU to avoid it.
    """
    if isinstance(grid_thw, np.ndarray):
        grid_thw = torch.from_numpy(grid_thw)
    if isinstance(grid_thw, Tensor):
        if grid_thw.is_floating_point() or grid_thw.is_complex() or grid_thw.dtype == torch.bool:
            raise ValueError(f"grid_thw must hold integers, got dtype {grid_thw.dtype}")
        if grid_thw.ndim != 2 or grid_thw.shape[1] != 3:
            raise ValueError(f"grid_thw must have shape [num_images, 3], got {tuple(grid_thw.shape)}")
        rows = grid_thw.tolist()
    else:
        rows = [list(r) for r in grid_thw]
        for r in rows:
            if len(r) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in r):
                raise ValueError(f"grid_thw rows must be three integers (t, h, w), got {r!r}")
    if not rows:
        raise ValueError("grid_thw is empty: the batch must hold at least one image")
    for i, (t, h, w) in enumerate(rows):
        if t < 1 or h < 1 or w < 1:
            raise ValueError(f"grid_thw[{i}] = ({t}, {h}, {w}): frames, rows and columns must all be >= 1")
    return tuple((int(t), int(h), int(w)) for t, h, w in rows)


def check_merge_size(grid: tuple[tuple[int, int, int], ...], merge_size: int) -> None:
    """Raise ``ValueError`` unless every frame splits into whole ``merge_size x merge_size`` blocks."""
    if not isinstance(merge_size, int) or isinstance(merge_size, bool) or merge_size < 1:
        raise ValueError(f"merge_size must be a positive integer, got {merge_size!r}")
    for i, (_, h, w) in enumerate(grid):
        if h % merge_size or w % merge_size:
            raise ValueError(
                f"image {i} is {h}x{w} patches, which does not split into {merge_size}x{merge_size} merge "
                f"blocks; resize it so rows and columns are multiples of {merge_size}"
            )


def _patch_position(local: Tensor, w: Tensor, merge_size: int) -> tuple[Tensor, Tensor]:
    """(row, col) in its frame of the patch at index ``local`` of a frame ``w`` patches wide."""
    if merge_size == 1:
        return local // w, local % w
    m = merge_size
    block, inner = local // (m * m), local % (m * m)
    blocks_per_row = w // m
    return (block // blocks_per_row) * m + inner // m, (block % blocks_per_row) * m + inner % m


@dataclass(frozen=True, eq=False)
class Packing:
    """Where every token of a packed batch lives. Build it with :meth:`from_grid`.

    Attributes:
        grid: host-side ``(t, h, w)`` per entry, as given.
        frame_sizes: host-side ``(h, w)`` per segment (one segment per frame).
        num_prefix: prefix tokens at the start of every segment.
        tokens: segment boundaries of the full sequence (prefix + patches).
        patches: segment boundaries of the patch tokens alone (the model's input and output layout).
        patch_rows: ``[N]`` row in the full sequence of each input patch (``None`` when there are no prefixes).
        prefix_rows: ``[S * num_prefix]`` rows of the prefix tokens, segment-major (``None`` when there are none).
        patch_coords: ``[N, 4]`` int32 per patch: row, column, frame rows ``h``, frame columns ``w``.
        patch_segment: ``[N]`` int64 segment (frame) index of each patch.
        merge_size: ``1`` for row-major patches, ``m`` for merge order (see the module docstring).
    """

    grid: tuple[tuple[int, int, int], ...]
    frame_sizes: tuple[tuple[int, int], ...]
    num_prefix: int
    tokens: Segments
    patches: Segments
    patch_rows: Tensor | None
    prefix_rows: Tensor | None
    patch_coords: Tensor
    patch_segment: Tensor
    merge_size: int = 1

    @classmethod
    def from_grid(
        cls,
        grid_thw: Tensor | list | tuple,
        num_prefix: int = 0,
        device: torch.device | str = "cpu",
        merge_size: int = 1,
    ) -> Packing:
        """Build the packing of a batch from its ``grid_thw`` ``[B, 3]`` (frames, rows, columns).

        Args:
            grid_thw: frames, rows and columns (in patches) of every entry.
            num_prefix: prefix tokens at the start of every segment.
            device: where the index tensors go.
            merge_size: ``m``: patches of each frame come in ``m x m`` blocks (merge order); every frame's rows
                and columns must be multiples of ``m``.
        """
        device = torch.device(device)
        grid = validate_grid_thw(grid_thw)
        check_merge_size(grid, merge_size)
        frame_sizes = tuple((h, w) for t, h, w in grid for _ in range(t))
        patch_lengths = tuple(h * w for h, w in frame_sizes)
        num_segments = len(frame_sizes)

        sizes = torch.tensor(frame_sizes, dtype=torch.int64)  # [S, 2]
        lengths = torch.tensor(patch_lengths, dtype=torch.int64)  # [S]
        seg_of_patch = torch.repeat_interleave(torch.arange(num_segments), lengths)  # [N]
        seg_start = torch.cumsum(lengths, 0) - lengths  # [S]
        local = torch.arange(int(lengths.sum())) - seg_start[seg_of_patch]  # [N] index inside the frame
        h, w = sizes[seg_of_patch].unbind(1)
        coords = torch.stack([*_patch_position(local, w, merge_size), h, w], dim=1).to(torch.int32)  # [N, 4]

        patch_rows = prefix_rows = None
        if num_prefix:
            patch_rows = torch.arange(len(local)) + (seg_of_patch + 1) * num_prefix
            seg_token_start = seg_start + torch.arange(num_segments) * num_prefix  # [S]
            prefix_rows = (seg_token_start[:, None] + torch.arange(num_prefix)).flatten()
            patch_rows, prefix_rows = _to_device(patch_rows, device), _to_device(prefix_rows, device)

        return cls(
            grid=grid,
            frame_sizes=frame_sizes,
            num_prefix=num_prefix,
            tokens=Segments.from_lengths(tuple(n + num_prefix for n in patch_lengths), device),
            patches=Segments.from_lengths(patch_lengths, device),
            patch_rows=patch_rows,
            prefix_rows=prefix_rows,
            patch_coords=_to_device(coords, device),
            patch_segment=_to_device(seg_of_patch, device),
            merge_size=merge_size,
        )

    @property
    def num_segments(self) -> int:
        return len(self.frame_sizes)

    @property
    def num_patches(self) -> int:
        return self.patches.total

    def token_segment(self) -> Tensor:
        """``[N + S*k]`` int64 segment index of every token of the packed sequence, prefix tokens included."""
        lengths = torch.tensor(self.tokens.lengths, dtype=torch.int64)
        seg = torch.repeat_interleave(torch.arange(self.num_segments), lengths)
        return _to_device(seg, self.patch_segment.device)

    def insert_prefix(self, patch_tokens: Tensor, prefix: Tensor | None) -> Tensor:
        """``[N, D]`` patch tokens and ``[k, D]`` prefix tokens -> ``[N + S*k, D]`` packed sequence."""
        if self.patch_rows is None or prefix is None:
            return patch_tokens
        out = patch_tokens.new_empty(self.tokens.total, patch_tokens.shape[-1])
        out = out.index_copy(0, self.patch_rows, patch_tokens)
        return out.index_copy(0, self.prefix_rows, prefix.to(patch_tokens.dtype).repeat(self.num_segments, 1))

    def patch_tokens(self, tokens: Tensor) -> Tensor:
        """``[N + S*k, ...]`` -> ``[N, ...]``: the patch tokens in input order."""
        return tokens if self.patch_rows is None else tokens.index_select(0, self.patch_rows)

    def prefix_tokens(self, tokens: Tensor) -> Tensor:
        """``[N + S*k, D]`` -> ``[S, k, D]``: each segment's prefix tokens."""
        if self.prefix_rows is None:
            return tokens.new_empty(self.num_segments, 0, tokens.shape[-1])
        return tokens.index_select(0, self.prefix_rows).unflatten(0, (self.num_segments, self.num_prefix))
