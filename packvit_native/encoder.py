"""The one packed encoder: stem -> N identical pre-norm blocks -> final norm -> outputs.

Input is pre-patchified pixels ``[total_patches, C*p*p]`` plus ``grid_thw [B, 3]``; all images share one
packed sequence and attention runs per segment through a varlen kernel, with no padding and no masks.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    """

    last_hidden_state: Tensor
    prefix_tokens: Tensor
    pooler_output: Tensor | None
    hidden_states: tuple[Tensor, ...] | None
    packing: Packing


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
        """Images ``[C, H, W]`` (or ``[T, C, H, W]``) -> ``(patches, grid_thw)`` in this model's layout."""
        return patchify(images, self.config.patch_size, layout=self.config.patch_layout)

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
        attn_backend: str | None = None,
    ) -> Tensor | EncoderOutput:
        """Encode a packed batch.

        Args:
            patches: ``[N, C*p*p]`` pixels, images one after another, each frame's patches row-major.
            grid_thw: ``[B, 3]`` integer (frames, rows, columns) per image. Keep it on the CPU: the forward
                then never waits on the GPU. Not needed when ``packing`` is given.
            packing: metadata from :meth:`Packing.from_grid`, to reuse it across calls.
            return_dict: return an :class:`EncoderOutput` instead of the final patch tokens.
            output_hidden_states: also return every layer's patch tokens (needs ``return_dict``).
            attn_backend: override the model's attention backend for this call.

        Returns:
            ``[N, D]`` final patch tokens, or an :class:`EncoderOutput`.
        """
        if output_hidden_states and not return_dict:
            raise ValueError("output_hidden_states=True needs return_dict=True")
        device = self.patch_embed.weight.device
        if packing is None:
            if grid_thw is None:
                raise ValueError("pass grid_thw (or a prebuilt packing)")
            packing = Packing.from_grid(grid_thw, self.config.num_prefix, device)
        elif packing.num_prefix != self.config.num_prefix:
            raise ValueError(
                f"packing was built for {packing.num_prefix} prefix tokens, this model has {self.config.num_prefix}"
            )
        self._check_patches(patches, packing)
        ctx_backend = resolve_backend(attn_backend or self.attn_backend, device)

        x = self.patch_norm(self.patch_embed(patches.to(self.patch_embed.weight.dtype)))  # [N, D]
        rope = None
        if isinstance(self.positions, Rope2D):
            rope = self.positions(packing, x.dtype)
        else:
            x = x + self.positions(packing).to(
                x.dtype
            )  # the table is cast before the add, as the reference does
        x = packing.insert_prefix(x, self.prefix)  # [T, D]
        drop = self.training and self.config.drop_path_rate > 0
        ctx = BlockContext(packing.tokens, ctx_backend, rope, packing.token_segment() if drop else None)

        hidden = [x] if output_hidden_states else None
        for block in self.blocks:
            x = block(x, ctx)
            if hidden is not None:
                hidden.append(x)
        x = self.norm(x)

        patch_out = packing.patch_tokens(x)
        if not return_dict:
            return patch_out
        return EncoderOutput(
            last_hidden_state=patch_out,
            prefix_tokens=packing.prefix_tokens(x),
            pooler_output=self.head(x, packing, ctx_backend) if self.head is not None else None,
            hidden_states=tuple(packing.patch_tokens(h) for h in hidden) if hidden is not None else None,
            packing=packing,
        )
