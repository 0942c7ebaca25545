"""Several ``packvit encode`` runs into one --out at once (e.g. one per GPU, each over its share of the inputs):
no run may replace another's output."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import packvit_native as pv
import packvit_native.cli as cli
from packvit_native import atomic


def _images(root: Path, stem: str, n: int) -> Path:
    rng = np.random.default_rng(len(stem))
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = 16 * int(rng.integers(1, 4)), 16 * int(rng.integers(1, 4))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{stem}{i:02d}.png")
    return root


def _parts(out: Path) -> dict[str, torch.Tensor]:
    """Every image's features across all parts; an image stored twice fails."""
    features: dict[str, torch.Tensor] = {}
    for part in sorted(out.glob("part-*.safetensors")):
        with safe_open(part, "pt") as f:
            names = json.loads(f.metadata()["names"])
        tensors = load_file(part)
        rows = tensors["grid_thw"].prod(1).tolist()
        for name, chunk in zip(names, tensors["features"].split(rows), strict=True):
            assert name not in features, f"{name} stored twice"
            features[name] = chunk.clone()
    return features


def test_concurrent_packed_runs_never_overwrite_each_other(tiny_reference, tmp_path):
    model_dir = pv.from_pretrained(tiny_reference("dinov3", "gelu")).save_pretrained(tmp_path / "model")
    shares = [_images(tmp_path / "share-a", "a", 8), _images(tmp_path / "share-b", "b", 8)]
    out = tmp_path / "out"
    command = [sys.executable, "-m", "packvit_native.cli", "encode", "--model", str(model_dir), "--out"]
    options = ["--format", "packed", "--max-tokens", "1", "--device", "cpu"]  # one image per part
    runs = [
        subprocess.Popen([*command, str(out), str(share), *options], stderr=subprocess.PIPE, text=True)
        for share in shares
    ]
    for run in runs:
        _, err = run.communicate(timeout=300)
        assert run.returncode == 0, err
        assert "encoded 8 images" in err
    features = _parts(out)
    assert sorted(features) == sorted([f"a{i:02d}" for i in range(8)] + [f"b{i:02d}" for i in range(8)])
    assert not [p for p in out.iterdir() if p.name.startswith(".")]

    model = pv.from_pretrained(model_dir)
    for share in shares:
        for path in sorted(share.iterdir()):
            patches, grid = pv.preprocess(path, model)
            with torch.no_grad():
                want = model(patches, grid)
            torch.testing.assert_close(features[path.stem], want, rtol=0, atol=1e-5)


def test_a_part_number_claimed_meanwhile_is_left_alone(tiny_reference, tmp_path, monkeypatch, capsys):
    """Deterministic form of the race above: another run claims part-00000 after this run's scan and before its
    first write; this run must store its batch under the next number."""
    model_dir = pv.from_pretrained(tiny_reference("dinov3", "gelu")).save_pretrained(tmp_path / "model")
    images, out = _images(tmp_path / "images", "x", 2), tmp_path / "out"
    real_write, claimed = cli.write_tensors, []

    def another_run_claims_first(file, tensors, metadata=None):
        if not claimed:
            theirs = {"grid_thw": torch.tensor([[1, 1, 1]]), "features": torch.zeros(1, 32)}
            save_file(theirs, out / "part-00000.safetensors", metadata={"names": '["theirs"]'})
            claimed.append(True)
        return real_write(file, tensors, metadata)

    monkeypatch.setattr(cli, "write_tensors", another_run_claims_first)
    args = ["encode", "--model", str(model_dir), "--out", str(out), str(images), "--format", "packed"]
    assert cli.main([*args, "--max-tokens", "1", "--device", "cpu"]) == 0
    with safe_open(out / "part-00000.safetensors", "pt") as f:
        assert json.loads(f.metadata()["names"]) == ["theirs"]
    assert sorted(_parts(out)) == ["theirs", "x00", "x01"]


def test_a_claim_marker_left_by_a_killed_run_stops_the_run_saying_what_to_do(
    tiny_reference, tmp_path, monkeypatch, capsys
):
    """On a file system without hard links the manifest is claimed through a marker; a run killed in that
    moment leaves it, and a later run must not go on without a manifest (which would let other settings mix
    into the folder)."""

    def no_hard_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_hard_links)
    monkeypatch.setattr(cli, "MANIFEST_CLAIM_TRIES", 2)
    model_dir = pv.from_pretrained(tiny_reference("dinov3", "gelu")).save_pretrained(tmp_path / "model")
    images, out = _images(tmp_path / "images", "x", 2), tmp_path / "out"
    out.mkdir()
    marker = atomic.claim_marker(out / cli.MANIFEST)
    marker.touch()
    args = ["encode", "--model", str(model_dir), "--out", str(out), str(images), "--device", "cpu"]
    assert cli.main(args) == 2
    assert f"{marker} stays, left by a run killed while claiming it" in capsys.readouterr().err
    assert not (out / cli.MANIFEST).exists()
    marker.unlink()
    assert cli.main(args) == 0 and (out / cli.MANIFEST).is_file()
    assert cli.main([*args, "--dtype", "bfloat16"]) == 2  # and the manifest guards the folder again
    assert "other settings" in capsys.readouterr().err


def test_a_dangling_manifest_link_is_named_not_blamed_on_a_marker(
    tiny_reference, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(cli, "MANIFEST_CLAIM_TRIES", 2)
    model_dir = pv.from_pretrained(tiny_reference("dinov3", "gelu")).save_pretrained(tmp_path / "model")
    images, out = _images(tmp_path / "images", "x", 1), tmp_path / "out"
    out.mkdir()
    (out / cli.MANIFEST).symlink_to(tmp_path / "gone.json")
    args = ["encode", "--model", str(model_dir), "--out", str(out), str(images), "--device", "cpu"]
    assert cli.main(args) == 2
    assert f"{out / cli.MANIFEST} exists but cannot be read" in capsys.readouterr().err
