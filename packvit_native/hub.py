"""Find a checkpoint: a local directory as is, or a Hugging Face hub id fetched into the local cache.

With ``HF_HUB_OFFLINE=1`` the cache (``HF_HUB_CACHE``) is read without network access. Only configs and
safetensors are fetched; nothing that looks like a local path is ever looked up on the hub.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

from .errors import CheckpointError

__all__ = ["CONFIG_PATTERNS", "HUB_PATTERNS", "is_local", "locate", "snapshot_of"]

CONFIG_PATTERNS = [
    "config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "*.safetensors.index.json",
]
HUB_PATTERNS = [*CONFIG_PATTERNS, "*.safetensors"]


def _looks_like_path(src: str) -> bool:
    """Whether ``src`` can only be meant as a local path (hub ids are ``org/name``)."""
    if src.startswith((".", "/", "~")) or "\\" in src or src.count("/") != 1:
        return True
    org = src.split("/", 1)[0]
    return Path(org).is_dir()  # "runs/typo" next to an existing runs/ folder is a mistyped path


def is_local(src: str | os.PathLike) -> bool:
    """Whether ``src`` names something on this machine rather than a hub id."""
    return not isinstance(src, str) or Path(src).expanduser().exists() or _looks_like_path(src)


def locate(src: str | os.PathLike, patterns: list[str] | None = None, revision: str | None = None) -> Path:
    """The directory of checkpoint ``src``: a local directory, or a hub id's snapshot in the local cache.

    Args:
        src: a local directory or a hub id.
        patterns: for a hub id, the files to fetch (default: configs and every safetensors file); fetching more
            later adds them to the same snapshot.
        revision: for a hub id, the commit to fetch (default: the latest); see :func:`snapshot_of`.

    Raises:
        CheckpointError: ``src`` is a file, a missing local path, or a hub id that cannot be fetched.
    """
    if not os.fspath(src):  # Path("") is the current folder, which is not what an empty name asks for
        raise CheckpointError("an empty name names no checkpoint; pass a folder or a hub id")
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{src} is a file; pass the directory that holds config.json and the weights")
    text = os.fspath(src)
    if not isinstance(src, str) or _looks_like_path(text):  # a Path object is never a hub id
        raise CheckpointError(f"{text}: no such directory (a hub id has the form org/name)")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        # Offline, huggingface_hub (1.33) still asks the hub for the file list of a commit named by its hash
        # and fails; the cache alone holds it.
        offline = revision is not None and constants.HF_HUB_OFFLINE
        return Path(
            snapshot_download(
                text, allow_patterns=patterns or HUB_PATTERNS, revision=revision, local_files_only=offline
            )
        )
    except HFValidationError as e:
        raise CheckpointError(f"{text} is neither a local directory nor a valid hub id: {e}") from None
    except Exception as e:  # offline with an empty cache, unknown repo, network failure
        raise CheckpointError(
            f"{text} is not a local directory, and fetching it from the hub failed: {type(e).__name__}: {e}"
        ) from None


def snapshot_of(src: str | os.PathLike, path: Path) -> Callable[..., Path]:
    """:func:`locate` for more files of ``path``, what ``locate(src, ...)`` returned: for a hub id, files of the
    same commit (a snapshot folder is named by its commit), so that weights fetched after the configs match
    them even if the repository changed in between."""
    return (
        functools.partial(locate, src)
        if is_local(src)
        else functools.partial(locate, src, revision=path.name)
    )
