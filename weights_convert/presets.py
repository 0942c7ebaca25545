"""Published architectures by name, as the transformers configs that describe them (random weights).

The one home of model sizes for benchmarks, GPU checks and examples: each preset is the ``config.json`` of a
published checkpoint's vision tower, converted by the family's own ``config_from_hf``, so a preset can never
drift from what the converter makes of the real checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from packvit_native.config import EncoderConfig

from .convert import family_for

__all__ = ["PRESETS", "Preset", "preset"]


@dataclass(frozen=True)
class Preset:
    """A published architecture.

    Attributes:
        title: what tables call it.
        hf_config: the transformers ``config.json`` of its vision tower (tower alone, no language model).
        hf_class: the transformers class that runs it (exported name or ``module.Class`` under
            ``transformers.models``).
    """

    title: str
    hf_config: dict[str, Any]
    hf_class: str

    def config(self, **changes: Any) -> EncoderConfig:
        """Our config for it (``changes`` replace fields, e.g. a smaller ``num_layers`` for a quick run)."""
        config = family_for(self.hf_config["model_type"]).config_from_hf(self.hf_config, None)
        return config.replace(**changes) if changes else config


PRESETS: dict[str, Preset] = {
    "dinov3_vits16": Preset(
        "DINOv3 ViT-S/16",
        {"model_type": "dinov3_vit", "hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 12,
         "num_attention_heads": 6, "patch_size": 16, "num_register_tokens": 4, "layerscale_value": 1e-5},
        "DINOv3ViTModel",
    ),
    "dinov3_vitl16": Preset(
        "DINOv3 ViT-L/16",
        {"model_type": "dinov3_vit", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
         "num_attention_heads": 16, "patch_size": 16, "num_register_tokens": 4, "layerscale_value": 1e-5},
        "DINOv3ViTModel",
    ),
    "dinov3_vit7b16": Preset(
        "DINOv3 ViT-7B/16",
        {"model_type": "dinov3_vit", "hidden_size": 4096, "intermediate_size": 8192, "num_hidden_layers": 40,
         "num_attention_heads": 32, "patch_size": 16, "num_register_tokens": 4, "layerscale_value": 1e-5,
         "use_gated_mlp": True, "hidden_act": "silu", "query_bias": False, "value_bias": False},
        "DINOv3ViTModel",
    ),
    "aimv2_l14": Preset(
        "AIMv2-L/14 native",
        {"model_type": "aimv2_vision_model", "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24,
         "num_attention_heads": 8, "patch_size": 14, "is_native": True, "use_head": False},
        "Aimv2VisionModel",
    ),
    "aimv2_l14_head": Preset(
        "AIMv2-L/14 native + pooling head",
        {"model_type": "aimv2_vision_model", "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24,
         "num_attention_heads": 8, "patch_size": 14, "is_native": True, "use_head": True},
        "Aimv2VisionModel",
    ),
    "siglip_so400m14_384": Preset(
        "SigLIP so400m/14 384px",
        {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
         "num_attention_heads": 16, "patch_size": 14, "image_size": 384},
        "SiglipVisionModel",
    ),
    "siglip2_so400m16": Preset(
        "SigLIP2 so400m/16 NaFlex",
        {"model_type": "siglip2_vision_model", "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
         "num_attention_heads": 16, "patch_size": 16, "num_patches": 256},
        "Siglip2VisionModel",
    ),
    "clip_vitl14_336": Preset(
        "CLIP ViT-L/14 336px",
        {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
         "num_attention_heads": 16, "patch_size": 14, "image_size": 336, "hidden_act": "quick_gelu"},
        "CLIPVisionModel",
    ),
    "dinov2_vitl14_reg": Preset(
        "DINOv2 ViT-L/14 with registers",
        {"model_type": "dinov2_with_registers", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
         "mlp_ratio": 4, "patch_size": 14, "image_size": 518, "num_register_tokens": 4, "layerscale_value": 1e-5},
        "Dinov2WithRegistersModel",
    ),
    "mlcd_vitbigg14_448": Preset(
        "MLCD ViT-bigG/14 448px",
        {"model_type": "mlcd_vision_model", "hidden_size": 1664, "intermediate_size": 8192, "num_hidden_layers": 48,
         "num_attention_heads": 16, "patch_size": 14, "image_size": 448},
        "MLCDVisionModel",
    ),
    "internvit_300m_448": Preset(
        "InternViT-300M 448px",
        {"model_type": "internvl_vision", "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
         "num_attention_heads": 16, "patch_size": [14, 14], "image_size": [448, 448], "layer_scale_init_value": 0.1,
         "use_mean_pooling": True, "attention_bias": True, "norm_type": "layer_norm"},
        "InternVLVisionModel",
    ),
    "qwen2_5_vl_7b": Preset(
        "Qwen2.5-VL-7B vision tower",
        {"model_type": "qwen2_5_vl_vision", "depth": 32, "hidden_size": 1280, "intermediate_size": 3420,
         "num_heads": 16, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
         "out_hidden_size": 3584, "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu"},
        "qwen2_5_vl.modeling_qwen2_5_vl.Qwen2_5_VisionTransformerPretrainedModel",
    ),
    "qwen3_vl_8b": Preset(
        "Qwen3-VL-8B vision tower",
        {"model_type": "qwen3_vl_vision", "depth": 27, "hidden_size": 1152, "intermediate_size": 4304,
         "num_heads": 16, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
         "out_hidden_size": 4096, "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24],
         "hidden_act": "gelu_pytorch_tanh"},
        "Qwen3VLVisionModel",
    ),
}  # fmt: skip


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]
