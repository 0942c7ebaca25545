"""``from_pretrained``: one entry point for hub ids, transformers directories and our own converted directories."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import EncoderConfig
from .encoder import PackedVisionEncoder
from .io import is_native_dir, load_native, to_patch_layout

__all__ = ["build_model", "from_pretrained"]


def build_model(
    config: EncoderConfig,
    state: dict[str, torch.Tensor],
    *,
    attn_backend: str = "auto",
    patch_layout: str | None = None,
    pos_resize: str | None = None,
    merge_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> PackedVisionEncoder:
    """Instantiate a model straight into place from a config and a state dict in ``config``'s patch layout.

    The model is built on the meta device and the tensors are assigned, so a large model is never allocated
    twice. Loading is strict: every parameter must be present with its exact shape.
    """
    changes = {}
    if patch_layout is not None and patch_layout != config.patch_layout:
        if patch_layout not in ("cpp", "ppc"):
            raise ValueError(f"patch_layout must be 'cpp' or 'ppc', got {patch_layout!r}")
        state = {
            **state,
            "patch_embed.weight": to_patch_layout(state["patch_embed.weight"], config, patch_layout),
        }
        changes["patch_layout"] = patch_layout
    if pos_resize is not None:
        if config.positions != "learned":
            raise ValueError(
                f"pos_resize applies to learned position tables; this model uses {config.positions}"
            )
        changes["pos_resize"] = pos_resize
    if merge_size is not None:
        changes["merge_size"] = merge_size
    config = config.replace(**changes) if changes else config
    with torch.device("meta"):
        model = PackedVisionEncoder(config, attn_backend=attn_backend)
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def from_pretrained(
    src: str | Path,
    *,
    attn_backend: str = "auto",
    patch_layout: str | None = None,
    pos_resize: str | None = None,
    merge_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> PackedVisionEncoder:
    """Load a packed encoder.

    Args:
        src: a hub id, a local transformers checkpoint directory (converted in memory, exactly as
            ``packvit-convert`` would), or a directory written by ``packvit-convert`` / ``save_pretrained``.
        attn_backend: default attention backend, ``"auto"`` for the fastest available.
        patch_layout: ``"cpp"`` or ``"ppc"``: the per-patch element order your inputs use. The patch-embedding
            weight is permuted once here; ``model.patchify`` follows it.
        pos_resize: for learned position tables only, override how other image sizes are handled
            (``"none"``, ``"bicubic"``, ``"bilinear_antialias"``). Fixed-size AIMv2 checkpoints load with
            ``"none"`` (transformers runs them at their trained size only); ``"bicubic"`` is an extension that
            resizes their table as SigLIP does.
        merge_size: token order of inputs and outputs: ``1`` row-major, ``m > 1`` merge order (each ``m x m``
            block of patches contiguous). Stored in ``model.config``, which ``model.patchify``,
            :func:`packvit_native.preprocess` and the forward all follow.
        device, dtype: where and in what floating dtype to place the weights (default: CPU, checkpoint dtype).

    Returns:
        The model in eval mode.
    """
    # The converter is imported here, not at module level: loading our own format never needs it.
    from weights_convert.convert import convert_loaded
    from weights_convert.sources import load_state_dict, locate, read_checkpoint

    path = locate(src)
    if is_native_dir(path):
        config, state = load_native(path)
    else:
        ckpt = read_checkpoint(path)
        config, state, _ = convert_loaded(ckpt.config, ckpt.preprocessor, load_state_dict(path))
    return build_model(
        config, state, attn_backend=attn_backend, patch_layout=patch_layout, pos_resize=pos_resize,
        merge_size=merge_size, device=device, dtype=dtype,
    )  # fmt: skip
