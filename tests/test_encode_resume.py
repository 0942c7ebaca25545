"""Resuming ``packvit encode``: the model is identified by content, damaged outputs are redone, the manifest is
never overwritten, and outputs get the modes the umask says."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import packvit_native as pv
import packvit_native.cli as cli
from packvit_native.io import load_native, save_native


def _images(root: Path, names: list[str], size=(24, 40)) -> Path:
    rng = np.random.default_rng(0)
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / name)
    return root


def _encode(*args) -> int:
    return cli.main(["encode", *map(str, args), "--device", "cpu", "--workers", "2"])


def _error(err: str) -> str:
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("packvit encode: error:")]
    return line


def _perturbed_copy(src: Path, dst: Path) -> Path:
    """``src`` (our format) with one weight changed: the same path and config, another model."""
    config, state = load_native(src)
    state = dict(state)
    key = sorted(state)[0]
    state[key] = state[key] + 1
    return save_native(dst, config, state, force=True)


@pytest.fixture
def model_dir(tiny_reference, tmp_path):
    return pv.from_pretrained(tiny_reference("dinov3", "gelu")).save_pretrained(tmp_path / "model")


def test_resume_follows_the_model_content_not_its_path(tiny_reference, model_dir, tmp_path, capsys):
    images, out = _images(tmp_path / "images", ["a.png", "b.png", "c.png"]), tmp_path / "out"
    assert _encode("--model", model_dir, "--out", out, images / "a.png") == 0
    manifest = json.loads((out / cli.MANIFEST).read_text())
    assert len(manifest["model"]["sha256"]) == 64

    # the same model moved elsewhere resumes, and so does the transformers checkpoint it was converted from
    moved = tmp_path / "moved"
    shutil.copytree(model_dir, moved)
    assert _encode("--model", moved, "--out", out, images / "a.png", images / "b.png") == 0
    assert "skipping 1 of 2 images" in capsys.readouterr().err
    assert _encode("--model", tiny_reference("dinov3", "gelu"), "--out", out, images / "b.png") == 0
    assert "nothing left to encode" in capsys.readouterr().err

    # another model put in place of the first (packvit-convert --force into the same folder) is refused
    _perturbed_copy(model_dir, model_dir)
    assert _encode("--model", model_dir, "--out", out, images) == 2
    line = _error(capsys.readouterr().err)
    assert (
        f"holds features of model {model_dir.resolve()} (sha256 {manifest['model']['sha256'][:16]})" in line
    )
    assert f"not of --model {model_dir.resolve()} (sha256 " in line and "same path, other content" in line
    assert not (out / "c.safetensors").exists()
    assert json.loads((out / cli.MANIFEST).read_text()) == manifest


def test_a_changed_transformers_checkpoint_is_refused(tiny_reference, tmp_path, capsys):
    """A transformers directory is fingerprinted by its converted config and tensors."""
    hf = Path(shutil.copytree(tiny_reference("dinov3", "gelu"), tmp_path / "hf"))
    images, out = _images(tmp_path / "images", ["a.png", "b.png"]), tmp_path / "out"
    assert _encode("--model", hf, "--out", out, images / "a.png") == 0
    weights = hf / "model.safetensors"
    with safe_open(weights, "pt") as f:
        metadata = f.metadata()
    state = {k: v.clone() for k, v in load_file(weights).items()}  # cloned: the file is rewritten in place
    key = next(k for k in sorted(state) if state[k].is_floating_point())
    state[key] = state[key] * 2
    save_file(state, weights, metadata=metadata)
    assert _encode("--model", hf, "--out", out, images) == 2
    assert "same path, other content" in _error(capsys.readouterr().err)
    assert not (out / "b.safetensors").exists()


def test_a_folder_of_an_older_version_is_refused(model_dir, tmp_path, capsys):
    images, out = _images(tmp_path / "images", ["a.png"]), tmp_path / "out"
    out.mkdir()
    old = {
        "model": str(model_dir),
        "layers": None,
        "dtype": "float32",
        "format": "per-image",
        "prefix": False,
    }
    (out / cli.MANIFEST).write_text(json.dumps(old))
    assert _encode("--model", model_dir, "--out", out, images) == 2
    line = _error(capsys.readouterr().err)
    assert "written by an older packvit encode" in line and "new --out" in line
    assert not (out / "a.safetensors").exists()


def test_a_manifest_written_meanwhile_is_compared_not_overwritten(model_dir, tmp_path, monkeypatch, capsys):
    """Another run (with another model) records its manifest after this run's start: this run must stop at its
    first write instead of replacing the manifest and mixing its features in."""
    images, out = _images(tmp_path / "images", ["a.png"]), tmp_path / "out"
    other_model = _perturbed_copy(model_dir, tmp_path / "other")
    other_out = tmp_path / "other-out"
    assert _encode("--model", other_model, "--out", other_out, images) == 0
    theirs = (other_out / cli.MANIFEST).read_text()
    real_preprocess = pv.preprocess

    def concurrent_run_starts(*args, **kwargs):
        out.mkdir(exist_ok=True)
        if not (out / cli.MANIFEST).exists():
            (out / cli.MANIFEST).write_text(theirs)
        return real_preprocess(*args, **kwargs)

    monkeypatch.setattr(pv, "preprocess", concurrent_run_starts)
    capsys.readouterr()
    assert _encode("--model", model_dir, "--out", out, images) == 2
    assert "holds features of model" in _error(capsys.readouterr().err)
    assert (out / cli.MANIFEST).read_text() == theirs
    assert not list(out.glob("*.safetensors"))


def test_damaged_per_image_outputs_are_encoded_again(model_dir, tmp_path, capsys):
    names = ["a.png", "b.png", "c.png", "sub/d.png"]
    images, out = _images(tmp_path / "images", names), tmp_path / "out"
    assert _encode("--model", model_dir, "--out", out, images) == 0
    # cloned: load_file maps the file, and the damage below rewrites it in place
    whole = {p: {k: v.clone() for k, v in load_file(p).items()} for p in out.rglob("*.safetensors")}
    (out / "a.safetensors").write_bytes(b"")  # a power cut before the data reached the disk
    data = (out / "b.safetensors").read_bytes()
    (out / "b.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    # ours (its metadata names its source) but without the features these settings store
    c = {"grid_thw": whole[out / "c.safetensors"]["grid_thw"]}
    save_file(c, out / "c.safetensors", metadata={"source": str(images / "c.png")})
    capsys.readouterr()
    assert _encode("--model", model_dir, "--out", out, images) == 0
    err = capsys.readouterr().err
    for name in "ab":
        assert f"{out / name}.safetensors is damaged" in err and f"encoding {images / name}.png again" in err
    assert (out / "a.safetensors.damaged").read_bytes() == b""  # moved aside, not overwritten
    assert (out / "b.safetensors.damaged").read_bytes() == data[: len(data) // 2]
    assert (
        f"{out / 'c'}.safetensors holds tensors ['grid_thw']" in err
        and f"encoding {images / 'c'}.png again" in err
    )
    assert "skipping 1 of 4 images" in err and "encoded 3 images" in err
    for path, tensors in whole.items():
        again = load_file(path)
        assert again.keys() == tensors.keys()
        for key in tensors:
            torch.testing.assert_close(again[key], tensors[key], rtol=0, atol=1e-6)


def _part_names(out: Path) -> list[str]:
    names = []
    for part in sorted(out.glob("part-*.safetensors")):
        with safe_open(part, "pt") as f:
            names += json.loads(f.metadata()["names"])
    return names


def test_a_damaged_packed_part_is_reported_and_its_images_redone(model_dir, tmp_path, capsys):
    images, out = _images(tmp_path / "images", ["a.png", "b.png", "c.png"]), tmp_path / "out"
    args = ("--model", model_dir, "--out", out, images, "--format", "packed", "--max-tokens", 1)
    assert _encode(*args) == 0
    part = out / "part-00001.safetensors"
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert _encode(*args) == 0
    err = capsys.readouterr().err
    assert f"{part} is damaged" in err and "moved to part-00001.safetensors.damaged" in err
    assert "skipping 2 of 3 images" in err and "encoded 1 image (" in err
    assert sorted(_part_names(out)) == ["a", "b", "c"]
    assert (out / "part-00001.safetensors.damaged").read_bytes() == data[: len(data) // 2]


def test_a_whole_part_with_other_tensors_is_refused_not_moved(model_dir, tmp_path, capsys):
    """A part that opens but holds other tensors was written by a run with other settings (a concurrent one,
    before its manifest appeared): it is left alone and this run is refused, not taken for damage."""
    images, out = _images(tmp_path / "images", ["a.png", "b.png"]), tmp_path / "out"
    args = ("--model", model_dir, "--out", out, images, "--format", "packed")
    assert _encode(*args, "--prefix") == 0
    (out / cli.MANIFEST).unlink()  # as a second run sees the folder before the first records its manifest
    part = out / "part-00000.safetensors"
    before = part.read_bytes()
    capsys.readouterr()
    assert _encode(*args) == 2
    err = capsys.readouterr().err
    assert "written with other settings" in err and "damaged" not in err
    assert part.read_bytes() == before and not part.with_name(part.name + ".damaged").exists()


@pytest.mark.parametrize("layout", ["per-image", "packed"])
def test_outputs_respect_the_umask(model_dir, tmp_path, layout):
    images, out = _images(tmp_path / "images", ["a.png", "sub/b.png"]), tmp_path / "out"
    old = os.umask(0o022)
    try:
        assert _encode("--model", model_dir, "--out", out, images, "--format", layout) == 0
    finally:
        os.umask(old)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {cli.MANIFEST}
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}
    folders = [out, *(p for p in out.rglob("*") if p.is_dir())]
    assert {oct(p.stat().st_mode & 0o777) for p in folders} == {"0o755"}


def test_previews_in_an_output_folder_inside_the_input_are_not_encoded(model_dir, tmp_path, capsys):
    photos = _images(tmp_path / "photos", ["a.png", "b.png"])
    out = photos / "feats"
    assert _encode("--model", model_dir, "--out", out, photos, "--preview") == 0
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".json") == [
        "a.pca.png", "a.safetensors", "b.pca.png", "b.safetensors",
    ]  # fmt: skip
    capsys.readouterr()
    assert _encode("--model", model_dir, "--out", out, photos, "--preview") == 0
    assert "nothing left to encode" in capsys.readouterr().err
    assert not (out / "feats").exists()
    (out / "c.png").write_bytes((photos / "a.png").read_bytes())  # a user's own image there is encoded
    assert _encode("--model", model_dir, "--out", out, photos, "--preview") == 0
    assert (out / "feats" / "c.safetensors").exists()


def test_preview_added_on_a_rerun_pictures_what_was_encoded_without_it(model_dir, tmp_path, capsys):
    photos = _images(tmp_path / "photos", ["a.png", "b.png"])
    out, packed = tmp_path / "out", tmp_path / "packed"
    assert _encode("--model", model_dir, "--out", out, photos / "a.png") == 0
    assert _encode("--model", model_dir, "--out", out, photos, "--preview") == 0
    assert sorted(p.name for p in out.glob("*.pca.png")) == ["a.pca.png", "b.pca.png"]
    assert _encode("--model", model_dir, "--out", packed, photos / "a.png", "--format", "packed") == 0
    capsys.readouterr()
    assert _encode("--model", model_dir, "--out", packed, photos, "--format", "packed", "--preview") == 0
    err = capsys.readouterr().err
    assert "1 image encoded earlier without --preview has no preview" in err
    assert [p.name for p in packed.glob("*.pca.png")] == ["b.pca.png"]  # a is not stored twice
