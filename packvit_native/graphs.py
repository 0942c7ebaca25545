"""CUDA graphs of the block stack at fixed token budgets, for small batches and online encoding.

A forward of one or a few images launches a few hundred short kernels, and the host takes longer to launch
them than the GPU takes to run them. A CUDA graph replays the whole block stack with one launch, but it fixes
every shape and every kernel argument. So a graph is captured per *token budget*: a batch of ``T`` tokens is
copied into the buffers of the smallest budget ``B >= T`` and the ``B - T`` padding tokens form segments of
their own after the real ones, so attention never mixes them with real tokens (every other layer works token
by token). Each segmentation keeps a fixed number of boundaries: the unused entries repeat ``B``, i.e. empty
segments, which the varlen kernels skip. The kernels are launched with the ``max_seqlen`` fixed at capture,
an upper bound on every segment's length.

Only the blocks are captured at a budget; the stem (patch embedding, position tables, prefix tokens) and the
outputs run eagerly around them, since they depend on the image sizes in ways a fixed graph cannot follow.
Where one batch shape repeats (a fixed serving resolution), :class:`BatchGraphs` captures the whole forward for
that exact ``grid_thw``, stem and outputs included, so a call is one copy in, one launch and one copy out.
Replay is used only with gradients disabled, in eval mode (a replay records no autograd history); anything a
graph cannot serve (more tokens than the largest budget, more segments than captured, a longer segment, kept
intermediate layers) runs eagerly with the same result.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .layers import BlockContext
from .packing import Packing, Segments

__all__ = ["BatchGraphs", "BlockGraphs", "ModuleSnapshot", "StaticBatch"]

RunBlocks = Callable[[Tensor, BlockContext], Tensor]
RunForward = Callable[[Tensor, Packing], Tensor]


class ModuleSnapshot:
    """What a captured graph read: every submodule, parameter and buffer of a module tree and their storage.

    :meth:`unchanged` tells whether the tree still holds the same objects at the same addresses: a module,
    parameter or buffer replaced (``convert_to_fp8``, an assignment) or moved (``.to()``) makes a graph stale,
    while weights copied in place (``load_state_dict``) do not. It compares the registries the tree held and the
    tensors' addresses, without walking the tree through ``named_modules`` again: it runs on every replay, where
    the walk would cost more host time than a small batch's whole launch.
    """

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        # (registry, name, object) of every entry: an entry added later is read by no captured kernel
        entries = [
            (registry, name, value)
            for module in root.modules()
            for registry in (module._modules, module._parameters, module._buffers)
            for name, value in registry.items()
        ]
        self.registries, self.names, self.values = (list(column) for column in zip(*entries, strict=True))
        self.tensors = [*root.parameters(), *root.buffers()]
        self.addresses = [t.data_ptr() for t in self.tensors]

    def unchanged(self) -> bool:
        # map() over C functions: a few microseconds per hundred entries, no Python frame per entry
        return all(map(operator.is_, map(dict.get, self.registries, self.names), self.values)) and (
            list(map(Tensor.data_ptr, self.tensors)) == self.addresses
        )


class StaticBatch:
    """The fixed buffers of one token budget: hidden states, rotary angles and segment boundaries.

    Args:
        budget: tokens the buffers hold.
        max_segments: segments a real batch may have in any one segmentation.
        max_seqlen: the longest segment a real batch may have; also the size of the padding segments.
        segmentations: names of the segmentations the blocks attend within (``"frames"``, ``"windows"``).
        hidden_size, dtype: of the hidden states.
        rope: ``(head_dim, dtype)`` of the rotary angles, or ``None`` for a model without them.
        device: where the buffers live.
    """

    def __init__(
        self,
        budget: int,
        max_segments: int,
        max_seqlen: int,
        segmentations: Sequence[str],
        hidden_size: int,
        dtype: torch.dtype,
        rope: tuple[int, torch.dtype] | None,
        device: torch.device,
    ) -> None:
        self.budget, self.max_segments, self.max_seqlen = budget, max_segments, max_seqlen
        self.x = torch.zeros(budget, hidden_size, dtype=dtype, device=device)
        self.rope = None
        if rope is not None:
            head_dim, rope_dtype = rope
            self.rope = tuple(torch.zeros(budget, 1, head_dim, dtype=rope_dtype, device=device) for _ in "cs")
        # Real segments, then padding segments of at most max_seqlen tokens, then empty ones.
        boundaries = max_segments + math.ceil(budget / max_seqlen) + 1
        steps = torch.arange(boundaries, dtype=torch.int64) * max_seqlen  # 0, L, 2L, ... capped at the budget
        self._steps = steps[1:].clamp(max=budget).to(device=device, dtype=torch.int32)
        start = steps.clamp(max=budget).to(device=device, dtype=torch.int32)  # the batch of padding only
        self.cu_seqlens = {name: start.clone() for name in segmentations}

    def fits(self, num_tokens: int, ctx: BlockContext) -> bool:
        """Whether a batch of ``num_tokens`` tokens with ``ctx``'s segmentations can run in these buffers."""
        if num_tokens > self.budget or ctx.segmentations.keys() != self.cu_seqlens.keys():
            return False
        return all(
            len(s.lengths) <= self.max_segments and s.max_seqlen <= self.max_seqlen
            for s in ctx.segmentations.values()
        )

    def load(self, x: Tensor, ctx: BlockContext) -> None:
        """Copy a batch in: its tokens first, zeros after; its boundaries, then the padding segments'."""
        t = x.shape[0]
        self.x[:t].copy_(x)
        self.x[t:].zero_()
        if self.rope is not None:
            for static, angles in zip(self.rope, ctx.rope, strict=True):
                static[:t].copy_(angles)
        for name, cu in self.cu_seqlens.items():
            real = ctx.segmentations[name].cu_seqlens
            n = real.shape[0]
            cu[:n].copy_(real)
            torch.clamp(self._steps[: cu.shape[0] - n] + t, max=self.budget, out=cu[n:])

    def context(self, backend: str) -> BlockContext:
        """The block context over these buffers. ``lengths`` is left empty: only the boundaries on the device
        are read (the host-side reference backend is refused for graphs, see :meth:`BlockGraphs.capture`)."""
        segmentations = {name: Segments(cu, self.max_seqlen, (), cu) for name, cu in self.cu_seqlens.items()}
        return BlockContext(segmentations, backend, self.rope)


class BlockGraphs:
    """Captured replays of a model's blocks, one per token budget, sharing one memory pool.

    Build it with :meth:`capture`; call it with a batch's block sequence and context to get the blocks'
    output, or ``None`` when no budget fits the batch (run the blocks eagerly then).
    """

    def __init__(
        self,
        batches: list[StaticBatch],
        graphs: list[torch.cuda.CUDAGraph],
        outputs: list[Tensor],
        backend: str,
    ) -> None:
        self.batches, self.graphs, self.outputs, self.backend = batches, graphs, outputs, backend

    @property
    def budgets(self) -> tuple[int, ...]:
        return tuple(b.budget for b in self.batches)

    @classmethod
    def capture(
        cls,
        run: RunBlocks,
        budgets: Sequence[int],
        make_batch: Callable[[int], StaticBatch],
        backend: str,
        warmup: int = 2,
        pool: tuple[int, int] | None = None,
    ) -> BlockGraphs:
        """Capture ``run`` over the buffers of every budget, largest first so smaller ones reuse its memory.

        Args:
            run: the blocks, ``(x, ctx) -> x``.
            budgets: token budgets.
            make_batch: the buffers of one budget.
            backend: a device-side attention backend (``"fa4"``, ``"fa3"``, ``"flash_attn"``, ``"torch"``).
            warmup: eager runs before each capture (kernels compiled on first use, e.g. FA4's, must not
                compile inside the capture).
            pool: the memory pool to capture into (default: a new one); graphs that never replay at the same
                time may share one.
        """
        _refuse_host_attention(backend)
        batches, graphs, outputs = [], [], []
        pool = torch.cuda.graph_pool_handle() if pool is None else pool
        for budget in sorted(set(budgets), reverse=True):
            batch = make_batch(budget)
            ctx = batch.context(backend)
            graph, out = _captured(lambda: run(batch.x, ctx), warmup, pool)  # noqa: B023 (called at once)
            batches.append(batch)
            graphs.append(graph)
            outputs.append(out)
        order = sorted(range(len(batches)), key=lambda i: batches[i].budget)  # smallest budget tried first
        return cls(
            [batches[i] for i in order], [graphs[i] for i in order], [outputs[i] for i in order], backend
        )

    def __call__(self, x: Tensor, ctx: BlockContext) -> Tensor | None:
        if ctx.backend != self.backend or ctx.token_segment is not None or x.dtype != self.outputs[0].dtype:
            return None
        for batch, graph, out in zip(self.batches, self.graphs, self.outputs, strict=True):
            if batch.fits(x.shape[0], ctx):
                batch.load(x, ctx)
                with torch.cuda.device(out.device):  # a graph replays on the current device's stream
                    graph.replay()
                # The output buffer is overwritten by the next replay; the caller gets its own copy.
                return out[: x.shape[0]].clone()
        return None


class BatchGraph(NamedTuple):
    """One batch shape's whole-forward graph, its input and output buffers, and the packing it reads."""

    patches: Tensor
    graph: torch.cuda.CUDAGraph
    output: Tensor
    packing: Packing  # kept alive: the graph reads its device tensors and the tables in its memo


class BatchGraphs:
    """Captured replays of a model's whole forward, one per exact batch shape (``grid_thw``).

    Build it with :meth:`capture`; where :meth:`serves` a batch, call it with the batch's patches and packing
    to get the forward's output.
    """

    def __init__(self, entries: dict[tuple, BatchGraph], backend: str) -> None:
        self.entries, self.backend = entries, backend

    @property
    def grids(self) -> tuple[tuple[tuple[int, int, int], ...], ...]:
        return tuple(self.entries)

    @classmethod
    def capture(
        cls,
        run: RunForward,
        packings: Sequence[Packing],
        patch_dim: int,
        dtype: torch.dtype,
        backend: str,
        warmup: int = 2,
        pool: tuple[int, int] | None = None,
    ) -> BatchGraphs:
        """Capture ``run`` over a fixed patch buffer for every packing.

        Args:
            run: the forward, ``(patches, packing) -> output``; the packing's device tensors and the tables it
                keeps (``memo``) are read by the graph, so the packing is kept with it.
            packings: one per batch shape.
            patch_dim, dtype: of the patch buffer (a forward's patches are copied in, cast as the eager
                forward casts them).
            backend, warmup, pool: as for :meth:`BlockGraphs.capture`.
        """
        _refuse_host_attention(backend)
        pool = torch.cuda.graph_pool_handle() if pool is None else pool
        entries = {}
        for packing in packings:
            patches = torch.zeros(packing.num_patches, patch_dim, dtype=dtype, device=packing.device)
            # The warm-up runs also fill the packing's memo outside the graph's memory pool.
            graph, out = _captured(lambda: run(patches, packing), warmup, pool)  # noqa: B023 (called at once)
            entries[packing.grid] = BatchGraph(patches, graph, out, packing)
        return cls(entries, backend)

    def serves(self, packing: Packing, backend: str) -> bool:
        """Whether a graph was captured for this batch shape with this attention backend (and the forward is
        not under autocast, which the capture ran without)."""
        device = packing.device.type
        return (
            backend == self.backend and packing.grid in self.entries and not torch.is_autocast_enabled(device)
        )

    def __call__(self, patches: Tensor, packing: Packing) -> Tensor:
        entry = self.entries[packing.grid]
        entry.patches.copy_(patches)
        with torch.cuda.device(entry.output.device):  # a graph replays on the current device's stream
            entry.graph.replay()
        return entry.output.clone()  # the next replay overwrites the output buffer


def _refuse_host_attention(backend: str) -> None:
    if backend == "sdpa":
        raise ValueError(
            "CUDA graphs need a GPU attention kernel (fa4, fa3, flash_attn or torch); the sdpa reference "
            "splits segments on the host, which a graph cannot replay"
        )


def _captured(
    run: Callable[[], Tensor], warmup: int, pool: tuple[int, int]
) -> tuple[torch.cuda.CUDAGraph, Tensor]:
    """``run`` captured as a graph into ``pool`` after ``warmup`` eager runs on a side stream (kernels compiled
    on first use, e.g. FA4's, and caches filled on first use must not be made inside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(warmup):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool), torch.no_grad():
        out = run()
    return graph, out
