"""from_pretrained refuses bad options at load time, before reading anything, and never asks the hub about
something that can only be a local path."""

from pathlib import Path

import pytest
import torch

import packvit_native as pv


@pytest.fixture
def no_network(monkeypatch):
    """Make any hub lookup fail the test (HF_HUB_OFFLINE unset, so a lookup would really go out)."""
    import huggingface_hub

    calls = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError(f"network lookup for {args}")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    yield calls
    assert calls == [], f"looked up on the hub: {calls}"


@pytest.mark.parametrize(
    ("option", "match"),
    [
        ({"attn_backend": "nope"}, "unknown attention backend 'nope'"),
        ({"dtype": "int8"}, r"dtype must be one of \['bfloat16', 'float16', 'float32'\]"),
        ({"dtype": torch.int8}, "dtype must be one of"),
        ({"merge_size": True}, "merge_size must be a positive integer, got True"),
        ({"merge_size": 2.0}, "merge_size must be a positive integer, got 2.0"),
        ({"merge_size": 0}, "merge_size must be a positive integer, got 0"),
        ({"device": "gpu0"}, "device='gpu0' is not a device"),
        ({"patch_layout": "pch"}, "patch layout must be 'chw' or 'hwc'"),
        ({"pos_resize": "lanczos"}, "pos_resize must be one of"),
    ],
)
def test_bad_options_are_refused_before_reading(no_network, option, match, tmp_path):
    # The source does not even exist: the option is checked first, so its error is the one reported.
    with pytest.raises(ValueError, match=match) as info:
        pv.from_pretrained(tmp_path / "not-there", **option)
    assert not isinstance(info.value, pv.CheckpointError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fa4 may be available with a GPU")
def test_unavailable_backend_is_refused_at_load(tiny_reference, no_network):
    with pytest.raises(ValueError, match="attention backend 'fa4' is not available: it needs a CUDA GPU"):
        pv.from_pretrained(tiny_reference("dinov3", "gelu"), attn_backend="fa4")


@pytest.mark.parametrize("dtype", ["bfloat16", "torch.bfloat16", torch.bfloat16])
def test_dtype_by_name_is_accepted(tiny_reference, no_network, dtype):
    model = pv.from_pretrained(tiny_reference("dinov3", "gelu"), dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        out = model(*model.patchify([torch.randn(3, 8, 12)]))
    assert out.dtype == torch.bfloat16 and out.shape == (6, model.config.hidden_size)


def test_merge_size_true_is_refused_at_load(tiny_reference, no_network):
    with pytest.raises(ValueError, match="merge_size must be a positive integer, got True"):
        pv.from_pretrained(tiny_reference("dinov3", "gelu"), merge_size=True)


@pytest.mark.parametrize(
    "typo", ["out_dinov", "convout/typo", "./convout_typo", "convout/a/b", "~/no-such-model"]
)
def test_mistyped_local_path_says_no_such_directory_offline(tmp_path, monkeypatch, no_network, typo):
    (tmp_path / "convout").mkdir()  # "convout/typo" next to an existing convout/ can only be a path
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(pv.CheckpointError, match=f"{typo}: no such directory"):
        pv.from_pretrained(typo)


def test_hub_id_shaped_name_is_looked_up(tmp_path, monkeypatch, no_network):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(pv.CheckpointError, match="fetching it from the hub failed"):
        pv.from_pretrained("someorg/somemodel")
    assert no_network == [("someorg/somemodel",)]
    no_network.clear()  # that one lookup was expected


def test_file_instead_of_folder(tmp_path, no_network):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(pv.CheckpointError, match="is a file; pass the directory"):
        pv.from_pretrained(tmp_path / "config.json")


def test_a_path_object_is_never_a_hub_id(tmp_path, monkeypatch, no_network):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(pv.CheckpointError, match="someorg/model: no such directory"):
        pv.from_pretrained(Path("someorg/model"))


def test_an_empty_name_is_not_the_current_folder(model_dir, monkeypatch, no_network):
    monkeypatch.chdir(model_dir)  # a checkpoint here, which "" must not load
    with pytest.raises(pv.CheckpointError, match="an empty name names no checkpoint"):
        pv.from_pretrained("")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8])
def test_weights_of_one_byte_or_integers_are_refused(model_dir, tmp_path, no_network, dtype):
    """FP8 is made at load from a bf16/fp32 checkpoint; a file already holding FP8 or integer weights would load
    and then fail inside the forward."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(model_dir, tmp_path / "model"))
    state = load_file(folder / "model.safetensors")
    key = next(k for k in sorted(state) if k.endswith("weight") and state[k].ndim == 2)
    state[key] = state[key].to(dtype)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(pv.CheckpointError, match=f"{key} is {dtype}; checkpoints hold float32"):
        pv.from_pretrained(folder)


def test_save_pretrained_refuses_a_state_dict_that_does_not_fit(model_dir, tmp_path, no_network):
    """Weights given to save_pretrained are checked against the model before anything is written: a wrapper's
    prefix, a wrong shape or integer weights would replace a good checkpoint with one nothing can load."""
    model = pv.from_pretrained(model_dir)
    out = model.save_pretrained(tmp_path / "out")
    good = model.state_dict()
    key = "blocks.0.attn.qkv.weight"
    bad = [
        ({f"module.{k}": v for k, v in good.items()}, "strip the module. prefix"),
        ({**good, key: good[key][:-1]}, f"{key} has shape"),
        ({**good, key: good[key].int()}, f"{key} is torch.int32"),
        ({k: v for k, v in good.items() if k != key}, "missing"),
        ({k: v.tolist() for k, v in good.items()}, "dict of tensors"),
    ]
    before = (out / "model.safetensors").read_bytes()
    for state, match in bad:
        with pytest.raises(ValueError, match=match):
            model.save_pretrained(out, force=True, state_dict=state)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    halved = {k: v * 0.5 for k, v in good.items()}
    saved = pv.from_pretrained(model.save_pretrained(out, force=True, state_dict=halved)).state_dict()
    assert saved.keys() == halved.keys() and all(torch.equal(saved[k], halved[k]) for k in halved)
