"""Writing files and folders so that nothing is lost or half-written, under a kill, a power cut or a full disk.

Every output is first written under a temporary sibling name, flushed to disk (``fsync``), given the mode a
new file gets under the process umask (as ``cp`` does: ``0o666 & ~umask``, folders ``0o777 & ~umask``), and
only then renamed into place, after which the folder itself is flushed so the rename survives a power cut.
A reader therefore sees the complete old version or the complete new one, never a mix or a truncated file.

Temporary names carry the writer's host and process id: ``.NAME.HOST.PID.RANDOM.tmp`` (``.aside`` for a replaced
folder moved aside where folders cannot be swapped in one step), and the writer holds an exclusive ``flock`` on
its temporary file or folder while it writes. A NAME too long to fit is shortened to its start and a hash
(``_stem``). Nothing else in the folder is ever touched: a user's own
``.NAME.previous`` or backup stays. A later run removes a leftover only if
its process is gone from this host *and* nobody holds its lock (:func:`remove_stale`): a concurrent run in
another PID namespace that shares the host name keeps its files.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import sys
import threading
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "check_placeable",
    "claim_marker",
    "left_by_other_hosts",
    "new_dir_mode",
    "new_file_mode",
    "remove_stale",
    "replace_dir",
    "temp_name",
    "write_file",
    "write_files",
]

_UMASK_LOCK = threading.Lock()
_RENAME_NOREPLACE = 1  # linux/fs.h
_RENAME_EXCHANGE = 2


def _umask() -> int:
    """The process umask, read without changing it where the system tells it (Linux), else set and restored
    under a lock (a file created by another thread in between would get the temporary mask)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def new_file_mode() -> int:
    return 0o666 & ~_umask()


def new_dir_mode() -> int:
    return 0o777 & ~_umask()


def _host() -> str:
    return "".join(c if c.isalnum() or c == "-" else "-" for c in socket.gethostname()) or "host"


# A file name holds at most 255 bytes; the host (at most 64), the pid, the random part and the kind take up to
# about 90 of them, so a longer name is shortened in its temporary names to fit.
_STEM_BYTES = 160


def fit_name(name: str, max_bytes: int) -> str:
    """``name`` if it holds at most ``max_bytes`` bytes, else its start and a hash of the whole in that many:
    a distinct name for each long one, still recognisable."""
    raw = name.encode(errors="surrogateescape")
    if len(raw) <= max_bytes:
        return name
    start = raw[: max_bytes - 17].decode(errors="ignore")  # whole characters only
    return f"{start}~{hashlib.sha256(raw).hexdigest()[:16]}"


def _stem(name: str) -> str:
    """``name``, or for a name too long to fit in a temporary name, its start and a hash of the whole."""
    return fit_name(name, _STEM_BYTES)


def _shortened(stem: str) -> bool:
    return (
        len(stem.encode(errors="surrogateescape")) > _STEM_BYTES - 20
        and re.search(r"~[0-9a-f]{16}$", stem) is not None
    )


def temp_name(name: str, kind: str = "tmp") -> str:
    """A fresh temporary sibling name for ``name`` that records this host and process; ``kind`` ``"aside"``
    names a replaced folder moved aside (see :func:`remove_stale`)."""
    return f".{_stem(name)}.{_host()}.{os.getpid()}.{secrets.token_hex(4)}.{kind}"


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive ``flock`` on ``path`` (a file or a folder) for the duration of the block."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # releases the lock


def claim_marker(path: Path) -> Path:
    """The marker an exclusive write to ``path`` holds on a file system without hard links (see ``_claim``);
    a kill in the moment between its creation and removal leaves it behind."""
    return path.parent / f".{path.name}.claim"


def _claim(tmp: Path, path: Path) -> None:
    """Give ``tmp`` the name ``path`` unless ``path`` exists (``FileExistsError``), even against a racing writer.

    A hard link fails if the name is taken, atomically. Filesystems without hard links (some FUSE and SMB
    mounts) get a claim marker created exclusively instead, then a rename; readers only ever see whole files.
    """
    try:
        os.link(tmp, path)
        return
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
    marker = claim_marker(path)
    fd = os.open(
        marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600
    )  # FileExistsError if another writer has it
    os.close(fd)
    try:
        if path.exists():
            raise FileExistsError(errno.EEXIST, "already written", str(path))
        os.replace(tmp, path)
    finally:
        marker.unlink(missing_ok=True)


def write_file(path: Path, write: Callable[[Path], None], *, exclusive: bool = False) -> None:
    """Create or replace ``path`` with what ``write(tmp)`` writes to a temporary path, all or nothing.

    Args:
        path: the final file.
        write: writes the whole content to the path it is given, in place (the file exists, empty, and this
            process holds a lock on it that tells other runs it is in use).
        exclusive: refuse to replace an existing ``path`` (``FileExistsError``); two writers racing for one
            name cannot both succeed, so this claims a name.
    """
    path = Path(path)
    with contextlib.ExitStack() as stack:
        tmp = _staged(stack, path, write)
        if exclusive:
            _claim(tmp, path)
        else:
            os.replace(tmp, path)
        _fsync(path.parent)


def _staged(stack: contextlib.ExitStack, path: Path, write: Callable[[Path], None]) -> Path:
    """Write ``path``'s content whole under a temporary name, locked and removed when ``stack`` closes."""
    tmp = path.parent / temp_name(path.name)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    stack.callback(tmp.unlink, missing_ok=True)
    stack.enter_context(_locked(tmp))
    write(tmp)
    _fsync(tmp)  # by name: the file there now, even if a writer replaced the one it was given
    os.chmod(tmp, new_file_mode())
    return tmp


def write_files(files: list[tuple[Path, Callable[[Path], None]]]) -> None:
    """Create or replace several files of one folder together, each as :func:`write_file` writes one.

    All are written whole under temporary names first; then they are renamed into place in order while this
    process holds the folder's lock, so two writers of the same set (two runs encoding one shard) never leave
    one's file beside the other's: the folder holds the set of the one that renamed last.
    """
    folders = {path.parent for path, _ in files}
    if len(folders) != 1:
        raise ValueError(f"files written together must share one folder, not {sorted(map(str, folders))}")
    with contextlib.ExitStack() as stack:
        staged = [(_staged(stack, path, write), path) for path, write in files]
        (folder,) = folders
        with _locked(folder):
            for tmp, path in staged:
                os.replace(tmp, path)
            _fsync(folder)


def _renameat2(a: Path, b: Path, flags: int) -> bool:
    """Linux ``renameat2``; ``False`` where it, or ``flags`` on this file system, is unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))  # EEXIST becomes FileExistsError, ENOENT FileNotFoundError


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (``RENAME_EXCHANGE``); ``False`` where that is unsupported."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def rename_new(a: Path, b: Path) -> None:
    """Rename ``a`` to ``b``, raising ``FileExistsError`` if ``b`` exists: in one step where the system can
    (``RENAME_NOREPLACE``); elsewhere checked first, so a folder made at ``b`` in between, if empty, is replaced."""
    if _renameat2(a, b, _RENAME_NOREPLACE):
        return
    if b.exists() or b.is_symlink():
        raise FileExistsError(errno.EEXIST, "exists", str(b))
    os.rename(a, b)


def _remove_tree(path: Path) -> None:
    """Remove folder ``path`` as far as possible, entering read-only folders inside it (an old checkpoint kept
    0555). Nothing outside ``path`` is changed; what cannot be removed stays, for a later run to try again."""
    top = os.path.abspath(path)

    def inside(entry: str) -> bool:
        entry = os.path.abspath(entry)
        return entry == top or entry.startswith(top + os.sep)

    def enter_then_retry(func: Callable[..., object], entry: str, *_: object) -> None:
        with contextlib.suppress(OSError):
            if func in (os.rmdir, os.unlink, os.remove):  # its folder is read-only
                if inside(os.path.dirname(entry)):
                    os.chmod(os.path.dirname(entry), 0o700)
                    func(entry)
            elif inside(entry) and os.path.isdir(entry) and not os.path.islink(entry):  # could not be listed
                os.chmod(entry, 0o700)
                rmtree(entry)

    def rmtree(folder: str | Path) -> None:
        if sys.version_info >= (3, 12):
            shutil.rmtree(folder, onexc=enter_then_retry)
        else:
            shutil.rmtree(folder, onerror=enter_then_retry)

    rmtree(path)


@contextlib.contextmanager
def _ctrl_c_deferred(message: str):
    """Hold off Ctrl-C for the block (main thread only) and raise it after, saying ``message``: a step that must
    not stop halfway."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed and previous is signal.default_int_handler:
        raise KeyboardInterrupt(message)
    if pressed and callable(previous):  # the caller's own handler gets the signal it was held from
        previous(signal.SIGINT, None)


def check_placeable(out: Path) -> None:
    """Raise ``OSError`` naming the reason where no folder can be put at ``out``: a part of its path is a file
    or a dangling link, ``out`` is a mount point (which a rename cannot move aside), is named ``.`` or ``..``, or is a symbolic link
    to something other than a folder."""
    for parent in reversed(out.parents):
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{parent} is a file, not a folder", str(out))
        if parent.is_symlink() and not parent.exists():
            raise NotADirectoryError(errno.ENOTDIR, f"{parent} is a link to nothing, not a folder", str(out))
    if os.path.ismount(out):
        raise OSError(
            errno.EBUSY,
            "it is a mount point, which cannot be replaced as a whole; choose a folder inside it",
            str(out),
        )
    if out.name in ("", ".", ".."):
        raise OSError(errno.EINVAL, "name the folder by its own name, not '.' or '..'", str(out))
    if out.is_symlink() and not out.is_dir():
        raise OSError(
            errno.ENOTDIR,
            f"it is a symbolic link to {os.readlink(out)}, which is not a folder; remove the link or choose "
            "another path",
            str(out),
        )


def replace_dir(
    out: Path,
    fill: Callable[[Path], None],
    *,
    force: bool = False,
    not_replaceable: Callable[[Path], str | None] | None = None,
) -> Path:
    """Create (or with ``force`` replace) folder ``out`` with what ``fill(tmp)`` writes into an empty folder.

    The folder is complete and flushed before it appears under ``out``. Replacing swaps the two folders in one
    step where the system can (Linux), so ``out`` is at every instant the complete old or the complete new
    folder; elsewhere the old folder is renamed aside first, a window a kill could fall into, and the next call
    for ``out`` puts it back (see :func:`remove_stale`). A symbolic link to a folder is followed: the folder it
    points to is replaced and the link kept.

    ``not_replaceable(folder)`` says why a folder may not be replaced (``None``: it may). It is asked again of
    the folder that was swapped out, since files may have been added to it while the new folder was written:
    if it now refuses, the folder is swapped back and the new one removed. Parent folders this call created
    are removed again when it fails.

    Raises:
        FileExistsError: ``out`` exists and ``force`` is not set, ``out`` is not a folder, or
            ``not_replaceable`` refused the folder found at ``out`` when the new one was put in place.
        OSError: no folder can be put at ``out`` (see :func:`check_placeable`), or writing failed.
    """
    out = Path(out)
    if out.is_symlink() and out.is_dir():
        out = out.resolve()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists")
    check_placeable(out)
    created = [parent for parent in reversed(out.parents) if not parent.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(out.parent, out.name)
        tmp = out.parent / temp_name(out.name)
        tmp.mkdir(mode=0o700)
        try:
            with _locked(tmp):
                _fill_and_place(tmp, out, fill, force, not_replaceable)
        finally:
            if tmp.exists():
                _remove_tree(tmp)
    except BaseException:
        for parent in reversed(created):  # deepest first; one that holds anything now is someone's: kept
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
    return out


def _fill_and_place(
    tmp: Path,
    out: Path,
    fill: Callable[[Path], None],
    force: bool,
    not_replaceable: Callable[[Path], str | None] | None,
) -> None:
    fill(tmp)
    for f in tmp.iterdir():
        _fsync(f)
        os.chmod(f, new_file_mode())
    # A setgid bit inherited from the parent (a group-shared folder) is kept, as mkdir keeps it.
    os.chmod(tmp, new_dir_mode() | (os.stat(tmp).st_mode & stat.S_ISGID))
    _fsync(tmp)
    # From here the new folder is complete: once it is in place the call succeeds, Ctrl-C or not, and a
    # failure to remove the old folder leaves a stale temporary for a later run, not an error.
    with _ctrl_c_deferred(f"{out} was written in full before the interrupt"):
        old = _place(tmp, out, force)
        if old is not None and not_replaceable is not None and (reason := not_replaceable(old)):
            try:
                _put_back(old, out)
            except OSError as e:  # old holds the user's files: out of the temporary's way before cleanup
                kept = out.parent / f"{out.name}.kept-{secrets.token_hex(4)}"
                os.rename(old, kept)
                raise FileExistsError(
                    f"{out} {reason}; the new folder is in place and the previous one could not be put back "
                    f"({e.strerror or e}): it is kept as {kept}"
                ) from None
            raise FileExistsError(
                f"{out} {reason}: files were added to it while the new one was being written; it is left as "
                "it was"
            )
        _fsync(out.parent)
        if old is not None:
            _remove_tree(old)


def _put_back(old: Path, out: Path) -> None:
    """Undo :func:`_place`: the previous folder ``old`` goes back to ``out``, the new one is removed."""
    if not _exchange(old, out):
        new = out.parent / temp_name(out.name, "undone")
        os.rename(out, new)
        os.rename(old, out)
        old = new
    _fsync(out.parent)
    _remove_tree(old)  # the new folder now


def _place(tmp: Path, out: Path, force: bool) -> Path | None:
    """Put ``tmp`` in place as ``out``; the previous ``out`` (now under another name, to remove) or ``None``.

    Without ``force`` a folder that appeared under ``out`` since the caller checked is never replaced."""
    while True:
        try:
            rename_new(tmp, out)
            return None
        except FileExistsError:
            if not force:
                raise FileExistsError(
                    f"{out} appeared while this was being written; it is left as it is"
                ) from None
        try:
            if _exchange(tmp, out):
                return tmp  # tmp now holds the previous folder
        except FileNotFoundError:
            continue  # out went away in between: place the new folder as new
        aside = out.parent / temp_name(out.name, "aside")
        with _locked(out):  # the lock goes with the folder: a concurrent run leaves it alone
            os.rename(out, aside)
            os.rename(tmp, out)
        return aside


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _in_use(path: Path) -> bool:
    """Whether a live writer holds the lock of a temporary file or folder (its own PID namespace included)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False  # already gone
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _temporaries(folder: Path, name: str | None) -> list[tuple[Path, list[str]]]:
    """Our temporary files and folders in ``folder`` (for ``name`` only, if given), each with its name's parts
    ``['.NAME', HOST, PID, RANDOM, 'tmp' or 'aside']``."""
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        parts = entry.name.rsplit(".", 4)
        if len(parts) != 5 or parts[4] not in ("tmp", "aside") or not parts[2].isdigit():
            continue
        if name is None or parts[0] == f".{_stem(name)}":
            found.append((entry, parts))
    return found


def left_by_other_hosts(folder: Path, name: str | None = None) -> list[Path]:
    """Temporaries in ``folder`` written on other hosts: whether their writer still runs cannot be told from
    here, so they are never removed; the caller tells the user (a killed job on another node leaves them)."""
    host = _host()
    return [entry for entry, parts in _temporaries(Path(folder), name) if parts[1] != host]


def remove_stale(folder: Path, name: str | None = None) -> list[Path]:
    """Remove temporary files and folders in ``folder`` left by dead processes of this host (for ``name``
    only, if given), and restore a folder a kill left renamed aside. Returns what was removed."""
    folder = Path(folder)
    removed = []
    host = _host()
    for entry, parts in _temporaries(folder, name):
        if parts[1] != host:
            continue
        if _pid_alive(int(parts[2])) or entry.is_symlink() or _in_use(entry):
            continue
        target = folder / (name if name is not None else parts[0][1:])
        if parts[4] == "aside" and name is None and _shortened(parts[0][1:]):
            continue  # which folder it was cannot be told without the name: left for a call that names it
        if parts[4] == "aside" and entry.is_dir() and not target.exists() and not target.is_symlink():
            os.rename(entry, target)  # a kill fell between the two renames of a replacement: undo it
            continue
        if entry.is_dir():
            _remove_tree(entry)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed
