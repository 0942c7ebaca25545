"""CLIP and MetaCLIP 2: converted by our CLI, packed, and compared with transformers image by image (vision
model, vision model with projection, two-tower model); the trained-size table, the config rules, the
preprocessing and the converter's failures."""

import copy
import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file

import packvit_native as pv
from tests.parity import ATOL, assert_packed_parity
from weights_convert.check import compare_with_reference, load_reference, mixed_batch
from weights_convert.cli import main as convert_cli
from weights_convert.families import clip

CASES = [(f, v) for f in ("clip", "metaclip_2") for v in clip.VARIANTS]
CLASSES = {"clip": clip.CLASSES, "metaclip_2": ("MetaClip2VisionModel", "MetaClip2VisionModelWithProjection",
                                                "MetaClip2Model")}  # fmt: skip


@pytest.mark.parametrize(("family", "variant"), CASES)
def test_parity_through_cli(tiny_reference, tmp_path, capsys, family, variant):
    src = tiny_reference(family, variant)
    hf_cfg = json.loads((src / "config.json").read_text())
    assert hf_cfg["architectures"] == [CLASSES[family][clip.VARIANTS.index(variant)]]
    assert convert_cli([str(src), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    if variant == "two_tower":
        assert "the text tower (text_model.*" in printed and "logit_scale" in printed
        assert "text_projection.weight" in printed and "visual_projection" not in printed
    model = pv.from_pretrained(tmp_path / "out", attn_backend="sdpa")
    c = model.config
    assert (c.family, c.pos_grid, c.pos_resize, c.head, c.final_norm) == (
        family,
        (8, 8),
        "bicubic",
        "cls_norm",
        False,
    )
    assert c.activation == ("gelu" if variant == "two_tower" else "quick_gelu")
    assert c.projection_dim == (None if variant == "default" else 24)
    hf_model = load_reference(src)
    images = mixed_batch(c)
    outputs = ("last_hidden_state", "prefix_tokens", "pooler_output")
    outputs += ("image_embeds",) if c.projection_dim is not None else ()
    rows = assert_packed_parity(model, hf_model, images, expect=outputs)
    assert ("image_embeds" in rows[0]) == (c.projection_dim is not None)


def test_trained_size_takes_the_table_unchanged(tiny_reference):
    """At the trained 8x8 grid both sides add the stored table as is; a 4x16 grid (as many patches, but not
    square) is resized by both, as transformers' ``interpolate_pos_encoding`` decides."""
    src = tiny_reference("clip", "default")
    model = pv.from_pretrained(src, attn_backend="sdpa")
    hf_model = load_reference(src)
    emb = hf_model.embeddings
    with torch.no_grad():
        terms = model.positions(model.pack([[1, 8, 8]]), torch.float32)
        assert torch.equal(terms.additive, model.positions.weight) and torch.equal(
            terms.cls, model.positions.cls
        )
        table = emb.interpolate_pos_encoding(torch.zeros(1, 65, 64), 32, 32)[0]
        assert torch.equal(table, torch.cat([model.positions.cls, model.positions.weight]))
        wide = model.positions(model.pack([[1, 4, 16]]), torch.float32).additive
        assert not torch.equal(wide, model.positions.weight)
        torch.testing.assert_close(wide, emb.interpolate_pos_encoding(torch.zeros(1, 65, 64), 16, 64)[0, 1:])
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, h, w, generator=g) for h, w in ((32, 32), (16, 64), (64, 16), (32, 32))]
    for row in compare_with_reference(model, hf_model, images):
        assert max(v for k, v in row.items() if k != "grid") <= ATOL, row


@pytest.mark.parametrize("name", ["CLIPVisionConfig", "MetaClip2VisionConfig"])
def test_defaults_are_transformers_defaults(name):
    """Hub configs omit default values: ours must be transformers' (CLIPConfig's projection_dim too)."""
    defaults = getattr(transformers, name)()
    assert {k: getattr(defaults, k) for k in clip.DEFAULTS} == clip.DEFAULTS
    assert transformers.CLIPConfig().projection_dim == transformers.MetaClip2Config().projection_dim == 512


def test_vision_config_dict_is_read_as_transformers_reads_it():
    """Old two-tower configs carry ``vision_config_dict``: transformers builds it over the defaults and lets it
    replace ``vision_config`` (here the 48-pixel image size falls back to the default 224)."""
    vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "patch_size": 4, "image_size": 48, "hidden_act": "gelu"}  # fmt: skip
    cfg = {"model_type": "clip", "vision_config": vision, "projection_dim": 24,
           "vision_config_dict": {k: vision[k] for k in ("hidden_size", "num_attention_heads", "patch_size")}}  # fmt: skip
    ref = transformers.CLIPConfig.from_dict(
        copy.deepcopy(cfg)
    ).vision_config  # it updates vision_config in place
    ours = clip.config_from_hf(cfg, None)
    assert ours.pos_grid == (ref.image_size // ref.patch_size,) * 2 == (56, 56)
    assert (ours.mlp_hidden, ours.num_layers, ours.activation) == (ref.intermediate_size, 12, "quick_gelu")
    assert clip.config_from_hf({**cfg, "vision_config_dict": None}, None).pos_grid == (12, 12)


def test_preprocessing_matches_clip_processor_on_square_images(tiny_reference):
    """Square images get exactly CLIPImageProcessor's pixels (PIL backend); other shapes keep the whole image
    within the trained grid's patch count, where the processor crops the central square."""
    model = pv.from_pretrained(tiny_reference("clip", "default"), attn_backend="sdpa")
    processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    rng = np.random.default_rng(0)
    for h, w in ((50, 50), (20, 20), (60, 40), (30, 90)):
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        patches, grid = pv.preprocess(image, model)
        _, gh, gw = grid[0].tolist()
        if h == w:
            ref = processor(images=[image], return_tensors="pt")["pixel_values"][0]
            assert (gh, gw) == (8, 8) and torch.equal(
                pv.unpatchify(patches, grid, 4)[0].reshape(ref.shape), ref
            )
        else:
            assert gh * gw <= 64 and abs(gh / gw - h / w) < 0.3


@pytest.mark.parametrize(
    "settings",
    [
        {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.9, 0.8, 0.7]},
        {"do_normalize": False},
        {"do_rescale": False, "image_mean": [120.0, 110.0, 100.0], "image_std": [60.0, 50.0, 40.0]},
        {"rescale_factor": 1 / 127.5, "image_mean": [1.0, 1.0, 1.0], "image_std": [1.0, 1.0, 1.0]},
        {"resample": 2},
    ],
    ids=["stats", "no-normalize", "no-rescale", "rescale-factor", "bilinear"],
)
@pytest.mark.parametrize("saved_by", ["processor", "image-processor"])
def test_the_image_processor_settings_of_a_checkpoint_are_kept(tiny_reference, tmp_path, settings, saved_by):
    """As transformers reads them: the image processor nested in processor_config.json (what a Processor's
    save_pretrained writes), else preprocessor_config.json; normalisation off, rescaling off, another factor,
    another resize filter (every family reads it, as it reads the statistics)."""
    src = tmp_path / "src"
    shutil.copytree(tiny_reference("clip", "default"), src)
    processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, **settings
    )
    if saved_by == "processor":
        (src / "processor_config.json").write_text(json.dumps({"image_processor": processor.to_dict()}))
        (src / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.0] * 3}))  # not read
    else:
        processor.save_pretrained(src)
    reloaded = transformers.CLIPImageProcessorPil.from_pretrained(src)
    model = pv.from_pretrained(src, attn_backend="sdpa")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    ref = reloaded(images=[image], return_tensors="pt")["pixel_values"][0]
    patches, grid = pv.preprocess(image, model)
    torch.testing.assert_close(
        pv.unpatchify(patches, grid, 4)[0].reshape(ref.shape), ref, rtol=1e-5, atol=1e-4
    )


def _bad_copy(src, dst, edit_state=None, edit_config=None):
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(edit_config(cfg) if edit_config else cfg))
    state = load_file(src / "model.safetensors")
    if edit_state:
        edit_state(state)
    save_file(state, dst / "model.safetensors")
    return dst


P = "vision_model."
FAILURES = [
    ("default", lambda s: s.update({"encoder.layers.0.extra.weight": torch.zeros(2)}), None,
     "unknown checkpoint keys: encoder.layers.0.extra.weight"),
    ("default", lambda s: s.update({"embeddings.patch_embedding.bias": torch.zeros(64)}), None,
     "unknown checkpoint keys: embeddings.patch_embedding.bias"),
    ("default", lambda s: s.update({"visual_projection.weight": torch.zeros(24, 64)}), None,
     "unknown checkpoint keys: visual_projection.weight"),
    ("default", lambda s: s.pop("pre_layrnorm.bias"), None, "missing checkpoint keys: pre_layrnorm.bias"),
    ("default", lambda s: s.update({"embeddings.position_embedding.weight": torch.zeros(64, 64)}), None,
     "embeddings.position_embedding.weight has the wrong shape: it gives positions.weight shape (63, 64)"),
    ("default", lambda s: s.update({"embeddings.position_embedding.weight": torch.zeros(65)}), None,
     "embeddings.position_embedding.weight: expected a table [1 + S*S, D], got shape (65,)"),
    ("default", lambda s: s.update({"embeddings.class_embedding": torch.zeros(65)}), None,
     "embeddings.class_embedding has the wrong shape"),
    ("default", lambda s: s.update({"encoder.layers.1.mlp.fc1.weight": torch.zeros(7, 64)}), None,
     "encoder.layers.1.mlp.fc1.weight has the wrong shape"),
    ("default", lambda s: s.update({P + "post_layernorm.bias": torch.zeros(64)}), None,
     "post_layernorm.bias appears both with and without the 'vision_model.' prefix"),
    ("with_projection", lambda s: s.pop("visual_projection.weight"), None,
     "missing checkpoint keys: visual_projection.weight"),
    ("with_projection", lambda s: s.update({"visual_projection.weight": torch.zeros(24, 65)}), None,
     "visual_projection.weight has the wrong shape"),
    # A CLIPVisionModelWithProjection checkpoint whose config does not say so: never guessed from the keys.
    ("with_projection", None, lambda c: {**c, "architectures": ["CLIPVisionModel"]},
     "unknown checkpoint keys: visual_projection.weight"),
    ("two_tower", lambda s: s.update({P + "head.probe": torch.zeros(1, 1, 64)}), None,
     "unknown checkpoint keys: head.probe"),
]  # fmt: skip


@pytest.mark.parametrize(("variant", "edit_state", "edit_config", "message"), FAILURES)
def test_bad_checkpoints_fail_naming_the_key_and_write_nothing(
    tiny_reference, tmp_path, capsys, variant, edit_state, edit_config, message
):
    bad = _bad_copy(tiny_reference("clip", variant), tmp_path / "bad", edit_state, edit_config)
    assert convert_cli([str(bad), str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_vision_model_with_legacy_prefix_converts_alike(tiny_reference, tmp_path):
    """A vision-only checkpoint saved by older transformers carries ``vision_model.`` on every key (and the
    ``position_ids`` buffer): the same model."""
    src = tiny_reference("clip", "default")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(src / "config.json", legacy / "config.json")
    state = {P + k: v for k, v in load_file(src / "model.safetensors").items()}
    state[P + "embeddings.position_ids"] = torch.arange(65)[None]
    save_file(state, legacy / "model.safetensors")
    a, b = pv.from_pretrained(src), pv.from_pretrained(legacy)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


@pytest.mark.parametrize("family", ["clip", "siglip", "aimv2"])
def test_attention_dropout_is_refused(tiny_reference, family):
    """The packed blocks have no dropout: a checkpoint trained with it is refused, not silently changed."""
    from weights_convert.convert import family_named
    from weights_convert.errors import ConversionError

    cfg = json.loads((tiny_reference(family, family_named(family).VARIANTS[0]) / "config.json").read_text())
    with pytest.raises(ConversionError, match=r"attention_dropout = 0\.1: dropout is not supported"):
        family_named(family).config_from_hf({**cfg, "attention_dropout": 0.1}, None)
