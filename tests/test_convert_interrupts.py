"""packvit-convert under kills and Ctrl-C: OUT is always a complete checkpoint (the old or the new one), an
interrupt prints one line and exits 130, and what a killed run left behind is removed by the next run."""

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import packvit_native as pv
from packvit_native import atomic
from weights_convert.cli import main as convert_cli

ROOT = Path(__file__).resolve().parents[1]


def _digest(folder: Path) -> tuple[tuple[str, str], ...]:
    return tuple((p.name, hashlib.sha256(p.read_bytes()).hexdigest()) for p in sorted(folder.iterdir()))


def _wait_dead(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} still alive after SIGKILL")


# Imports once, then forks a converter per request that replaces OUT with --force, alternating float32 and
# bfloat16, until killed. Forking before torch has run anything is safe, and spares an import per kill.
# SIGCHLD ignored: the kernel reaps killed children at once, so their pids read as dead to the next run.
LOOPING_CONVERTER = """
import os, signal, sys
from weights_convert.cli import main
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
src, out = sys.argv[1:3]
print("ready", flush=True)
for _ in sys.stdin:
    pid = os.fork()
    if pid == 0:
        quiet = os.open(os.devnull, os.O_WRONLY)
        os.dup2(quiet, 1)
        os.dup2(quiet, 2)
        for i in range(10**9):
            main([src, out, "--force", "--dtype", ("float32", "bfloat16")[i % 2]])
    print(pid, flush=True)
"""


def test_sigkill_at_random_moments_leaves_a_complete_out(tiny_reference, tmp_path):
    src = tiny_reference("dinov3", "gelu")
    versions = {}
    for dtype in ("float32", "bfloat16"):
        assert convert_cli([str(src), str(tmp_path / dtype), "--dtype", dtype]) == 0
        versions[_digest(tmp_path / dtype)] = dtype
    work = tmp_path / "work"
    out = work / "out"
    assert convert_cli([str(src), str(out), "--dtype", "float32"]) == 0

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    zygote = subprocess.Popen(
        [sys.executable, "-c", LOOPING_CONVERTER, str(src), str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    rng = random.Random(0)
    seen = []
    try:
        assert zygote.stdout.readline() == "ready\n"
        for _ in range(12):
            zygote.stdin.write("go\n")
            zygote.stdin.flush()
            pid = int(zygote.stdout.readline())
            time.sleep(rng.uniform(0.0, 0.5))
            os.kill(pid, signal.SIGKILL)
            _wait_dead(pid)
            state = _digest(out)
            assert state in versions, f"OUT is neither complete checkpoint after a kill: {state}"
            seen.append(versions[state])
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=30)
    assert pv.from_pretrained(out) is not None
    # Whatever the kills left (temporary folders of dead processes) goes with the next run into that parent.
    assert convert_cli([str(src), str(out), "--force"]) == 0
    assert [p.name for p in work.iterdir()] == ["out"], f"left behind; states seen after kills: {seen}"


def test_next_convert_removes_stale_temp_folders_of_dead_runs_only(tiny_reference, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    def temp_folder(pid: int) -> Path:
        prefix, _, rand, tmp = atomic.temp_name("out").rsplit(".", 3)  # '.out.HOST', PID, RANDOM, 'tmp'
        folder = tmp_path / f"{prefix}.{pid}.{rand}.{tmp}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half-written")
        return folder

    stale, live = temp_folder(dead.pid), temp_folder(os.getpid())  # live: a concurrent run, still writing
    assert convert_cli([str(tiny_reference("dinov3", "gelu")), str(tmp_path / "out")]) == 0
    assert not stale.exists()
    assert live.exists()


@pytest.mark.parametrize("phase", ["reading", "writing", "replacing"])
def test_ctrl_c_is_one_line_exit_130_and_leaves_old_out(tiny_reference, tmp_path, capsys, monkeypatch, phase):
    import packvit_native.io as io
    import weights_convert.cli as cli

    src = tiny_reference("dinov3", "gelu")
    out = tmp_path / "out"
    assert convert_cli([str(src), str(out)]) == 0
    before = _digest(out)
    capsys.readouterr()

    def ctrl_c_after(fn):
        def wrapped(*args, **kwargs):
            result = fn(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGINT)  # a real SIGINT, through Python's own handler
            return result

        return wrapped

    if phase == "reading":
        monkeypatch.setattr(cli, "convert_directory", ctrl_c_after(cli.convert_directory))
    elif phase == "writing":
        monkeypatch.setattr(io, "save_file", ctrl_c_after(io.save_file))
    else:  # the new folder is complete and flushed, about to be swapped in
        fsync = atomic._fsync

        def fsync_then_ctrl_c_at_the_folder(path):
            (ctrl_c_after(fsync) if Path(path).is_dir() else fsync)(path)

        monkeypatch.setattr(atomic, "_fsync", fsync_then_ctrl_c_at_the_folder)
    assert convert_cli([str(src), str(out), "--force", "--dtype", "bfloat16"]) == 130
    captured = capsys.readouterr()
    assert captured.err == "packvit-convert: interrupted\n" and captured.out == ""
    assert _digest(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "no temporary folder left"


INTERRUPTED_CONVERTER = """
import sys, time
import packvit_native.io as io
from weights_convert.cli import main

def slow_save(*args, **kwargs):
    io_save(*args, **kwargs)
    print("writing", flush=True)
    time.sleep(60)

io_save, io.save_file = io.save_file, slow_save
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_of_the_real_process_prints_no_traceback(tiny_reference, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [str(tiny_reference("dinov3", "gelu")), str(tmp_path / "out")]
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED_CONVERTER, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        assert proc.stdout.readline() == "writing\n"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert stderr == "packvit-convert: interrupted\n"
    assert list(tmp_path.iterdir()) == []
