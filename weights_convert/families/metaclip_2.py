"""MetaCLIP 2 (transformers ``MetaClip2VisionModel``, ``MetaClip2VisionModelWithProjection``, ``MetaClip2Model``);
Chuang et al., "Meta CLIP 2: A Worldwide Scaling Recipe", 2025.

transformers generates these classes from CLIP's (``modular_metaclip_2.py``): the vision tower, its keys, its
config and its numerics are CLIP's, only the model types and class names differ. Everything is ``clip.py``'s.
"""

from __future__ import annotations

from functools import partial

from . import clip

NAME = "metaclip_2"
MODEL_TYPES = ("metaclip_2_vision_model", "metaclip_2")
CLASSES = ("MetaClip2VisionModel", "MetaClip2VisionModelWithProjection", "MetaClip2Model")
VARIANTS = clip.VARIANTS

config_from_hf = partial(clip.config_from_hf, family=NAME, classes=CLASSES)
convert_state_dict = clip.convert_state_dict
tiny_hf_config = partial(clip.tiny_hf_config, model_types=MODEL_TYPES, classes=CLASSES)
reference_forward = clip.reference_forward
load_reference = partial(clip.load_reference, classes=CLASSES)
