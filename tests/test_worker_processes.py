"""``packvit encode --processes``: decoding in worker processes gives the threads' outputs bit for bit, lists
the same unreadable samples, and a worker that dies stops the run with a message; a rerun completes it."""

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from shard_data import CORRUPT, as_files, samples, write_webdataset

import packvit_native as pv
from packvit_native import worker_processes
from packvit_native.cli import main, prefetch
from packvit_native.preprocess import LOADING_NICENESS
from packvit_native.shards import preprocess_bytes
from packvit_native.worker_processes import LoadingFailed, LoadingProcesses


def _encode(*args) -> int:
    return main(["encode", *map(str, args), "--device", "cpu", "--workers", "2"])


def _table(path):
    table = pq.read_table(path)
    record = json.loads(table.schema.metadata[b"packvit"])
    return table.column("key").to_pylist(), np.stack(table.to_pandas().embedding), record


def test_processes_give_the_threads_outputs(model_dir, tmp_path, capsys):
    write_webdataset(tmp_path / "wds", shards=2, per_shard=5)
    shards = tmp_path / "wds" / "{00000..00001}.tar"
    common = ["--model", model_dir, shards, "--tokens", "--max-tokens", 150]
    assert _encode(*common, "--out", tmp_path / "threads") == 1  # 1: each shard has a corrupt sample
    threads_err = capsys.readouterr().err
    assert _encode(*common, "--out", tmp_path / "processes", "--processes") == 1
    processes_err = capsys.readouterr().err
    for s in ("00000", "00001"):
        (ka, ea, ma), (kb, eb, mb) = (_table(tmp_path / d / f"{s}.parquet") for d in ("threads", "processes"))
        assert ka == kb and len(ka) == 4 and np.array_equal(ea, eb) and ma["errors"] == mb["errors"]
        a = load_file(tmp_path / "threads" / f"{s}.safetensors")
        b = load_file(tmp_path / "processes" / f"{s}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    skipped = [line for line in threads_err.splitlines() if "skipped" in line]
    assert len(skipped) == 2 and all(line in processes_err for line in skipped)


def test_processes_encode_image_files(model_dir, tmp_path):
    folder = tmp_path / "files"
    as_files(folder, [samples(0, 4)])
    (folder / "broken.jpg").write_bytes(CORRUPT)
    assert _encode("--model", model_dir, folder, "--out", tmp_path / "threads") == 1
    assert _encode("--model", model_dir, folder, "--out", tmp_path / "processes", "--processes") == 1
    written = sorted(
        p.relative_to(tmp_path / "threads") for p in (tmp_path / "threads").rglob("*.safetensors")
    )
    assert len(written) == 3
    for name in written:
        a, b = load_file(tmp_path / "threads" / name), load_file(tmp_path / "processes" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_processes_apply_to_local_cpu_decoding(model_dir, tmp_path, capsys):
    write_webdataset(tmp_path / "wds", shards=1, per_shard=2)
    args = ["--model", model_dir, tmp_path / "wds" / "00000.tar", "--out", tmp_path / "out", "--processes"]
    for other in (["--decode", "gpu"], ["--engine", "ray"]):
        assert _encode(*args, *other) == 2
        assert (
            "--processes runs the decoding workers of --decode cpu --engine local" in capsys.readouterr().err
        )
    assert not (tmp_path / "out").exists()


def _jpeg(side: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), 90, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def test_a_worker_that_dies_fails_what_is_queued(model_dir):
    config = pv.from_pretrained(model_dir).config
    args = argparse.Namespace(dtype="float32", resample=None, max_decoded_pixels=None)
    rule = {"max_patches": None, "min_pixels": None, "max_pixels": None, "size": None}
    loads = LoadingProcesses(lambda data: data, 2, config, args, rule, pin=False)
    try:
        patches, grid = loads.submit(_jpeg(32)).result(timeout=120)
        here = preprocess_bytes(_jpeg(32), config, args, rule)  # what a loading thread makes
        assert torch.equal(grid, here[1]) and torch.equal(patches, here[0])
        with pytest.raises(ValueError, match="cannot read image"):
            loads.submit(b"not an image").result(timeout=60)
        assert loads.submit(None).result() is None
        mine = os.getpriority(os.PRIO_PROCESS, 0)
        for pid in loads.pool._processes:  # the workers yield cores to the thread feeding the model
            assert os.getpriority(os.PRIO_PROCESS, pid) == min(mine + LOADING_NICENESS, 19)
        for pid in list(loads.pool._processes):
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(LoadingFailed, match="a loading process ended"):
            for _ in range(4):
                loads.submit(_jpeg(32)).result(timeout=60)
    finally:
        loads.close()


def _settings(model_dir, dtype="float32"):
    config = pv.from_pretrained(model_dir).config
    args = argparse.Namespace(dtype=dtype, resample=None, max_decoded_pixels=None)
    rule = {"max_patches": None, "min_pixels": None, "max_pixels": None, "size": None}
    return config, args, rule


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_patches_come_back_through_the_shared_slots(model_dir, monkeypatch, dtype):
    config, args, rule = _settings(model_dir, dtype)
    small, large = _jpeg(32), _jpeg(96)
    want = {}
    for side in (32, 96):
        patches, grid = preprocess_bytes(_jpeg(side), config, args, rule)
        want[side] = patches.to(getattr(torch, dtype)), grid
    # slots that hold the small image's patches and not the large one's, which travel on their own
    monkeypatch.setattr(worker_processes, "SLOT_BYTES", want[32][0].numel() * want[32][0].element_size())
    loads = LoadingProcesses(lambda data: data, 2, config, args, rule, pin=False)
    try:
        assert loads.slots is not None and len(loads.free) == loads.window + 1
        patches, grid = loads.submit(small).result(timeout=120)
        assert patches.dtype == want[32][0].dtype
        assert torch.equal(patches, want[32][0]) and torch.equal(grid, want[32][1])
        written = loads.slots[0].view(want[32][0].dtype)  # the first free slot, written by the worker
        assert torch.equal(written, want[32][0].reshape(-1))
        results = [loads.submit(data) for data in [large, small, b"not an image"] * 3]
        for f, side in zip(results, [96, 32, None] * 3, strict=True):
            if side is None:
                with pytest.raises(ValueError, match="cannot read image"):
                    f.result(timeout=60)
            else:
                patches, grid = f.result(timeout=60)
                assert patches.dtype == want[side][0].dtype
                assert torch.equal(patches, want[side][0]) and torch.equal(grid, want[side][1])
        assert sorted(loads.free) == list(range(loads.window + 1))  # every slot free again
    finally:
        loads.close()


def test_prefetch_always_finds_a_free_slot(model_dir, monkeypatch):
    """Through prefetch (as packvit encode submits), every image comes back through a slot, and a slot is
    still taken while its patches are copied out."""
    config, args, rule = _settings(model_dir, "bfloat16")
    received, receive = [], LoadingProcesses._received

    def watched(self, patches, slot):
        received.append((isinstance(patches, torch.Tensor), slot is not None and slot in self.free))
        return receive(self, patches, slot)

    monkeypatch.setattr(LoadingProcesses, "_received", watched)
    images = [_jpeg(24 + 8 * (i % 5)) for i in range(40)]
    loads = LoadingProcesses(lambda data: data, 2, config, args, rule, pin=False)
    try:
        for i, (data, future) in enumerate(prefetch(images, loads)):
            patches, grid = future.result(timeout=120)
            want = preprocess_bytes(data, config, args, rule)
            assert torch.equal(patches, want[0].to(torch.bfloat16)) and torch.equal(grid, want[1])
            if i % 7 == 0:
                time.sleep(0.05)  # a slow consumer lets the workers run ahead
    finally:
        loads.close()
    assert received == [(False, False)] * len(images)  # no tensor on its own; no slot freed before its copy


def test_without_room_for_the_slots_patches_travel_on_their_own(model_dir, monkeypatch):
    config, args, rule = _settings(model_dir)
    monkeypatch.setattr(worker_processes, "SLOT_BYTES", 1 << 50)  # more than any /dev/shm holds
    loads = LoadingProcesses(lambda data: data, 1, config, args, rule, pin=False)
    try:
        assert loads.slots is None and not loads.free
        patches, grid = loads.submit(_jpeg(40)).result(timeout=120)
        here = preprocess_bytes(_jpeg(40), config, args, rule)
        assert torch.equal(patches, here[0]) and torch.equal(grid, here[1])
    finally:
        loads.close()


def test_a_result_that_cannot_be_received_fails_its_image(model_dir, monkeypatch):
    config = pv.from_pretrained(model_dir).config
    args = argparse.Namespace(dtype="float32", resample=None, max_decoded_pixels=None)
    rule = {"max_patches": None, "min_pixels": None, "max_pixels": None, "size": None}
    loads = LoadingProcesses(lambda data: data, 1, config, args, rule, pin=True)

    def no_pinned_memory(*args, **kwargs):
        raise RuntimeError("out of pinned memory")

    # pinned memory runs out, for patches copied out of their slot and for those shared on their own
    monkeypatch.setattr(LoadingProcesses, "_allocate", no_pinned_memory)
    monkeypatch.setattr(torch.Tensor, "pin_memory", no_pinned_memory)
    try:
        for slots in (loads.slots, None):
            loads.slots = slots
            loads.free = deque(range(loads.window + 1) if slots is not None else ())
            with pytest.raises(LoadingFailed, match="could not be received: RuntimeError: out of pinned"):
                loads.submit(_jpeg(32)).result(timeout=60)  # raises, rather than never resolving
    finally:
        loads.close()


def _cannot_start():
    raise RuntimeError("this worker cannot start")


class Unstartable:
    """Settings whose unpickling fails in the worker, as a worker that cannot start."""

    def __reduce__(self):
        return _cannot_start, ()


def test_workers_that_cannot_start_say_so(model_dir):
    args = argparse.Namespace(dtype="float32", resample=None, max_decoded_pixels=None)
    with pytest.raises(LoadingFailed, match="the loading processes could not start"):
        LoadingProcesses(lambda data: data, 2, Unstartable(), args, {}, pin=False)


def test_a_run_whose_worker_dies_stops_and_resumes(model_dir, tmp_path, capsys, monkeypatch):
    write_webdataset(tmp_path / "wds", shards=3, per_shard=5)
    args = ["--model", model_dir, tmp_path / "wds" / "{00000..00002}.tar", "--out", tmp_path / "out"]
    args += ["--max-tokens", 150, "--processes"]
    submit, calls = LoadingProcesses.submit, []

    def kill_after_seven(self, item):
        calls.append(item)
        if len(calls) == 8:  # a worker killed mid-run, as by the OOM killer
            for pid in list(self.pool._processes):
                os.kill(pid, signal.SIGKILL)
        return submit(self, item)

    monkeypatch.setattr(LoadingProcesses, "submit", kill_after_seven)
    assert _encode(*args) == 2
    err = capsys.readouterr().err
    assert "a loading process ended" in err and "rerun the same command to resume" in err
    monkeypatch.setattr(LoadingProcesses, "submit", submit)
    assert _encode(*args) == 1  # the corrupt samples, listed
    for s in range(3):
        keys, embeddings, _ = _table(tmp_path / "out" / f"0000{s}.parquet")
        assert len(keys) == 4 == len(set(keys)) and np.isfinite(embeddings).all()


HANGING = """
import sys, time
import packvit_native.shards as shards
real_write = shards.write_shard
def write_then_hang(*args, **kwargs):
    real_write(*args, **kwargs)
    time.sleep(600)  # SIGKILL comes while this run and its workers are alive
shards.write_shard = write_then_hang
from packvit_native.cli import main, prefetch
sys.exit(main(sys.argv[1:]))
"""


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_workers_end_with_a_run_killed_by_sigkill(model_dir, tmp_path, reaped):
    """Also while the killed run is a zombie not yet reaped: a parent reading its output before reaping it
    (subprocess.run with capture_output) would otherwise wait for the workers forever."""
    write_webdataset(tmp_path / "wds", shards=2, per_shard=5)
    args = ["encode", "--model", str(model_dir), "--out", str(tmp_path / "out"), "--device", "cpu"]
    args += [str(tmp_path / "wds" / "{00000..00001}.tar"), "--processes", "--workers", "2"]
    proc = subprocess.Popen([sys.executable, "-c", HANGING, *args], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "out" / "00000.parquet").exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    workers = _descendants(proc.pid)
    assert len(workers) >= 3  # the fork server and two workers (and the resource tracker)
    proc.send_signal(signal.SIGKILL)
    if reaped:
        proc.wait(timeout=60)
    deadline = time.monotonic() + 30
    while workers & {int(p.name) for p in Path("/proc").glob("[0-9]*")}:
        assert time.monotonic() < deadline, f"left running: {sorted(workers)}"
        time.sleep(0.2)
    proc.communicate(timeout=60)  # returns: no worker holds the run's stderr any more
