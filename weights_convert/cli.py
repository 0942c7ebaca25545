"""``packvit-convert SRC OUT_DIR``: convert a transformers checkpoint (hub id or local dir) to packvit-native.

Exit codes: 0 converted; 2 an error, reported on one line as ``packvit-convert: error: <file>: <problem>`` and
nothing written; 130 interrupted (Ctrl-C), nothing written unless the message says OUT was written in full
(Ctrl-C in the moment the finished folder was being put in place).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from packvit_native.atomic import check_placeable, left_by_other_hosts
from packvit_native.config import EncoderConfig
from packvit_native.errors import CheckpointError
from packvit_native.io import not_replaceable, save_native
from packvit_native.loading import DTYPES

from .convert import convert_directory, describe_dropped
from .sources import read_checkpoint

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for a program stopped by Ctrl-C


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="packvit-convert", description=__doc__)
    parser.add_argument(
        "src", help="hub id (e.g. facebook/dinov3-vitl16-pretrain-lvd1689m) or local directory"
    )
    parser.add_argument("out_dir", help="directory to write config.json and model.safetensors into")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="cast weights (default: keep the source dtype)"
    )
    return parser


def check_out_dir(src: Path, out: Path, force: bool) -> None:
    """Refuse an ``out`` that would overwrite or nest with the source, then as :func:`check_out_free` does.

    Replacing OUT removes what was there, so OUT equal to SRC, inside it or containing it (or any file the
    checkpoint's files link to, as a hub cache's snapshot links into its ``blobs``) would destroy the checkpoint
    being read. Folders are compared by device and inode, so neither a symlink nor a bind mount slips through.
    """
    out_chain, src_chain = _identities(_resolved(out)), _identities(_resolved(src))
    if src_chain and out_chain and src_chain[0] == out_chain[0] and out.exists():
        where = "is"
    elif src_chain and src_chain[0] in out_chain:
        where = "is inside"
    elif out.exists() and out_chain and (out_chain[0] in src_chain or out_chain[0] in _linked_folders(src)):
        where = "contains"
    else:
        check_out_free(out, force)
        return
    raise CheckpointError(
        f"{out}: the output folder {where} the source checkpoint {src}; choose an OUT_DIR outside it"
    )


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a link loop, before Python 3.13
        raise CheckpointError(f"{path}: cannot follow its links ({e})") from None


def _expanded(text: str) -> Path:
    try:
        return Path(text).expanduser()
    except RuntimeError as e:  # "~user" of no such user
        raise CheckpointError(f"{text}: {e}") from None


def _identities(path: Path) -> list[tuple[int, int]]:
    """(device, inode) of ``path`` if it exists, then of each folder above it."""
    chain = []
    for p in (path, *path.parents):
        try:
            st = p.stat()
        except OSError:
            continue
        chain.append((st.st_dev, st.st_ino))
    return chain


def _linked_folders(src: Path) -> set[tuple[int, int]]:
    """Identities of the folders holding the checkpoint's files where they really are (a hub snapshot's entries
    link into its ``blobs``)."""
    files = src.iterdir() if src.is_dir() else [src]
    found = set()
    for f in files:
        try:
            real = f.resolve()
        except (OSError, RuntimeError):  # a link loop links to no file the checkpoint could be read from
            continue
        found.update(_identities(real.parent))
    return found


def check_out_free(out: Path, force: bool) -> None:
    """Refuse an ``out`` that is a file, that exists without ``force``, that holds anything but a packvit
    checkpoint, or where no folder can be put (checked before any download)."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a folder; choose another OUT_DIR")
    if (out.exists() or out.is_symlink()) and not force:
        raise CheckpointError(f"{out}: already exists; pass --force to replace it")
    try:
        check_placeable(out)
        reason = not_replaceable(out) if out.is_dir() else None
    except OSError as e:
        raise CheckpointError(f"{out}: {e.strerror or e}") from None
    if reason:
        raise CheckpointError(
            f"{out}: {reason}; --force replaces only a packvit checkpoint or an empty folder"
        )


def _convert(args: argparse.Namespace) -> tuple[Path, EncoderConfig, int, dict]:
    """Convert and write OUT_DIR: (OUT_DIR, config, parameter count, dropped keys)."""
    args.out_dir = str(_expanded(args.out_dir))  # as from_pretrained reads '~/model', save there
    local = _expanded(args.src)
    if local.exists():
        check_out_dir(local, Path(args.out_dir), args.force)
    else:
        check_out_free(Path(args.out_dir), args.force)  # before fetching anything from the hub
    ckpt = read_checkpoint(args.src)
    check_out_dir(ckpt.path, Path(args.out_dir), args.force)  # before converting: fail fast, write nothing
    config, state, dropped = convert_directory(ckpt.path, ckpt, dtype=DTYPES.get(args.dtype))
    try:
        out = save_native(args.out_dir, config, state, force=args.force)
    except FileExistsError:  # OUT appeared while converting: say it in this command's words
        check_out_free(Path(args.out_dir), args.force)
        raise
    return out, config, sum(t.numel() for t in state.values()), dropped


def _report(out: Path, config: EncoderConfig, params: int, dropped: dict) -> None:
    print(
        f"converted {config.family} ({config.num_layers} layers, width {config.hidden_size}, "
        f"{params / 1e6:.1f}M params)"
    )
    if dropped:
        print(describe_dropped(dropped))
    print(f"wrote {out}/config.json and {out}/model.safetensors")
    sys.stdout.flush()  # a closed pipe fails here, inside the caller's try, not at interpreter exit
    if others := left_by_other_hosts(out.parent, out.name):
        print(
            f"packvit-convert: note: {', '.join(p.name for p in others)} in {out.parent}: left by a run on another "
            "host, which may still be writing; remove them once it is over",
            file=sys.stderr,
        )


def _silence_stdout() -> None:
    """Send what is still buffered for stdout nowhere: Python flushes it at exit and would fail again."""
    with contextlib.suppress(OSError, ValueError):  # a stdout with no file behind it has nothing buffered
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        written = _convert(args)
    except (CheckpointError, OSError) as e:  # OSError: e.g. FileExistsError, OUT appeared while converting
        print(f"packvit-convert: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except (
        KeyboardInterrupt
    ) as e:  # the temporary folder is already gone: replace_dir cleans up on any exception
        print(f"packvit-convert: interrupted{f'; {e}' if str(e) else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
    try:  # OUT_DIR is in place: a report that cannot be printed (a closed pipe, a full disk) changes nothing
        _report(*written)
    except (OSError, UnicodeError):
        _silence_stdout()
    return 0


if __name__ == "__main__":
    sys.exit(main())
