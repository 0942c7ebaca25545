"""The one packed encoder: stem -> N identical pre-norm blocks -> final norm -> outputs.

Input is pre-patchified pixels ``[total_patches, C*p*p]`` plus ``grid_thw [B, 3]``; all images share one
packed sequence and attention runs per segment through a varlen kernel, with no padding and no masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path

import torch
from torch import Tensor, nn

from .attention import resolve_backend
from .config import EncoderConfig
from .heads import build_head
from .io import save_native
from .layers import Block, BlockContext, make_norm
from .packing import Packing
from .patchify import patchify
from .positions import Rope2D, build_positions

__all__ = ["EncoderOutput", "PackedVisionEncoder"]


@dataclass
class EncoderOutput:
    """Outputs of a packed forward.

    Attributes:
        last_hidden_state: ``[N, D]`` final patch tokens (after the final norm), in input order.
        prefix_tokens: ``[S, k, D]`` final prefix tokens (class token, then registers) of each segment.
        pooler_output: ``[S, D]`` pooled output per segment, or ``None`` for a model without a head.
        hidden_states: ``num_layers + 1`` tensors ``[N, D]`` of patch tokens: the embedding output, then the
            output of each block (before the final norm), indexed as transformers indexes them.
        packing: the packing metadata of this batch.
        layers: the layers asked for with ``output_layers``, in the order asked, or ``None``.

    With ``return_prefix=True`` every per-token tensor above holds the full packed sequence ``[N + S*k, D]``.
    """

    last_hidden_state: Tensor
    prefix_tokens: Tensor
    pooler_output: Tensor | None
    hidden_states: tuple[Tensor, ...] | None
    packing: Packing
    layers: tuple[Tensor, ...] | None = None


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
        # A Conv2d with stride = kernel = patch is a linear map of each flattened patch.
        self.patch_embed = nn.Linear(config.patch_dim, d, bias=config.patch_bias, **dd)
        self.patch_norm = make_norm(config, **dd) if config.patch_norm else nn.Identity()
        self.positions = build_positions(config, **dd)
        self.prefix = nn.Parameter(torch.zeros(config.num_prefix, d, **dd)) if config.num_prefix else None
        self.blocks = nn.ModuleList(Block(config, **dd) for _ in range(config.num_layers))
        self.norm = make_norm(config, **dd) if config.final_norm else nn.Identity()
        self.head = build_head(config, **dd)

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

    def patchify(self, images: list[Tensor] | Tensor) -> tuple[Tensor, Tensor]:
        """Images ``[C, H, W]`` (or ``[T, C, H, W]``) -> ``(patches, grid_thw)`` in this model's layout and order.

        Images must already be normalised and sized in multiples of the patch size (and of ``merge_size``
        patches); :func:`packvit_native.preprocess` does that from image files.
        """
        c = self.config
        return patchify(images, c.patch_size, layout=c.patch_layout, merge_size=c.merge_size)

    def save_pretrained(self, out_dir: str | Path, force: bool = False) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (atomically) for :func:`from_pretrained`."""
        return save_native(out_dir, self.config, self.state_dict(), force=force)

    def _check_patches(self, patches: Tensor, packing: Packing) -> None:
        weight = self.patch_embed.weight
        if not isinstance(patches, Tensor) or patches.ndim != 2:
            shape = tuple(patches.shape) if isinstance(patches, Tensor) else type(patches).__name__
            raise ValueError(f"patches must be a 2D tensor [total_patches, C*p*p], got {shape}")
        if patches.shape[1] != self.config.patch_dim:
            c, p = self.config.num_channels, self.config.patch_size
            raise ValueError(
                f"patches have {patches.shape[1]} values each, but this model takes C*p*p = {c}*{p}*{p} = "
                f"{self.config.patch_dim}"
            )
        if patches.shape[0] != packing.num_patches:
            raise ValueError(
                f"grid_thw describes {packing.num_patches} patches (sum of t*h*w) but patches has "
                f"{patches.shape[0]} rows"
            )
        if not patches.is_floating_point():
            raise ValueError(f"patches must be floating point pixels, got dtype {patches.dtype}")
        if patches.device != weight.device:
            raise ValueError(
                f"patches are on {patches.device} but the model is on {weight.device}; move one of them"
            )

    def forward(
        self,
        patches: Tensor,
        grid_thw: Tensor | list | None = None,
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
            patches: ``[N, C*p*p]`` pixels, images one after another, each frame's patches in the model's token
                order (row-major, or merge order when ``config.merge_size > 1``).
            grid_thw: ``[B, 3]`` integer (frames, rows, columns) per image. Keep it on the CPU: the forward
                then never waits on the GPU. Not needed when ``packing`` is given.
            packing: metadata from :meth:`Packing.from_grid`, to reuse it across calls.
            return_dict: return an :class:`EncoderOutput` instead of the final patch tokens.
            output_hidden_states: also return every layer's patch tokens (needs ``return_dict``).
            output_layers: return just these layers: an int gives one tensor, a sequence a tuple in the order
                asked (in :attr:`EncoderOutput.layers` with ``return_dict``). Only the asked layers are kept,
                and without ``return_dict`` the blocks after the deepest asked layer are not run.
            return_prefix: every returned token tensor holds the full packed sequence ``[N + S*k, D]``
                (each segment's ``k`` prefix tokens, then its patches; ``packing.tokens.cu_seqlens`` marks the
                segments) instead of the patch tokens ``[N, D]`` alone.
            apply_final_norm: ``None`` (default): the last layer's output goes through the final norm and the
                layers picked by ``output_layers`` do not, as in transformers' ``hidden_states``. ``True``:
                the picked layers are normed too (DINOv3's ``get_intermediate_layers(norm=True)``).
                ``False``: nothing is normed; the final output is the last block's raw output. The pooled
                output always uses the normed tokens its head was trained on.
            attn_backend: override the model's attention backend for this call.

        Returns:
            ``[N, D]`` final patch tokens; the picked layer(s) when ``output_layers`` is given; or an
            :class:`EncoderOutput` with ``return_dict``.
        """
        if output_hidden_states and not return_dict:
            raise ValueError("output_hidden_states=True needs return_dict=True")
        if apply_final_norm not in (None, True, False):
            raise ValueError(f"apply_final_norm must be None, True or False, got {apply_final_norm!r}")
        num_layers = self.config.num_layers
        picks = self._layer_indices(output_layers)
        keep = set(range(num_layers + 1)) if output_hidden_states else set(picks or ())
        # Without return_dict only the picked layers are returned: the later blocks would be wasted work.
        depth = max(picks) if picks is not None and not return_dict else num_layers

        device = self.patch_embed.weight.device
        merge = self.config.merge_size
        if packing is None:
            if grid_thw is None:
                raise ValueError("pass grid_thw (or a prebuilt packing)")
            packing = Packing.from_grid(grid_thw, self.config.num_prefix, device, merge_size=merge)
        elif packing.num_prefix != self.config.num_prefix:
            raise ValueError(
                f"packing was built for {packing.num_prefix} prefix tokens, this model has {self.config.num_prefix}"
            )
        elif packing.merge_size != merge:
            raise ValueError(
                f"packing was built with merge_size={packing.merge_size}, this model's config.merge_size is {merge}"
            )
        elif packing.tokens.cu_seqlens.device != device:
            raise ValueError(
                f"packing was built for {packing.tokens.cu_seqlens.device}, the model is on {device}"
            )
        self._check_patches(patches, packing)
        ctx_backend = resolve_backend(attn_backend or self.attn_backend, device)

        x = self.patch_norm(self.patch_embed(patches.to(self.patch_embed.weight.dtype)))  # [N, D]
        rope = None
        if isinstance(self.positions, Rope2D):
            rope = self.positions(packing, x.dtype)
        else:
            # The table is cast to the activation dtype before the add, as the references do.
            x = x + self.positions(packing).to(x.dtype)
        x = packing.insert_prefix(x, self.prefix)  # [T, D]
        drop = self.training and self.config.drop_path_rate > 0
        ctx = BlockContext(packing.tokens, ctx_backend, rope, packing.token_segment() if drop else None)

        kept = {0: x} if 0 in keep else {}
        for i, block in enumerate(self.blocks[:depth], start=1):
            x = block(x, ctx)
            if i in keep:
                kept[i] = x

        select = (lambda t: t) if return_prefix else packing.patch_tokens
        picked = None
        if picks is not None:
            picked = tuple(select(self.norm(kept[i]) if apply_final_norm else kept[i]) for i in picks)
            if not return_dict:
                return picked[0] if isinstance(output_layers, Integral) else picked
        if not return_dict:
            return select(x if apply_final_norm is False else self.norm(x))
        normed = self.norm(x)
        last = x if apply_final_norm is False else normed
        hidden = tuple(select(kept[i]) for i in range(num_layers + 1)) if output_hidden_states else None
        return EncoderOutput(
            last_hidden_state=select(last),
            prefix_tokens=packing.prefix_tokens(last),
            pooler_output=self.head(normed, packing, ctx_backend) if self.head is not None else None,
            hidden_states=hidden,
            packing=packing,
            layers=picked,
        )

    def _layer_indices(self, output_layers: int | Sequence[int] | None) -> tuple[int, ...] | None:
        """``output_layers`` as non-negative hidden-state indices (``None`` stays ``None``)."""
        if output_layers is None:
            return None
        asked = (output_layers,) if isinstance(output_layers, Integral) else tuple(output_layers)
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
