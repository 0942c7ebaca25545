"""The one packed encoder: stem -> N identical pre-norm blocks -> final norm -> heads.

Input is pre-patchified pixels ``[total_patches, C*T*p*p]`` plus ``grid_thw [B, 3]``; all images share one
packed sequence and attention runs per segment (frame or window) through a varlen kernel, with no padding and
no masks.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .attention import resolve_backend
from .config import EncoderConfig
from .graphs import BatchGraphs, BlockGraphs, ModuleSnapshot, StaticBatch
from .heads import Merger, build_head
from .io import save_native
from .layers import Block, BlockContext, make_norm
from .packing import Packing, validate_grid_thw
from .patchify import patchify
from .positions import Positions

__all__ = ["EncoderOutput", "PackedVisionEncoder"]

RECENT_PACKINGS = 16  # packings kept per model for batches of repeated sizes


@dataclass
class EncoderOutput:
    """Outputs of a packed forward.

    Attributes:
        last_hidden_state: ``[N, D]`` final patch tokens (after the final norm, if the model has one), in input
            order.
        prefix_tokens: ``[S, k, D]`` final prefix tokens (class token, then registers) of each segment.
        pooler_output: the head's output, or ``None`` for a model without one: ``[S, D]`` (one row per
            segment) for pooling heads, ``[N / m^2, out_hidden_size]`` (one row per ``m x m`` block, in input
            order) for a merger.
        hidden_states: ``num_layers + 1`` tensors ``[N, D]`` of patch tokens: the embedding output, then the
            output of each block (before the final norm), indexed as transformers indexes them.
        packing: the packing metadata of this batch.
        layers: the layers asked for with ``output_layers``, in the order asked, or ``None``.
        deepstack_features: one ``[N / m^2, out_hidden_size]`` tensor per ``config.deepstack_layers`` entry (that
            layer's tokens through its own merger), or ``None`` for a model without them.
        image_embeds: ``[S, projection_dim]``, the pooled output through the model's projection (CLIP's
            ``visual_projection``), or ``None`` for a model without one.

    With ``return_prefix=True`` every per-token tensor above holds the full sequence ``[N + S*k, D]``.
    """

    last_hidden_state: Tensor
    prefix_tokens: Tensor
    pooler_output: Tensor | None
    hidden_states: tuple[Tensor, ...] | None
    packing: Packing
    layers: tuple[Tensor, ...] | None = None
    deepstack_features: tuple[Tensor, ...] | None = None
    image_embeds: Tensor | None = None


@dataclass(frozen=True)
class _Request:
    """What a forward was asked to return, checked once."""

    return_dict: bool
    picks: tuple[int, ...] | None  # output_layers as hidden-state indices
    single: bool  # output_layers was one int
    keep: frozenset[int]  # hidden-state indices to keep while the blocks run
    depth: int  # blocks to run
    apply_final_norm: bool | None
    return_prefix: bool

    @property
    def final_tokens_only(self) -> bool:
        """Whether the forward returns the normed final patch tokens alone (the default)."""
        return not (self.return_dict or self.picks is not None or self.return_prefix) and (
            self.apply_final_norm is not False
        )


class PackedVisionEncoder(nn.Module):
    """A vision transformer that encodes a packed batch of variable-size images in one pass.

    Args:
        config: the architecture.
        attn_backend: default attention backend (``"auto"``, ``"fa4"``, ``"fa3"``, ``"flash_attn"``,
            ``"torch"`` or ``"sdpa"``); a forward may override it.
        device, dtype: where and in what dtype to create the parameters (``"meta"`` builds without memory).
    """

    def __init__(self, config: EncoderConfig, attn_backend: str = "auto", device=None, dtype=None) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.attn_backend = attn_backend
        dd = {"device": device, "dtype": dtype}
        d = config.hidden_size
        # A Conv2d/Conv3d with stride = kernel = patch is a linear map of each flattened patch.
        self.patch_embed = nn.Linear(config.patch_dim, d, bias=config.patch_bias, **dd)
        self.patch_norm = make_norm(config, **dd) if config.patch_norm else nn.Identity()
        self.positions = Positions(config, **dd)
        self.prefix = nn.Parameter(torch.zeros(config.num_prefix, d, **dd)) if config.num_prefix else None
        self.embed_norm = make_norm(config, **dd) if config.embed_norm else nn.Identity()
        self.blocks = nn.ModuleList(Block(config, i, **dd) for i in range(config.num_layers))
        self.norm = make_norm(config, **dd) if config.final_norm else nn.Identity()
        self.head = build_head(config, **dd)
        self.deepstack = nn.ModuleList(
            Merger(config, postshuffle_norm=True, **dd) for _ in config.deepstack_layers
        )
        self.projection = (
            nn.Linear(d, config.projection_dim, bias=False, **dd)
            if config.projection_dim is not None
            else None
        )
        self._packings: OrderedDict[tuple, Packing] = OrderedDict()  # recent packings, most recent last
        self._graphs: BlockGraphs | None = None
        self._graph_blocks: ModuleSnapshot | None = None
        self._batch_graphs: BatchGraphs | None = None
        self._graph_model: ModuleSnapshot | None = None

    @property
    def device(self) -> torch.device:
        return self.patch_embed.weight.device

    def set_activation_checkpointing(self, every: int = 1) -> PackedVisionEncoder:
        """Recompute block activations in the backward instead of storing them.

        Args:
            every: checkpoint blocks ``0, every, 2*every, ...``; ``1`` checkpoints every block, ``0`` none.
                Checkpointing a subset trades memory for recompute time between the two extremes.

        Returns:
            self, for chaining.
        """
        if not isinstance(every, int) or isinstance(every, bool) or every < 0:
            raise ValueError(f"every must be a non-negative integer, got {every!r}")
        for i, block in enumerate(self.blocks):
            block.checkpointed = every > 0 and i % every == 0
        return self

    def compile_blocks(self, **compile_kwargs) -> PackedVisionEncoder:
        """``torch.compile`` each block in place, with dynamic shapes; parameter names are unchanged.

        Only the blocks are compiled: the per-batch work before them (packing metadata, position tables) is
        host-side bookkeeping that would make the compiler specialise on image sizes. With dynamic shapes a
        batch with another token total, segment count or longest segment reuses the compiled graphs. Apply it
        before ``fully_shard`` or DDP wrapping, as with any module-level compile.

        Args:
            compile_kwargs: passed to :meth:`torch.nn.Module.compile` (default ``dynamic=True``).
        """
        compile_kwargs.setdefault("dynamic", True)
        for block in self.blocks:
            block.compile(**compile_kwargs)
        return self

    def capture_graphs(
        self,
        budgets: Sequence[int] = (),
        *,
        batches: Sequence[Tensor | Sequence | np.ndarray] = (),
        max_segments: int = 64,
        max_seqlen: int | None = None,
        attn_backend: str | None = None,
    ) -> PackedVisionEncoder:
        """Capture CUDA graphs for small batches and online encoding: the blocks at a few token budgets, and
        the whole forward for batch shapes that repeat.

        A later inference forward (under ``torch.no_grad()`` or ``torch.inference_mode()``, in eval mode) whose
        ``grid_thw`` is one of ``batches`` and that asks for the final patch tokens alone (no ``return_dict``,
        ``output_layers``, ``return_prefix`` or ``apply_final_norm=False``) copies its patches in and replays
        that batch's graph: stem, blocks, final norm and output order in one launch. Otherwise, a batch that
        fits a budget copies its block-sequence tokens into that budget's buffers, pads the rest with tokens in
        segments of their own, and replays the block stack with one launch instead of a few hundred. Outputs
        match the eager forward's (padding never meets real tokens; GEMMs over the padded shape may round
        differently in bf16). Batches that fit neither, forwards with gradients enabled (outside
        ``no_grad``/``inference_mode``: a replay records no autograd history) or that keep intermediate layers
        (``output_layers``, ``output_hidden_states``, deepstack features) run eagerly. See
        :mod:`packvit_native.graphs`.

        Args:
            budgets: token budgets in block-sequence tokens: patches plus each frame's prefix tokens (a
                448x448 DINOv3-L/16 image is 28 * 28 + 5 = 789). Each budget keeps its activations' memory
                (shared between all graphs).
            batches: ``grid_thw`` of batch shapes that repeat (a fixed serving resolution: ``[[(1, 28, 28)] *
                8]`` for eight 448x448 images at patch 16), one whole-forward graph each.
            max_segments: the most frames (and attention windows) a batch may have to use a budget's graph.
            max_seqlen: the longest frame (or window) in tokens a batch may have to use a budget's graph
                (default: the budget). The attention kernels are launched for this length, so a bound near the
                real images' size avoids idle thread blocks.
            attn_backend: the attention backend the graphs are captured with (default: the model's); a
                forward with another backend runs eagerly.

        Returns:
            self, for chaining. Capture again after moving or replacing parameters (``.to()``; a new
            ``state_dict`` loaded in place is fine). ``capture_graphs()`` with neither budgets nor batches
            releases the graphs and their memory.
        """
        self._release_graphs()
        budgets, batches = tuple(budgets), tuple(batches)
        if not budgets and not batches:
            return self
        checked = {"max_segments": max_segments, "max_seqlen": 1 if max_seqlen is None else max_seqlen}
        for name, value in [*checked.items(), *(("budgets entry", b) for b in budgets)]:
            if not isinstance(value, Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        grids = [validate_grid_thw(grid) for grid in batches]
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device; it is on {self.device}")
        if self.training:
            raise ValueError("capture_graphs is for inference: call model.eval() first")
        backend = resolve_backend(attn_backend or self.attn_backend, self.device)
        packings = [self.pack(grid) for grid in grids]
        for packing in packings:
            self.positions.check_sizes(packing)
        c = self.config
        dtype = self.patch_embed.weight.dtype
        rope = None
        if c.rope != "none":
            rope = (c.head_dim, torch.float32 if c.rope_fp32 else dtype)
        names = ("frames", "windows") if c.window_size else ("frames",)

        def make_batch(budget: int) -> StaticBatch:
            seqlen = min(max_seqlen or budget, budget)
            return StaticBatch(budget, max_segments, seqlen, names, c.hidden_size, dtype, rope, self.device)

        # Streams, the memory pool and the capture follow the current device: make it the model's. The buffers
        # are made outside inference mode, so forwards in any mode can copy into them.
        with torch.cuda.device(self.device), torch.inference_mode(False):
            pool = torch.cuda.graph_pool_handle()
            try:
                if budgets:
                    self._graphs = BlockGraphs.capture(
                        self._all_blocks, budgets, make_batch, backend, pool=pool
                    )
                    self._graph_blocks = ModuleSnapshot(self.blocks)
                if packings:
                    run = functools.partial(self._final_patch_tokens, backend=backend)
                    self._batch_graphs = BatchGraphs.capture(
                        run, packings, c.patch_dim, dtype, backend, pool=pool
                    )
                    self._graph_model = ModuleSnapshot(self)
            except BaseException:  # all or nothing: no part of a failed capture stays installed
                self._release_graphs()
                raise
        return self

    def _release_graphs(self) -> None:
        self._graphs, self._graph_blocks, self._batch_graphs, self._graph_model = None, None, None, None

    def _all_blocks(self, x: Tensor, ctx: BlockContext) -> Tensor:
        for block in self.blocks:
            x = block(x, ctx)
        return x

    def _final_patch_tokens(self, patches: Tensor, packing: Packing, backend: str) -> Tensor:
        """The default forward's output, all eager: what a batch shape's graph captures."""
        x, ctx = self.embed(patches, packing, backend)
        return packing.patch_tokens(packing.to_sequence(self.norm(self._all_blocks(x, ctx))))

    def _replayable(self, snapshot: ModuleSnapshot, root: nn.Module) -> bool:
        """Whether this forward may replay graphs that read ``root`` as ``snapshot`` saw it."""
        if self.training or torch.is_grad_enabled():  # a replay records no autograd history
            return False
        if snapshot.root is not root or not snapshot.unchanged():
            raise RuntimeError(
                "the model's parameters were moved or replaced since capture_graphs; call it again"
            )
        return True

    def _replayed(self, x: Tensor, ctx: BlockContext, request: _Request) -> Tensor | None:
        """The blocks' output from a captured graph, or ``None`` where this forward must run eagerly."""
        if self._graphs is None or request.keep or request.depth != self.config.num_layers:
            return None
        return self._graphs(x, ctx) if self._replayable(self._graph_blocks, self.blocks) else None

    def _replayed_batch(self, patches: Tensor, packing: Packing, backend: str) -> Tensor | None:
        """The forward's output from the graph captured for this batch shape, or ``None``."""
        graphs = self._batch_graphs
        if graphs is None or not graphs.serves(packing, backend):
            return None
        return graphs(patches, packing) if self._replayable(self._graph_model, self) else None

    def patchify(self, images: list[Tensor] | Tensor) -> tuple[Tensor, Tensor]:
        """Images ``[C, H, W]`` (or ``[F, C, H, W]`` clips) -> ``(patches, grid_thw)`` in this model's layout,
        token order and temporal patch size.

        Images must already be normalised and sized in multiples of the patch size (and of ``merge_size``
        patches); :func:`packvit_native.preprocess` does that from image files.
        """
        c = self.config
        return patchify(
            images, c.patch_size, layout=c.patch_layout, merge_size=c.merge_size,
            temporal_patch_size=c.temporal_patch_size,
        )  # fmt: skip

    def pack(self, grid_thw: Tensor | Sequence | np.ndarray) -> Packing:
        """The packing metadata of a batch for this model (prefix tokens, merge order, windows, device).

        The last few packings are kept, so a batch of the same sizes as a recent one (fixed-size serving, a
        repeated benchmark call) skips the host work; pass it as ``model(patches, packing=...)`` to reuse one
        explicitly.
        """
        c = self.config
        key = (validate_grid_thw(grid_thw), self.device, c.num_prefix, c.merge_size, c.window_size)
        packing = self._packings.pop(key, None)
        if packing is None:
            packing = Packing.from_grid(
                key[0], c.num_prefix, self.device, merge_size=c.merge_size, window_size=c.window_size
            )
        # A Packing is immutable (frozen, and nothing writes into its tensors), so it can serve every later
        # batch of these sizes; kept per model, so its device memory goes with the model.
        self._packings[key] = packing
        if len(self._packings) > RECENT_PACKINGS:
            self._packings.popitem(last=False)
        return packing

    def save_pretrained(
        self, out_dir: str | Path, force: bool = False, state_dict: dict[str, Tensor] | None = None
    ) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (atomically) for :func:`from_pretrained`.

        ``state_dict``: the weights to write instead of this model's own, e.g. the full state gathered from an
        FSDP2-sharded copy of it (whose own state holds only this rank's shards). It must hold this model's
        keys and shapes: anything else is refused before a file is written."""
        if state_dict is None:
            return save_native(out_dir, self.config, self.state_dict(), force=force)
        self._check_state_dict(state_dict)
        return save_native(out_dir, self.config, state_dict, force=force)

    def _check_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        if not isinstance(state_dict, dict) or not all(isinstance(v, Tensor) for v in state_dict.values()):
            raise ValueError("state_dict must be a dict of tensors, as model.state_dict() returns")
        expected = {k: v.shape for k, v in self.state_dict().items()}  # a shard's shape is the whole tensor's
        missing, unknown = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
        if missing or unknown:
            wrapped = {k.split(".", 1)[0] for k in unknown} & {"module", "_orig_mod", "_fsdp_wrapped_module"}
            hint = f" (keys of a wrapper: strip the {sorted(wrapped)[0]}. prefix)" if wrapped else ""
            raise ValueError(
                f"state_dict does not match this model: missing {missing[:5]}, unexpected {unknown[:5]}{hint}"
            )
        for key, shape in expected.items():
            value = state_dict[key]
            if value.shape != shape:
                raise ValueError(
                    f"state_dict: {key} has shape {tuple(value.shape)}, this model's is {tuple(shape)}"
                )
            if not value.is_floating_point():
                raise ValueError(f"state_dict: {key} is {value.dtype}; a checkpoint holds float weights")

    def forward(
        self,
        patches: Tensor,
        grid_thw: Tensor | Sequence | np.ndarray | None = None,
        *,
        packing: Packing | None = None,
        return_dict: bool = False,
        output_hidden_states: bool = False,
        output_layers: int | Sequence[int] | None = None,
        return_prefix: bool = False,
        apply_final_norm: bool | None = None,
        attn_backend: str | None = None,
    ) -> Tensor | tuple[Tensor, ...] | EncoderOutput:
        """Encode a packed batch.

        Layers are numbered as transformers numbers ``hidden_states``: ``0`` is the embedding output (positions
        added, prefix tokens inserted), ``i`` the output of block ``i``, ``-1`` the last block's output before
        the final norm, ``-2`` the one before it (what LLaVA-style code takes).

        Args:
            patches: ``[N, C*T*p*p]`` pixels, images one after another, each frame's patches in the model's
                token order (row-major, or merge order when ``config.merge_size > 1``).
            grid_thw: ``[B, 3]`` integer (frames, rows, columns) per image, frames counted in temporal patches.
                Keep it on the CPU: the forward then never waits on the GPU. Not needed when ``packing`` is
                given.
            packing: metadata from :meth:`pack`, to reuse it across calls.
            return_dict: return an :class:`EncoderOutput` instead of the final patch tokens.
            output_hidden_states: also return every layer's patch tokens (needs ``return_dict``).
            output_layers: return just these layers: an int gives one tensor, a sequence a tuple in the order
                asked (in :attr:`EncoderOutput.layers` with ``return_dict``). Only the asked layers are kept,
                and without ``return_dict`` the blocks after the deepest asked layer are not run.
            return_prefix: every returned token tensor holds the full sequence ``[N + S*k, D]`` (each
                segment's ``k`` prefix tokens, then its patches; ``packing.frames.cu_seqlens`` marks the
                segments) instead of the patch tokens ``[N, D]`` alone.
            apply_final_norm: ``None`` (default): the last layer's output goes through the final norm and the
                layers picked by ``output_layers`` do not, as in transformers' ``hidden_states``. ``True``:
                the picked layers are normed too (DINOv3's ``get_intermediate_layers(norm=True)``).
                ``False``: nothing is normed; the final output is the last block's raw output. Heads always
                use the normed tokens they were trained on.
            attn_backend: override the model's attention backend for this call.

        Returns:
            ``[N, D]`` final patch tokens; the picked layer(s) when ``output_layers`` is given; or an
            :class:`EncoderOutput` with ``return_dict``.
        """
        request = self._request(
            return_dict, output_hidden_states, output_layers, apply_final_norm, return_prefix
        )
        packing = self._packing(patches, grid_thw, packing)
        backend = resolve_backend(attn_backend or self.attn_backend, self.device)
        if request.final_tokens_only:
            replayed = self._replayed_batch(patches, packing, backend)
            if replayed is not None:
                return replayed
        x, ctx = self.embed(patches, packing, backend)
        x, kept = self.run_blocks(x, ctx, request)
        if not request.return_dict:
            return self._plain_output(x, kept, packing, request)
        return self._dict_output(x, kept, packing, backend, request)

    def embed(self, patches: Tensor, packing: Packing, backend: str) -> tuple[Tensor, BlockContext]:
        """The stem: ``[N, C*T*p*p]`` pixels -> ``[T, D]`` block sequence, and what the blocks share."""
        x = self.patch_norm(self.patch_embed(patches.to(self.patch_embed.weight.dtype)))  # [N, D]
        terms = self.positions(packing, x.dtype)
        prefix = self.prefix
        if terms.additive is not None:
            x = x + terms.additive.to(x.dtype)  # cast before the add, as the references do
        if terms.cls is not None:
            prefix = torch.cat([prefix[:1] + terms.cls.to(prefix.dtype), prefix[1:]])
        x = packing.to_blocks(x, prefix)  # [T, D]: prefix tokens inserted, or windows made contiguous
        x = self.embed_norm(x)
        segmentations = {"frames": packing.frames}
        if packing.windows is not None:
            segmentations["windows"] = packing.windows
        drop = self.training and self.config.drop_path_rate > 0
        return x, BlockContext(
            segmentations, backend, terms.rotary, packing.token_segment() if drop else None
        )

    def run_blocks(self, x: Tensor, ctx: BlockContext, request: _Request) -> tuple[Tensor, dict[int, Tensor]]:
        """Run the first ``request.depth`` blocks, keeping the hidden states ``request.keep`` names."""
        replayed = self._replayed(x, ctx, request)
        if replayed is not None:
            return replayed, {}
        kept = {0: x} if 0 in request.keep else {}
        for i, block in enumerate(self.blocks[: request.depth], start=1):
            x = block(x, ctx)
            if i in request.keep:
                kept[i] = x
        return x, kept

    def _view(self, packing: Packing, request: _Request):
        """Block sequence -> what a returned token tensor holds: patch tokens, or the whole sequence."""
        if request.return_prefix:
            return packing.to_sequence
        return lambda t: packing.patch_tokens(packing.to_sequence(t))

    def _picked(
        self, kept: dict[int, Tensor], packing: Packing, request: _Request
    ) -> tuple[Tensor, ...] | None:
        if request.picks is None:
            return None
        view = self._view(packing, request)
        return tuple(view(self.norm(kept[i]) if request.apply_final_norm else kept[i]) for i in request.picks)

    def _plain_output(
        self, x: Tensor, kept: dict[int, Tensor], packing: Packing, request: _Request
    ) -> Tensor | tuple[Tensor, ...]:
        picked = self._picked(kept, packing, request)
        if picked is not None:
            return picked[0] if request.single else picked
        return self._view(packing, request)(x if request.apply_final_norm is False else self.norm(x))

    def _dict_output(
        self, x: Tensor, kept: dict[int, Tensor], packing: Packing, backend: str, request: _Request
    ) -> EncoderOutput:
        view = self._view(packing, request)
        normed = packing.to_sequence(self.norm(x))
        last = packing.to_sequence(x) if request.apply_final_norm is False else normed
        n = self.config.num_layers
        hidden = tuple(view(kept[i]) for i in range(n + 1)) if len(request.keep) == n + 1 else None
        deepstack = None
        if self.config.deepstack_layers:
            deepstack = tuple(
                merger(packing.patch_tokens(packing.to_sequence(kept[i])))
                for merger, i in zip(self.deepstack, self.config.deepstack_layers, strict=True)
            )
        pooled = self.head(normed, packing, backend) if self.head is not None else None
        return EncoderOutput(
            last_hidden_state=last if request.return_prefix else packing.patch_tokens(last),
            prefix_tokens=packing.prefix_tokens(last),
            pooler_output=pooled,
            hidden_states=hidden,
            packing=packing,
            layers=self._picked(kept, packing, request),
            deepstack_features=deepstack,
            image_embeds=self.projection(pooled) if self.projection is not None else None,
        )

    def _request(
        self,
        return_dict: bool,
        output_hidden_states: bool,
        output_layers: int | Sequence[int] | None,
        apply_final_norm: bool | None,
        return_prefix: bool,
    ) -> _Request:
        for name, value in (("return_dict", return_dict), ("output_hidden_states", output_hidden_states),
                            ("return_prefix", return_prefix)):  # fmt: skip
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        if output_hidden_states and not return_dict:
            raise ValueError("output_hidden_states=True needs return_dict=True")
        if apply_final_norm is not None and not isinstance(apply_final_norm, bool):
            raise ValueError(f"apply_final_norm must be None, True or False, got {apply_final_norm!r}")
        n = self.config.num_layers
        picks = self._layer_indices(output_layers)
        if output_hidden_states:
            keep = frozenset(range(n + 1))
        else:
            keep = frozenset(picks or ()) | (
                frozenset(self.config.deepstack_layers) if return_dict else frozenset()
            )
        # Without return_dict only the picked layers are returned: the later blocks would be wasted work.
        depth = max(picks) if picks is not None and not return_dict else n
        single = isinstance(output_layers, Integral) or (
            isinstance(output_layers, (Tensor, np.ndarray)) and output_layers.ndim == 0
        )
        return _Request(return_dict, picks, single, keep, depth, apply_final_norm, return_prefix)

    def _layer_indices(self, output_layers: int | Sequence[int] | None) -> tuple[int, ...] | None:
        """``output_layers`` as non-negative hidden-state indices (``None`` stays ``None``)."""
        if output_layers is None:
            return None
        if isinstance(output_layers, (Tensor, np.ndarray)):
            output_layers = output_layers.tolist()
        if isinstance(output_layers, Integral) and not isinstance(output_layers, bool):
            asked = (output_layers,)
        elif isinstance(output_layers, Sequence) and not isinstance(output_layers, (str, bytes)):
            asked = tuple(output_layers)
        else:
            raise ValueError(f"output_layers must be an int or a sequence of ints, got {output_layers!r}")
        n = self.config.num_layers
        if not asked:
            raise ValueError("output_layers is empty; pass None for the final output")
        for i in asked:
            if not isinstance(i, Integral) or isinstance(i, bool) or not -(n + 1) <= i <= n:
                raise ValueError(
                    f"output_layers entry {i!r} is out of range: this model has layers 0 (embeddings) to {n}, "
                    f"or -{n + 1} to -1 from the end"
                )
        return tuple(int(i) % (n + 1) for i in asked)

    def _packing(self, patches: Tensor, grid_thw, packing: Packing | None) -> Packing:
        """The batch's packing, built here from ``grid_thw`` or checked against this model and ``patches``."""
        if packing is None:
            if grid_thw is None:
                raise ValueError("pass grid_thw (or a prebuilt packing)")
            grid = validate_grid_thw(grid_thw)
            self._check_patches(patches, sum(t * h * w for t, h, w in grid))  # before any per-patch work
            packing = self.pack(grid)
        else:
            self._check_packing(packing, grid_thw)
            self._check_patches(patches, packing.num_patches)
        self.positions.check_sizes(packing)
        return packing

    def _check_packing(self, packing: Packing, grid_thw) -> None:
        c = self.config
        if not isinstance(packing, Packing):
            raise ValueError(f"packing must be a Packing (from model.pack), got {type(packing).__name__}")
        expected = {"num_prefix": c.num_prefix, "merge_size": c.merge_size, "window_size": c.window_size}
        for name, value in expected.items():
            if getattr(packing, name) != value:
                raise ValueError(
                    f"packing was built with {name}={getattr(packing, name)}, this model needs {value}; "
                    "build it with model.pack(grid_thw)"
                )
        if packing.device != self.device:
            raise ValueError(f"packing was built for {packing.device}, the model is on {self.device}")
        if grid_thw is not None and validate_grid_thw(grid_thw) != packing.grid:
            raise ValueError("grid_thw and packing describe different batches; pass one of them")

    def _check_patches(self, patches: Tensor, num_patches: int) -> None:
        c = self.config
        if not isinstance(patches, Tensor) or patches.ndim != 2:
            shape = tuple(patches.shape) if isinstance(patches, Tensor) else type(patches).__name__
            raise ValueError(f"patches must be a 2D tensor [total_patches, C*T*p*p], got {shape}")
        if patches.shape[1] != c.patch_dim:
            raise ValueError(
                f"patches have {patches.shape[1]} values each, but this model takes C*T*p*p = {c.num_channels}*"
                f"{c.temporal_patch_size}*{c.patch_size}*{c.patch_size} = {c.patch_dim}"
            )
        if patches.shape[0] != num_patches:
            raise ValueError(
                f"grid_thw describes {num_patches} patches (sum of t*h*w) but patches has {patches.shape[0]} rows"
            )
        if not patches.is_floating_point():
            raise ValueError(f"patches must be floating point pixels, got dtype {patches.dtype}")
        if patches.device != self.device:
            raise ValueError(
                f"patches are on {patches.device} but the model is on {self.device}; move one of them"
            )
