"""Writing files and folders so that nothing is lost or half-written, under a kill, a power cut or a full disk.

Every output is first written under a temporary sibling name, flushed to disk (``fsync``), given the mode a
new file gets under the process umask (as ``cp`` does: ``0o666 & ~umask``, folders ``0o777 & ~umask``), and
only then renamed into place, after which the folder itself is flushed so the rename survives a power cut.
A reader therefore sees the complete old version or the complete new one, never a mix or a truncated file.

Temporary names carry the writer's host and process id: ``.NAME.HOST.PID.RANDOM.tmp``. A later run removes the
leftovers of processes on this host that are no longer alive (:func:`remove_stale`) and leaves those of live
processes (a concurrent run) alone.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import socket
import threading
from collections.abc import Callable
from pathlib import Path

__all__ = ["new_dir_mode", "new_file_mode", "remove_stale", "replace_dir", "temp_name", "write_file"]

_UMASK_LOCK = threading.Lock()
_RENAME_EXCHANGE = 2  # linux/fs.h


def _umask() -> int:
    with _UMASK_LOCK:  # os.umask can only be read by setting it; the lock keeps other threads out meanwhile
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def new_file_mode() -> int:
    return 0o666 & ~_umask()


def new_dir_mode() -> int:
    return 0o777 & ~_umask()


def _host() -> str:
    return "".join(c if c.isalnum() or c == "-" else "-" for c in socket.gethostname()) or "host"


def temp_name(name: str) -> str:
    """A fresh temporary sibling name for ``name`` that records this host and process."""
    return f".{name}.{_host()}.{os.getpid()}.{secrets.token_hex(4)}.tmp"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, write: Callable[[Path], None], *, exclusive: bool = False) -> None:
    """Create or replace ``path`` with what ``write(tmp)`` writes to a temporary path, all or nothing.

    Args:
        path: the final file.
        write: writes the whole content to the path it is given (which does not exist yet).
        exclusive: refuse to replace an existing ``path`` (``FileExistsError``); two writers racing for one
            name cannot both succeed, so this claims a name.
    """
    path = Path(path)
    tmp = path.parent / temp_name(path.name)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, new_file_mode())
        if exclusive:
            os.link(tmp, path)  # fails with EEXIST instead of replacing; the temp name is removed below
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where that is unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def replace_dir(out: Path, fill: Callable[[Path], None], *, force: bool = False) -> Path:
    """Create (or with ``force`` replace) folder ``out`` with what ``fill(tmp)`` writes into an empty folder.

    The folder is complete and flushed before it appears under ``out``. Replacing swaps the two folders in one
    step where the system can (Linux), so ``out`` is at every instant the complete old or the complete new
    folder; elsewhere the old folder is renamed aside first, a window a kill could fall into, and the next call
    for ``out`` puts it back (see :func:`remove_stale`).

    Raises:
        FileExistsError: ``out`` exists and ``force`` is not set, or ``out`` is not a folder.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out.parent, out.name)
    tmp = out.parent / temp_name(out.name)
    tmp.mkdir(mode=0o700)
    try:
        fill(tmp)
        for f in tmp.iterdir():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.chmod(f, new_file_mode())
        os.chmod(tmp, new_dir_mode())
        _fsync_dir(tmp)
        if not out.exists():
            os.rename(tmp, out)
        elif _exchange(tmp, out):
            shutil.rmtree(tmp)  # tmp now holds the previous folder
        else:
            aside = out.parent / f".{out.name}.previous"
            os.rename(out, aside)
            os.rename(tmp, out)
            shutil.rmtree(aside)
        _fsync_dir(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale(folder: Path, name: str | None = None) -> list[Path]:
    """Remove temporary files and folders in ``folder`` left by dead processes of this host (for ``name``
    only, if given), and restore a folder a kill left renamed aside. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    host = _host()
    for entry in folder.iterdir():
        parts = entry.name.rsplit(".", 4)  # ['.NAME', HOST, PID, RANDOM, 'tmp']
        if len(parts) != 5 or parts[4] != "tmp" or not parts[2].isdigit() or parts[1] != host:
            continue
        if name is not None and parts[0] != f".{name}":
            continue
        if _pid_alive(int(parts[2])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    for aside in folder.glob(".*.previous") if name is None else [folder / f".{name}.previous"]:
        target = folder / aside.name[1 : -len(".previous")]
        if aside.is_dir() and not target.exists():
            os.rename(aside, target)  # a kill fell between the two renames of a replacement: undo it
        elif aside.is_dir():
            shutil.rmtree(aside, ignore_errors=True)
    return removed
