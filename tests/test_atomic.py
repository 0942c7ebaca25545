"""All-or-nothing writes: every failure point of a file or folder write leaves the old version whole."""

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from packvit_native import atomic


def _write_text(text):
    def write(path):
        path.write_text(text)

    return write


def test_write_file_replaces_whole_and_respects_the_umask(tmp_path):
    target = tmp_path / "a.txt"
    old = os.umask(0o027)
    try:
        atomic.write_file(target, _write_text("one"))
        assert (target.stat().st_mode & 0o777) == 0o640
    finally:
        os.umask(old)
    os.umask(0o022)
    try:
        atomic.write_file(target, _write_text("two"))
        assert (target.stat().st_mode & 0o777) == 0o644
    finally:
        os.umask(old)
    assert target.read_text() == "two"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_write_file_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.txt"
    atomic.write_file(target, _write_text("old"))

    def disk_full(path):
        path.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic.write_file(target, disk_full)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_exclusive_write_claims_a_name_once(tmp_path):
    target = tmp_path / "part-00000"
    atomic.write_file(target, _write_text("first"), exclusive=True)
    with pytest.raises(FileExistsError):
        atomic.write_file(target, _write_text("second"), exclusive=True)
    assert target.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["part-00000"]


def _fill(text):
    def fill(folder):
        (folder / "config.json").write_text(text)
        (folder / "model.bin").write_text(text * 3)

    return fill


def test_replace_dir_needs_force_and_swaps_whole(tmp_path):
    out = tmp_path / "out"
    os.umask(old := os.umask(0o022))
    atomic.replace_dir(out, _fill("a"))
    assert (out.stat().st_mode & 0o777) == 0o777 & ~old
    assert ((out / "config.json").stat().st_mode & 0o777) == 0o666 & ~old
    with pytest.raises(FileExistsError, match=r"out already exists$"):
        atomic.replace_dir(out, _fill("b"))
    atomic.replace_dir(out, _fill("b"), force=True)
    assert (out / "config.json").read_text() == "b"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failing_fill_leaves_the_previous_folder(tmp_path):
    out = tmp_path / "out"
    atomic.replace_dir(out, _fill("a"))

    def fill(folder):
        (folder / "config.json").write_text("new")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        atomic.replace_dir(out, fill, force=True)
    assert (out / "config.json").read_text() == "a"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def _killed_between_the_renames(out, monkeypatch) -> None:
    """Write folder ``out`` ("a"), then replace it ("b") where folders cannot be swapped in one step, killed
    after the old folder was renamed aside and before the new one took its place."""
    atomic.replace_dir(out, _fill("a"))
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def killed_after_first_rename(src, dst):
        real_rename(src, dst)
        if str(dst).endswith(".aside"):
            raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "rename", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        atomic.replace_dir(out, _fill("b"), force=True)
    monkeypatch.setattr(atomic.os, "rename", real_rename)


def test_kill_between_the_fallback_renames_is_undone_by_the_next_run(tmp_path, monkeypatch):
    """Where the folders cannot be swapped in one step, a kill between the two renames leaves the old folder
    aside; the next call puts it back before doing anything else."""
    out = tmp_path / "out"
    _killed_between_the_renames(out, monkeypatch)
    (aside,) = tmp_path.glob(".out.*.aside")
    assert not out.exists() and aside.is_dir()
    atomic.remove_stale(tmp_path, "out")
    assert aside.exists()  # its writer (this process) is alive
    monkeypatch.setattr(atomic, "_pid_alive", lambda pid: False)
    atomic.remove_stale(tmp_path, "out")
    assert (out / "config.json").read_text() == "a"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_names_too_long_for_a_temporary_name_are_written(tmp_path, monkeypatch):
    """A name of up to 255 bytes is written, though its temporary name (host, pid, random part) would be longer;
    a folder of such a name moved aside by a kill between two renames is still put back."""
    name = "é" * 120 + ".safetensors"  # 252 bytes
    atomic.write_file(tmp_path / name, lambda tmp: tmp.write_text("x"))
    atomic.write_files([(tmp_path / (name[:-12] + ".parquet"), lambda tmp: tmp.write_text("y"))])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, name[:-12] + ".parquet"])
    out = tmp_path / ("d" * 250)
    _killed_between_the_renames(out, monkeypatch)
    monkeypatch.setattr(atomic, "_pid_alive", lambda pid: False)
    assert atomic.remove_stale(tmp_path) == [] and not out.exists()  # nameless: which folder is unknown
    atomic.replace_dir(out, _fill("c"), force=True)  # names it: the old folder is put back, then replaced
    assert (out / "config.json").read_text() == "c"
    assert len(list(tmp_path.iterdir())) == 3


@pytest.mark.parametrize("force", [False, True])
def test_a_users_previous_folder_is_never_touched(tmp_path, force):
    out, mine = tmp_path / "model", tmp_path / ".model.previous"
    mine.mkdir()
    (mine / "NOTES.txt").write_text("backup")
    if force:
        atomic.replace_dir(out, _fill("a"))
    atomic.replace_dir(out, _fill("b"), force=force)
    assert (mine / "NOTES.txt").read_text() == "backup"
    assert (out / "config.json").read_text() == "b"


def test_a_folder_that_appears_while_writing_is_kept_without_force(tmp_path):
    out = tmp_path / "out"

    def fill(folder):
        (folder / "config.json").write_text("new")
        out.mkdir()  # another run, or the user, made it meanwhile
        (out / "notes.txt").write_text("mine")

    with pytest.raises(FileExistsError, match="appeared while"):
        atomic.replace_dir(out, fill)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_empty_folder_that_appears_while_writing_is_kept_without_force(tmp_path):
    if sys.platform != "linux":
        pytest.skip("replacing an empty folder is refused in one step only with renameat2")
    out = tmp_path / "out"
    with pytest.raises(FileExistsError):
        atomic.replace_dir(out, lambda folder: (folder / "x").write_text("x") and out.mkdir())
    assert out.is_dir() and not any(out.iterdir())


def _honouring_file_modes() -> list[str]:
    """A command prefix under which file modes apply: none for an ordinary user; for root, setpriv dropping the
    capabilities that let root write, enter and chmod whatever it likes."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as root, where file modes do not apply, and setpriv is not installed")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]


REMOVE_TREE_SCRIPT = """
import os, sys
from pathlib import Path
from packvit_native import atomic
atomic._remove_tree(Path(sys.argv[1]))
atomic._remove_tree(Path(sys.argv[2]))
"""


def test_removing_an_old_folder_changes_nothing_outside_it(tmp_path):
    """A folder that cannot be listed is entered; one that cannot be emptied stays; neither is an error, and
    the folder holding them keeps its mode (a group-shared 2775)."""
    parent = tmp_path / "shared"
    parent.mkdir()
    parent.chmod(0o2775)
    unlisted = parent / ".old1"
    (unlisted / "sub").mkdir(parents=True)
    (unlisted / "sub" / "f").write_text("x")
    (unlisted / "sub").chmod(0)
    unremovable = parent / ".old2"
    (unremovable / "theirs").mkdir(parents=True)
    (unremovable / "theirs" / "f").write_text("x")
    if os.geteuid() == 0:
        os.chown(unremovable / "theirs", 65534, -1)  # nobody's folder: its file cannot be deleted by us
    else:
        (unremovable / "theirs").chmod(0o555)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [
        *_honouring_file_modes(),
        sys.executable,
        "-c",
        REMOVE_TREE_SCRIPT,
        str(unlisted),
        str(unremovable),
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    (unremovable / "theirs").chmod(0o755)
    assert run.returncode == 0, run.stderr
    assert not unlisted.exists()
    assert (unremovable / "theirs" / "f").exists()
    assert parent.stat().st_mode & 0o7777 == 0o2775


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders anyway")
def test_a_read_only_old_folder_is_replaced_and_removed(tmp_path):
    out = tmp_path / "out"
    atomic.replace_dir(out, _fill("a"))
    out.chmod(0o555)
    atomic.replace_dir(out, _fill("b"), force=True)
    assert (out / "config.json").read_text() == "b"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_exchange_swaps_in_one_step_on_linux(tmp_path):
    if sys.platform != "linux":
        pytest.skip("renameat2 is Linux-only; elsewhere the two-rename fallback above is what runs")
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    assert atomic._exchange(a, b)
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_stale_temporaries_of_dead_processes_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    host = atomic._host()
    stale = tmp_path / f".img.safetensors.{host}.{dead_pid}.abcd1234.tmp"
    live = tmp_path / f".img.safetensors.{host}.{os.getpid()}.abcd1234.tmp"
    other = tmp_path / f".img.safetensors.elsewhere.{dead_pid}.abcd1234.tmp"
    for p in (stale, live, other):
        p.write_text("x")
    assert atomic.remove_stale(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and other.exists()


def test_a_locked_temporary_of_an_unknown_pid_is_kept(tmp_path):
    """A writer in another PID namespace with the same host name looks dead by its pid; its lock keeps it."""
    import fcntl

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    busy = tmp_path / f".part-00000.safetensors.{atomic._host()}.{int(dead.stdout)}.abcd1234.tmp"
    busy.write_text("being written")
    fd = os.open(busy, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert atomic.remove_stale(tmp_path) == [] and busy.exists()
    finally:
        os.close(fd)
    assert atomic.remove_stale(tmp_path) == [busy] and not busy.exists()


def test_replace_dir_through_a_symlink_replaces_the_target_and_keeps_the_link(tmp_path):
    real = tmp_path / "real"
    atomic.replace_dir(real, _fill("a"))
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    atomic.replace_dir(link, _fill("b"), force=True)
    assert link.is_symlink() and (link / "config.json").read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_exclusive_claim_without_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(atomic.os, "link", no_links)
    target = tmp_path / "part-00000"
    atomic.write_file(target, _write_text("first"), exclusive=True)
    with pytest.raises(FileExistsError):
        atomic.write_file(target, _write_text("second"), exclusive=True)
    assert target.read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["part-00000"]


def test_umask_is_read_without_changing_it():
    old = os.umask(0o027)
    try:
        assert atomic.new_file_mode() == 0o640 and atomic.new_dir_mode() == 0o750
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(old)


def test_safetensors_are_written_into_the_locked_file_that_is_renamed(tmp_path, monkeypatch):
    """save_tensors writes its bytes in place: the file locked and flushed is the one that takes the name (not
    a file of the library's own renamed over it, which left the lock and fsync on an emptied file)."""
    import torch
    from safetensors.torch import load_file

    from packvit_native.cli import save_tensors

    locked, real_locked = [], atomic._locked

    @contextlib.contextmanager
    def watched(path):
        with real_locked(path) as fd:
            locked.append(os.fstat(fd).st_ino)
            yield fd

    monkeypatch.setattr(atomic, "_locked", watched)
    target = tmp_path / "t.safetensors"
    save_tensors(target, {"x": torch.arange(6.0)}, {"k": "v"})
    assert locked == [target.stat().st_ino]
    assert torch.equal(load_file(target)["x"], torch.arange(6.0))
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]


def test_ctrl_c_while_the_new_folder_is_put_in_place_lets_that_finish(tmp_path, monkeypatch):
    out = tmp_path / "out"
    atomic.replace_dir(out, _fill("a"))
    real_place = atomic._place

    def interrupted_place(tmp, target, force):
        signal.raise_signal(signal.SIGINT)
        return real_place(tmp, target, force)

    monkeypatch.setattr(atomic, "_place", interrupted_place)
    with pytest.raises(KeyboardInterrupt, match="written in full"):
        atomic.replace_dir(out, _fill("b"), force=True)
    assert (out / "config.json").read_text() == "b"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_no_folder_is_placed_under_a_file_or_at_a_mount_point(tmp_path):
    (tmp_path / "afile").write_text("notes")
    with pytest.raises(NotADirectoryError, match=f"{tmp_path / 'afile'} is a file, not a folder"):
        atomic.replace_dir(tmp_path / "afile" / "sub" / "out", _fill("a"))
    assert (tmp_path / "afile").read_text() == "notes"
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]
    with pytest.raises(OSError, match="is a mount point, which cannot be replaced as a whole") as info:
        atomic.check_placeable(Path("/"))  # a mount point on every system the tests run on
    assert info.value.errno == errno.EBUSY


def test_files_written_together_appear_together_under_the_folders_lock(tmp_path):
    """Two runs writing one shard's token and parquet files: each run's pair is renamed in while it holds the
    folder's lock, so the folder holds one run's pair, never one file of each."""
    import fcntl
    import threading

    folder = tmp_path / "out"
    folder.mkdir()
    pair = [folder / "00000.safetensors", folder / "00000.parquet"]

    def run(tag: str) -> None:
        atomic.write_files([(path, lambda tmp, tag=tag: tmp.write_text(tag)) for path in pair])

    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held as by another run in the middle of its renames
    writer = threading.Thread(target=run, args=("a",))
    writer.start()
    writer.join(timeout=1)
    assert writer.is_alive() and not any(path.exists() for path in pair)  # both written, waiting to rename
    staged = sorted(p.name for p in folder.iterdir())
    assert len(staged) == 2 and all(name.endswith(".tmp") for name in staged)
    os.close(fd)  # the other run is done
    writer.join(timeout=10)
    assert [path.read_text() for path in pair] == ["a", "a"]
    run("b")
    assert [path.read_text() for path in pair] == ["b", "b"]
    assert sorted(p.name for p in folder.iterdir()) == ["00000.parquet", "00000.safetensors"]
    with pytest.raises(ValueError, match="share one folder"):
        atomic.write_files([(folder / "a", lambda tmp: None), (tmp_path / "b", lambda tmp: None)])


def _refuse_notes(folder):
    return "holds NOTES.md" if (folder / "NOTES.md").exists() else None


@pytest.mark.parametrize("existed", [True, False])
def test_files_added_while_writing_are_never_deleted(tmp_path, existed):
    """A file written into OUT while the new folder is being filled (or OUT made then, holding one) keeps
    the folder it is in: the swap is undone and the call fails, naming what was added."""
    out = tmp_path / "out"
    if existed:
        atomic.replace_dir(out, _fill("a"))

    def fill_while_someone_writes(folder):
        _fill("b")(folder)
        out.mkdir(exist_ok=True)
        (out / "NOTES.md").write_text("mine")

    with pytest.raises(FileExistsError, match=r"NOTES\.md.*left as it was"):
        atomic.replace_dir(out, fill_while_someone_writes, force=True, not_replaceable=_refuse_notes)
    assert (out / "NOTES.md").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == (
        ["NOTES.md", "config.json", "model.bin"] if existed else ["NOTES.md"]
    )
    if existed:
        assert (out / "config.json").read_text() == "a"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the new folder is removed
    atomic.replace_dir(
        tmp_path / "other", _fill("c"), force=True, not_replaceable=_refuse_notes
    )  # a plain write


def test_a_failed_write_removes_the_parent_folders_it_made(tmp_path):
    (tmp_path / "a").mkdir()

    def disk_full(folder):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic.replace_dir(tmp_path / "a" / "b" / "c" / "out", disk_full)
    assert [p.name for p in tmp_path.iterdir()] == ["a"] and not any((tmp_path / "a").iterdir())


def test_a_group_shared_parent_keeps_its_setgid_bit(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o2775)
    (shared / "probe").mkdir()
    if not (shared / "probe").stat().st_mode & 0o2000:
        pytest.skip("this file system does not pass a folder's setgid bit on to new folders")
    atomic.replace_dir(shared / "out", _fill("a"))
    assert (shared / "out").stat().st_mode & 0o2000


def test_a_failed_swap_back_keeps_the_folder_with_the_added_files(tmp_path, monkeypatch):
    out = tmp_path / "out"
    atomic.replace_dir(out, _fill("a"))

    def fill_while_someone_writes(folder):
        _fill("b")(folder)
        (out / "NOTES.md").write_text("mine")

    def put_back_fails(old, out):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(atomic, "_put_back", put_back_fails)
    with pytest.raises(FileExistsError, match=r"could not be put back .*kept as"):
        atomic.replace_dir(out, fill_while_someone_writes, force=True, not_replaceable=_refuse_notes)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("out.kept-")]
    assert len(kept) == 1 and (kept[0] / "NOTES.md").read_text() == "mine"
    assert (out / "config.json").read_text() == "b"
