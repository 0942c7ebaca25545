"""CUDA graphs of the block stack at fixed token budgets, for small batches and online encoding.

A forward of one or a few images launches a few hundred short kernels, and the host takes longer to launch
them than the GPU takes to run them. A CUDA graph replays the whole block stack with one launch, but it fixes
every shape and every kernel argument. So a graph is captured per *token budget*: a batch of ``T`` tokens is
copied into the buffers of the smallest budget ``B >= T`` and the ``B - T`` padding tokens form segments of
their own after the real ones, so attention never mixes them with real tokens (every other layer works token
by token). Each segmentation keeps a fixed number of boundaries: the unused entries repeat ``B``, i.e. empty
segments, which the varlen kernels skip. The kernels are launched with the ``max_seqlen`` fixed at capture,
an upper bound on every segment's length.

Only the blocks are captured; the stem (patch embedding, position tables, prefix tokens) and the outputs run
eagerly around them, since they depend on the image sizes in ways a fixed graph cannot follow. Replay is used
only with gradients disabled, in eval mode (a replay records no autograd history); anything a graph cannot serve (more tokens than the largest budget,
more segments than captured, a longer segment, kept intermediate layers) runs eagerly with the same result.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from .layers import BlockContext
from .packing import Segments

__all__ = ["BlockGraphs", "ModuleSnapshot", "StaticBatch"]

RunBlocks = Callable[[Tensor, BlockContext], Tensor]


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
    ) -> BlockGraphs:
        """Capture ``run`` over the buffers of every budget, largest first so smaller ones reuse its memory.

        Args:
            run: the blocks, ``(x, ctx) -> x``.
            budgets: token budgets.
            make_batch: the buffers of one budget.
            backend: a device-side attention backend (``"fa4"``, ``"fa3"``, ``"flash_attn"``, ``"torch"``).
            warmup: eager runs before each capture (kernels compiled on first use, e.g. FA4's, must not
                compile inside the capture).
        """
        if backend == "sdpa":
            raise ValueError(
                "CUDA graphs need a GPU attention kernel (fa4, fa3, flash_attn or torch); the sdpa reference "
                "splits segments on the host, which a graph cannot replay"
            )
        batches, graphs, outputs = [], [], []
        pool = torch.cuda.graph_pool_handle()
        for budget in sorted(set(budgets), reverse=True):
            batch = make_batch(budget)
            ctx = batch.context(backend)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(warmup):
                    run(batch.x, ctx)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool), torch.no_grad():
                out = run(batch.x, ctx)
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
