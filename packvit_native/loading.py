"""``from_pretrained``: one entry point for hub ids, transformers directories and our own converted directories.

A directory in our own format loads with the runtime alone; only a foreign (transformers) checkpoint imports
the converter, ``weights_convert``.
"""

from __future__ import annotations

import os

import torch

from .attention import resolve_backend
from .config import EncoderConfig, patch_layout_name
from .encoder import PackedVisionEncoder
from .hub import locate
from .io import is_native_dir, load_native
from .patchify import patch_weight_layout

__all__ = ["DTYPES", "build_model", "from_pretrained", "parse_dtype"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A floating dtype given as a ``torch.dtype`` or by name (``"bfloat16"``, ``"torch.float16"``, ...)."""
    if dtype is None or dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype must be one of {sorted(DTYPES)} (or the torch dtype), got {dtype!r}")


def build_model(
    config: EncoderConfig,
    state: dict[str, torch.Tensor],
    *,
    attn_backend: str = "auto",
    patch_layout: str | None = None,
    pos_resize: str | None = None,
    merge_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> PackedVisionEncoder:
    """Instantiate a model straight into place from a config and a state dict in ``config``'s patch layout.

    The model is built on the meta device and the tensors are assigned, so a large model is never allocated
    twice. Loading is strict: every parameter must be present with its exact shape. Arguments as for
    :func:`from_pretrained`.
    """
    dtype = parse_dtype(dtype)
    target = torch.device(device) if device is not None else torch.device("cpu")
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asked for, but no CUDA GPU is available")
    resolve_backend(attn_backend, target)
    changes = {}
    if patch_layout is not None and patch_layout_name(patch_layout) != config.patch_layout:
        c = config
        weight = patch_weight_layout(
            state["patch_embed.weight"], c.num_channels, c.patch_size, c.temporal_patch_size,
            c.patch_layout, patch_layout,
        )  # fmt: skip
        state = {**state, "patch_embed.weight": weight}
        changes["patch_layout"] = patch_layout_name(patch_layout)
    if pos_resize is not None:
        if config.pos_embed != "learned":
            raise ValueError(
                f"pos_resize applies to learned position tables; this model's is {config.pos_embed!r}"
            )
        changes["pos_resize"] = pos_resize
    if merge_size is not None:
        if not isinstance(merge_size, int) or isinstance(merge_size, bool) or merge_size < 1:
            raise ValueError(f"merge_size must be a positive integer, got {merge_size!r}")
        if config.merge_fixed and merge_size != config.merge_size:
            raise ValueError(
                f"this model's merger or attention windows group {config.merge_size}x{config.merge_size} patches, "
                f"so its tokens come in that merge order; merge_size={merge_size} is not possible"
            )
        changes["merge_size"] = merge_size
    config = config.replace(**changes) if changes else config
    with torch.device("meta"):
        model = PackedVisionEncoder(config, attn_backend=attn_backend)
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def from_pretrained(
    src: str | os.PathLike,
    *,
    attn_backend: str = "auto",
    patch_layout: str | None = None,
    pos_resize: str | None = None,
    merge_size: int | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> PackedVisionEncoder:
    """Load a packed encoder.

    Args:
        src: a hub id (``org/name``), a local transformers checkpoint directory (converted in memory, exactly
            as ``packvit-convert`` would), or a directory written by ``packvit-convert`` / ``save_pretrained``.
        attn_backend: default attention backend, ``"auto"`` for the fastest available; one that cannot run on
            ``device`` is refused here.
        patch_layout: ``"chw"`` or ``"hwc"``: the per-patch element order your inputs use. The patch-embedding
            weight is permuted once here; ``model.patchify`` follows it.
        pos_resize: for learned position tables only, override how other image sizes are handled
            (``"none"``, ``"bicubic"``, ``"bilinear_antialias"``, ``"bilinear_corners"``). Fixed-size AIMv2
            checkpoints load with ``"none"`` (transformers runs them at their trained size only); ``"bicubic"``
            is an extension that resizes their table as SigLIP does.
        merge_size: token order of inputs and outputs: ``1`` row-major, ``m > 1`` merge order (each ``m x m``
            block of patches contiguous). Stored in ``model.config``, which ``model.patchify``,
            :func:`packvit_native.preprocess` and the forward all follow. Models with a merger or attention
            windows are fixed to their own.
        device: where to place the weights (default: the CPU).
        dtype: floating dtype of the weights, a ``torch.dtype`` or its name (default: the checkpoint's).

    Returns:
        The model in eval mode.

    Raises:
        CheckpointError: the checkpoint cannot be found, read or converted (a ``ValueError``).
        ValueError: an argument is invalid.
    """
    path = locate(src)
    if is_native_dir(path):
        config, state = load_native(path)
    else:
        from weights_convert.convert import convert_directory

        config, state, _ = convert_directory(path)
    return build_model(
        config, state, attn_backend=attn_backend, patch_layout=patch_layout, pos_resize=pos_resize,
        merge_size=merge_size, device=device, dtype=dtype,
    )  # fmt: skip
