"""Gradient parity with transformers: one packed backward against per-image backwards, summed.

Family-agnostic: transformers' gradients are mapped into our layout by the family's own converter. A converter
only renames, fuses, reshapes and fills in zeros, all linear re-arrangements, so converting the gradients of
transformers' parameters gives exactly the gradients of ours if the two models compute the same function.
Each of our tensors is reported under the transformers names it was built from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import packvit_native as pv
from weights_convert.convert import family_for

REL_TOL = 1e-4


def output_weights(model: pv.PackedVisionEncoder, images: list[Tensor], seed: int = 1) -> dict[str, Tensor]:
    """Fixed random weights for every output of a packed forward, so a weighted sum touches all of them."""
    patches, grid = model.patchify(images)
    with torch.no_grad():
        out = model(patches, grid, return_dict=True)
    g = torch.Generator().manual_seed(seed)
    weights = {
        "last_hidden_state": torch.randn(out.last_hidden_state.shape, generator=g),
        "prefix_tokens": torch.randn(out.prefix_tokens.shape, generator=g),
    }
    if out.pooler_output is not None:
        weights["pooler_output"] = torch.randn(out.pooler_output.shape, generator=g)
    return weights


def packed_loss(model: pv.PackedVisionEncoder, images: list[Tensor], weights: dict[str, Tensor]) -> Tensor:
    patches, grid = model.patchify(images)
    out = model(patches, grid, return_dict=True)
    return sum((w * getattr(out, name)).sum() for name, w in weights.items())


def reference_loss(hf_model: Any, images: list[Tensor], weights: dict[str, Tensor]) -> Tensor:
    """The same loss from transformers run frame by frame, each frame's slice of the weights."""
    fam = family_for(hf_model.config.model_type)
    total, start, seg = 0.0, 0, 0
    for image in images:
        for frame in image if image.ndim == 4 else image[None]:
            ref = fam.reference_forward(hf_model, frame)
            n = ref["last_hidden_state"].shape[0]
            total = total + (weights["last_hidden_state"][start : start + n] * ref["last_hidden_state"]).sum()
            if weights["prefix_tokens"].numel():
                total = total + (weights["prefix_tokens"][seg] * ref["prefix_tokens"]).sum()
            if "pooler_output" in weights:
                total = total + (weights["pooler_output"][seg] * ref["pooler_output"]).sum()
            start, seg = start + n, seg + 1
    return total


def gradient_errors(
    model: pv.PackedVisionEncoder, hf_model: Any, hf_dir: Path, images: list[Tensor]
) -> dict[str, tuple[str, float]]:
    """Relative gradient error per parameter of ours: ``max |ours - ref| / max |ref|``, with its sources."""
    fam = family_for(hf_model.config.model_type)
    hf_cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    weights = output_weights(model, images)
    model.zero_grad()
    hf_model.zero_grad()
    packed_loss(model, images, weights).backward()
    reference_loss(hf_model, images, weights).backward()
    hf_grads = {
        name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach()
        for name, p in hf_model.named_parameters()
    }
    converted = fam.convert_state_dict(hf_grads, hf_cfg, model.config)
    errors = {}
    for name, p in model.named_parameters():
        ref = converted.tensors[name]
        assert ref.shape == p.shape, f"{name}: reference gradient {tuple(ref.shape)} vs ours {tuple(p.shape)}"
        scale = float(ref.abs().max())
        diff = float((p.grad - ref).abs().max())
        errors[name] = (" + ".join(converted.sources[name]), diff / scale if scale > 0 else diff)
    return errors
