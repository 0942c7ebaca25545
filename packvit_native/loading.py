"""``from_pretrained``: one entry point for hub ids, transformers directories and our own converted directories.

A directory in our own format loads with the runtime alone; only a foreign (transformers) checkpoint imports
the converter, ``weights_convert``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .attention import resolve_backend
from .config import EncoderConfig, PositionResize, patch_layout_name
from .encoder import PackedVisionEncoder
from .errors import CheckpointError
from .fp8 import convert_to_fp8, fp8_unavailable_reason
from .hub import CONFIG_PATTERNS, locate, snapshot_of
from .io import is_native_dir, load_native
from .patchify import patch_weight_layout

__all__ = ["DTYPES", "PRECISIONS", "build_model", "from_pretrained", "parse_dtype"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Precisions other than the weights' dtype: "fp8" runs the block linears as FP8 GEMMs (packvit_native.fp8).
PRECISIONS = ("fp8",)


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A floating dtype given as a ``torch.dtype`` or by name (``"bfloat16"``, ``"torch.float16"``, ...)."""
    if dtype is None or dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise ValueError(f"dtype must be one of {sorted(DTYPES)} (or the torch dtype), got {dtype!r}")


def _parse_device(device: torch.device | str | None) -> torch.device:
    """The target device, refused here (``ValueError``) if it cannot be named or has no GPU behind it."""
    if device is None:
        return torch.device("cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a device: {e}") from None
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asked for, but no CUDA GPU is available")
    return target


def _check_options(
    attn_backend: str,
    patch_layout: str | None,
    pos_resize: str | None,
    merge_size: int | None,
    device: torch.device | str | None,
    dtype: torch.dtype | str | None,
    precision: str | None,
) -> tuple[torch.device, torch.dtype | None]:
    """Refuse bad loading options before anything is read, fetched or converted; returns (device, dtype)."""
    dtype = parse_dtype(dtype)
    target = _parse_device(device)
    # An unknown or unavailable backend fails now, as the CLI's --attn-backend does, not at the first forward.
    resolve_backend(attn_backend, target)
    if patch_layout is not None:
        patch_layout_name(patch_layout)
    if pos_resize is not None and pos_resize not in PositionResize.__args__:
        raise ValueError(f"pos_resize must be one of {list(PositionResize.__args__)}, got {pos_resize!r}")
    if merge_size is not None and (
        not isinstance(merge_size, int) or isinstance(merge_size, bool) or merge_size < 1
    ):
        raise ValueError(f"merge_size must be a positive integer, got {merge_size!r}")
    if precision is not None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be None or one of {list(PRECISIONS)}, got {precision!r}")
        if dtype not in (None, torch.bfloat16):
            raise ValueError(
                f"precision='fp8' runs everything but the block linears in bfloat16; leave dtype unset or pass "
                f"bfloat16, not {dtype}"
            )
        reason = fp8_unavailable_reason(target)
        if reason is not None:
            raise ValueError(f"precision='fp8' cannot run on {target}: {reason}")
        dtype = torch.bfloat16
    return target, dtype


def _check_state(config: EncoderConfig, state: dict[str, torch.Tensor], file: Path) -> None:
    """Raise ``CheckpointError`` naming ``file`` unless ``state`` has exactly the model's keys and shapes."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in PackedVisionEncoder(config).state_dict().items()}
    missing, unknown = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unknown:
        raise CheckpointError(
            f"{file} does not match its config.json: missing {missing[:5]}, unexpected {unknown[:5]}"
        )
    for key, shape in expected.items():
        if state[key].shape != shape:
            raise CheckpointError(
                f"{file}: {key} has shape {tuple(state[key].shape)}, but config.json implies {tuple(shape)}"
            )
        # FP8 weights are made at load (precision="fp8"), never stored: one byte per value is not a checkpoint's
        if not state[key].is_floating_point() or state[key].element_size() == 1:
            raise CheckpointError(
                f"{file}: {key} is {state[key].dtype}; checkpoints hold float32, bfloat16 or float16 weights"
            )


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
    precision: str | None = None,
) -> PackedVisionEncoder:
    """Instantiate a model straight into place from a config and a state dict in ``config``'s patch layout.

    The model is built on the meta device and the tensors are assigned, so a large model is never allocated
    twice. Loading is strict: every parameter must be present with its exact shape. Arguments as for
    :func:`from_pretrained`.
    """
    target, dtype = _check_options(
        attn_backend, patch_layout, pos_resize, merge_size, device, dtype, precision
    )
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
        if config.merge_fixed and merge_size != config.merge_size:
            raise ValueError(
                f"this model's merger or attention windows group {config.merge_size}x{config.merge_size} patches, "
                f"so its tokens come in that merge order; merge_size={merge_size} is not possible"
            )
        changes["merge_size"] = merge_size
    config = config.replace(**changes) if changes else config
    with torch.device("meta"):
        model = PackedVisionEncoder(config, attn_backend=attn_backend)
    state = {k: v.to(device=target, dtype=dtype if v.is_floating_point() else None) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if precision == "fp8":
        convert_to_fp8(model)
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
    precision: str | None = None,
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
        precision: ``None`` (default): everything computes in ``dtype``. ``"fp8"``: inference with the
            transformer blocks' linear layers as FP8 GEMMs (weights per output channel, activations per
            token) and everything else in bfloat16 (see :mod:`packvit_native.fp8`); needs a CUDA GPU of
            compute capability 8.9 or newer (or a PyTorch whose CPU build runs FP8 matmuls), and ``dtype``
            unset or bfloat16. The model comes back frozen: FP8 is inference only.

    Returns:
        The model in eval mode.

    Raises:
        CheckpointError: the checkpoint cannot be found, read or converted (a ``ValueError``).
        ValueError: an argument is invalid (checked before the checkpoint is looked up).
    """
    _check_options(attn_backend, patch_layout, pos_resize, merge_size, device, dtype, precision)
    if not isinstance(src, (str, os.PathLike)):
        raise ValueError(f"src must be a hub id or a folder path, got {type(src).__name__}")
    path = locate(src, CONFIG_PATTERNS)  # a hub id: the configs first, to learn what else to fetch
    if is_native_dir(path):
        path = snapshot_of(src, path)()
        config, state = load_native(path)
        _check_state(config, state, path / "model.safetensors")
    else:
        from weights_convert.convert import convert_checkpoint

        config, state, _ = convert_checkpoint(src)  # fetches only the weights the family reads
    return build_model(
        config, state, attn_backend=attn_backend, patch_layout=patch_layout, pos_resize=pos_resize,
        merge_size=merge_size, device=device, dtype=dtype, precision=precision,
    )  # fmt: skip
