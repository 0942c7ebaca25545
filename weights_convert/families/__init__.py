"""The families the converter knows: one module each, one entry in :data:`FAMILIES`.

A family module maps one source format onto :class:`~packvit_native.EncoderConfig` and our parameter names.
The runtime never names a family: everything in which a tower differs (norms, positions, windows, heads,
resampling filter, default size rule) is a config field the module fills in. The contract:

Required
    ``NAME``
        the family's name (``packvit-check --family NAME``; recorded as ``config.family``).
    ``MODEL_TYPES``
        the ``model_type`` values of ``config.json`` it converts; a source is recognised by these alone.
    ``VARIANTS``
        names of the small configs ``tiny_hf_config`` builds (the first is the default).
    ``config_from_hf(hf_config, preprocessor, keys) -> EncoderConfig``
        the whole architecture and preprocessing from the source's configs (``keys``: the tensor names, for the
        rare format whose config leaves something out). Refuse what cannot be represented.
    ``convert_state_dict(state, hf_config, config) -> keymap.Converted``
        an exact key table (:func:`~weights_convert.keymap.rename`) plus named tensor steps (fuse, reshape).
    ``tiny_hf_config(variant) -> dict``
        a small transformers ``config.json`` for tests and the embedded default; ``architectures`` names the
        transformers class that builds it (else ``AutoModel``).
    ``reference_forward(hf_model, entry) -> dict``
        transformers' outputs for one entry (``[C, H, W]`` image or ``[F, C, H, W]`` clip, normalised, sized
        for the model), in our token order: ``last_hidden_state [n, D]`` and ``hidden_states`` (lists of
        ``[n, D]``) over all its frames, ``prefix_tokens [frames, k, D]``, ``pooler_output`` and
        ``deepstack_features`` where the model has them.
    ``load_reference(checkpoint) -> transformers model``
        transformers' vision model of a checkpoint directory, fp32, eval mode, SDPA attention.

Optional
    ``select_keys(keys, hf_config) -> set[str]``
        the tensor names to read; the rest are reported as dropped without being read (a vision tower inside
        a multi-GB language model). Default: all.
    ``V1_DEFAULTS``
        config fields that version-1 configs of the family (which named it and left its preprocessing to
        per-family tables in the runtime) did not hold, with the values those tables gave them. Default: none.

``qwen2_5_vl.py`` and ``qwen3_vl.py`` are complete examples of a family with its own stem, windows and heads.
"""

from typing import Any

from . import aimv2, clip, dinov2, dinov3, internvl, metaclip_2, mlcd, qwen2_5_vl, qwen3_vl, siglip, siglip2

FAMILIES = (dinov3, aimv2, siglip, siglip2, qwen2_5_vl, qwen3_vl, dinov2, clip, metaclip_2, mlcd, internvl)

__all__ = ["FAMILIES", "version_1_defaults"]


def version_1_defaults(family: str | None) -> dict[str, Any]:
    """The fields a version-1 config of ``family`` left to the runtime (see ``V1_DEFAULTS``)."""
    module = next((m for m in FAMILIES if family == m.NAME), None)
    return dict(getattr(module, "V1_DEFAULTS", {}))
