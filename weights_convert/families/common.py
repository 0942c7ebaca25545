"""Reading values out of a transformers config, strictly."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from ..errors import ConversionError
from ..sources import Checkpoint

__all__ = [
    "ACTIVATIONS",
    "CLIP_STATS",
    "IMAGENET_STATS",
    "activation",
    "image_stats",
    "load_tower_reference",
    "load_vlm_tower_reference",
    "no_token_id_warnings",
    "per_frame",
    "refuse_dropout",
    "require",
    "split_prefix",
    "square",
    "tower_config",
    "tower_state",
    "vlm_tower_keys",
    "vlm_tower_tensors",
    "with_defaults",
]

# Published normalisation statistics ((mean per channel), (std per channel)), used when a checkpoint has no
# preprocessor config.
CLIP_STATS = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))  # OpenAI CLIP
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

# transformers' activation names -> ours.
ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
    "quick_gelu": "quick_gelu",
}


def require(cfg: dict[str, Any], key: str, kind: type | tuple[type, ...] = int) -> Any:
    if key not in cfg:
        raise ConversionError(f"config.json lacks {key!r}")
    value = cfg[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConversionError(f"config.json {key!r} = {value!r} has an unexpected type")
    return value


def refuse_dropout(cfg: dict[str, Any], *keys: str) -> None:
    """Refuse a nonzero dropout setting: the packed blocks and varlen kernels have none, and training without
    it silently would not be the source model's training."""
    for key in keys:
        value = cfg.get(key, 0.0)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value != 0:
            raise ConversionError(f"config.json {key} = {value!r}: dropout is not supported; set it to 0.0")


def activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ConversionError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def square(value: Any, key: str) -> int:
    """Patch or image sizes given as an int or a square pair."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConversionError(f"config.json {key!r} = {value!r}: only square sizes are supported")
        value = value[0]
    if not isinstance(value, int) or value < 1:
        raise ConversionError(f"config.json {key!r} = {value!r} is not a positive integer")
    return value


def image_stats(
    preprocessor: dict[str, Any] | None, default: tuple[tuple[float, ...], tuple[float, ...]]
) -> dict[str, tuple[float, ...]]:
    """The normalisation mean/std from a checkpoint's preprocessor config, else the family's published one.

    Our preprocessing computes ``(pixel / 255 - mean) / std``; the image processor's ``(pixel * rescale_factor
    - mean) / std`` (``do_rescale`` false: factor 1; ``do_normalize`` false: mean 0, std 1) is the same with
    mean and std divided by ``255 * rescale_factor``, so every setting is kept exactly."""
    mean, std = default
    if not preprocessor:
        return {"image_mean": mean, "image_std": std}
    mean = tuple(float(v) for v in preprocessor.get("image_mean", mean))
    std = tuple(float(v) for v in preprocessor.get("image_std", std))
    if preprocessor.get("do_normalize") is False:
        mean, std = (0.0,) * len(mean), (1.0,) * len(std)
    factor = (
        float(preprocessor.get("rescale_factor", 1 / 255))
        if preprocessor.get("do_rescale") is not False
        else 1.0
    )
    scale = 255 * factor
    if scale != 1.0:
        mean, std = tuple(m / scale for m in mean), tuple(s / scale for s in std)
    return {"image_mean": mean, "image_std": std}


# PIL's filter numbers, as image processor configs record them, for the filters our preprocessing has.
RESAMPLE = {2: "bilinear", 3: "bicubic"}


def resample_of(preprocessor: dict[str, Any] | None, default: str) -> str:
    """The resize filter of a checkpoint's image processor config, else ``default`` (its class's default)."""
    value = (preprocessor or {}).get("resample")
    if value is None:
        return default
    if value not in RESAMPLE or isinstance(value, bool):
        raise ConversionError(
            f"the image processor's resample = {value!r}: only bilinear (2) and bicubic (3) are supported"
        )
    return RESAMPLE[value]


def with_defaults(cfg: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """A config with the source library's defaults filled in: hub configs often omit default values."""
    return {**defaults, **cfg}


def tower_config(cfg: dict[str, Any], key: str = "vision_config") -> tuple[dict[str, Any], bool]:
    """The vision tower's config and whether the checkpoint holds two towers (vision + text)."""
    if key not in cfg:
        return cfg, False
    vision = cfg[key]
    if not isinstance(vision, dict):
        raise ConversionError(f"config.json {key!r} is not an object")
    return vision, True


def tower_state(
    state: dict[str, Tensor], two_tower: bool, prefix: str
) -> tuple[dict[str, Tensor], list[str]]:
    """The vision tower's tensors with ``prefix`` removed, and the other keys of the checkpoint (dropped).

    A two-tower checkpoint keeps its vision tower under ``prefix``; everything else (the text tower, the
    projections, the logit scale) is not part of the encoder. A vision-only checkpoint may carry the prefix on
    its keys (older transformers versions saved it) or not, but not both spellings of one key.
    """
    if two_tower:
        vision = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        if not vision:
            raise ConversionError(f"this two-tower checkpoint has no vision tower tensors ({prefix}*)")
        return vision, sorted(k for k in state if not k.startswith(prefix))
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        canon = key.removeprefix(prefix)
        if canon in out:
            raise ConversionError(f"{canon} appears both with and without the {prefix!r} prefix")
        out[canon] = value
    return out, []


def split_prefix(out: Any, k: int) -> dict[str, Any]:
    """transformers' output for one image with ``k`` prefix tokens in front, split as ours are: patch tokens,
    prefix tokens, the pooled output and every hidden state's patch tokens."""
    return {
        "last_hidden_state": out.last_hidden_state[0, k:],
        "prefix_tokens": out.last_hidden_state[0, :k],
        "pooler_output": out.pooler_output[0] if getattr(out, "pooler_output", None) is not None else None,
        "hidden_states": [h[0, k:] for h in out.hidden_states],
    }


def per_frame(
    forward_frame: Callable[[Any, Tensor], dict[str, Any]],
) -> Callable[[Any, Tensor], dict[str, Any]]:
    """An entry-level ``reference_forward`` from one that runs transformers on a single ``[C, H, W]`` frame,
    for families whose reference knows only still images: every frame of a clip is run alone (each frame is
    its own segment), token outputs are concatenated and per-frame outputs stacked."""

    def forward(model: Any, entry: Tensor) -> dict[str, Any]:
        refs = [forward_frame(model, frame) for frame in (entry if entry.ndim == 4 else entry[None])]
        out: dict[str, Any] = {
            "last_hidden_state": torch.cat([r["last_hidden_state"] for r in refs]),
            "hidden_states": [torch.cat(hs) for hs in zip(*(r["hidden_states"] for r in refs), strict=True)],
        }
        for key in ("prefix_tokens", "pooler_output"):
            if refs[0].get(key) is not None:
                out[key] = torch.stack([r[key] for r in refs])
        return out

    return forward


_TOKEN_ID_WARNING = re.compile(
    r"Model config: \w+_token_id must be `None` or an integer within the vocabulary"
)


def _not_a_token_id_warning(record: logging.LogRecord) -> bool:
    return not _TOKEN_ID_WARNING.match(record.getMessage())


@contextmanager
def no_token_id_warnings() -> Iterator[None]:
    """Drop transformers' "token id outside the vocabulary" warnings while a reference is built or loaded.

    transformers 5.17 warns about a config nobody uses: giving a SigLIP/SigLIP2 two-tower config its text
    config runs a type check whose error text calls ``repr``, which builds a default ``SiglipTextConfig``,
    and that default (bos 49406, vocabulary 32000) fails transformers' own token-id check. A parity check
    never runs the text tower, so its token ids cannot matter; only this one message is dropped, only here.
    """
    logger = logging.getLogger("transformers.configuration_utils")  # where the record is made
    logger.addFilter(_not_a_token_id_warning)
    try:
        yield
    finally:
        logger.removeFilter(_not_a_token_id_warning)


def load_tower_reference(ckpt: Checkpoint, hf_class: str) -> Any:
    """transformers' vision model of a vision-only or two-tower checkpoint, fp32, eval mode, SDPA attention."""
    import transformers

    if "vision_config" in ckpt.config:
        # A two-tower checkpoint: load the whole model and keep its vision tower (a vision-only class would
        # silently load nothing from it).
        with no_token_id_warnings():
            full = transformers.AutoModel.from_pretrained(ckpt.path, attn_implementation="sdpa")
        return full.vision_model.eval().float()
    return (
        getattr(transformers, hf_class).from_pretrained(ckpt.path, attn_implementation="sdpa").eval().float()
    )


# A vision tower inside a vision-language checkpoint (config.json with a vision_config): its tensors sit under
# one of a few prefixes, and the language model beside it is never read.


def vlm_tower_keys(keys: Iterable[str], cfg: dict[str, Any], prefixes: tuple[str, ...]) -> set[str]:
    """The tower's tensor names of a vision-language checkpoint; every name of a tower saved alone."""
    keys = list(keys)
    if "vision_config" not in cfg:
        return set(keys)
    return {k for k in keys if k.startswith(prefixes)}


def vlm_tower_tensors(
    state: dict[str, Tensor], cfg: dict[str, Any], prefixes: tuple[str, ...]
) -> dict[str, Tensor]:
    """The tower's tensors with their prefix removed; a key under two prefixes, or none, is an error."""
    if "vision_config" not in cfg:
        return state
    spelled = "/".join(prefixes)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            raise ConversionError(f"{key} is not part of the vision tower ({spelled}*)")
        if key.removeprefix(prefix) in out:
            raise ConversionError(f"{key.removeprefix(prefix)} appears under more than one of {spelled}")
        out[key.removeprefix(prefix)] = value
    if not out:
        raise ConversionError(f"this checkpoint has no vision tower tensors ({spelled}*)")
    return out


def load_vlm_tower_reference(
    ckpt: Checkpoint, class_name: str, config_type: str, prefixes: tuple[str, ...]
) -> Any:
    """transformers' tower built from the checkpoint's vision config, fp32, eval mode, SDPA attention, with only
    the tower's tensors read (``class_name``: exported, or ``module.Class`` under ``transformers.models``)."""
    import transformers

    from ..check import transformers_class
    from ..sources import load_state_dict

    fields = {k: v for k, v in tower_config(ckpt.config)[0].items() if k != "model_type"}
    config = transformers.AutoConfig.for_model(config_type, **fields)
    model = transformers_class(class_name)._from_config(
        config, attn_implementation="sdpa", dtype=torch.float32
    )
    state, _ = load_state_dict(ckpt.path, lambda keys: vlm_tower_keys(keys, ckpt.config, prefixes))
    model.load_state_dict(vlm_tower_tensors(state, ckpt.config, prefixes), strict=True)
    return model.eval()
