"""Gradient parity with transformers: one packed backward against per-image backwards, summed.

Family-agnostic: transformers' gradients are mapped into our layout by the family's own converter. A converter
only renames, fuses, reshapes and fills in zeros, all linear re-arrangements, so converting the gradients of
transformers' parameters gives exactly the gradients of ours if the two models compute the same function.
Each of our tensors is reported under the transformers names it was built from.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import packvit_native as pv
from weights_convert.convert import family_named

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
    if out.image_embeds is not None:
        weights["image_embeds"] = torch.randn(out.image_embeds.shape, generator=g)
    for j, feature in enumerate(out.deepstack_features or ()):
        weights[f"deepstack.{j}"] = torch.randn(feature.shape, generator=g)
    return weights


def _output(out, name: str) -> Tensor:
    if name.startswith("deepstack."):
        return out.deepstack_features[int(name.split(".")[1])]
    return getattr(out, name)


def packed_loss(model: pv.PackedVisionEncoder, images: list[Tensor], weights: dict[str, Tensor]) -> Tensor:
    patches, grid = model.patchify(images)
    out = model(patches, grid, return_dict=True)
    return sum((w * _output(out, name)).sum() for name, w in weights.items())


def reference_loss(
    model: pv.PackedVisionEncoder, hf_model: Any, images: list[Tensor], weights: dict[str, Tensor]
) -> Tensor:
    """The same loss from transformers run image by image, each image's slice of the weights."""
    c = model.config
    fam = family_named(c.family)
    grids = model.patchify(images)[1].tolist()
    total, start, seg, merged = 0.0, 0, 0, 0
    for image, (t, h, w) in zip(images, grids, strict=True):
        ref = fam.reference_forward(hf_model, image)
        n = t * h * w
        m = n // c.merge_size**2
        total = total + (weights["last_hidden_state"][start : start + n] * ref["last_hidden_state"]).sum()
        if weights["prefix_tokens"].numel():
            total = total + (weights["prefix_tokens"][seg : seg + t] * ref["prefix_tokens"]).sum()
        if "pooler_output" in weights:
            rows = slice(merged, merged + m) if c.head == "merger" else slice(seg, seg + t)
            total = total + (weights["pooler_output"][rows] * ref["pooler_output"]).sum()
        if "image_embeds" in weights:
            total = total + (weights["image_embeds"][seg : seg + t] * ref["image_embeds"]).sum()
        for j, feature in enumerate(ref.get("deepstack_features") or ()):
            total = total + (weights[f"deepstack.{j}"][merged : merged + m] * feature).sum()
        start, seg, merged = start + n, seg + t, merged + m
    return total


def gradient_errors(
    model: pv.PackedVisionEncoder, hf_model: Any, images: list[Tensor]
) -> dict[str, tuple[str, float]]:
    """Relative gradient error per parameter of ours: ``max |ours - ref| / max |ref|``, with its sources."""
    fam = family_named(model.config.family)
    hf_cfg = hf_model.config.to_dict()  # the reference tower's own config: its parameter names have no prefix
    weights = output_weights(model, images)
    model.zero_grad()
    hf_model.zero_grad()
    packed_loss(model, images, weights).backward()
    reference_loss(model, hf_model, images, weights).backward()
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
