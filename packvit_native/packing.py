"""Packing metadata: everything a forward needs to know about where each image sits in the packed sequence.

A batch of ``B`` entries described by ``grid_thw`` (frames, rows, columns in patches) becomes one sequence.
Every frame of every entry is its own attention segment; each segment holds the family's prefix tokens (CLS,
registers) followed by that frame's patches::

    [p0 .. pk-1 | patches of frame 0] [p0 .. pk-1 | patches of frame 1] ...

Patches of a frame are row-major, or with ``merge_size = m > 1`` in *merge order*: the frame is cut into
``m x m`` blocks, blocks are visited row-major and each block's ``m*m`` patches come out row-major and
contiguous (what a Qwen-style patch merger reshapes into ``[N / m^2, m^2 * D]`` without a gather). Position
encodings read each patch's ``(row, col)`` from :attr:`Packing.patch_coords`, so they follow either order.

Segmentations. Attention runs over one of two named segmentations of the *block sequence* (the order tokens
have inside the blocks): ``"frames"`` (each frame whole) and, for a model with attention windows,
``"windows"``: each frame tiled from its top-left corner into windows of ``window_size`` patches a side, each
a set of whole merge blocks, with partial windows at the right and bottom edges. Windows need their tokens
contiguous, so the block sequence of a windowed model lists each frame window by window (merge blocks
row-major inside a window); frames stay contiguous, so both segmentations describe the same sequence. Tokens
are put in block order once on the way in (:meth:`Packing.to_blocks`) and back once on the way out
(:meth:`Packing.to_sequence`).

Outputs are read from the *sequence*: frame by frame, each frame's prefix tokens then its patches in input
order. Without windows the block sequence is the sequence and :meth:`Packing.to_sequence` does nothing.

All of it is built once per forward, before the layer loop, from host-side integers: ``cu_seqlens`` is int32,
``max_seqlen`` a Python int; the per-patch indices are whole-array numpy operations on the host, copied to the
device in one non-blocking transfer, so a forward whose ``grid_thw`` lives on the CPU makes no host-device
synchronisation and the thread feeding the GPU runs few tensor operations (each one gives up the interpreter
lock, and with busy loading threads waits to get it back). Blocks then reuse the same metadata instead of
recomputing it (or reading ``max_seqlen`` back from the GPU) per layer.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral

import numpy as np
import torch
from torch import Tensor

__all__ = ["Packing", "Segments", "check_merge_size", "validate_grid_thw"]

# cu_seqlens are int32, as the varlen kernels take them: a batch may hold at most this many tokens.
MAX_TOKENS = 2**31 - 1


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Copy a freshly built CPU tensor to ``device`` without making the host wait for the GPU."""
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _to_device_together(host: dict[str, np.ndarray], device: torch.device) -> dict[str, Tensor]:
    """Host-side integer arrays (int64 or int32) as tensors on ``device``, in one non-blocking transfer.

    On a CUDA device the arrays are written into one pinned int64 buffer and copied at once: pinning costs
    milliseconds per call, and every tensor operation on the host is a point where the thread feeding the GPU
    gives up the interpreter lock and may wait to get it back, so a packing makes as few as it can. On the
    device the pieces are views of the buffer (int32 pieces are cast there, a kernel, not a wait).
    """
    if device.type == "cpu":
        return {name: torch.from_numpy(a) for name, a in host.items()}
    flat = torch.empty(
        sum(a.size for a in host.values()), dtype=torch.int64, pin_memory=device.type == "cuda"
    )
    spans, start, staged = {}, 0, flat.numpy()
    for name, a in host.items():
        staged[start : start + a.size] = a.reshape(-1)
        spans[name] = (start, a)
        start += a.size
    flat = flat.to(device, non_blocking=True)
    out = {}
    for name, (start, a) in spans.items():
        piece = flat[start : start + a.size]
        piece = piece if a.ndim == 1 else piece.view(a.shape)
        out[name] = piece if a.dtype == np.int64 else piece.to(torch.int32)
    return out


def _boundaries(lengths: np.ndarray) -> np.ndarray:
    """int32 ``[S + 1]`` cumulative lengths."""
    cu = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu[1:])
    return cu.astype(np.int32)


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
        cu = cls.host_boundaries(lengths)
        return cls(_to_device(cu, device), max(lengths), lengths, cu)

    @staticmethod
    def host_boundaries(lengths: tuple[int, ...]) -> Tensor:
        """int32 ``[S + 1]`` cumulative lengths on the CPU."""
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int64), 0).to(torch.int32)
        return cu

    @property
    def total(self) -> int:
        return sum(self.lengths)


def _grid_rows(grid_thw: Tensor | Sequence | np.ndarray) -> list[Sequence]:
    if isinstance(grid_thw, np.ndarray):
        grid_thw = torch.from_numpy(grid_thw)
    if isinstance(grid_thw, Tensor):
        if grid_thw.is_floating_point() or grid_thw.is_complex() or grid_thw.dtype == torch.bool:
            raise ValueError(f"grid_thw must hold integers, got dtype {grid_thw.dtype}")
        if grid_thw.ndim != 2 or grid_thw.shape[1] != 3:
            raise ValueError(f"grid_thw must have shape [num_images, 3], got {tuple(grid_thw.shape)}")
        if grid_thw.device.type == "meta":
            raise ValueError("grid_thw is on the meta device and holds no values; pass it on the CPU")
        return grid_thw.tolist()
    if not isinstance(grid_thw, Sequence) or isinstance(grid_thw, (str, bytes)):
        raise ValueError(
            f"grid_thw must be a [num_images, 3] tensor or a list of (t, h, w), got {grid_thw!r}"
        )
    if len(grid_thw) == 3 and all(isinstance(v, Integral) for v in grid_thw):
        raise ValueError(f"grid_thw must be a list of (t, h, w) rows; for one image write [{list(grid_thw)}]")
    rows = []
    for r in grid_thw:
        if isinstance(r, (Tensor, np.ndarray)):
            r = r.tolist()
        if not isinstance(r, Sequence) or isinstance(r, (str, bytes)):
            raise ValueError(f"grid_thw rows must be three integers (t, h, w), got {r!r}")
        rows.append(r)
    return rows


def validate_grid_thw(grid_thw: Tensor | Sequence | np.ndarray) -> tuple[tuple[int, int, int], ...]:
    """Check ``grid_thw`` and return it as host-side ``(t, h, w)`` triples, in time and memory linear in the
    number of images (nothing is expanded per patch here).

    A CUDA ``grid_thw`` costs one device-to-host copy here (once per forward); keep it on the CPU to avoid it.
    """
    rows = _grid_rows(grid_thw)
    if not rows:
        raise ValueError("grid_thw is empty: the batch must hold at least one image")
    out = []
    total = 0
    for i, r in enumerate(rows):
        if len(r) != 3 or not all(isinstance(v, Integral) and not isinstance(v, bool) for v in r):
            raise ValueError(f"grid_thw rows must be three integers (t, h, w), got {list(r)!r}")
        t, h, w = (int(v) for v in r)
        if t < 1 or h < 1 or w < 1:
            raise ValueError(f"grid_thw[{i}] = ({t}, {h}, {w}): frames, rows and columns must all be >= 1")
        total += t * h * w
        if total > MAX_TOKENS:
            raise ValueError(
                f"grid_thw describes more than {MAX_TOKENS} patches (at entry {i}: {t}x{h}x{w}); one packed "
                "batch holds at most that many"
            )
        out.append((t, h, w))
    return tuple(out)


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


def _patch_indices(
    frame_sizes: tuple[tuple[int, int], ...], table_start: np.ndarray, merge_size: int
) -> dict[str, np.ndarray]:
    """Per-patch indices of a batch from its per-frame sizes, as whole-array numpy operations on the host.

    ``table_start`` is each frame's first row in the concatenated per-size position tables. Numpy, not
    PyTorch: a few dozen small tensor operations each give up the interpreter lock and wait to get it back,
    which in a process with busy loading threads (an encoding pipeline) took longer than the work. Returns
    ``coords`` ``[N, 4]`` int32 (row, column, h, w in token order: row-major, or merge order for
    ``merge_size > 1``), ``segment`` ``[N]`` (frame of each patch) and ``size_table_rows`` ``[N]``.
    """
    h, w = np.array(frame_sizes, dtype=np.int64).reshape(-1, 2).T
    counts = h * w
    segment = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    local = np.arange(len(segment), dtype=np.int64) - (np.cumsum(counts) - counts)[segment]
    hs, ws = h[segment], w[segment]
    m = merge_size
    if m == 1:
        row, col = np.divmod(local, ws)
    else:  # merge blocks row-major, each block's m x m patches row-major
        block, within = np.divmod(local, m * m)
        block_row, block_col = np.divmod(block, ws // m)
        row = block_row * m + within // m
        col = block_col * m + within % m
    return {
        "coords": np.stack([row, col, hs, ws], axis=1).astype(np.int32),
        "segment": segment,
        "size_table_rows": table_start[segment] + row * ws + col,
    }


def _window_order(
    frame_sizes: tuple[tuple[int, int], ...], merge_size: int, window_size: int
) -> tuple[np.ndarray, tuple[int, ...]]:
    """Block order of a windowed model: ``[N]`` input index of each block position, and the window lengths.

    Every merge block gets a key (frame, window row, window column). A stable sort by that key lists each
    window's blocks in the order they have in the frame, i.e. row-major inside the window.
    """
    m, side = merge_size, window_size // merge_size  # window side in merge blocks
    h, w = np.array(frame_sizes, dtype=np.int64).reshape(-1, 2).T
    block_rows, block_cols = h // m, w // m  # [S]
    blocks = block_rows * block_cols
    win_cols = -(-block_cols // side)
    windows = -(-block_rows // side) * win_cols  # [S] windows per frame
    frame = np.repeat(np.arange(len(frame_sizes), dtype=np.int64), blocks)  # [N / m^2]
    local = np.arange(len(frame), dtype=np.int64) - (np.cumsum(blocks) - blocks)[frame]
    row, col = np.divmod(local, block_cols[frame])
    key = (np.cumsum(windows) - windows)[frame] + (row // side) * win_cols[frame] + col // side
    block_order = np.argsort(key, kind="stable")  # [N / m^2]
    lengths = np.bincount(key, minlength=int(windows.sum())) * (m * m)
    token_order = (block_order[:, None] * (m * m) + np.arange(m * m, dtype=np.int64)).reshape(-1)  # [N]
    return token_order, tuple(lengths.tolist())


@dataclass(frozen=True, eq=False)
class Packing:
    """Where every token of a packed batch lives. Build it with :meth:`from_grid` (or ``model.pack``).

    Attributes:
        grid: host-side ``(t, h, w)`` per entry, as given.
        frame_sizes: host-side ``(h, w)`` per segment (one segment per frame).
        num_prefix: prefix tokens at the start of every segment.
        frames: segment boundaries of the block sequence by frame (prefix tokens and patches).
        frame_patches: segment boundaries of the patch tokens alone, in input order (the model's input and
            output layout).
        windows: segment boundaries of the block sequence by attention window, or ``None`` without windows.
        patch_rows: ``[N]`` row in the sequence of each input patch (``None`` without prefixes).
        prefix_rows: ``[S * num_prefix]`` rows of the prefix tokens, segment-major (``None`` without prefixes).
        block_order: ``[N]`` input patch at each row of a windowed block sequence (``None`` without windows).
        block_rows: ``[N]`` row in the windowed block sequence of each input patch (``None`` without windows).
        patch_coords: ``[N, 4]`` int32 per input patch: row, column, frame rows ``h``, frame columns ``w``.
        patch_segment: ``[N]`` int64 segment (frame) index of each input patch.
        distinct_sizes: host-side distinct ``(h, w)`` frame sizes, in order of first appearance.
        size_table_rows: ``[N]`` int64 row of each input patch in the concatenation of one row-major table per
            distinct size (how position tables built per size are gathered into packed order).
        merge_size: ``1`` for row-major patches, ``m`` for merge order (see the module docstring).
        window_size: side of the attention windows in patches, ``0`` for none.
        memo: tables computed from this packing alone, kept with it (e.g. eval-mode rotary angles).
    """

    grid: tuple[tuple[int, int, int], ...]
    frame_sizes: tuple[tuple[int, int], ...]
    num_prefix: int
    frames: Segments
    frame_patches: Segments
    windows: Segments | None
    patch_rows: Tensor | None
    prefix_rows: Tensor | None
    block_order: Tensor | None
    block_rows: Tensor | None
    patch_coords: Tensor
    patch_segment: Tensor
    distinct_sizes: tuple[tuple[int, int], ...]
    size_table_rows: Tensor
    merge_size: int = 1
    window_size: int = 0
    # Tables derived from this packing alone (the rotary angles of eval-mode forwards), made once per packing.
    memo: dict = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_grid(
        cls,
        grid_thw: Tensor | Sequence | np.ndarray,
        num_prefix: int = 0,
        device: torch.device | str = "cpu",
        merge_size: int = 1,
        window_size: int = 0,
    ) -> Packing:
        """Build the packing of a batch from its ``grid_thw`` ``[B, 3]`` (frames, rows, columns).

        Args:
            grid_thw: frames, rows and columns (in patches) of every entry.
            num_prefix: prefix tokens at the start of every segment.
            device: where the index tensors go.
            merge_size: ``m``: patches of each frame come in ``m x m`` blocks (merge order); every frame's rows
                and columns must be multiples of ``m``.
            window_size: side of the attention windows in patches (a multiple of ``merge_size``); ``0`` for
                none. Windows and prefix tokens cannot be combined.
        """
        device = torch.device(device)
        grid = validate_grid_thw(grid_thw)
        check_merge_size(grid, merge_size)
        if (
            not isinstance(window_size, int)
            or isinstance(window_size, bool)
            or window_size < 0
            or (window_size % merge_size)
        ):
            raise ValueError(
                f"window_size must be a non-negative multiple of merge_size, got {window_size!r}"
            )
        if not isinstance(num_prefix, Integral) or isinstance(num_prefix, bool) or num_prefix < 0:
            raise ValueError(f"num_prefix must be a non-negative integer, got {num_prefix!r}")
        if window_size and num_prefix:
            raise ValueError("attention windows and prefix tokens cannot be combined")
        frame_sizes = tuple((h, w) for t, h, w in grid for _ in range(t))
        patch_lengths = tuple(h * w for h, w in frame_sizes)

        distinct = tuple(dict.fromkeys(frame_sizes))
        table_start = dict(
            zip(distinct, itertools.accumulate([h * w for h, w in distinct][:-1], initial=0), strict=True)
        )
        host = _patch_indices(
            frame_sizes, np.array([table_start[size] for size in frame_sizes], dtype=np.int64), merge_size
        )
        lengths = np.array(patch_lengths, dtype=np.int64)
        host["frames"] = _boundaries(lengths + num_prefix)
        host["frame_patches"] = _boundaries(lengths)
        if num_prefix:
            host["patch_rows"] = (
                np.arange(len(host["segment"]), dtype=np.int64) + (host["segment"] + 1) * num_prefix
            )
            frame_token_start = host["frames"][:-1].astype(np.int64)  # [S]
            host["prefix_rows"] = (
                frame_token_start[:, None] + np.arange(num_prefix, dtype=np.int64)
            ).reshape(-1)
        window_lengths = ()
        if window_size:
            order, window_lengths = _window_order(frame_sizes, merge_size, window_size)
            host["block_order"] = order
            host["block_rows"] = np.empty_like(order)
            host["block_rows"][order] = np.arange(len(order), dtype=np.int64)
            host["windows"] = _boundaries(np.array(window_lengths, dtype=np.int64))
        # Everything is computed here and sent in one small transfer (about 40 bytes per patch). Tensors made in
        # inference mode could never be saved for a backward: a packing kept by the model and built in an
        # inference-mode forward would break every later training step over batches of the same sizes.
        with torch.inference_mode(False):
            dev = _to_device_together(host, device)

            def segments(name: str, lengths: tuple[int, ...]) -> Segments:
                return Segments(dev[name], max(lengths), lengths, torch.from_numpy(host[name]))

            return cls(
                grid=grid,
                frame_sizes=frame_sizes,
                num_prefix=num_prefix,
                frames=segments("frames", tuple(n + num_prefix for n in patch_lengths)),
                frame_patches=segments("frame_patches", patch_lengths),
                windows=segments("windows", window_lengths) if window_size else None,
                patch_rows=dev.get("patch_rows"),
                prefix_rows=dev.get("prefix_rows"),
                block_order=dev.get("block_order"),
                block_rows=dev.get("block_rows"),
                patch_coords=dev["coords"],
                patch_segment=dev["segment"],
                distinct_sizes=distinct,
                size_table_rows=dev["size_table_rows"],
                merge_size=merge_size,
                window_size=window_size,
            )

    # Earlier names of the two frame segmentations and of to_blocks, kept for code written against them.
    @property
    def tokens(self) -> Segments:
        return self.frames

    @property
    def patches(self) -> Segments:
        return self.frame_patches

    def insert_prefix(self, patch_tokens: Tensor, prefix: Tensor | None) -> Tensor:
        return self.to_blocks(patch_tokens, prefix)

    @property
    def num_segments(self) -> int:
        return len(self.frame_sizes)

    @property
    def num_patches(self) -> int:
        return self.frame_patches.total

    @property
    def device(self) -> torch.device:
        return self.frames.cu_seqlens.device

    def segmentation(self, name: str) -> Segments:
        """The named segmentation of the block sequence: ``"frames"`` or ``"windows"``."""
        if name == "frames":
            return self.frames
        if name == "windows" and self.windows is not None:
            return self.windows
        raise ValueError(f"this packing has no {name!r} segmentation (window_size={self.window_size})")

    def token_segment(self) -> Tensor:
        """``[T]`` int64 frame index of every token of the block sequence, prefix tokens included."""
        lengths = torch.tensor(self.frames.lengths, dtype=torch.int64)
        seg = torch.repeat_interleave(torch.arange(self.num_segments), lengths)
        return _to_device(seg, self.device)

    def to_blocks(self, patch_tokens: Tensor, prefix: Tensor | None = None) -> Tensor:
        """``[N, ...]`` patch tokens in input order and ``[k, ...]`` prefix tokens -> ``[T, ...]`` block sequence."""
        if self.block_order is not None:
            return patch_tokens.index_select(0, self.block_order)
        if self.prefix_rows is None or prefix is None:
            return patch_tokens
        out = patch_tokens.new_empty(self.frames.total, *patch_tokens.shape[1:])
        out = out.index_copy(0, self.patch_rows, patch_tokens)
        return out.index_copy(0, self.prefix_rows, prefix.to(patch_tokens.dtype).repeat(self.num_segments, 1))

    def to_sequence(self, tokens: Tensor) -> Tensor:
        """``[T, ...]`` block sequence -> ``[T, ...]`` sequence (frame by frame, prefix tokens then patches in
        input order); the block sequence itself unless windows reordered it."""
        return tokens if self.block_rows is None else tokens.index_select(0, self.block_rows)

    def patch_tokens(self, sequence: Tensor) -> Tensor:
        """``[T, ...]`` sequence -> ``[N, ...]``: the patch tokens in input order."""
        return sequence if self.patch_rows is None else sequence.index_select(0, self.patch_rows)

    def prefix_tokens(self, sequence: Tensor) -> Tensor:
        """``[T, D]`` sequence -> ``[S, k, D]``: each segment's prefix tokens."""
        if self.prefix_rows is None:
            return sequence.new_empty(self.num_segments, 0, sequence.shape[-1])
        return sequence.index_select(0, self.prefix_rows).unflatten(0, (self.num_segments, self.num_prefix))
