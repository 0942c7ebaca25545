"""``packvit encode`` over webdataset and parquet shards with the local engine: features equal to the
single-image path, corrupt samples listed, ``--num-shards`` splits, a run killed with SIGKILL resumes."""

import argparse
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from shard_data import CORRUPT, as_files, samples, write_parquet, write_webdataset

import packvit_native as pv
from packvit_native import shards
from packvit_native.cli import MANIFEST, main, share, share_index
from packvit_native.preview import pca_rgb

WDS_SHARDS, PER_SHARD = 3, 5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_webdataset(root / "wds", WDS_SHARDS, PER_SHARD)
    write_parquet(root / "pq", 2, PER_SHARD)
    return root


def _encode(*args) -> int:
    return main(["encode", *map(str, args), "--device", "cpu", "--workers", "2"])


def _rows(path: Path) -> tuple[list[str], np.ndarray, dict]:
    table = pq.read_table(path)
    record = json.loads(table.schema.metadata[b"packvit"])
    return table.column("key").to_pylist(), np.stack(table.to_pandas().embedding), record


def _reference(model, files: dict[str, Path]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The single-image path: ``pv.preprocess`` on a file and one forward per image."""
    out = {}
    for key, path in files.items():
        patches, grid = pv.preprocess(path, model)
        with torch.no_grad():
            result = model(patches, grid, return_dict=True)
        out[key] = (result.pooler_output[0], result.last_hidden_state)
    return out


def test_expand_braces():
    assert shards.expand_braces("d/{00008..00011}.tar") == [f"d/{i:05d}.tar" for i in range(8, 12)]
    assert shards.expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert shards.expand_braces("{3..1}") == ["3", "2", "1"]
    assert shards.expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="cannot expand"):
        shards.expand_braces("x{y}.tar")
    assert shards.expand_braces("{-01..1}") == ["-01", "000", "001"]


def test_expand_braces_refuses_a_pattern_naming_too_many_paths():
    # Found while expanding lazily: a list of 10^12 strings would exhaust memory first.
    for pattern in (
        "d/{000000..999999}/{000000..999999}.tar",
        "d/{0..9999999999}.tar",
        "{0..{1999,0}}-{0..{999,0}}.tar",  # ranges that exist only once their inner braces are expanded
    ):
        with pytest.raises(ValueError, match="names more than 1,000,000 paths; split the run"):
            shards.expand_braces(pattern)
    assert len(shards.expand_braces(f"{{1..{shards.MAX_EXPANDED}}}")) == shards.MAX_EXPANDED
    with pytest.raises(ValueError, match="too many braces in one pattern"):
        shards.expand_braces("{a,b}" * 1500)


def test_webdataset_shards_match_the_single_image_path(model_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    pattern = data / "wds" / "{00000..00002}.tar"
    assert _encode("--model", model_dir, "--out", out, pattern, "--tokens", "--max-tokens", 200) == 1
    err = capsys.readouterr().err
    for s in range(WDS_SHARDS):  # each corrupt sample is reported by shard and key
        assert f"{s:05d}.tar: sample 's{s:02d}/0002' skipped: cannot read image" in err
    assert "3 samples unreadable" in err

    model = pv.from_pretrained(model_dir)
    rows = [samples(s, PER_SHARD) for s in range(WDS_SHARDS)]
    want = _reference(model, as_files(tmp_path / "files", rows))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MANIFEST] + [f"{s:05d}.{ext}" for s in range(WDS_SHARDS) for ext in ("parquet", "safetensors")]
    )
    for s in range(WDS_SHARDS):
        keys, embedding, record = _rows(out / f"{s:05d}.parquet")
        assert keys == [
            k for k, d, _ in rows[s] if d != CORRUPT
        ]  # the shard's order, the corrupt one left out
        assert record["errors"] == [{"key": f"s{s:02d}/0002", "error": record["errors"][0]["error"]}]
        assert record["images"] == 4 and record["embedding"] == "pooler_output"
        table = pq.read_table(out / f"{s:05d}.parquet").to_pylist()
        assert table[0]["json"] == json.dumps({"id": keys[0]}) and table[0]["txt"] == f"caption {keys[0]}"
        tokens = load_file(out / f"{s:05d}.safetensors")
        with safe_open(out / f"{s:05d}.safetensors", "pt") as f:
            assert json.loads(f.metadata()["names"]) == keys
        for i, key in enumerate(keys):
            pooled, patches = want[key]
            np.testing.assert_allclose(embedding[i], pooled.numpy(), rtol=0, atol=1e-6)
            rows_i = tokens["features"][tokens["offsets"][i] : tokens["offsets"][i + 1]]
            torch.testing.assert_close(rows_i, patches, rtol=0, atol=1e-6)
            assert tokens["grid_thw"][i].prod() == patches.shape[0] == int(np.prod(table[i]["grid_thw"]))

    # a rerun finds every shard finished and writes nothing
    mtimes = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    assert _encode("--model", model_dir, "--out", out, pattern, "--tokens", "--max-tokens", 200) == 0
    assert "skipping 3 of 3 shards" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_parquet_shards_keep_columns_and_match(model_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--image-column", "jpg", "--key-column", "id", "--keep-columns", "caption"]
    assert _encode("--model", model_dir, "--out", out, data / "pq" / "part-{0,1}.parquet", *args) == 1
    assert "part-1.parquet: sample 's11/0002' skipped" in capsys.readouterr().err
    model = pv.from_pretrained(model_dir)
    rows = [samples(10 + s, PER_SHARD) for s in range(2)]
    want = _reference(model, as_files(tmp_path / "files", rows))
    for s in range(2):
        keys, embedding, record = _rows(out / f"part-{s}.parquet")
        assert keys == [k for k, d, _ in rows[s] if d != CORRUPT]
        assert [e["key"] for e in record["errors"]] == [f"s{10 + s}/0002"]
        assert record["settings"]["input"] == {
            "format": "parquet", "image_column": "jpg", "key_column": "id", "keep_columns": ["caption"],
        }  # fmt: skip
        assert pq.read_table(out / f"part-{s}.parquet").column("caption").to_pylist() == [
            f"caption {k}" for k in keys
        ]
        for i, key in enumerate(keys):
            np.testing.assert_allclose(embedding[i], want[key][0].numpy(), rtol=0, atol=1e-6)
    assert not (out / "part-0.safetensors").exists()  # no token features asked for


def test_parquet_image_struct_of_hugging_face_datasets(tmp_path):
    import pyarrow as pa

    rows = samples(20, 3)
    images = pa.array([{"bytes": d, "path": None} for _, d, _ in rows])
    pq.write_table(pa.table({"key": [k for k, _, _ in rows], "image": images}), tmp_path / "hf.parquet")
    read = list(shards.read_parquet(tmp_path / "hf.parquet", shards_args()))
    assert [(s.key, s.data) for s in read] == [(k, d) for k, d, _ in rows]


def test_an_unreadable_parquet_file_first_is_reported_not_fatal(model_dir, data, tmp_path, capsys):
    folder, out = tmp_path / "pq", tmp_path / "out"
    folder.mkdir()
    (folder / "part-0.parquet").write_bytes(b"PAR1 cut short")
    (folder / "part-1.parquet").write_bytes((data / "pq" / "part-1.parquet").read_bytes())
    args = ["--image-column", "jpg", "--key-column", "id", "--keep-columns", "caption"]
    assert _encode("--model", model_dir, "--out", out, folder / "part-{0,1}.parquet", *args) == 1
    assert "part-0.parquet: file skipped: not a readable parquet file" in capsys.readouterr().err
    empty = pq.read_table(out / "part-0.parquet")
    record = json.loads(empty.schema.metadata[b"packvit"])
    assert empty.num_rows == 0 and "caption" in empty.schema.names
    assert record["errors"][0]["key"] is None and record["errors"][0]["part"] == "file"
    assert record["errors"][0]["retry"] is True
    # a later file without a kept column stays so: recorded once, not read again on every rerun
    import pyarrow as pa

    pq.write_table(pa.table({"id": ["k"], "jpg": pa.array([b"x"], pa.binary())}), folder / "part-2.parquet")
    assert _encode("--model", model_dir, "--out", out, folder / "part-{1,2}.parquet", *args) == 1
    assert "part-2.parquet: file skipped: has no column 'caption'" in capsys.readouterr().err
    assert "retry" not in json.loads(pq.read_schema(out / "part-2.parquet").metadata[b"packvit"])["errors"][0]
    assert _encode("--model", model_dir, "--out", out, folder / "part-{1,2}.parquet", *args) == 0
    assert "skipping 2 of 2 shards" in capsys.readouterr().err
    keys, _, record = _rows(out / "part-1.parquet")
    assert keys == [k for k, d, _ in samples(11, PER_SHARD) if d != CORRUPT]

    # none readable: one error before anything is written
    nothing = tmp_path / "nothing"
    assert _encode("--model", model_dir, "--out", nothing, folder / "part-0.parquet", *args) == 2
    assert "part-0.parquet not a readable parquet file" in capsys.readouterr().err
    assert not nothing.exists()


def test_a_parquet_row_without_key_is_reported_as_that_row(model_dir, tmp_path, capsys):
    import pyarrow as pa

    rows = samples(30, 3)
    keys = [None, *(k for k, _, _ in rows[1:])]
    table = pa.table({"key": keys, "image": pa.array([d for _, d, _ in rows], pa.binary())})
    pq.write_table(table, tmp_path / "rows.parquet")
    out = tmp_path / "out"
    assert _encode("--model", model_dir, "--out", out, tmp_path / "rows.parquet") == 1
    assert "rows.parquet: row 0 skipped: no key" in capsys.readouterr().err
    written, _, record = _rows(out / "rows.parquet")
    assert written == [k for k, d, _ in rows[1:] if d != CORRUPT]
    assert record["errors"][0] == {"key": None, "part": "row 0", "error": "no key"}
    # a row without a key stays so: the shard is finished, not read again on every rerun
    assert _encode("--model", model_dir, "--out", out, tmp_path / "rows.parquet") == 0
    assert "skipping 1 of 1 shard" in capsys.readouterr().err


def test_a_member_name_that_is_not_utf8_keeps_its_bytes_escaped(tmp_path):
    import io
    import os
    import tarfile

    (_, data, _), *_ = samples(31, 1)
    with tarfile.open(tmp_path / "x.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo(os.fsdecode(b"caf\xe9.jpg"))
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    [sample] = shards.read_webdataset(tmp_path / "x.tar")
    assert (sample.key, sample.data, sample.error) == ("caf\\xe9", data, None)


def test_rows_after_an_unreadable_row_group_keep_their_numbers(tmp_path):
    import pyarrow as pa

    rows = [r for r in samples(32, 8) if r[1] != CORRUPT][:5]
    keys = [k for k, _, _ in rows]
    keys[3] = None
    path = tmp_path / "x.parquet"
    table = pa.table({"key": keys, "image": pa.array([d for _, d, _ in rows], pa.binary())})
    pq.write_table(table, path, row_group_size=2)
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(1)  # the images of rows 0-1
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    raw = bytearray(path.read_bytes())
    raw[start + 30 : start + chunk.total_compressed_size - 5] = b"\xab" * (chunk.total_compressed_size - 35)
    path.write_bytes(bytes(raw))
    read = [(s.index, s.key, s.part, s.error is None) for s in shards.read_parquet(path, shards_args())]
    assert read[0][:3] == (0, None, "row group 0 (rows 0-1)")
    assert read[1:] == [
        (2, keys[2], "archive", True),
        (3, None, "row 3", False),
        (4, keys[4], "archive", True),
    ]


def test_inputs_and_foreign_files_in_out_are_never_replaced(model_dir, data, tmp_path, capsys):
    folder = tmp_path / "pq"
    folder.mkdir()
    for s in range(2):
        (folder / f"part-{s}.parquet").write_bytes((data / "pq" / f"part-{s}.parquet").read_bytes())
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    args = ["--image-column", "jpg", "--key-column", "id"]
    assert _encode("--model", model_dir, "--out", folder, folder / "part-{0,1}.parquet", *args) == 2
    assert "would replace the input" in capsys.readouterr().err
    # the same file under another name (a link; on a case-insensitive file system, PART-0.parquet)
    aliases = tmp_path / "aliases"
    aliases.mkdir()
    (aliases / "part-0.parquet").hardlink_to(folder / "part-0.parquet")
    assert _encode("--model", model_dir, "--out", aliases, folder / "part-{0,1}.parquet", *args) == 2
    assert "would replace the input" in capsys.readouterr().err
    (aliases / "part-0.parquet").unlink()
    # a parquet file of the same name that packvit did not write (the inputs, copied there by hand)
    out = tmp_path / "out"
    out.mkdir()
    (out / "00000.parquet").write_bytes(before["part-0.parquet"])
    assert _encode("--model", model_dir, "--out", out, data / "wds" / "00000.tar") == 2
    assert "00000.parquet is not an output of packvit encode" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert (out / "00000.parquet").read_bytes() == before["part-0.parquet"]
    # nor a safetensors file where a token file would go, with --tokens (replaced) or without (removed)
    from safetensors.torch import save_file

    (out / "00000.parquet").unlink()
    save_file({"weight": torch.ones(2)}, out / "00000.safetensors", metadata={"format": "pt"})
    weights = (out / "00000.safetensors").read_bytes()
    for tokens in ([], ["--tokens"]):
        assert _encode("--model", model_dir, "--out", out, data / "wds" / "00000.tar", *tokens) == 2
        assert "00000.safetensors is not an output of packvit encode" in capsys.readouterr().err
        assert (out / "00000.safetensors").read_bytes() == weights and not (out / "00000.parquet").exists()


def test_a_shard_read_only_in_part_is_read_again_on_rerun(model_dir, data, tmp_path, capsys):
    whole = (data / "wds" / "00000.tar").read_bytes()
    shard, out = tmp_path / "00000.tar", tmp_path / "out"
    shard.write_bytes(whole[: len(whole) // 2])  # still being copied when the first run read it
    assert _encode("--model", model_dir, "--out", out, shard) == 1
    first, _, _ = _rows(out / "00000.parquet")
    shard.write_bytes(whole)
    assert _encode("--model", model_dir, "--out", out, shard) == 1  # its one corrupt sample stays
    err = capsys.readouterr().err
    assert "00000 is redone: part of it could not be read last time (archive: archive " in err
    keys, _, record = _rows(out / "00000.parquet")
    assert len(keys) > len(first) and [e["key"] for e in record["errors"]] == ["s00/0002"]
    assert _encode("--model", model_dir, "--out", out, shard) == 0  # finished now: skipped
    assert "skipping 1 of 1 shard" in capsys.readouterr().err


def shards_args(**given):
    from packvit_native.cli import encode_args

    return encode_args(**given)


def test_num_shards_splits_deterministically_and_matches_one_run(model_dir, data, tmp_path, capsys):
    pattern = data / "wds" / "{00000..00002}.tar"
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert _encode("--model", model_dir, "--out", whole, pattern, "--tokens") == 1
    for index in (0, 1):  # two runs, as two slurm array tasks, into one folder
        assert (
            _encode(
                "--model",
                model_dir,
                "--out",
                split,
                pattern,
                "--tokens",
                "--num-shards",
                2,
                "--shard-index",
                index,
            )
            == 1
        )
        written = sorted(p.stem for p in split.glob("*.parquet"))
        # by a hash of the name: 00000 and 00002 to run 0, 00001 to run 1
        assert written == (["00000", "00002"] if index == 0 else ["00000", "00001", "00002"])
    capsys.readouterr()
    for s in range(WDS_SHARDS):
        a, b = _rows(whole / f"{s:05d}.parquet"), _rows(split / f"{s:05d}.parquet")
        assert a[0] == b[0]
        np.testing.assert_allclose(a[1], b[1], rtol=0, atol=1e-6)
        ta, tb = load_file(whole / f"{s:05d}.safetensors"), load_file(split / f"{s:05d}.safetensors")
        torch.testing.assert_close(ta["features"], tb["features"], rtol=0, atol=1e-6)
    assert _encode("--model", model_dir, "--out", split, pattern, "--num-shards", 2, "--shard-index", 2) == 2
    assert "--shard-index 2 is not in 0..1" in capsys.readouterr().err
    # more runs than shards (a torchrun job with 4 ranks over 3 shards): an idle run succeeds, writing nothing
    before = sorted(p.name for p in split.iterdir())
    assert [share_index(f"{s:05d}", 4) for s in range(3)] == [0, 3, 2]
    assert _encode("--model", model_dir, "--out", split, pattern, "--num-shards", 4, "--shard-index", 1) == 0
    assert "has no shard to encode; nothing to do" in capsys.readouterr().err
    assert sorted(p.name for p in split.iterdir()) == before


def test_an_inputs_run_depends_on_its_name_alone():
    """Runs repeated after inputs were added still cover every input once: no name changes run."""
    names = [f"{i:05d}" for i in range(1000)]
    runs = [share(names, 8, i, str) for i in range(8)]
    assert sorted(n for run in runs for n in run) == names
    assert all(100 <= len(run) <= 150 for run in runs)  # about 125 each
    grown = sorted([*names, "00000a", "extra", "0"])
    for i, run in enumerate(runs):
        assert set(run) <= set(share(grown, 8, i, str))


KILLABLE = """
import sys, time
import packvit_native.shards as shards
real_write = shards.write_shard
def write_then_hang(*args, **kwargs):
    real_write(*args, **kwargs)
    time.sleep(600)  # SIGKILL comes while the next shards are encoded and their writes wait
shards.write_shard = write_then_hang
from packvit_native.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_run_killed_after_the_first_shard_resumes_without_writing_twice(model_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["encode", "--model", str(model_dir), "--out", str(out), str(data / "wds" / "{00000..00002}.tar")]
    args += ["--tokens", "--device", "cpu", "--max-tokens", "100"]
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, *args], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "00000.parquet").exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # the next shard is being encoded
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert sorted(p.name for p in out.glob("*.parquet")) == ["00000.parquet"]
    first = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("00000.*")}

    assert main([*args, "--workers", "2"]) == 1  # the corrupt samples are still unreadable
    err = capsys.readouterr().err
    assert "skipping 1 of 3 shards" in err and "encoded 8 images" in err
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("00000.*")} == first  # not rewritten
    assert not [p for p in out.rglob("*") if p.name.startswith(".")], "no temporary file is left"
    keys = []
    for s in range(WDS_SHARDS):
        shard_keys, _, record = _rows(out / f"{s:05d}.parquet")
        assert (
            shard_keys == [k for k, d, _ in samples(s, PER_SHARD) if d != CORRUPT] and record["images"] == 4
        )
        with safe_open(out / f"{s:05d}.safetensors", "pt") as f:
            assert json.loads(f.metadata()["names"]) == shard_keys
        keys += shard_keys
    assert len(keys) == len(set(keys)) == 12  # every image once


def test_unfinished_or_damaged_shards_are_redone(model_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    pattern = data / "wds" / "{00000..00002}.tar"
    assert _encode("--model", model_dir, "--out", out, pattern, "--tokens") == 1
    (out / "00001.parquet").unlink()  # killed between the token file and the parquet file
    (out / "00002.safetensors").write_bytes(b"torn")  # a power cut emptied it
    kept = (out / "00000.parquet").stat().st_mtime_ns
    capsys.readouterr()
    assert _encode("--model", model_dir, "--out", out, pattern, "--tokens") == 1
    err = capsys.readouterr().err
    assert "00002 is redone: 00002.safetensors is damaged" in err and "skipping 1 of 3 shards" in err
    assert (out / "00000.parquet").stat().st_mtime_ns == kept
    for s in range(WDS_SHARDS):
        assert (
            shards.shard_status(out, shards.Shard(Path(f"{s:05d}.tar"), f"{s:05d}"), _manifest(out), _args())
            is None
        )


def _manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST).read_text())


def _args():
    return shards_args(tokens=True)


def test_truncated_archive_keeps_what_it_read(model_dir, data, tmp_path, capsys):
    whole = (data / "wds" / "00000.tar").read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[: len(whole) * 3 // 5])
    out = tmp_path / "out"
    assert _encode("--model", model_dir, "--out", out, cut) == 1
    keys, _, record = _rows(out / "cut.parquet")
    assert keys and len(keys) < 4
    assert any(e["key"] is None and e["error"].startswith("archive ") for e in record["errors"])
    # cut at every 512-byte block: the loss is always reported, never a silently shorter shard
    for end in range(512, len(whole) - 1024, 512):
        cut.write_bytes(whole[:end])
        assert list(shards.read_webdataset(cut))[-1].key is None


def test_shard_options_are_checked_before_anything_is_written(model_dir, data, tmp_path, capsys):
    wds, out = data / "wds" / "00000.tar", tmp_path / "out"
    image = tmp_path / "a.png"
    Image.new("RGB", (20, 20)).save(image)
    cases = [
        ([wds, "--format", "packed"], "--format applies to image files"),
        ([wds, "--image-column", "jpg"], "apply to parquet shards"),
        ([wds, "--layers=-2"], "add --tokens"),
        ([data / "pq" / "part-0.parquet"], "has no column 'image'"),
        ([image, "--tokens"], "--tokens apply to webdataset or parquet shards"),
        ([image, wds], "inputs mix"),
        ([data / "wds" / "{00000..00009}.tar"], "00003.tar: no such file"),
        ([image, "--engine", "ray"], "--engine ray reads webdataset or parquet shards"),
        ([wds, "--engine", "ray", "--decode", "gpu"], "--decode gpu applies to --engine local"),
    ]
    (tmp_path / "folder.tar").mkdir()
    cases.append(([tmp_path / "folder.tar"], "folder.tar: a folder, not a shard file"))
    for extra, message in cases:
        assert _encode("--model", model_dir, "--out", out, *extra) == 2
        assert message in capsys.readouterr().err
        assert not out.exists() or not any(out.iterdir())
    for inputs in ([wds], [image]):  # a backend that cannot run is refused before --out is even made
        assert _encode("--model", model_dir, "--out", out, *inputs, "--attn-backend", "nope") == 2
        assert "unknown attention backend 'nope'" in capsys.readouterr().err
        assert not out.exists()


def test_preview_pictures(model_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    assert _encode("--model", model_dir, "--out", out, data / "wds" / "00001.tar", "--preview") == 1
    table = pq.read_table(out / "00001.parquet").to_pylist()
    patch = pv.from_pretrained(model_dir).config.patch_size
    for row in table:
        png = Image.open(out / "00001.pca" / (row["key"].replace("/", "%2F") + ".png"))
        _, h, w = row["grid_thw"]
        assert png.size == (w * patch, h * patch) and png.mode == "RGB"
    # image files: beside the features
    folder = as_files(tmp_path / "files", [samples(0, 2)])
    assert (
        _encode("--model", model_dir, "--out", tmp_path / "files-out", tmp_path / "files", "--preview") == 0
    )
    assert sorted(p.name for p in (tmp_path / "files-out" / "s00").iterdir()) == sorted(
        [f"{Path(k).name}.{ext}" for k in folder for ext in ("safetensors", "pca.png")]
    )
    # merge order is undone: the picture of merge-ordered tokens is the row-major picture
    tokens = torch.randn(4 * 6, 8)
    merged = tokens.reshape(2, 2, 3, 2, 8).permute(0, 2, 1, 3, 4).reshape(24, 8)  # [h/m, m, w/m, m] -> blocks
    np.testing.assert_array_equal(pca_rgb(merged, 4, 6, merge_size=2), pca_rgb(tokens, 4, 6))


def test_embedding_rule_by_model():
    from packvit_native.config import EncoderConfig

    base = EncoderConfig(family="t", patch_size=2, hidden_size=8, num_layers=1, num_heads=2, mlp_hidden=8)
    assert shards.embedding_source(base.replace(head="map")) == "pooler_output"
    assert shards.embedding_source(base.replace(num_cls=1, head="cls")) == "pooler_output"
    assert shards.embedding_source(base.replace(num_cls=1)) == "class_token"
    assert shards.embedding_source(base) == "mean_patch_tokens"


def test_folder_inputs_and_num_shards(model_dir, tmp_path, capsys):
    folder = as_files(tmp_path / "files", [samples(0, 5)])
    out = tmp_path / "out"
    for index in (0, 1):
        assert (
            _encode(
                "--model",
                model_dir,
                "--out",
                out,
                tmp_path / "files",
                "--num-shards",
                2,
                "--shard-index",
                index,
            )
            == 0
        )
    written = sorted(p.relative_to(out).with_suffix("").as_posix() for p in out.rglob("*.safetensors"))
    assert written == sorted(folder)


def test_a_failing_batch_is_retried_image_by_image(model_dir):
    """One image whose patches do not match its grid fails alone; the others of its batch are encoded as on
    their own."""
    model = pv.from_pretrained(model_dir)
    args = argparse.Namespace(layers=None, prefix=False, tokens=False, preview=False)
    good = [model.patchify([torch.rand(3, 16 * h, 16 * w)]) for h, w in ((2, 3), (1, 1))]
    bad = (torch.rand(5, good[0][0].shape[1]), torch.tensor([[1, 2, 2]]))
    results = shards.encode_later(model, [good[0], bad, good[1]], args, torch.device("cpu"))
    encoded, seconds = results()
    assert isinstance(encoded[1], str) and encoded[1].startswith("encoding failed: ValueError")
    assert seconds > 0
    for item, one in zip((encoded[0], encoded[2]), good, strict=True):
        alone = shards.encode_images(model, [one], args, torch.device("cpu"))[0]
        assert item.grid == alone.grid
        np.testing.assert_array_equal(item.rows["embedding"], alone.rows["embedding"])


def test_read_ahead_keeps_order_errors_and_closes_its_source():
    import threading

    from packvit_native.cli import read_ahead

    assert list(read_ahead(range(1000), 4)) == list(range(1000))

    def failing():
        yield from range(3)
        raise ValueError("shard 7 is cut short")

    seen = []
    with pytest.raises(ValueError, match="cut short"):
        for item in read_ahead(failing(), 2):
            seen.append(item)
    assert seen == [0, 1, 2]  # the error comes after the items before it

    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()  # the source's open files would be closed here

    stream = read_ahead(endless(), 2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()
    assert closed.is_set()
    assert not [t for t in threading.enumerate() if t.name == "packvit-read-ahead"]


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_an_empty_archive_is_whole_and_has_no_samples(tmp_path):
    assert list(shards.read_webdataset(_tar(tmp_path / "empty.tar", []))) == []


def test_a_member_repeated_next_to_itself_is_reported(tmp_path):
    path = _tar(tmp_path / "dup.tar", [("a.jpg", b"first"), ("a.jpg", b"second"), ("b.jpg", b"x")])
    got = list(shards.read_webdataset(path))
    assert [(s.key, s.error) for s in got] == [("a", "duplicate member a.jpg in the archive"), ("b", None)]


def test_long_keys_get_file_names_of_their_own_within_the_limit():
    keys = ["短" * 80, "短" * 80 + "x", "a" * 300, "b/c?d"]
    names = [shards.preview_name(k) for k in keys]
    assert len(set(names)) == len(keys)
    assert all(len(n.encode()) <= shards.PREVIEW_NAME_BYTES + 4 for n in names)
    assert names[-1] == "b%2Fc%3Fd.png"


def test_a_shard_without_readable_images_has_every_column(tmp_path, capsys):
    """A shard whose samples are all unreadable still gets each output column (empty), so reading the
    folder's files together keeps them: pyarrow takes the columns from the first file."""
    import dataclasses
    import tarfile

    from weights_convert.presets import PRESETS

    config = PRESETS["dinov3_vitl16"].config(hidden_size=32, num_heads=2, num_layers=1, mlp_hidden=64)
    config = dataclasses.replace(config, projection_dim=8)
    model = tmp_path / "model"
    torch.manual_seed(0)
    pv.PackedVisionEncoder(config).save_pretrained(model)
    (tmp_path / "wds").mkdir()
    with tarfile.open(tmp_path / "wds" / "broken.tar", "w") as tar:
        info = tarfile.TarInfo("only.jpg")
        info.size = len(CORRUPT)
        tar.addfile(info, io.BytesIO(CORRUPT))
    assert _encode("--model", model, "--out", tmp_path / "out", tmp_path / "wds" / "broken.tar") == 1
    table = pq.read_table(tmp_path / "out" / "broken.parquet")
    assert table.num_rows == 0 and {"embedding", "image_embeds"} <= set(table.schema.names)
    assert table.schema.field("image_embeds").type.list_size == 8


def test_a_higher_max_decoded_pixels_redoes_the_images_it_refused(model_dir, data, tmp_path, capsys):
    out, shard = tmp_path / "out", data / "wds" / "00000.tar"
    assert _encode("--model", model_dir, "--out", out, shard, "--max-decoded-pixels", "1500") == 1
    few, _, record = _rows(out / "00000.parquet")
    refused = [e for e in record["errors"] if "over the limit of 1500 decoded pixels" in e["error"]]
    assert refused and len(few) == PER_SHARD - 1 - len(refused)  # the corrupt one aside
    capsys.readouterr()
    assert _encode("--model", model_dir, "--out", out, shard, "--max-decoded-pixels", "1500") == 0
    assert "skipping 1 of 1 shard" in capsys.readouterr().err  # the same limit: nothing new to read
    assert _encode("--model", model_dir, "--out", out, shard) == 1
    assert (
        "images refused for their size last time are within --max-decoded-pixels now"
        in capsys.readouterr().err
    )
    keys, _, record = _rows(out / "00000.parquet")
    assert len(keys) == PER_SHARD - 1 and [e["key"] for e in record["errors"]] == ["s00/0002"]


def test_another_shard_of_the_same_name_is_encoded_not_skipped(model_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    assert _encode("--model", model_dir, "--out", out, data / "wds" / "00000.tar") == 1
    moved = tmp_path / "moved" / "00000.tar"  # the same file elsewhere: finished
    moved.parent.mkdir()
    moved.write_bytes((data / "wds" / "00000.tar").read_bytes())
    capsys.readouterr()
    assert _encode("--model", model_dir, "--out", out, moved) == 0
    assert "skipping 1 of 1 shard" in capsys.readouterr().err
    other = write_webdataset(tmp_path / "other", shards=1, per_shard=8)[0]  # another dataset's 00000.tar
    assert _encode("--model", model_dir, "--out", out, other) == 1
    err = capsys.readouterr().err
    assert f"the input differs from the file it was made from ({data / 'wds' / '00000.tar'}, " in err
    keys, _, record = _rows(out / "00000.parquet")
    assert len(keys) == 7 and record["shard"] == str(other) and record["shard_bytes"] == other.stat().st_size
    # one of the same size (tar files are padded to 10 KiB): its first and last bytes tell it apart
    import tarfile

    same_size = tmp_path / "same" / "00000.tar"
    same_size.parent.mkdir()
    with tarfile.open(other) as src, tarfile.open(same_size, "w") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            member.mtime += 1
            dst.addfile(member, io.BytesIO(data[::-1] if member.name.endswith(".txt") else data))
    assert same_size.stat().st_size == other.stat().st_size and same_size.read_bytes() != other.read_bytes()
    assert _encode("--model", model_dir, "--out", out, same_size) == 1
    assert f"the input differs from the file it was made from ({other}, " in capsys.readouterr().err
    assert _rows(out / "00000.parquet")[2]["shard"] == str(same_size)


def test_a_redone_shard_keeps_only_its_own_pictures(model_dir, data, tmp_path):
    out = tmp_path / "out"
    assert _encode("--model", model_dir, "--out", out, data / "wds" / "00000.tar", "--preview") == 1
    assert len(list((out / "00000.pca").glob("*.png"))) == 4
    (out / "00000.pca" / "notes.txt").write_text("not ours")
    members = [(f"new{i}.{ext}", blob) for i, (_, blob, ext) in enumerate(samples(3, 2))]
    (tmp_path / "other").mkdir()
    other = _tar(tmp_path / "other" / "00000.tar", members)  # another dataset's shard of the same name
    assert _encode("--model", model_dir, "--out", out, other, "--preview") == 0
    assert sorted(p.name for p in (out / "00000.pca").iterdir()) == ["new0.png", "new1.png", "notes.txt"]
    other.write_bytes(other.read_bytes() + bytes(10240))  # changed again: redone, now without pictures
    assert _encode("--model", model_dir, "--out", out, other) == 0
    assert [p.name for p in (out / "00000.pca").iterdir()] == ["notes.txt"]
    (out / "00000.pca" / "notes.txt").unlink()
    other.write_bytes(other.read_bytes() + bytes(10240))
    assert _encode("--model", model_dir, "--out", out, other) == 0
    assert not (out / "00000.pca").exists()


@pytest.mark.parametrize("tokens", [[], ["--tokens"]])
def test_an_unreadable_file_named_like_a_token_file_is_moved_aside_not_deleted(
    model_dir, data, tmp_path, tokens
):
    out = tmp_path / "out"
    out.mkdir()
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 42\n"
    (out / "00000.safetensors").write_bytes(pointer)
    assert _encode("--model", model_dir, "--out", out, data / "wds" / "00000.tar", *tokens) == 1
    assert (out / "00000.safetensors.damaged").read_bytes() == pointer
    assert (out / "00000.safetensors").is_file() == bool(tokens)
    # redone: a second such file is moved aside beside the first, not over it
    (out / "00000.parquet").unlink()
    (out / "00000.safetensors").write_bytes(b"second")
    assert _encode("--model", model_dir, "--out", out, data / "wds" / "00000.tar", *tokens) == 1
    assert (out / "00000.safetensors.damaged").read_bytes() == pointer
    assert (out / "00000.safetensors.damaged.1").read_bytes() == b"second"


def test_run_as_a_module_an_error_of_the_shard_code_is_one_line(model_dir, data, tmp_path):
    """``python -m packvit_native.cli`` makes the file a second module beside the one the shard code imports;
    errors raised there are still caught and reported in one line."""
    from safetensors.torch import save_file

    out = tmp_path / "out"
    out.mkdir()
    save_file({"w": torch.zeros(2)}, out / "00000.safetensors")  # someone else's file, named like an output
    run = subprocess.run(
        [sys.executable, "-m", "packvit_native.cli", "encode", "--model", str(model_dir), "--out", str(out),
         str(data / "wds" / "00000.tar"), "--tokens"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip().endswith("move it away or encode into another --out")


def test_an_image_column_of_binary_views_is_read(model_dir, tmp_path):
    import pyarrow as pa

    rows = samples(0, 2)
    (tmp_path / "in").mkdir()
    table = pa.table(
        {"key": [k for k, _, _ in rows], "image": pa.array([d for _, d, _ in rows], pa.binary_view())}
    )
    pq.write_table(table, tmp_path / "in" / "p.parquet")
    assert _encode("--model", model_dir, "--out", tmp_path / "out", tmp_path / "in" / "p.parquet") == 0
    assert _rows(tmp_path / "out" / "p.parquet")[0] == [k for k, _, _ in rows]


def test_a_binary_key_column_gives_text_keys(model_dir, tmp_path):
    import pyarrow as pa

    rows = samples(0, 2)
    table = pa.table(
        {
            "id": pa.array([b"k1", b"caf\xe9"], pa.binary()),  # the second is Latin-1, not UTF-8
            "jpg": pa.array([d for _, d, _ in rows], pa.binary()),
        }
    )
    (tmp_path / "in").mkdir()
    pq.write_table(table, tmp_path / "in" / "p.parquet")
    options = ["--image-column", "jpg", "--key-column", "id"]
    assert (
        _encode("--model", model_dir, "--out", tmp_path / "out", tmp_path / "in" / "p.parquet", *options) == 0
    )
    keys, _, _ = _rows(tmp_path / "out" / "p.parquet")
    assert keys == ["k1", "caf\\xe9"]


def test_preview_added_on_a_rerun_redoes_the_shard(model_dir, data, tmp_path, capsys):
    out, shard = tmp_path / "out", data / "wds" / "00001.tar"
    assert _encode("--model", model_dir, "--out", out, shard) == 1
    before, embeddings, _ = _rows(out / "00001.parquet")
    capsys.readouterr()
    assert _encode("--model", model_dir, "--out", out, shard, "--preview") == 1
    assert "it was encoded without --preview (0 of 4 pictures in 00001.pca)" in capsys.readouterr().err
    keys, again, _ = _rows(out / "00001.parquet")
    assert keys == before and np.array_equal(again, embeddings)
    assert len(list((out / "00001.pca").glob("*.png"))) == len(keys)
    assert _encode("--model", model_dir, "--out", out, shard, "--preview") == 0
