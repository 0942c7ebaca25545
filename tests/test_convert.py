"""The converter: CLI round trip, hub-id loading from an offline cache, and every failure mode."""

import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import packvit_native as pv
from weights_convert import ConversionError, convert_checkpoint
from weights_convert.cli import main as convert_cli

ROOT = Path(__file__).resolve().parents[1]


def _copy_with_state(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    state = load_file(src / "model.safetensors")
    edit(state)
    save_file(state, dst / "model.safetensors")
    return dst


def test_cli_refuses_to_overwrite_without_force(tiny_reference, tmp_path, capsys):
    src, out = tiny_reference("dinov3", "gelu"), tmp_path / "out"
    assert convert_cli([str(src), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert convert_cli([str(src), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    assert convert_cli([str(src), str(out), "--force", "--dtype", "bfloat16"]) == 0
    assert load_file(out / "model.safetensors")["prefix"].dtype == torch.bfloat16
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "no temporary directories left behind"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.update({"layer.0.attention.extra.weight": torch.zeros(2)}), "unknown checkpoint keys: layer.0.attention.extra.weight"),
        (lambda s: s.pop("layer.1.attention.k_proj.weight"), "missing checkpoint keys: layer.1.attention.k_proj.weight"),
        (lambda s: s.update({"layer.2.mlp.up_proj.weight": torch.zeros(7, 64)}), "layer.2.mlp.up_proj.weight has the wrong shape"),
        (lambda s: s.update({"norm.bias": torch.zeros(65)}), "norm.bias has the wrong shape"),
        (lambda s: s.update({"embeddings.patch_embeddings.weight": torch.zeros(64, 48)}), "expected a 4D conv weight"),
        (lambda s: s.update({"layer.0.attention.k_proj.bias": torch.zeros(64)}), "unknown checkpoint keys: layer.0.attention.k_proj.bias"),
    ],
)  # fmt: skip
def test_bad_checkpoints_fail_naming_the_key_and_write_nothing(
    tiny_reference, tmp_path, capsys, edit, message
):
    bad = _copy_with_state(tiny_reference("dinov3", "gelu"), tmp_path / "bad", edit)
    assert convert_cli([str(bad), str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_unsupported_and_broken_sources(tiny_reference, tmp_path):
    src = tiny_reference("dinov3", "gelu")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    shutil.copy(src / "model.safetensors", tmp_path / "bert")
    with pytest.raises(ConversionError, match="unsupported model_type 'bert'"):
        convert_checkpoint(tmp_path / "bert")
    (tmp_path / "noweights").mkdir()
    shutil.copy(src / "config.json", tmp_path / "noweights")
    with pytest.raises(ConversionError, match="has no weights"):
        convert_checkpoint(tmp_path / "noweights")
    with pytest.raises(pv.CheckpointError, match="no such directory"):
        convert_checkpoint(tmp_path / "missing")
    cfg = json.loads((src / "config.json").read_text())
    (tmp_path / "badcfg").mkdir()
    (tmp_path / "badcfg" / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu6"}))
    shutil.copy(src / "model.safetensors", tmp_path / "badcfg")
    with pytest.raises(ConversionError, match="unsupported activation 'relu6'"):
        convert_checkpoint(tmp_path / "badcfg")


def test_sharded_checkpoint_converts_like_the_single_file(tiny_reference, tmp_path):
    src = tiny_reference("dinov3", "gelu")
    state = load_file(src / "model.safetensors")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(src / "config.json", sharded)
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, sharded / name)
    weight_map = {k: name for name, ks in shards.items() for k in ks}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _, a, _ = convert_checkpoint(src)
    _, b, _ = convert_checkpoint(sharded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConversionError, match=r"shard model-00002-of-00002\.safetensors named in"):
        convert_checkpoint(sharded)


def _lay_out_hub_cache(cache: Path, repo_id: str, files: Path) -> None:
    """Write ``files`` into ``cache`` exactly as huggingface_hub stores a downloaded snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "blobs").mkdir()
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in files.iterdir():
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))


def test_hub_id_loads_offline_from_the_cache(tiny_reference, tmp_path):
    src = tiny_reference("dinov3", "gelu")
    cache = tmp_path / "hub"
    _lay_out_hub_cache(cache, "someorg/tiny-dinov3", src)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    script = (
        "import torch, packvit_native as pv\n"
        "m = pv.from_pretrained('someorg/tiny-dinov3')\n"
        "torch.manual_seed(0); x = [torch.randn(3, 12, 8), torch.randn(3, 4, 4)]\n"
        "torch.save(m(*m.patchify(x)).detach(), 'hub_out.pt')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    local = pv.from_pretrained(src)
    torch.manual_seed(0)
    x = [torch.randn(3, 12, 8), torch.randn(3, 4, 4)]
    with torch.no_grad():
        torch.testing.assert_close(
            torch.load(tmp_path / "hub_out.pt"), local(*local.patchify(x)), rtol=0, atol=0
        )

    cli = [sys.executable, "-m", "weights_convert.cli"]
    run = subprocess.run(
        [*cli, "someorg/tiny-dinov3", "out"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    run = subprocess.run(
        [*cli, "someorg/absent", "out2"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert (
        run.returncode == 2
        and "someorg/absent is not a local directory, and fetching it from the hub failed" in run.stderr
    )
    assert not (tmp_path / "out2").exists()


def test_out_holding_the_hub_cache_files_is_refused(tiny_reference, tmp_path):
    """A hub snapshot's files are links into the repository's blobs: an OUT there would delete the checkpoint.
    Given by hub id, the blobs are refused before anything is fetched, as a folder not ours."""
    cache = tmp_path / "hub"
    _lay_out_hub_cache(cache, "someorg/tiny-dinov3", tiny_reference("dinov3", "gelu"))
    repo = cache / "models--someorg--tiny-dinov3"
    blobs, (snapshot,) = repo / "blobs", (repo / "snapshots").iterdir()
    before = sorted(p.name for p in blobs.iterdir())
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    for src, problem in [
        (snapshot, f"the output folder contains the source checkpoint {snapshot}"),
        ("someorg/tiny-dinov3", "holds "),
    ]:
        run = subprocess.run(
            [sys.executable, "-m", "weights_convert.cli", str(src), str(blobs), "--force"],
            env=env, capture_output=True, text=True,
        )  # fmt: skip
        assert run.returncode == 2
        assert run.stderr.startswith(f"packvit-convert: error: {blobs}: {problem}"), run.stderr
        assert sorted(p.name for p in blobs.iterdir()) == before


def test_model_safetensors_is_read_beside_other_weight_files(tiny_reference, tmp_path):
    """Some repositories ship another library's weights next to transformers' (open_clip_model.safetensors)."""
    src = tiny_reference("dinov3", "gelu")
    both = tmp_path / "both"
    shutil.copytree(src, both)
    (both / "open_clip_model.safetensors").write_bytes(b"another library's weights")
    _, a, _ = convert_checkpoint(src)
    _, b, _ = convert_checkpoint(both)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hub_checkpoint_fetches_only_the_towers_shards(tiny_reference, tmp_path):
    """A vision-language checkpoint on the hub: its language model's shard is never asked for. The cache here
    holds the configs, the index and the vision shard only; converting by hub id works offline from it."""
    src = tiny_reference("qwen3_vl", "vlm")
    state = load_file(src / "model.safetensors")
    files = tmp_path / "files"
    files.mkdir()
    shutil.copy(src / "config.json", files)
    vision = {k: v for k, v in state.items() if k.startswith("model.visual.")}
    save_file(vision, files / "model-00001-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" if k in vision else "model-00002-of-00002.safetensors"
                  for k in state}  # fmt: skip
    (files / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    cache = tmp_path / "hub"
    _lay_out_hub_cache(cache, "someorg/tiny-qwen3-vl", files)  # the language-model shard is not in the cache
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    # The real snapshot_download, with the file patterns of each call recorded on the way through.
    script = (
        "import fnmatch, json, sys, huggingface_hub\n"
        "real, asked = huggingface_hub.snapshot_download, []\n"
        "def recording(*a, **k):\n"
        "    asked.extend(k['allow_patterns'])\n"
        "    return real(*a, **k)\n"
        "huggingface_hub.snapshot_download = recording\n"
        "from weights_convert.cli import main\n"
        "code = main(['someorg/tiny-qwen3-vl', 'out'])\n"
        "print(json.dumps(asked))\n"
        "sys.exit(code)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    asked = json.loads(run.stdout.strip().splitlines()[-1])
    assert "model-00001-of-00002.safetensors" in asked
    assert not any(fnmatch.fnmatch("model-00002-of-00002.safetensors", p) for p in asked), asked
    ours, local = load_file(tmp_path / "out" / "model.safetensors"), convert_checkpoint(src)[1]
    assert ours.keys() == local.keys() and all(torch.equal(ours[k], local[k]) for k in ours)
