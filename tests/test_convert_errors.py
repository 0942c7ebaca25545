"""Every broken input ends in one line naming the file (``packvit-convert: error: <file>: <problem>``, exit 2)
and, from Python, in a CheckpointError naming the file; nothing is written and nothing hangs."""

import argparse
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import packvit_native as pv
from packvit_native.io import CheckpointWriteError
from weights_convert import convert_checkpoint
from weights_convert.cli import main as convert_cli

ROOT = Path(__file__).resolve().parents[1]
LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize 421736\n".format("0" * 64)


@contextmanager
def no_hang(seconds: int = 20):
    """Fail instead of hanging: a FIFO opened for reading blocks until a writer appears."""

    def fail(signum, frame):
        raise AssertionError(f"still running after {seconds}s: the input made the reader block")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _weights(d: Path) -> Path:
    return d / "model.safetensors"


def _replace(path: Path, make) -> None:
    path.unlink()
    make(path)


def _config_edit(**changes):
    def edit(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, **changes}))

    return edit


def _retyped(d: Path, key: str, dtype: torch.dtype) -> None:
    state = load_file(_weights(d))
    state[key] = state[key].to(dtype)
    save_file(state, _weights(d))


def _reshaped(d: Path, key: str, edit) -> None:
    state = load_file(_weights(d))
    state[key] = edit(state[key]).clone()
    save_file(state, _weights(d))


def _header_claiming(n: int) -> bytes:
    return struct.pack("<Q", n) + b"{}"


# (name, edit of a copy of a good checkpoint, file the message must name, text the message must hold)
BROKEN_SOURCES = [
    ("truncated", lambda d: _weights(d).write_bytes(_weights(d).read_bytes()[:5000]), "model.safetensors", "not a readable safetensors file"),
    ("zero-byte", lambda d: _weights(d).write_bytes(b""), "model.safetensors", "not a readable safetensors file"),
    ("garbage", lambda d: _weights(d).write_bytes(bytes(range(256)) * 8), "model.safetensors", "not a readable safetensors file"),
    ("huge-header", lambda d: _weights(d).write_bytes(_header_claiming(2**60)), "model.safetensors", "not a readable safetensors file"),
    ("lfs-pointer", lambda d: _weights(d).write_text(LFS_POINTER), "model.safetensors", "Git LFS pointer, not the weights file: fetch the real file (`git lfs pull`"),
    ("weights-dir", lambda d: _replace(_weights(d), Path.mkdir), "model.safetensors", "is a directory"),
    ("weights-fifo", lambda d: _replace(_weights(d), os.mkfifo), "model.safetensors", "not a regular file"),
    ("weights-loop", lambda d: _replace(_weights(d), lambda p: p.symlink_to(p.name)), "model.safetensors", "Too many levels of symbolic links"),
    ("config-list", lambda d: (d / "config.json").write_text("[]"), "config.json", "must hold a JSON object, not list"),
    ("config-null", lambda d: (d / "config.json").write_text("null"), "config.json", "must hold a JSON object, not NoneType"),
    ("config-latin1", lambda d: (d / "config.json").write_bytes('{"model_type": "dinov3_vit", "é": 1}'.encode("latin-1")), "config.json", "is not UTF-8 text"),
    ("config-fifo", lambda d: _replace(d / "config.json", os.mkfifo), "config.json", "not a regular file"),
    ("config-loop", lambda d: _replace(d / "config.json", lambda p: p.symlink_to(p.name)), "config.json", "Too many levels of symbolic links"),
    ("rope-theta-text", _config_edit(rope_theta="fast"), "config.json", "rope_theta = 'fast' is not a finite number"),
    ("eps-nan", _config_edit(layer_norm_eps=float("nan")), "config.json", "layer_norm_eps = nan is not a finite number"),
    ("heads", _config_edit(num_attention_heads=5), "", "config.json describes an invalid dinov3 model: hidden_size 64 is not divisible by num_heads 5"),
    ("mean-per-channel", lambda d: (d / "preprocessor_config.json").write_text('{"image_mean": [0.5, 0.5], "image_std": [0.2, 0.2]}'), "", "image_mean and image_std need one value per channel"),
    ("mean-text", lambda d: (d / "preprocessor_config.json").write_text('{"image_mean": "imagenet"}'), "preprocessor_config.json", "image_mean = 'imagenet' is not a list of finite numbers"),
    ("std-zero", lambda d: (d / "preprocessor_config.json").write_text('{"image_std": [0.2, 0.0, 0.2]}'), "preprocessor_config.json", "image_std = [0.2, 0.0, 0.2] is not a list of positive numbers"),
    ("mean-nan", lambda d: (d / "preprocessor_config.json").write_text('{"image_mean": [0.5, NaN, 0.5]}'), "preprocessor_config.json", "is not a list of finite numbers"),
    ("rescale-zero", lambda d: (d / "preprocessor_config.json").write_text('{"rescale_factor": 0}'), "preprocessor_config.json", "rescale_factor = 0 is not a positive number"),
    ("int8-weight", lambda d: _retyped(d, "layer.0.attention.q_proj.weight", torch.int8), "", "layer.0.attention.q_proj.weight is torch.int8: only float32, bfloat16, float16 and float64 weights are converted"),
    ("fp8-weight", lambda d: _retyped(d, "embeddings.patch_embeddings.weight", torch.float8_e4m3fn), "", "embeddings.patch_embeddings.weight is torch.float8_e4m3fn"),
    ("scalar-token", lambda d: _reshaped(d, "embeddings.cls_token", lambda t: t.flatten()[0]), "", "embeddings.cls_token has shape (): a weight cannot be empty or a scalar"),
    ("empty-bias", lambda d: _reshaped(d, "layer.0.attention.q_proj.bias", lambda t: t[:0]), "", "layer.0.attention.q_proj.bias has shape (0,)"),
]  # fmt: skip


def test_a_checkpoint_of_mixed_dtypes_loads_in_its_main_one(broken):
    src = broken(lambda d: _retyped(d, "layer.0.attention.q_proj.weight", torch.bfloat16))
    model = pv.from_pretrained(src)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model(*model.patchify([torch.rand(3, 16, 24)]))  # one dtype: the forward runs


@pytest.fixture
def broken(tiny_reference, tmp_path):
    """``broken(edit)`` -> a copy of the tiny DINOv3 checkpoint with ``edit`` applied."""

    def make(edit, name="src"):
        d = tmp_path / name
        shutil.copytree(tiny_reference("dinov3", "gelu"), d)
        edit(d)
        return d

    return make


@pytest.mark.parametrize(
    ("name", "edit", "file", "problem"), BROKEN_SOURCES, ids=[c[0] for c in BROKEN_SOURCES]
)
def test_broken_source_is_one_line_naming_the_file(broken, tmp_path, capsys, name, edit, file, problem):
    src = broken(edit)
    with no_hang():
        assert convert_cli([str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"packvit-convert: error: {src / file}"), err
    assert problem in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"], "nothing written"
    with no_hang(), pytest.raises(pv.CheckpointError, match=re.escape(problem)):
        convert_checkpoint(src)
    with no_hang(), pytest.raises(pv.CheckpointError) as info:
        pv.from_pretrained(src)
    assert str(info.value).startswith(str(src / file)) and problem in str(info.value)


def test_config_values_the_encoder_refuses_name_config_json(broken, tmp_path, capsys):
    src = broken(_config_edit(hidden_act="relu6", layerscale_value=0.5))
    assert convert_cli([str(src), str(tmp_path / "out")]) == 2
    assert "unsupported activation 'relu6'" in capsys.readouterr().err


def _shard_index(d: Path, shard: str) -> None:
    state = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    keys = sorted(state)
    save_file({k: state[k] for k in keys[1:]}, d / "model-00001-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in keys[1:]} | {keys[0]: shard}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_shard_index_pointing_outside_is_refused_unread(broken, tmp_path, capsys, where):
    outside = tmp_path / "x.safetensors"
    save_file({"secret": torch.zeros(1)}, outside)
    shard = "../x.safetensors" if where == "parent" else str(outside)
    src = broken(lambda d: _shard_index(d, shard))
    assert convert_cli([str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"names shard {shard!r}; shards must be files in the checkpoint directory itself" in err
    assert not (tmp_path / "out").exists()


def test_two_pickles_are_refused_clearly(broken, tmp_path, capsys):
    def two_bins(d: Path) -> None:
        state = load_file(d / "model.safetensors")
        (d / "model.safetensors").unlink()
        keys = sorted(state)
        torch.save({k: state[k] for k in keys[::2]}, d / "pytorch_model-00001.bin")
        torch.save({k: state[k] for k in keys[1::2]}, d / "pytorch_model-00002.bin")

    src = broken(two_bins)
    assert convert_cli([str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert (
        "several weight pickles (['pytorch_model-00001.bin', 'pytorch_model-00002.bin']) and no index" in err
    )
    assert "has no weights" not in err


def test_weight_files_are_chosen_in_transformers_order(broken, tiny_reference):
    """model.safetensors before a shard index that an earlier sharded save left beside it, and
    pytorch_model.bin beside a Trainer's training_args.bin: the weights transformers loads."""
    reference = pv.from_pretrained(tiny_reference("dinov3", "gelu")).state_dict()

    def stale_index(d: Path) -> None:
        state = load_file(d / "model.safetensors")
        save_file({k: v + 1 for k, v in state.items()}, d / "model-00001-of-00001.safetensors")
        index = {"weight_map": dict.fromkeys(state, "model-00001-of-00001.safetensors")}
        (d / "model.safetensors.index.json").write_text(json.dumps(index))

    def trainer_folder(d: Path) -> None:
        torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
        (d / "model.safetensors").unlink()
        torch.save({"lr": 1e-4}, d / "training_args.bin")
        torch.save({"state": {}}, d / "optimizer.pt")

    for name, edit in (("stale_index", stale_index), ("trainer", trainer_folder)):
        got = pv.from_pretrained(broken(edit, name)).state_dict()
        assert got.keys() == reference.keys()
        assert all(torch.equal(got[k], reference[k]) for k in got), name


def test_nan_eps_never_converts(broken):
    src = broken(_config_edit(layer_norm_eps=float("nan")))
    with pytest.raises(pv.CheckpointError, match="layer_norm_eps = nan"):
        convert_checkpoint(src)


@pytest.mark.parametrize("layout", ["same", "inside", "contains", "symlink"])
def test_out_overlapping_src_is_refused_and_src_kept(broken, tmp_path, capsys, layout):
    src = broken(lambda d: None)
    if layout == "contains":
        src = broken(lambda d: shutil.copytree(d, d / "inner"), name="outer") / "inner"
    out = {
        "same": src,
        "inside": src / "converted",
        "contains": src.parent,
        "symlink": tmp_path / "alias",
    }[layout]
    if layout == "symlink":
        out.symlink_to(src, target_is_directory=True)
    before = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}
    assert convert_cli([str(src), str(out), "--force"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"packvit-convert: error: {out}: the output folder ") and "source checkpoint" in err
    assert {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()} == before
    assert not (src / "converted").exists()


def test_existing_out_is_refused_before_converting(broken, tmp_path, capsys, monkeypatch):
    import weights_convert.cli as cli

    src = broken(lambda d: None)
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(cli, "convert_directory", lambda *a, **k: pytest.fail("converted before refusing"))
    assert convert_cli([str(src), str(tmp_path / "out")]) == 2
    assert (
        capsys.readouterr().err
        == f"packvit-convert: error: {tmp_path / 'out'}: already exists; pass --force to replace it\n"
    )


def test_save_pretrained_says_force_true(tiny_reference, tmp_path):
    model = pv.from_pretrained(tiny_reference("dinov3", "gelu"))
    model.save_pretrained(tmp_path / "m")
    with pytest.raises(FileExistsError, match=r"already exists; pass force=True to replace it"):
        model.save_pretrained(tmp_path / "m")


# A read-only OUT. chmod does not stop root, so as root the parent is made read-only with a bind mount in a
# private mount namespace (unshare), which stops root too and disappears with the process.
READ_ONLY_SCRIPT = """
import sys
import packvit_native as pv
from weights_convert.cli import main
src, parent = sys.argv[1], sys.argv[2]
rc = main([src, parent + "/new"])
rc_force = main([src, parent + "/old", "--force"])
model = pv.from_pretrained(src)
try:
    model.save_pretrained(parent + "/py")
except pv.CheckpointError as e:
    assert isinstance(e, OSError)
    print("python:", e)
sys.exit(10 * rc + rc_force)
"""


def _run_read_only(src: Path, parent: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-c", READ_ONLY_SCRIPT, str(src), str(parent)]
    if os.geteuid() != 0:
        parent.chmod(0o555)
        try:
            return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        finally:
            parent.chmod(0o755)
    if not shutil.which("unshare"):
        pytest.skip("running as root, where chmod does not stop writes, and unshare is not installed")
    # "$1" is the folder, the rest the command: nothing is spliced into the shell text.
    in_read_only = ["unshare", "--mount", "sh", "-c",
                    'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" && shift && exec "$@"', "sh",
                    str(parent)]  # fmt: skip
    probe = subprocess.run([*in_read_only, "sh", "-c", '! touch "$0/probe" 2>/dev/null', str(parent)],
                           capture_output=True, text=True)  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(
            f"running as root, where chmod does not stop writes, and no read-only mount: {probe.stderr}"
        )
    return subprocess.run([*in_read_only, *cmd], env=env, capture_output=True, text=True, timeout=120)


def test_read_only_out_names_out_not_a_temp_path(tiny_reference, tmp_path):
    src = tiny_reference("dinov3", "gelu")
    parent = tmp_path / "ro"
    assert convert_cli([str(src), str(parent / "old")]) == 0
    before = (parent / "old" / "model.safetensors").read_bytes()
    run = _run_read_only(src, parent)
    assert run.returncode == 22, run.stderr  # both CLI runs exit 2
    lines = run.stderr.splitlines()
    assert lines[0].startswith(
        f"packvit-convert: error: {parent / 'new'}: cannot write the checkpoint there: "
    )
    assert lines[1].startswith(
        f"packvit-convert: error: {parent / 'old'}: cannot write the checkpoint there: "
    )
    assert f"python: {parent / 'py'}: cannot write the checkpoint there: " in run.stdout
    assert ".tmp" not in run.stderr + run.stdout
    assert (parent / "old" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in parent.iterdir()) == ["old"]


# Our own format: a converted folder whose files are broken is reported as ours, never handed to the converter.
BROKEN_NATIVE = [
    ("truncated", lambda d: _weights(d).write_bytes(_weights(d).read_bytes()[:5000]), "model.safetensors", "not a readable safetensors file"),
    ("zero-byte", lambda d: _weights(d).write_bytes(b""), "model.safetensors", "not a readable safetensors file"),
    ("huge-header", lambda d: _weights(d).write_bytes(_header_claiming(2**60)), "model.safetensors", "not a readable safetensors file"),
    ("lfs-pointer", lambda d: _weights(d).write_text(LFS_POINTER), "model.safetensors", "Git LFS pointer"),
    ("weights-dir", lambda d: _replace(_weights(d), Path.mkdir), "model.safetensors", "is a directory"),
    ("weights-fifo", lambda d: _replace(_weights(d), os.mkfifo), "model.safetensors", "not a regular file"),
    ("weights-missing", lambda d: _weights(d).unlink(), "", "config.json but no model.safetensors"),
    ("weights-other-model", lambda d: save_file({"norm.weight": torch.zeros(3)}, _weights(d)), "model.safetensors", "does not match its config.json"),
    ("config-truncated", lambda d: (d / "config.json").write_text((d / "config.json").read_text()[:60]), "config.json", "is not valid JSON"),
    ("config-unknown-field", lambda d: _native_config(d, surprise=1), "config.json", "unknown config fields: ['surprise']"),
    ("config-heads", lambda d: _native_config(d, num_heads=5), "config.json", "not divisible by num_heads 5"),
    ("config-eps-nan", lambda d: _native_config(d, norm_eps=float("nan")), "config.json", "norm_eps must be a positive finite number"),
    ("config-version", lambda d: _native_config(d, format_version=99), "config.json", "unsupported packvit-native config version 99"),
]  # fmt: skip


def _native_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **changes}))


@pytest.fixture(scope="module")
def converted(tiny_reference, tmp_path_factory):
    out = tmp_path_factory.mktemp("native") / "converted"
    assert convert_cli([str(tiny_reference("dinov3", "gelu")), str(out)]) == 0
    return out


@pytest.mark.parametrize(
    ("name", "edit", "file", "problem"), BROKEN_NATIVE, ids=[c[0] for c in BROKEN_NATIVE]
)
def test_broken_converted_folder_is_a_checkpoint_error(converted, tmp_path, name, edit, file, problem):
    d = tmp_path / "native"
    shutil.copytree(converted, d)
    edit(d)
    with no_hang(), pytest.raises(pv.CheckpointError) as info:
        pv.from_pretrained(d)
    message = str(info.value)
    assert message.startswith(str(d / file)) and problem in message, message
    assert "model_type" not in message, "handed to the converter"


def test_out_that_is_a_file_is_refused_even_with_force(broken, tmp_path, capsys):
    src = broken(lambda d: None)
    (tmp_path / "out").write_text("notes")
    for extra in ([], ["--force"]):
        assert convert_cli([str(src), str(tmp_path / "out"), *extra]) == 2
        assert "exists and is not a folder" in capsys.readouterr().err
    assert (tmp_path / "out").read_text() == "notes"


def test_out_under_a_file_is_refused_before_converting(broken, tmp_path, capsys, monkeypatch):
    import weights_convert.cli as cli

    src = broken(lambda d: None)
    (tmp_path / "afile").write_text("notes")
    monkeypatch.setattr(cli, "convert_directory", lambda *a, **k: pytest.fail("converted before refusing"))
    assert convert_cli([str(src), str(tmp_path / "afile" / "out")]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"packvit-convert: error: {tmp_path / 'afile' / 'out'}: {tmp_path / 'afile'} is a file, not a folder\n"
    )


def test_save_pretrained_under_a_file_names_the_file(tiny_reference, tmp_path):
    (tmp_path / "afile").write_text("notes")
    with pytest.raises(CheckpointWriteError, match=f"{tmp_path / 'afile'} is a file, not a folder"):
        pv.from_pretrained(tiny_reference("dinov3", "gelu")).save_pretrained(tmp_path / "afile" / "m")


def test_out_appearing_while_converting_is_reported_in_the_commands_words(
    tiny_reference, tmp_path, capsys, monkeypatch
):
    import weights_convert.cli as cli

    out = tmp_path / "out"
    convert = cli.convert_directory

    def convert_then_another_run_writes_out(*args, **kwargs):
        result = convert(*args, **kwargs)
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        return result

    monkeypatch.setattr(cli, "convert_directory", convert_then_another_run_writes_out)
    assert convert_cli([str(tiny_reference("dinov3", "gelu")), str(out)]) == 2
    assert (
        capsys.readouterr().err
        == f"packvit-convert: error: {out}: already exists; pass --force to replace it\n"
    )
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


BIND_ALIAS_SCRIPT = 'mkdir -p "$2" && mount --bind "$1" "$2" && shift 2 && exec "$@"'


def test_out_that_is_the_source_through_a_bind_mount_is_refused(broken, tmp_path):
    """The same folder seen at two paths: no path comparison can tell, the device and inode do."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("a bind mount needs root and unshare")
    src = broken(lambda d: None)
    view = tmp_path / "view"
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    convert = [sys.executable, "-m", "weights_convert.cli", str(src), str(view), "--force"]
    run = subprocess.run(
        ["unshare", "--mount", "sh", "-c", BIND_ALIAS_SCRIPT, "sh", str(src), str(view), *convert],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if "mount" in run.stderr and run.returncode != 2:
        pytest.skip(f"no bind mount here: {run.stderr.strip()}")
    assert run.returncode == 2, run.stderr
    assert (
        run.stderr
        == f"packvit-convert: error: {view}: the output folder is the source checkpoint {src}; choose an OUT_DIR outside it\n"
    )
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


@pytest.mark.parametrize("kind", ["other files", "not ours"])
def test_force_replaces_only_a_packvit_checkpoint(broken, tiny_reference, tmp_path, capsys, kind):
    src = broken(lambda d: None)
    out = tmp_path / "models"
    if kind == "other files":
        assert convert_cli([str(src), str(out)]) == 0
        (out / "NOTES.md").write_text("mine")
        reason = "holds NOTES.md, which replacing it would delete"
    else:
        shutil.copytree(tiny_reference("dinov3", "gelu"), out)  # a transformers checkpoint
        reason = "holds files named like a checkpoint's but is not a packvit checkpoint"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert convert_cli([str(src), str(out), "--force"]) == 2
    assert capsys.readouterr().err == (
        f"packvit-convert: error: {out}: {reason}; --force replaces only a packvit checkpoint or an empty folder\n"
    )
    with pytest.raises(FileExistsError, match=f"{reason}; force=True replaces only"):
        pv.from_pretrained(src).save_pretrained(out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_force_replaces_a_checkpoint_and_an_empty_folder(broken, tmp_path):
    src = broken(lambda d: None)
    out = tmp_path / "out"
    out.mkdir()
    assert convert_cli([str(src), str(out), "--force"]) == 0
    assert convert_cli([str(src), str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("out", ["dangling", "dangling/sub", ".", "sub/.."])
def test_out_no_folder_can_be_put_at_is_refused_before_converting(broken, tmp_path, capsys, monkeypatch, out):
    import weights_convert.cli as cli

    src = broken(lambda d: None)
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "dangling").symlink_to(work / "nowhere")
    work.chmod(0o2775)
    monkeypatch.chdir(work)
    monkeypatch.setattr(cli, "convert_directory", lambda *a, **k: pytest.fail("converted before refusing"))
    assert convert_cli([str(src), out, "--force"]) == 2
    reason = {
        "dangling": f"it is a symbolic link to {work / 'nowhere'}, which is not a folder",
        "dangling/sub": "dangling is a link to nothing, not a folder",
        ".": "name the folder by its own name, not '.' or '..'",
        "sub/..": "name the folder by its own name, not '.' or '..'",
    }[out]
    err = capsys.readouterr().err
    assert err.startswith(f"packvit-convert: error: {Path(out)}: {reason}"), err
    assert sorted(p.name for p in work.iterdir()) == ["dangling", "sub"]
    assert (work / "dangling").is_symlink() and work.stat().st_mode & 0o7777 == 0o2775


def test_a_tilde_in_out_is_the_home_folder(broken, tmp_path, monkeypatch):
    src = broken(lambda d: None)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert convert_cli([str(src), "~/conv"]) == 0
    pv.from_pretrained(src).save_pretrained("~/py")
    assert pv.from_pretrained("~/conv").config == pv.from_pretrained("~/py").config
    assert not (tmp_path / "~").exists()


def test_a_leftover_of_another_host_is_named_and_kept(broken, tmp_path, capsys):
    src = broken(lambda d: None)
    leftover = tmp_path / ".out.node-a.123.abcdef.tmp"
    leftover.mkdir()
    (leftover / "model.safetensors").write_text("partial")
    assert convert_cli([str(src), str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert err == (
        f"packvit-convert: note: {leftover.name} in {tmp_path}: left by a run on another host, which may still "
        "be writing; remove them once it is over\n"
    )
    assert (leftover / "model.safetensors").read_text() == "partial"


def _as_pickle(extra: dict | None = None, truncate: int | None = None):
    """An edit: the weights as one ``pytorch_model.bin`` (a training checkpoint holding ``extra`` too, if given,
    or cut to ``truncate`` bytes)."""

    def edit(d: Path) -> None:
        state = load_file(d / "model.safetensors")
        (d / "model.safetensors").unlink()
        torch.save({"model": state, **extra} if extra else state, d / "pytorch_model.bin")
        if truncate:
            data = (d / "pytorch_model.bin").read_bytes()
            (d / "pytorch_model.bin").write_bytes(data[:truncate])

    return edit


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (
            _as_pickle({"args": argparse.Namespace(lr=0.1)}),
            "holds Python objects besides tensors (argparse.Namespace), and only plain weights are read",
        ),
        (_as_pickle(truncate=5000), "cannot be read as a torch checkpoint (truncated or damaged?): "),
    ],
    ids=["training checkpoint", "truncated"],
)
def test_a_pickle_that_is_not_plain_weights_is_one_line(broken, tmp_path, capsys, edit, problem):
    src = broken(edit)
    assert convert_cli([str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"packvit-convert: error: {src / 'pytorch_model.bin'} {problem}"), err
    assert err.count("\n") == 1 and "\x1b" not in err
    assert not (tmp_path / "out").exists()


def test_a_written_checkpoint_is_exit_0_even_where_the_report_cannot_be_printed(tiny_reference, tmp_path):
    """OUT is in place before the report is printed: stdout on a full disk (or a closed pipe) changes nothing."""
    src = tiny_reference("dinov3", "gelu")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("PYTHONUNBUFFERED", None)  # stdout block-buffered, as in a pipe: the failure comes at the flush
    with open("/dev/full", "w") as full:
        run = subprocess.run(
            [sys.executable, "-m", "weights_convert.cli", str(src), str(tmp_path / "out")],
            stdout=full, stderr=subprocess.PIPE, text=True, env=env, timeout=300,
        )  # fmt: skip
    assert (run.returncode, run.stderr) == (0, "")
    assert pv.from_pretrained(tmp_path / "out") is not None


def test_link_loops_and_unknown_homes_are_one_line(tiny_reference, tmp_path, capsys):
    src = Path(shutil.copytree(tiny_reference("dinov3", "gelu"), tmp_path / "src"))
    (src / "loop").symlink_to("loop")  # a stray link of no use to the checkpoint
    out = tmp_path / "out"
    assert convert_cli([str(src), str(out)]) == 0
    assert (
        convert_cli([str(src), str(out), "--force"]) == 0
    )  # the loop is no file the checkpoint is read from
    (tmp_path / "looped").symlink_to("looped")
    for bad, match in ((tmp_path / "looped", "looped"), ("~no-such-user-here/out", "no-such-user-here")):
        capsys.readouterr()
        assert convert_cli([str(src), str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("packvit-convert: error: ") and err.count("\n") == 1 and match in err
