"""Bad input gets a ValueError that says what is wrong, before any compute."""

import pytest
import torch

import packvit_native as pv
from packvit_native.config import EncoderConfig


@pytest.fixture(scope="module")
def model():
    cfg = EncoderConfig(
        family="dinov3", patch_size=4, hidden_size=32, num_layers=1, num_heads=2, mlp_hidden=64,
        num_cls=1, num_registers=1, layer_scale=True, head="cls",
    )  # fmt: skip
    return pv.PackedVisionEncoder(cfg, attn_backend="sdpa").eval()


def _call(model, patches, grid):
    with torch.no_grad():
        return model(patches, grid)


@pytest.mark.parametrize(
    ("patches", "grid", "match"),
    [
        (torch.randn(10, 48), [[1, 2, 2]], "describes 4 patches"),
        (torch.randn(4, 47), [[1, 2, 2]], r"C\*T\*p\*p = 3\*1\*4\*4 = 48"),
        (torch.randn(4, 48), [[1, 0, 4]], "must all be >= 1"),
        (torch.randn(4, 48), [[1, -2, -2]], "must all be >= 1"),
        (torch.randn(4, 48), torch.tensor([[1.0, 2.0, 2.0]]), "must hold integers"),
        (torch.randn(4, 48), [[1, 2.0, 2]], "three integers"),
        (torch.randn(4, 48), torch.tensor([1, 2, 2]), r"shape \[num_images, 3\]"),
        (torch.randn(0, 48), torch.zeros(0, 3, dtype=torch.int64), "empty"),
        (torch.randint(0, 255, (4, 48)), [[1, 2, 2]], "floating point"),
        (torch.randn(4, 48)[None], [[1, 2, 2]], "2D tensor"),
    ],
)
def test_bad_input_is_a_clear_value_error(model, patches, grid, match):
    with pytest.raises(ValueError, match=match):
        _call(model, patches, grid)


def test_wrong_device_is_a_clear_value_error(model):
    with pytest.raises(ValueError, match="are on meta but the model is on cpu"):
        _call(model, torch.randn(4, 48, device="meta"), [[1, 2, 2]])


def test_missing_grid_and_hidden_states_without_dict(model):
    with pytest.raises(ValueError, match="grid_thw"):
        _call(model, torch.randn(4, 48), None)
    with pytest.raises(ValueError, match="return_dict"):
        model(torch.randn(4, 48), [[1, 2, 2]], output_hidden_states=True)


def test_unknown_and_unavailable_backends(model):
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        model(torch.randn(4, 48), [[1, 2, 2]], attn_backend="nope")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pip install flash-attn-4"):
            model(torch.randn(4, 48), [[1, 2, 2]], attn_backend="fa4")
        with pytest.raises(ValueError, match="needs a CUDA GPU and the model is on cpu"):
            model(torch.randn(4, 48), [[1, 2, 2]], attn_backend="torch")


def test_other_float_dtypes_are_cast_to_the_weights(model):
    patches = torch.randn(4, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(patches.double(), [[1, 2, 2]]), model(patches, [[1, 2, 2]]))


def test_patchify_rejects_bad_images():
    with pytest.raises(ValueError, match="not a positive multiple of patch size 4"):
        pv.patchify([torch.randn(3, 10, 8)], 4)
    with pytest.raises(ValueError, match="floating point"):
        pv.patchify([torch.zeros(3, 8, 8, dtype=torch.uint8)], 4)
    with pytest.raises(ValueError, match="no images"):
        pv.patchify([], 4)
    with pytest.raises(ValueError, match="layout"):
        pv.patchify([torch.randn(3, 8, 8)], 4, layout="pch")


def test_config_rejects_inconsistencies_and_unknown_fields(tmp_path):
    base = dict(family="dinov3", patch_size=4, hidden_size=32, num_layers=1, num_heads=2, mlp_hidden=64)
    with pytest.raises(ValueError, match="not divisible"):
        EncoderConfig(**{**base, "num_heads": 3}).validate()
    with pytest.raises(ValueError, match="allowed"):
        EncoderConfig(**{**base, "norm": "batchnorm"}).validate()
    cfg = EncoderConfig(**base).validate()
    assert EncoderConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown config fields"):
        EncoderConfig.from_dict({**cfg.to_dict(), "surprise": 1})
    with pytest.raises(ValueError, match="not a packvit-native config"):
        EncoderConfig.from_dict(dict(base))


def test_numpy_inputs_work_or_fail_clearly(model):
    import numpy as np

    patches = torch.randn(4, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(patches, np.array([[1, 2, 2]])), model(patches, [[1, 2, 2]]))
        assert model(patches, [[1, 2, 2]], output_layers=np.int64(1)).shape == (4, 32)
    with pytest.raises(ValueError, match="must hold integers"):
        model(patches, np.array([[1.0, 2.0, 2.0]]))
    with pytest.raises(ValueError, match="numpy arrays are ambiguous"):
        pv.preprocess(np.zeros((8, 8, 3), dtype=np.uint8), model)


def test_packing_on_another_device_is_refused(model):
    packing = pv.Packing.from_grid([[1, 2, 2]], model.config.num_prefix, "meta")
    with pytest.raises(ValueError, match="packing was built for meta"):
        model(torch.randn(4, 48), packing=packing)
