"""``packvit encode`` end to end: a folder with a corrupt file, token-budget batches, resume, packed output."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

import packvit_native as pv
from packvit_native.cli import find_images, main

SIZES = {"a.png": (40, 60), "sub/b.jpg": (33, 17), "c.png": (8, 8), "sub/deeper/d.bmp": (24, 24)}


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for name, (h, w) in SIZES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / name)
    (root / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (root / "notes.txt").write_text("not an image, and not named like one")
    return root


def _encode(*args) -> int:
    return main(["encode", *map(str, args), "--device", "cpu", "--workers", "2"])


def test_encode_folder_reports_corrupt_file_and_resumes(tiny_reference, folder, tmp_path, capsys):
    src = tiny_reference("dinov3", "gelu")
    out = tmp_path / "features"
    # a budget of 100 tokens splits the four images over several batches
    assert _encode("--model", src, "--out", out, folder, "--max-tokens", 100) == 1
    err = capsys.readouterr().err
    assert "broken.jpg" in err and "unreadable" in err
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.safetensors"))
    assert written == ["a.safetensors", "c.safetensors", "sub/b.safetensors", "sub/deeper/d.safetensors"]
    assert not list(out.rglob("*.tmp"))

    model = pv.from_pretrained(src)
    for name in SIZES:
        stored = load_file(out / f"{name.rsplit('.', 1)[0]}.safetensors")
        patches, grid = pv.preprocess(folder / name, model)
        with torch.no_grad():
            want = model(patches, grid)
        assert torch.equal(stored["grid_thw"], grid)
        torch.testing.assert_close(stored["features"], want, rtol=0, atol=1e-5)

    # resume: nothing is rewritten, and the run says so
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    (out / "c.safetensors").unlink()
    assert _encode("--model", src, "--out", out, folder, "--max-tokens", 100) == 1
    err = capsys.readouterr().err
    assert "skipping 3 of 5 images, already in" in err and "encoded 1 image (" in err
    for p, t in mtimes.items():
        if p.name != "c.safetensors":
            assert p.stat().st_mtime_ns == t
    assert (out / "c.safetensors").is_file()

    # other settings into the same folder are refused, not mixed in
    assert _encode("--model", src, "--out", out, folder, "--layers=-2") == 2
    assert "other settings" in capsys.readouterr().err


def test_encode_packed_layers_and_prefix(tiny_reference, folder, tmp_path, capsys):
    src = tiny_reference("dinov3", "gelu")
    out = tmp_path / "packed"
    inputs = [folder / "a.png", folder / "sub", folder / "c.png"]
    args = ["--model", src, "--out", out, *inputs, "--format", "packed", "--layers=-2,-1", "--prefix"]
    assert _encode(*args, "--max-tokens", 50, "--merge-size", "2", "--max-patches", "24") == 0
    parts = sorted(out.glob("part-*.safetensors"))
    assert len(parts) >= 2
    names, features, grids, prefixes = [], [], [], []
    for part in parts:
        with safe_open(part, "pt") as f:
            names += json.loads(f.metadata()["names"])
        t = load_file(part)
        assert set(t) == {"grid_thw", "features.-2", "features.-1", "prefix.-2", "prefix.-1"}
        features.append(t["features.-2"])
        grids.append(t["grid_thw"])
        prefixes.append(t["prefix.-2"])
    assert names == ["a", "b", "deeper/d", "c"]

    model = pv.from_pretrained(src, merge_size=2)
    patches, grid = pv.preprocess(
        [folder / n for n in ("a.png", "sub/b.jpg", "sub/deeper/d.bmp", "c.png")], model, max_patches=24
    )
    with torch.no_grad():
        want = model(patches, grid, output_layers=-2, return_dict=True, return_prefix=True)
    packing = want.packing
    assert torch.equal(torch.cat(grids), grid)
    torch.testing.assert_close(torch.cat(features), packing.patch_tokens(want.layers[0]), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat(prefixes), packing.prefix_tokens(want.layers[0]), rtol=0, atol=1e-5)

    # a rerun finds every name in the parts' metadata
    assert _encode(*args, "--max-tokens", 50, "--merge-size", "2", "--max-patches", "24") == 0
    assert "nothing left to encode" in capsys.readouterr().err
    assert sorted(out.glob("part-*.safetensors")) == parts


def test_input_errors(tmp_path, folder, capsys):
    with pytest.raises(ValueError, match="no such file"):
        find_images([tmp_path / "missing"])
    (tmp_path / "a.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="same name"):
        find_images([folder, tmp_path / "a.jpg"])
    assert _encode("--model", tmp_path / "nowhere", "--out", tmp_path / "o", folder) == 2
    assert "error" in capsys.readouterr().err


def test_folders_are_searched_through_links_and_outputs_of_other_runs_left_out(folder, tmp_path):
    elsewhere = tmp_path / "disk2" / "2023"
    elsewhere.mkdir(parents=True)
    (elsewhere / "e.png").write_bytes((folder / "a.png").read_bytes())
    (folder / "2023").symlink_to(elsewhere, target_is_directory=True)
    (elsewhere / "loop").symlink_to(folder, target_is_directory=True)  # back to a folder it lies in
    other_run = folder / "feats_other"  # another run's output, previews and all
    (other_run / "sub").mkdir(parents=True)
    (other_run / "packvit-encode.json").write_text("{}")
    (other_run / "sub" / "a.pca.png").write_bytes((folder / "a.png").read_bytes())
    (folder / "mine.pca.png").write_bytes((folder / "a.png").read_bytes())  # a user's image, named so
    names = sorted(item.name for item in find_images([folder], out=tmp_path / "feats"))
    assert names == ["2023/e", "a", "broken", "c", "mine.pca", "sub/b", "sub/deeper/d"]


def test_a_folder_that_cannot_be_listed_stops_the_search(folder, monkeypatch):
    # As an unreadable folder does for a user who is not root (root lists every folder).
    scandir = os.scandir

    def refused(path):
        if Path(path).name == "deeper":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refused)
    with pytest.raises(ValueError, match=r"deeper: cannot list this folder \(Permission denied"):
        find_images([folder])


def test_settings_given_from_python_are_checked_as_the_command_line_checks_them():
    from packvit_native.cli import encode_args

    args = encode_args(
        size=(224, 224), keep_columns="a,b", layers=-2, gpus_per_worker=0.5, max_decoded_pixels=None
    )
    assert (args.size, args.keep_columns, args.layers, args.gpus_per_worker) == (
        [224, 224],
        ["a", "b"],
        [-2],
        0.5,
    )
    assert args.max_decoded_pixels is None  # None leaves an option unset: here, no limit
    refused = {
        "size": (224, "a pair of integers"), "min_pixels": ("1000", "an integer"), "gpus_per_worker": ("1", "a number"),
        "layers": (True, "an int or a list of ints"), "max_tokens": (0, "a positive integer"),
        "tokens": (1, "True or False"), "resample": ("nearest", "one of 'bilinear', 'bicubic'"),
        "keep_columns": ([1], "a list of column names"),
    }  # fmt: skip
    for name, (value, message) in refused.items():
        with pytest.raises(ValueError, match=f"{name} must be {message}"):
            encode_args(**{name: value})
    with pytest.raises(TypeError, match="unknown encode settings: bogus"):
        encode_args(bogus=1)
    # the command line's own text, and numpy scalars, as a caller computing them passes them
    args = encode_args(
        layers="-2,-1", keep_columns="a,", max_tokens=np.int64(512), gpus_per_worker=np.float32(0.5)
    )
    assert (args.layers, args.keep_columns, args.max_tokens, args.gpus_per_worker) == (
        [-2, -1],
        ["a"],
        512,
        0.5,
    )


def test_an_image_that_is_a_link_repointed_is_encoded_again(tiny_reference, tmp_path, capsys):
    """A folder of links into a store (git-annex, DVC): a link re-pointed to a new version is that image,
    changed, not another image of the same name."""
    src, out, folder, store = (
        tiny_reference("dinov3", "gelu"),
        tmp_path / "out",
        tmp_path / "images",
        tmp_path / "store",
    )
    folder.mkdir()
    store.mkdir()
    for version, value in (("v1", 90), ("v2", 30)):
        Image.fromarray(np.full((20, 28, 3), value, np.uint8)).save(store / f"{version}.png")
    (folder / "cat.png").symlink_to(store / "v1.png")
    assert _encode("--model", src, "--out", out, folder) == 0
    (folder / "cat.png").unlink()
    (folder / "cat.png").symlink_to(store / "v2.png")
    capsys.readouterr()
    assert _encode("--model", src, "--out", out, folder) == 0
    assert (
        "cat.png changed since cat.safetensors was made from it; encoding it again" in capsys.readouterr().err
    )


def test_graphs_need_a_cuda_device(tiny_reference, folder, tmp_path, capsys):
    out = tmp_path / "features"
    assert _encode("--model", tiny_reference("dinov3", "gelu"), "--out", out, folder, "--graphs") == 2
    assert "--graphs replays CUDA graphs; it needs a CUDA device, not cpu" in capsys.readouterr().err
    assert not list(out.glob("**/*.safetensors"))


def test_interrupted_run_leaves_whole_files_and_resumes(
    tiny_reference, folder, tmp_path, break_second_token_write, capsys
):

    src = tiny_reference("dinov3", "gelu")
    out = tmp_path / "features"
    break_second_token_write(KeyboardInterrupt())  # half a file, then the user presses Ctrl-C
    capsys.readouterr()
    assert _encode("--model", src, "--out", out, folder, "--max-tokens", 1) == 130
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "packvit encode: interrupted; run the same command again to resume"
    assert "Traceback" not in err
    assert len(list(out.rglob("*.safetensors"))) == 1
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]
    break_second_token_write(None)
    assert _encode("--model", src, "--out", out, folder) == 1  # broken.jpg is still unreadable
    assert "skipping 1 of 5 images, already in" in capsys.readouterr().err
    assert len(list(out.rglob("*.safetensors"))) == len(SIZES)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (["--layers=99"], "out of range"),
        (["--attn-backend", "bogus"], "unknown attention backend 'bogus'"),
        (["--attn-backend", "fa4"], "needs a CUDA GPU"),
    ],
)
def test_bad_options_fail_before_anything_is_written(tiny_reference, folder, tmp_path, capsys, bad, message):
    if torch.cuda.is_available() and bad[-1] == "fa4":
        pytest.skip("fa4 may be installed on a GPU machine")
    src, out = tiny_reference("dinov3", "gelu"), tmp_path / "features"
    assert _encode("--model", src, "--out", out, folder / "a.png", *bad) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir()), "a failed start leaves no manifest or features"
    # corrected options are not refused as "other settings"
    assert _encode("--model", src, "--out", out, folder / "a.png") == 0


def test_fp8_is_a_setting_of_the_folder(tiny_reference, folder, tmp_path, capsys):
    src, out = tiny_reference("dinov3", "gelu"), tmp_path / "features"
    assert _encode("--model", src, "--out", out, folder / "a.png", "--fp8", "--dtype", "float32") == 2
    assert "--fp8 runs the layers it leaves unquantized in bfloat16" in capsys.readouterr().err
    code = _encode("--model", src, "--out", out, folder / "a.png", "--fp8")
    err = capsys.readouterr().err
    if code == 2:  # no FP8 matmuls on this machine: refused at load, saying why, before anything is written
        assert "precision='fp8' cannot run on cpu" in err and not list(out.rglob("*.safetensors"))
        pytest.skip(f"FP8 does not run here: {err.strip()}")
    assert code == 0, err
    settings = json.loads((out / "packvit-encode.json").read_text())["settings"]
    assert settings["precision"] == "fp8" and settings["dtype"] == "bfloat16"
    assert load_file(out / "a.safetensors")["features"].dtype == torch.bfloat16
    # features made without FP8 would differ: such a rerun into the folder is refused
    assert _encode("--model", src, "--out", out, folder / "c.png", "--dtype", "bfloat16") == 2
    assert "differing: precision" in capsys.readouterr().err


def test_local_run_hands_the_interpreter_over_often_and_restores_it(
    tiny_reference, folder, tmp_path, monkeypatch
):
    import sys

    from packvit_native import cli

    seen = []
    run_files = cli._encode_files

    def observed(args):
        seen.append(sys.getswitchinterval())
        return run_files(args)

    monkeypatch.setattr(cli, "_encode_files", observed)
    before = sys.getswitchinterval()
    assert before != cli.SWITCH_INTERVAL_S
    assert _encode("--model", tiny_reference("dinov3", "gelu"), "--out", tmp_path / "f", folder) == 1
    assert seen == [cli.SWITCH_INTERVAL_S]
    assert sys.getswitchinterval() == before
    # and restored when the run fails
    assert _encode("--model", tmp_path / "missing", "--out", tmp_path / "g", folder) == 2
    assert len(seen) == 2 and sys.getswitchinterval() == before  # the failure came inside the run


def test_an_unexpected_failure_exits_2_not_1(tiny_reference, folder, tmp_path, monkeypatch, capsys):
    from packvit_native import cli

    def defect(args):
        raise RuntimeError("a defect")

    monkeypatch.setattr(cli, "_encode_files", defect)
    assert _encode("--model", tiny_reference("dinov3", "gelu"), "--out", tmp_path / "f", folder) == 2
    err = capsys.readouterr().err
    assert "RuntimeError: a defect" in err and "packvit encode: error: unexpected failure" in err


@pytest.mark.parametrize("layout", ["files", "packed"])
def test_a_file_name_that_is_not_utf8_is_encoded_and_resumed(tiny_reference, tmp_path, capsys, layout):
    """Linux file names are bytes: one that is not UTF-8 reaches Python with surrogates, which no safetensors
    header can hold; its output is written (the source kept with the odd bytes escaped) and read back."""
    images = tmp_path / "images"
    images.mkdir()
    name = os.fsdecode(b"caf\xe9")
    Image.fromarray(np.full((20, 28, 3), 90, np.uint8)).save(images / f"{name}.png")
    src, out = tiny_reference("dinov3", "gelu"), tmp_path / "out"
    fmt = ["--format", "packed"] if layout == "packed" else []
    assert _encode("--model", src, "--out", out, images, *fmt) == 0
    [written] = out.glob("*.safetensors")
    with safe_open(written, "pt") as f:
        meta = f.metadata()
        assert f.get_tensor("grid_thw").shape == (1, 3)
    if layout == "files":
        assert written.name == "caf\\xe9.safetensors" and meta["source"].endswith("caf\\xe9.png")
    else:
        assert json.loads(meta["names"]) == ["caf\\xe9"]
    capsys.readouterr()
    assert _encode("--model", src, "--out", out, images, *fmt) == 0
    assert "already in" in capsys.readouterr().err


def test_an_image_named_near_the_file_name_limit_is_stored_under_a_shortened_name(
    tiny_reference, tmp_path, capsys
):
    images = tmp_path / "images" / "sub"
    images.mkdir(parents=True)
    stem = "写真" * 41  # 246 bytes: with ".safetensors" over the 255 a file name may hold
    Image.fromarray(np.full((20, 28, 3), 90, np.uint8)).save(images / f"{stem}.png")
    Image.fromarray(np.full((20, 28, 3), 40, np.uint8)).save(images / "z.png")
    src, out = tiny_reference("dinov3", "gelu"), tmp_path / "out"
    assert _encode("--model", src, "--out", out, images.parent, "--preview") == 0
    names = {p.name for p in (out / "sub").iterdir()} - {"z.safetensors", "z.pca.png"}
    short = f"{stem[:71]}~"  # the start that fits (213 of 214 bytes), then a hash of the whole name
    assert len(names) == 2 and all(n.startswith(short) and len(n.encode()) <= 255 for n in names)
    (features,) = (n for n in names if n.endswith(".safetensors"))
    with safe_open(out / "sub" / features, "pt") as f:
        assert f.metadata()["source"] == str(images / f"{stem}.png")
    capsys.readouterr()
    assert _encode("--model", src, "--out", out, images.parent, "--preview") == 0
    assert "skipping 2 of 2 images" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["files", "packed"])
def test_a_changed_image_or_another_of_the_same_name_is_not_taken_for_the_encoded_one(
    tiny_reference, tmp_path, capsys, layout, monkeypatch
):
    src, out = tiny_reference("dinov3", "gelu"), tmp_path / "out"
    fmt = ["--format", "packed"] if layout == "packed" else []
    day1, day2, moved = tmp_path / "day1", tmp_path / "day2", tmp_path / "moved"
    for folder, value in ((day1, 90), (day2, 30)):
        folder.mkdir()
        Image.fromarray(np.full((20, 28, 3), value, np.uint8)).save(folder / "IMG_1.png")
    assert _encode("--model", src, "--out", out, day1, *fmt) == 0
    before = sorted((p.name, p.read_bytes()) for p in out.glob("*.safetensors"))
    capsys.readouterr()
    assert _encode("--model", src, "--out", out, day2, *fmt) == 2  # another image of that name: refused
    err = capsys.readouterr().err
    assert (
        f"holds the features of {day1 / 'IMG_1.png'}, a different image stored under the name 'IMG_1'" in err
    )
    assert sorted((p.name, p.read_bytes()) for p in out.glob("*.safetensors")) == before
    moved.mkdir()
    (moved / "IMG_1.png").write_bytes((day1 / "IMG_1.png").read_bytes())  # a copy elsewhere: done
    assert _encode("--model", src, "--out", out, moved, *fmt) == 0
    assert "skipping 1 of 1 image" in capsys.readouterr().err
    Image.fromarray(np.full((24, 28, 3), 200, np.uint8)).save(
        day1 / "IMG_1.png"
    )  # replaced by another picture
    assert _encode("--model", src, "--out", out, day1, *fmt) == 0
    err = capsys.readouterr().err
    if layout == "files":
        assert "IMG_1.png changed since IMG_1.safetensors was made from it; encoding it again" in err
        grid = load_file(out / "IMG_1.safetensors")["grid_thw"]
        assert grid.tolist() == [[1, 6, 7]]  # 24 x 28 px, where it was 20 x 28
    else:  # parts are never rewritten: the change is reported
        assert "1 image changed since encoded into packed parts" in err
        assert sorted((p.name, p.read_bytes()) for p in out.glob("*.safetensors")) == before
    # changed again, and the folder given by a relative path this time: still the same image's file
    Image.fromarray(np.full((28, 28, 3), 10, np.uint8)).save(day1 / "IMG_1.png")
    monkeypatch.chdir(tmp_path)
    assert _encode("--model", src, "--out", out, "day1", *fmt) == 0


def test_a_file_of_someone_elses_named_like_an_output_is_never_replaced(tiny_reference, tmp_path, capsys):
    """Encoding a folder into itself: model.png beside model.safetensors (a model's weights, say)."""
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((20, 28, 3), 90, np.uint8)).save(images / "model.png")
    weights = {"encoder.weight": torch.randn(4, 4)}
    from safetensors.torch import save_file

    save_file(weights, images / "model.safetensors", metadata={"format": "pt"})
    before = (images / "model.safetensors").read_bytes()
    src = tiny_reference("dinov3", "gelu")
    assert _encode("--model", src, "--out", images, images) == 2
    assert "model.safetensors is not an output of packvit encode" in capsys.readouterr().err
    assert (images / "model.safetensors").read_bytes() == before
    (images / "part-00000.safetensors").write_bytes(before)
    (images / "model.safetensors").unlink()
    assert _encode("--model", src, "--out", images, images, "--format", "packed") == 2
    assert "it is not an output of packvit encode" in capsys.readouterr().err
    assert (images / "part-00000.safetensors").read_bytes() == before


def test_a_packed_name_stored_with_surrogates_by_earlier_versions_counts_as_done(
    tiny_reference, tmp_path, capsys
):
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((20, 28, 3), 90, np.uint8)).save(images / (os.fsdecode(b"caf\xe9") + ".png"))
    src, out = tiny_reference("dinov3", "gelu"), tmp_path / "out"
    assert _encode("--model", src, "--out", out, images, "--format", "packed") == 0
    [part] = out.glob("part-*.safetensors")
    tensors = {k: v.clone() for k, v in load_file(part).items()}  # cloned: the file is rewritten below
    with safe_open(part, "pt") as f:
        meta = f.metadata()
    from safetensors.torch import save_file

    # what earlier versions wrote: the name as Python decoded it, escaped by json.dumps
    save_file(tensors, part, metadata=meta | {"names": json.dumps([os.fsdecode(b"caf\xe9")])})
    capsys.readouterr()
    assert _encode("--model", src, "--out", out, images, "--format", "packed") == 0
    assert "skipping 1 of 1 image" in capsys.readouterr().err
    assert list(out.glob("part-*.safetensors")) == [part]
