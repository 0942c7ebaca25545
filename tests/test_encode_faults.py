"""``packvit encode`` under faults: a full disk, a read-only --out, a corrupt --model, Ctrl-C (injected and a real
SIGINT), temp files of a killed run, a decompression bomb; and the polish of its messages and options.

Fatal errors exit 2 with one ``packvit encode: error: ...`` line and keep what was written; an interrupt exits
130; exit 1 stays "some images were unreadable, the rest encoded".
"""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from safetensors.torch import load_file

import packvit_native as pv
import packvit_native.cli as cli
from packvit_native import atomic
from packvit_native.preprocess import MAX_DECODED_PIXELS, load_image


def _images(root: Path, n: int, stem: str = "img", size=(24, 40)) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / f"{stem}{i:03d}.png")
    return root


@pytest.fixture
def model_dir(tiny_reference, tmp_path):
    """A converted (our format) tiny DINOv3."""
    return pv.from_pretrained(tiny_reference("dinov3", "gelu")).save_pretrained(tmp_path / "model")


def _encode(*args) -> int:
    return cli.main(["encode", *map(str, args), "--device", "cpu", "--workers", "2"])


def _errors(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("packvit encode: error:")]


def _leftovers(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.startswith(".")]


def _dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(done.stdout)


def test_full_disk_is_one_line_exit_2_and_keeps_what_was_written(
    model_dir, tmp_path, break_second_token_write, capsys
):
    images, out = _images(tmp_path / "images", 3), tmp_path / "out"
    break_second_token_write(OSError(errno.ENOSPC, "No space left on device"))
    assert _encode("--model", model_dir, "--out", out, images, "--max-tokens", 1) == 2
    [line] = _errors(capsys.readouterr().err)
    assert "img001.safetensors" in line and "No space left on device" in line and "rerun" in line
    assert [p.name for p in out.glob("*.safetensors")] == ["img000.safetensors"]
    assert not _leftovers(out)
    break_second_token_write(None)
    assert _encode("--model", model_dir, "--out", out, images) == 0
    assert "skipping 1 of 3 images" in capsys.readouterr().err
    assert len(list(out.glob("*.safetensors"))) == 3


@pytest.mark.parametrize("how", ["erofs", "chmod"])
def test_read_only_out_is_refused_before_the_model_is_loaded(model_dir, tmp_path, monkeypatch, capsys, how):
    images, out = _images(tmp_path / "images", 1), tmp_path / "ro"
    out.mkdir()
    if how == "chmod":
        if os.geteuid() == 0:
            pytest.skip("root writes into a 0555 folder anyway; the erofs case covers this")
        out.chmod(0o555)
    else:  # a read-only file system: every create under out fails with EROFS
        real_open = os.open

        def read_only_open(path, flags, *args, **kwargs):
            creates = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            if creates and os.path.abspath(path).startswith(str(out) + os.sep):
                raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", read_only_open)
    try:
        # a missing model shows the order: --out is refused first, before any model is looked for
        assert _encode("--model", tmp_path / "no-model", "--out", out, images) == 2
        [line] = _errors(capsys.readouterr().err)
        assert f"cannot write into --out {out}" in line
        assert _encode("--model", model_dir, "--out", out, images) == 2
        [line] = _errors(capsys.readouterr().err)
        assert f"cannot write into --out {out}" in line
        assert ("Read-only file system" if how == "erofs" else "Permission denied") in line
        assert not list(out.iterdir())
    finally:
        out.chmod(0o755)


@pytest.mark.parametrize("damage", [b"", b"garbage, not a safetensors file" * 10])
def test_corrupt_model_is_one_line_exit_2(model_dir, tmp_path, capsys, damage):
    (model_dir / "model.safetensors").write_bytes(damage)
    images, out = _images(tmp_path / "images", 1), tmp_path / "out"
    assert _encode("--model", model_dir, "--out", out, images) == 2
    [line] = _errors(capsys.readouterr().err)
    assert str(model_dir) in line or "model.safetensors" in line
    assert not list(out.iterdir()), "nothing written, not even the manifest"


SLOW_ENCODE = """
import sys, time
import packvit_native.cli as cli
real_write = cli.atomic.write_file
def slow_write(path, write, **kwargs):
    def slowly(tmp):
        with open(tmp, "wb") as f:  # a half-written temp file is on disk while the signal comes
            f.write(b"partial")
        time.sleep(0.3)
        write(tmp)
    real_write(path, slowly if path.suffix == ".safetensors" else write, **kwargs)
cli.atomic.write_file = slow_write
sys.exit(cli.main(sys.argv[1:]))
"""


def test_real_sigint_exits_130_without_traceback_or_temp_files(model_dir, tmp_path):
    images, out = _images(tmp_path / "images", 20), tmp_path / "out"
    command = [sys.executable, "-c", SLOW_ENCODE, "encode", "--model", str(model_dir), "--out", str(out)]
    proc = subprocess.Popen(
        [*command, str(images), "--max-tokens", "1", "--device", "cpu"], stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not list(out.glob("*.safetensors")):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.1)  # inside the next (slow) write
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.splitlines()[-1] == "packvit encode: interrupted; run the same command again to resume"
    assert "Traceback" not in err
    assert not _leftovers(out)
    written = list(out.glob("*.safetensors"))
    assert 1 <= len(written) < 20
    for path in written:
        load_file(path)  # whole files only


def test_temp_files_of_a_killed_run_are_removed(model_dir, tmp_path, capsys):
    images, out = _images(tmp_path / "images" / "sub", 2).parent, tmp_path / "out"
    dead, host = _dead_pid(), atomic._host()
    stale = [
        out / f".img000.safetensors.{host}.{dead}.abcd1234.tmp",
        out / "sub" / f".img001.safetensors.{host}.{dead}.abcd1234.tmp",
    ]
    live = out / f".img000.safetensors.{host}.{os.getpid()}.abcd1234.tmp"  # a concurrent run's: kept
    for path in [*stale, live]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
    assert _encode("--model", model_dir, "--out", out, images) == 0
    assert "removed 2 temporary files left by an interrupted run" in capsys.readouterr().err
    assert not any(p.exists() for p in stale) and live.exists()


def _bomb(path: Path) -> Path:
    """A 12 KB PNG declaring 10000 x 10000 pixels (300 MB as RGB once decoded)."""
    Image.new("1", (10_000, 10_000)).save(path)
    return path


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own, at open
def test_load_image_checks_the_declared_size_before_decoding(tmp_path, monkeypatch):
    bomb = _bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 300_000 and MAX_DECODED_PIXELS < 10_000 * 10_000

    def no_decoding(self):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ValueError, match=rf"bomb\.png.*10000x10000.*limit of {MAX_DECODED_PIXELS}"):
        load_image(bomb)
    monkeypatch.undo()
    small = tmp_path / "small.png"
    Image.new("RGB", (100, 50)).save(small)
    assert load_image(small, max_decoded_pixels=5000).size == (100, 50)
    with pytest.raises(ValueError, match="limit of 4999"):
        load_image(small, max_decoded_pixels=4999)


def test_encode_reports_a_decompression_bomb_as_unreadable_and_goes_on(model_dir, tmp_path, capsys):
    images, out = _images(tmp_path / "images", 2, size=(40, 60)), tmp_path / "out"
    _bomb(images / "bomb.png")
    assert _encode("--model", model_dir, "--out", out, images) == 1
    err = capsys.readouterr().err
    assert "bomb.png" in err and f"limit of {MAX_DECODED_PIXELS}" in err and "1 image unreadable" in err
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["img000.safetensors", "img001.safetensors"]
    # the limit is adjustable: 40 x 60 = 2400 pixels is over 2000
    assert _encode("--model", model_dir, "--out", tmp_path / "o2", images, "--max-decoded-pixels", 2000) == 1
    assert "limit of 2000" in capsys.readouterr().err
    assert not list((tmp_path / "o2").glob("*.safetensors"))


def test_no_images_found_is_an_error(model_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("not an image")
    assert _encode("--model", model_dir, "--out", tmp_path / "out", empty) == 2
    [line] = _errors(capsys.readouterr().err)
    assert f"no images found in {empty}" in line


def test_summary_counts_patch_tokens_in_the_singular_too(model_dir, tmp_path, capsys):
    images, out = _images(tmp_path / "images", 1, size=(32, 48)), tmp_path / "out"
    assert _encode("--model", model_dir, "--out", out, images) == 0
    grid = load_file(out / "img000.safetensors")["grid_thw"]
    tokens = int(grid.prod())
    assert f"encoded 1 image ({tokens} patch tokens) in" in capsys.readouterr().err


def test_no_arguments_prints_the_help(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: packvit") and "encode" in err


@pytest.mark.parametrize(
    "bad", [["--max-tokens", "0"], ["--workers", "0"], ["--workers", "four"], ["--max-decoded-pixels", "-1"]]
)
def test_bad_numbers_are_rejected_by_the_parser(tmp_path, capsys, bad):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["encode", "--model", "m", "--out", str(tmp_path / "o"), str(tmp_path), *bad])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{bad[0]}: must be a positive integer, got '{bad[1]}'" in err
