"""The Ray Data engine on a local Ray (2 CPUs): ``packvit encode --engine ray`` gives the local engine's outputs
and resumes its runs, and :func:`packvit_native.ray_data.encode_dataset` encodes a dataset's image column."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from safetensors.torch import load_file
from shard_data import CORRUPT, as_files, samples, write_parquet, write_webdataset

import packvit_native as pv
from packvit_native.cli import encode_args, main


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _encode(*args) -> int:
    return main(["encode", *map(str, args)])


def _table(path):
    table = pq.read_table(path)
    return table, json.loads(table.schema.metadata[b"packvit"])


def test_ray_engine_matches_the_local_engine_and_resumes_its_run(model_dir, tmp_path, capsys):
    write_webdataset(tmp_path / "wds", shards=3, per_shard=5)
    pattern = tmp_path / "wds" / "{00000..00002}.tar"
    local, remote = tmp_path / "local", tmp_path / "ray"
    common = ["--model", model_dir, pattern, "--tokens", "--prefix", "--max-tokens", 150]
    assert _encode(*common, "--out", local, "--device", "cpu") == 1
    # the Ray run starts from a folder where one shard is finished already (as after a killed run)
    remote.mkdir()
    for name in ("00001.parquet", "00001.safetensors", "packvit-encode.json"):
        (remote / name).write_bytes((local / name).read_bytes())
    capsys.readouterr()
    assert _encode(*common, "--out", remote, "--engine", "ray", "--workers", 1) == 1
    err = capsys.readouterr().err
    assert "skipping 1 of 3 shards" in err and "encoded 8 images" in err
    assert "img/s end to end" in err and "img/s in the model alone" in err
    for s in (0, 2):
        assert f"{s:05d}.tar: sample 's{s:02d}/0002' skipped: cannot read image" in err
    for s in range(3):
        (a, ra), (b, rb) = _table(local / f"{s:05d}.parquet"), _table(remote / f"{s:05d}.parquet")
        assert a.column("key").to_pylist() == b.column("key").to_pylist()
        assert a.drop_columns(["embedding"]).equals(b.drop_columns(["embedding"]))  # grid, json, txt
        np.testing.assert_allclose(
            np.stack(a.to_pandas().embedding), np.stack(b.to_pandas().embedding), rtol=0, atol=1e-6
        )
        assert [e["key"] for e in ra["errors"]] == [e["key"] for e in rb["errors"]] == [f"s{s:02d}/0002"]
        assert ra["settings"] == rb["settings"] and ra["model"]["sha256"] == rb["model"]["sha256"]
        ta, tb = load_file(local / f"{s:05d}.safetensors"), load_file(remote / f"{s:05d}.safetensors")
        assert ta.keys() == tb.keys() == {"features", "prefix", "grid_thw", "offsets"}
        for key in ta:
            torch.testing.assert_close(ta[key], tb[key], rtol=0, atol=1e-6)


def test_ray_engine_reads_parquet_with_kept_columns(model_dir, tmp_path, capsys):
    write_parquet(tmp_path / "pq", shards=2, per_shard=5)
    out, local = tmp_path / "out", tmp_path / "local"
    args = ["--model", model_dir, tmp_path / "pq" / "part-{0..1}.parquet", "--image-column", "jpg"]
    args += ["--key-column", "id", "--keep-columns", "caption"]
    assert _encode(*args, "--out", out, "--engine", "ray", "--gpus-per-worker", 0, "--preview") == 1
    assert _encode(*args, "--out", local, "--device", "cpu", "--preview") == 1
    for s in range(2):
        (a, ra), (b, rb) = _table(out / f"part-{s}.parquet"), _table(local / f"part-{s}.parquet")
        assert a.schema.names == ["key", "grid_thw", "embedding", "caption"]
        assert a.drop_columns(["embedding"]).equals(b.drop_columns(["embedding"]))
        np.testing.assert_allclose(
            np.stack(a.to_pandas().embedding), np.stack(b.to_pandas().embedding), rtol=0, atol=1e-6
        )
        assert ra["errors"][0]["key"] == rb["errors"][0]["key"] == f"s1{s}/0002"
        pictures = sorted(p.name for p in (out / f"part-{s}.pca").iterdir())
        assert pictures == sorted(k.replace("/", "%2F") + ".png" for k in a.column("key").to_pylist())
        for name in pictures:  # the same picture from the actors as from the local engine
            assert (out / f"part-{s}.pca" / name).read_bytes() == (
                local / f"part-{s}.pca" / name
            ).read_bytes()


def test_kept_columns_of_another_type_stop_both_engines_with_one_line(model_dir, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_parquet(tmp_path / "pq", shards=2, per_shard=3)
    second = tmp_path / "pq" / "part-1.parquet"
    table = pq.read_table(second)
    ints = pa.array(range(table.num_rows), pa.int64())
    pq.write_table(table.set_column(table.schema.get_field_index("caption"), "caption", ints), second)
    args = ["--model", model_dir, tmp_path / "pq" / "part-{0..1}.parquet", "--image-column", "jpg"]
    args += ["--key-column", "id", "--keep-columns", "caption"]
    for engine in (["--engine", "ray", "--gpus-per-worker", 0], ["--device", "cpu"]):
        assert _encode(*args, "--out", tmp_path / engine[1], *engine) == 2
        # Ray logs the task's failure itself; our own last line says it as the local engine does
        ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("packvit encode: ")]
        assert ours[-1].startswith("packvit encode: error: --keep-columns caption: ") and (
            "do not fit the column's type" in ours[-1]
        )


def test_columns_named_like_outputs_are_refused(model_dir, tmp_path, capsys):
    from packvit_native.ray_data import encode_dataset

    write_parquet(tmp_path / "pq", shards=1, per_shard=2)
    args = [
        "--model",
        model_dir,
        tmp_path / "pq" / "part-0.parquet",
        "--image-column",
        "jpg",
        "--key-column",
        "id",
    ]
    for name in ("error", "embedding", "_shard"):
        assert _encode(*args, "--keep-columns", name, "--out", tmp_path / "out", "--engine", "ray") == 2
        assert f"--keep-columns {name}: the outputs have columns of that name" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    ds = ray.data.from_arrow(pa.table({"image": pa.array([b"x"], pa.binary()), "error": ["download ok"]}))
    with pytest.raises(ValueError, match="columns error have the names of columns encode_dataset adds"):
        encode_dataset(ds, str(model_dir))
    with pytest.raises(ValueError, match="add it"):
        encode_dataset(ds.drop_columns(["error"]), str(model_dir), layers=[-2])


def test_encode_dataset_adds_embeddings_and_reports_bad_samples(model_dir, tmp_path):
    from packvit_native.ray_data import encode_dataset

    rows = samples(7, 6)
    ds = ray.data.from_arrow(
        pa.table(
            {
                "key": [k for k, _, _ in rows],
                "image": pa.array([d for _, d, _ in rows], pa.binary()),
                "label": list(range(len(rows))),
            }
        )
    )
    result = encode_dataset(ds, str(model_dir), tokens=True, max_tokens=120)
    out = {r["key"]: r for r in result.take_all()}
    assert set(out) == {k for k, _, _ in rows}
    model = pv.from_pretrained(model_dir)
    files = as_files(tmp_path / "files", [rows])
    for key, row in out.items():
        assert set(row) == {"key", "label", "grid_thw", "embedding", "features", "error"}
        if key not in files:  # the corrupt sample
            assert row["embedding"] is None and "cannot read image" in row["error"]
            continue
        patches, grid = pv.preprocess(files[key], model)
        with torch.no_grad():
            want = model(patches, grid, return_dict=True)
        assert row["error"] is None and list(row["grid_thw"]) == grid[0].tolist()
        np.testing.assert_allclose(
            np.asarray(row["embedding"]), want.pooler_output[0].numpy(), rtol=0, atol=1e-6
        )
        features = np.stack([np.asarray(t) for t in row["features"]])
        np.testing.assert_allclose(features, want.last_hidden_state.numpy(), rtol=0, atol=1e-6)
    assert sum(1 for _, d, _ in rows if d == CORRUPT) == 1

    with pytest.raises(ValueError, match="out of range"):
        encode_dataset(ds, str(model_dir), layers=[99], tokens=True)
    with pytest.raises(TypeError, match="unknown encode settings: bogus"):
        encode_dataset(ds, str(model_dir), bogus=1)


def test_graphs_need_gpu_actors(model_dir, tmp_path, capsys):
    write_webdataset(tmp_path / "wds", shards=1, per_shard=2)
    shards = tmp_path / "wds" / "00000.tar"
    args = [
        "--model",
        model_dir,
        shards,
        "--out",
        tmp_path / "out",
        "--engine",
        "ray",
        "--gpus-per-worker",
        0,
    ]
    assert _encode(*args, "--graphs") == 2
    assert "--graphs replays CUDA graphs: give the model actors GPUs" in capsys.readouterr().err
    with pytest.raises(ValueError, match="graphs=True replays CUDA graphs"):
        from packvit_native.ray_data import encode_dataset

        encode_dataset(ray.data.from_items([{"image": b""}]), str(model_dir), graphs=True)


def test_what_would_wait_forever_or_fail_in_every_actor_is_refused_up_front(model_dir, tmp_path, capsys):
    """On this 2-CPU cluster: two CPU actors would hold both CPUs and leave none to read (Ray waits forever);
    GPU actors on a cluster without GPUs would never start; settings the command line refuses, a missing image
    column and an attention backend the CPU actors cannot run are refused on the driver."""
    from packvit_native.ray_data import encode_dataset

    ds = ray.data.from_items([{"image": b""}])
    refused = [
        ({"workers": 2}, "2 model workers on CPUs would hold all 2 CPUs of the Ray cluster"),
        ({"gpus_per_worker": 1}, "the Ray cluster has no GPU"),
        ({"resample": "nearest"}, "resample must be one of 'bilinear', 'bicubic', got 'nearest'"),
        ({"dtype": "fp16"}, "dtype must be one of"),
        ({"max_tokens": 0}, "max_tokens must be a positive integer, got 0"),
        ({"image_column": "jpg"}, "the dataset has no column 'jpg' \\(image_column\\); its columns: image"),
        ({"attn_backend": "fa4"}, "attention backend 'fa4' is not available: it needs a CUDA GPU"),
    ]
    for settings, message in refused:
        with pytest.raises(ValueError, match=message):
            encode_dataset(ds, str(model_dir), **settings)
    layers = encode_args(model=str(model_dir), layers=-2).layers  # an int, as the command line's --layers=-2
    assert layers == [-2]
    write_webdataset(tmp_path / "wds", shards=1, per_shard=2)
    common = [
        "--model",
        model_dir,
        tmp_path / "wds" / "00000.tar",
        "--out",
        tmp_path / "out",
        "--engine",
        "ray",
    ]
    for extra, message in (
        (["--workers", 2], "2 model workers on CPUs would hold all 2 CPUs"),
        (["--attn-backend", "fa4"], "attention backend 'fa4' is not available: it needs a CUDA GPU"),
    ):
        assert _encode(*common, *extra) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_errors_without_a_key_keep_what_they_stand_for(model_dir, tmp_path, capsys):
    """A parquet row without a key travels from the read stage to the record as that row, not as an archive."""
    rows = samples(40, 3)
    keys = [rows[0][0], None, rows[2][0]]
    table = pa.table({"key": keys, "image": pa.array([d for _, d, _ in rows], pa.binary())})
    pq.write_table(table, tmp_path / "rows.parquet")
    out = tmp_path / "out"
    assert _encode("--model", model_dir, "--out", out, tmp_path / "rows.parquet", "--engine", "ray") == 1
    assert "rows.parquet: row 1 skipped: no key" in capsys.readouterr().err
    written, record = _table(out / "rows.parquet")
    assert written.column("key").to_pylist() == [k for k, d, _ in (rows[0], rows[2]) if d != CORRUPT]
    assert record["errors"][0] == {"key": None, "part": "row 1", "error": "no key"}


def test_token_columns_are_read_at_their_offsets():
    """A column whose rows, or whose fixed-size token lists, are slices of longer buffers reads as its own rows."""
    from packvit_native.ray_data import _fixed, _ragged

    dim = 2
    tokens = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(20, dtype=np.float32)), dim)  # 10 tokens
    inner = tokens.slice(3)  # tokens 3..9: a child that starts inside its buffer
    column = pa.ListArray.from_arrays(pa.array([0, 2, 2, 7], pa.int32()), inner)  # rows of 2, 0 and 5 tokens
    got = _ragged(pa.chunked_array([column.slice(1)]), dim)  # and the rows sliced too
    expected = np.arange(20, dtype=np.float32).reshape(10, dim)
    assert [g.shape[0] for g in got] == [0, 5] and np.array_equal(got[1], expected[5:10])
    pooled = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(8, dtype=np.float32)), dim).slice(1, 2)
    assert np.array_equal(_fixed(pa.chunked_array([pooled])), expected[1:3])
