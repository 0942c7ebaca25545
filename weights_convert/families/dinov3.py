"""DINOv3 ViT (transformers ``DINOv3ViTModel``, model_type ``dinov3_vit``).

Both spellings of the blocks are accepted: ``layer.N.`` (what the published checkpoints and ``save_pretrained``
write) and ``model.layer.N.`` (the module path inside transformers 5).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from torch import Tensor

from packvit_native.config import EncoderConfig

from ..errors import ConversionError
from ..keymap import DROP, Converted, rename
from ..sources import Checkpoint
from .common import (
    IMAGENET_STATS,
    activation,
    image_stats,
    load_tower_reference,
    per_frame,
    refuse_dropout,
    require,
    resample_of,
    split_prefix,
    square,
)

NAME = "dinov3"
MODEL_TYPES = ("dinov3_vit",)
HF_CLASS = "DINOv3ViTModel"
VARIANTS = ("gelu", "swiglu")


def config_from_hf(
    cfg: dict[str, Any], preprocessor: dict[str, Any] | None, keys: Collection[str] = ()
) -> EncoderConfig:
    gated = bool(cfg.get("use_gated_mlp", False))
    q, k, v = (bool(cfg.get(f"{n}_bias", d)) for n, d in (("query", True), ("key", False), ("value", True)))
    refuse_dropout(cfg, "attention_dropout")
    drop_path = cfg.get("drop_path_rate", 0.0)
    if not isinstance(drop_path, (int, float)) or isinstance(drop_path, bool) or not 0 <= drop_path < 1:
        raise ConversionError(f"config.json drop_path_rate = {drop_path!r} is not a number in [0, 1)")
    return EncoderConfig(
        family="dinov3",
        patch_size=square(cfg.get("patch_size", 16), "patch_size"),
        num_channels=cfg.get("num_channels", 3),
        hidden_size=require(cfg, "hidden_size"),
        num_layers=require(cfg, "num_hidden_layers"),
        num_heads=require(cfg, "num_attention_heads"),
        mlp_hidden=require(cfg, "intermediate_size"),
        mlp="swiglu" if gated else "mlp",
        activation=activation(cfg.get("hidden_act", "gelu")),
        norm="layernorm",
        norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
        qkv_bias=q or k or v,
        key_bias=k,
        proj_bias=bool(cfg.get("proj_bias", True)),
        mlp_bias=bool(cfg.get("mlp_bias", True)),
        layer_scale=True,
        num_cls=1,
        num_registers=cfg.get("num_register_tokens", 0),
        rope="normalized",
        rope_theta=float(cfg.get("rope_theta", 100.0)),
        final_norm=True,
        head="cls",
        pos_embed_shift=cfg.get("pos_embed_shift"),
        pos_embed_jitter=cfg.get("pos_embed_jitter"),
        pos_embed_rescale=cfg.get("pos_embed_rescale", 2.0),
        drop_path_rate=float(drop_path),
        resample=resample_of(preprocessor, "bilinear"),
        **image_stats(preprocessor, IMAGENET_STATS),
    ).validate()


def _table(cfg: dict[str, Any], config: EncoderConfig) -> dict[str, str | None]:
    t: dict[str, str | None] = {
        "embeddings.cls_token": "cls",
        "embeddings.mask_token": DROP,  # masked-image pre-training only
        "embeddings.patch_embeddings.weight": "patch_embed.weight",
        "embeddings.patch_embeddings.bias": "patch_embed.bias",
        "embeddings.register_tokens": "registers" if config.num_registers else DROP,
        "norm.weight": "norm.weight",
        "norm.bias": "norm.bias",
    }
    biases = {n: bool(cfg.get(f"{n}_bias", d)) for n, d in (("query", True), ("key", False), ("value", True))}
    mlp = ("gate_proj", "up_proj", "down_proj") if config.mlp == "swiglu" else ("up_proj", "down_proj")
    for i in range(config.num_layers):
        s, o = f"layer.{i}.", f"blocks.{i}."
        for n in ("norm1", "norm2"):
            t[f"{s}{n}.weight"], t[f"{s}{n}.bias"] = f"{o}{n}.weight", f"{o}{n}.bias"
        for proj, name in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
            t[f"{s}attention.{proj}.weight"] = f"{o}attn.{proj[0]}.weight"
            if biases[name]:
                t[f"{s}attention.{proj}.bias"] = f"{o}attn.{proj[0]}.bias"
        t[f"{s}attention.o_proj.weight"] = f"{o}attn.proj.weight"
        if config.proj_bias:
            t[f"{s}attention.o_proj.bias"] = f"{o}attn.proj.bias"
        t[f"{s}layer_scale1.lambda1"] = f"{o}ls1.gamma"
        t[f"{s}layer_scale2.lambda1"] = f"{o}ls2.gamma"
        for proj in mlp:
            t[f"{s}mlp.{proj}.weight"] = f"{o}mlp.{proj}.weight"
            if config.mlp_bias:
                t[f"{s}mlp.{proj}.bias"] = f"{o}mlp.{proj}.bias"
    return t


def _canonical_keys(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        canon = key.removeprefix("model.") if key.startswith("model.layer.") else key
        if canon in out:
            raise ConversionError(f"{key} appears in both the 'layer.' and 'model.layer.' spellings")
        out[canon] = value
    return out


def convert_state_dict(state: dict[str, Tensor], cfg: dict[str, Any], config: EncoderConfig) -> Converted:
    c = rename(_canonical_keys(state), _table(cfg, config))
    c.conv_to_linear("patch_embed.weight")
    prefix = ["cls", "registers"] if config.num_registers else ["cls"]
    for p in prefix:  # [1, n, D] -> [n, D]
        t, s = c.pop(p)
        c.put(p, t.reshape(-1, t.shape[-1]), s)
    c.fuse(prefix, "prefix")
    for i in range(config.num_layers):
        o = f"blocks.{i}."
        for kind in ("weight", "bias"):
            # A zero key bias where the checkpoint has none: one fused linear, same function.
            c.fuse([f"{o}attn.{n}.{kind}" for n in "qkv"], f"{o}attn.qkv.{kind}", fill_missing=kind == "bias")
        if config.mlp == "swiglu":
            for kind in ("weight", "bias"):
                c.fuse([f"{o}mlp.gate_proj.{kind}", f"{o}mlp.up_proj.{kind}"], f"{o}mlp.gate_up.{kind}")
            names = {"down_proj": "down"}
        else:
            names = {"up_proj": "fc1", "down_proj": "fc2"}
        for src, dst in names.items():
            for kind in ("weight", "bias"):
                if f"{o}mlp.{src}.{kind}" in c.tensors:
                    c.put(f"{o}mlp.{dst}.{kind}", *c.pop(f"{o}mlp.{src}.{kind}"))
    return c


def tiny_hf_config(variant: str = "gelu") -> dict[str, Any]:
    """A small transformers config for demos and tests (``variant``: ``"gelu"`` MLP or ``"swiglu"``)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown dinov3 variant {variant!r}; choose one of {list(VARIANTS)}")
    gated = variant == "swiglu"
    return {
        "model_type": "dinov3_vit",
        "hidden_size": 64,
        "intermediate_size": 96 if gated else 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "patch_size": 4,
        "image_size": 32,
        "num_register_tokens": 2,
        "layerscale_value": 0.5,
        "use_gated_mlp": gated,
        "hidden_act": "silu" if gated else "gelu",
    }


def _frame_forward(model: Any, frame: Tensor) -> dict[str, Any]:
    """transformers' outputs for one ``[C, H, W]`` frame, split as ours are (prefix tokens, patch tokens)."""
    k = 1 + model.config.num_register_tokens
    out = model(pixel_values=frame[None], output_hidden_states=True)
    return split_prefix(out, k)


reference_forward = per_frame(_frame_forward)


def load_reference(ckpt: Checkpoint) -> Any:
    return load_tower_reference(ckpt, HF_CLASS)
