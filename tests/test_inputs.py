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
    with pytest.raises(ValueError, match="image 1 has 1 channels and image 0 3"):
        pv.patchify([torch.randn(3, 8, 8), torch.randn(1, 8, 8)], 4)
    for bad in (0, -4, 2.0):
        with pytest.raises(ValueError, match="patch_size must be a positive integer"):
            pv.patchify([torch.randn(3, 8, 8)], bad)
    patches, grid = pv.patchify([torch.randn(3, 8, 8)], 4)
    with pytest.raises(ValueError, match="not a whole number of channels"):
        pv.unpatchify(patches, grid, 4, temporal_patch_size=5)


def test_odd_but_valid_forms_of_arguments(model):
    """A 0-d array of output_layers is one layer, as an int is; a config built in Python with a list for its
    position grid runs; a backend name a kernel table does not know is one line, as is a None checkpoint."""
    import numpy as np

    from packvit_native.packing import Segments

    patches, grid = torch.randn(4, 48), [(1, 2, 2)]
    with torch.no_grad():
        assert isinstance(model(patches, grid, output_layers=np.array(1)), torch.Tensor)
    cfg = EncoderConfig(
        family="siglip", patch_size=4, hidden_size=32, num_layers=1, num_heads=2, mlp_hidden=64,
        pos_embed="learned", pos_grid=[2, 2], pos_resize="none",
    )  # fmt: skip
    with torch.no_grad():
        assert pv.PackedVisionEncoder(cfg, attn_backend="sdpa")(patches, grid).shape == (4, 32)
    q = torch.randn(4, 2, 8)
    segments = Segments.from_lengths((4,), torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown attention backend 'auto'"):
        pv.varlen_attention(q, q, q, segments, segments, "auto", 1.0)
    for lengths, match in (((3,), "cover 3 rows but q has 4"), ((2, 3), "cover 5 rows")):
        short = Segments.from_lengths(lengths, torch.device("cpu"))
        with pytest.raises(ValueError, match=match):
            pv.varlen_attention(q, q, q, short, short, "sdpa", 1.0)
    two = Segments.from_lengths((1, 1), torch.device("cpu"))
    with pytest.raises(ValueError, match="q_segments has 2 segments and k_segments 1"):
        pv.varlen_attention(q[:2], q, q, two, segments, "sdpa", 1.0)
    with pytest.raises(ValueError, match=r"\[T, H, D\]"):
        pv.varlen_attention(q, q, q[:3], segments, segments, "sdpa", 1.0)
    with pytest.raises(ValueError, match="hub id or a folder path"):
        pv.from_pretrained(None)
    assert isinstance(pv.available_backends("cuda"), list)  # a CPU build has no CUDA backend, and says so


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


def test_flat_grid_says_how_to_write_one_image(model):
    with pytest.raises(ValueError, match=r"for one image write \[\[1, 2, 2\]\]"):
        _call(model, torch.randn(4, 48), [1, 2, 2])


def test_grid_on_the_meta_device_is_refused(model):
    with pytest.raises(ValueError, match="grid_thw is on the meta device"):
        _call(model, torch.randn(4, 48), torch.tensor([[1, 2, 2]], device="meta"))


def test_output_layers_as_a_0d_tensor_or_a_float(model):
    patches = torch.randn(4, 48)
    with torch.no_grad():
        expected = model(patches, [[1, 2, 2]], output_layers=1)
        torch.testing.assert_close(model(patches, [[1, 2, 2]], output_layers=torch.tensor(1)), expected)
        (picked,) = model(patches, [[1, 2, 2]], output_layers=torch.tensor([1]))
        torch.testing.assert_close(picked, expected)
    for bad in (1.0, torch.tensor(1.0), "1", True):
        with pytest.raises(ValueError, match="output_layers must be an int or a sequence of ints"):
            model(patches, [[1, 2, 2]], output_layers=bad)


def test_numpy_integer_rows_are_accepted(model):
    import numpy as np

    patches = torch.randn(8, 48)
    with torch.no_grad():
        expected = model(patches, [[1, 2, 2], [1, 1, 4]])
        for grid in (
            [[np.int64(1), np.int64(2), np.int32(2)], [1, 1, 4]],
            [np.array([1, 2, 2]), np.array([1, 1, 4])],
            [torch.tensor([1, 2, 2]), (1, 1, 4)],
            np.array([[1, 2, 2], [1, 1, 4]], dtype=np.int32),
        ):
            torch.testing.assert_close(model(patches, grid), expected, rtol=0, atol=0)


def test_grid_and_packing_that_disagree_are_refused(model):
    patches = torch.randn(16, 48)
    packing = model.pack([[1, 4, 4]])
    with torch.no_grad():
        torch.testing.assert_close(
            model(patches, [[1, 4, 4]], packing=packing), model(patches, packing=packing)
        )
    with pytest.raises(ValueError, match="grid_thw and packing describe different batches"):
        model(patches, [[1, 2, 8]], packing=packing)


def test_huge_grid_fails_fast_without_allocating(model):
    import resource
    import time

    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux; never goes down
    start = time.perf_counter()
    with pytest.raises(
        ValueError, match=r"grid_thw describes 100000000 patches \(sum of t\*h\*w\) but patches has 16 rows"
    ):
        _call(model, torch.randn(16, 48), [[1, 10000, 10000]])
    with pytest.raises(ValueError, match=r"more than 2147483647 patches \(at entry 0: 1x100000x100000\)"):
        _call(model, torch.randn(16, 48), torch.tensor([[1, 100000, 100000]]))
    assert time.perf_counter() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 200 * 1024, "expanded per patch"


def test_grid_beyond_int64_says_what_is_wrong(model):
    with pytest.raises(
        ValueError, match=r"more than 2147483647 patches .* one packed batch holds at most that many"
    ):
        _call(model, torch.randn(16, 48), [[1, 2**40, 2**40]])
    with pytest.raises(ValueError, match="more than 2147483647 patches"):
        _call(model, torch.randn(16, 48), [[2**62, 2**62, 2**62]])
