"""Our checkpoint format: ``config.json`` (an :class:`EncoderConfig`) + ``model.safetensors``, written atomically.

Reading refuses anything but a regular file before opening it (a FIFO would block forever, a Git LFS pointer
would read as garbage), and every failure is a :class:`~packvit_native.errors.CheckpointError` that names the
file and the problem.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .atomic import replace_dir
from .config import FORMAT_NAME, EncoderConfig
from .errors import CheckpointError

# How often a checkpoint replaced while being read is read again before giving up.
READ_TRIES = 3

__all__ = [
    "CheckpointWriteError",
    "check_regular_file",
    "is_native_dir",
    "load_native",
    "not_replaceable",
    "save_native",
]

_LFS_POINTER = b"version https://git-lfs"

# What save_native writes; replacing a folder deletes it, so a folder holding anything else is never replaced.
CHECKPOINT_FILES = ("config.json", "model.safetensors")


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint folder cannot be written (no permission, read-only or full disk).

    A :class:`CheckpointError` like every checkpoint failure, and an ``OSError`` like the failure it reports,
    so code that caught ``OSError`` around ``save_pretrained`` still does.
    """


def check_regular_file(path: Path, what: str, error: type[CheckpointError] = CheckpointError) -> None:
    """Raise ``error`` unless ``path`` is a readable regular file that is not a Git LFS pointer.

    Checked with ``stat`` before anything opens the file: opening a FIFO blocks until a writer appears.

    Args:
        path: the file.
        what: what the file should be, for the message (``"weights file"``).
        error: the exception class to raise (the converter raises its own subclass).
    """
    try:
        mode = path.stat().st_mode
    except OSError as e:  # missing, a symlink loop, no permission on the folder
        raise error(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise error(f"{path}: the {what} is {kind}")
    try:
        with path.open("rb") as f:
            head = f.read(len(_LFS_POINTER))
    except OSError as e:
        raise error(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    if head == _LFS_POINTER:
        raise error(
            f"{path} is a Git LFS pointer, not the {what}: fetch the real file (`git lfs pull` in the clone, "
            "or download it with huggingface_hub)"
        )


def is_native_dir(path: Path) -> bool:
    """Whether ``path`` holds a checkpoint in our format: its config.json names the format.

    A config.json that mentions our format but cannot be parsed counts as ours, so that loading it reports
    what is wrong with it instead of handing the folder to the converter as a foreign checkpoint.
    """
    cfg = path / "config.json"
    try:
        if not cfg.is_file():  # a stat, so a FIFO is never opened
            return False
        raw = cfg.read_bytes()
    except OSError:
        return False
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return FORMAT_NAME.encode() in raw
    if isinstance(data, dict):
        return data.get("format") == FORMAT_NAME
    return FORMAT_NAME.encode() in raw


def not_replaceable(out: Path) -> str | None:
    """Why the existing folder ``out`` may not be replaced by a checkpoint (``None``: it may): replacing deletes
    what it holds, so only an empty folder or one holding a checkpoint of ours and nothing else qualifies."""
    others = sorted(p.name for p in out.iterdir() if p.name not in CHECKPOINT_FILES)
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        return f"holds {shown}, which replacing it would delete"
    if any(out.iterdir()) and not is_native_dir(out):
        return "holds files named like a checkpoint's but is not a packvit checkpoint"
    return None


def _not_replaceable_or_write_error(out: Path) -> str | None:
    try:
        return not_replaceable(out)
    except OSError as e:
        raise CheckpointWriteError(f"{out}: cannot read the folder to replace: {e.strerror or e}") from None


def _not_replaceable_now(out: Path) -> str | None:
    """:func:`not_replaceable`, asked again of the folder swapped out: one that cannot be read is kept."""
    try:
        return not_replaceable(out)
    except OSError as e:
        return f"could not be read again before removing it ({e.strerror or e})"


def _is_shard(t: Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def save_native(
    out_dir: str | Path, config: EncoderConfig, state: dict[str, Tensor], force: bool = False
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` into ``out_dir``, all or nothing.

    The folder is written and flushed under a temporary name and then put in place (see
    :func:`~packvit_native.atomic.replace_dir`): ``out_dir`` is at every instant absent, the complete previous
    checkpoint, or the complete new one. An existing ``out_dir`` is replaced only with ``force``.

    Raises:
        ValueError: ``state`` holds FP8 weights (a model loaded with ``precision="fp8"``), or shards of weights
            (FSDP2 ``DTensor``s) rather than whole ones.
        FileExistsError: ``out_dir`` exists and ``force`` is not set, or it holds something other than a
            packvit checkpoint (see :func:`not_replaceable`).
        CheckpointWriteError: ``out_dir`` cannot be written (no permission, disk full, ...): a
            ``CheckpointError`` and an ``OSError``, whose message names ``out_dir``, not the temporary folder
            the failure happened in.
    """
    try:
        out = Path(out_dir).expanduser()
    except RuntimeError as e:  # "~user" of no such user
        raise CheckpointWriteError(f"{out_dir}: {e}") from None
    sharded = [k for k, v in state.items() if _is_shard(v)]
    if sharded:
        raise ValueError(
            f"cannot save {out}: this model's weights are sharded across ranks ({sharded[0]}, ...: FSDP2); "
            "gather them on every rank with torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
            "options=StateDictOptions(full_state_dict=True, cpu_offload=True)), then on rank 0 call "
            "model.save_pretrained(out, state_dict=that)"
        )
    fp8 = [k for k, v in state.items() if v.dtype == torch.float8_e4m3fn]
    if fp8:
        # FP8 is a way of running a checkpoint, chosen at load time; the format holds the weights it ran from.
        raise ValueError(
            f"cannot save {out}: this model's block linears are FP8 ({fp8[0]}, ...), loaded with "
            "precision='fp8'; save the model loaded without it and pass precision='fp8' when loading that"
        )
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass force=True to replace it")
    if out.is_dir() and (reason := _not_replaceable_or_write_error(out)):
        raise FileExistsError(
            f"{out} {reason}; force=True replaces only a packvit checkpoint or an empty folder"
        )
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}

    def fill(folder: Path) -> None:
        config.to_json(folder / "config.json")
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    try:
        return replace_dir(out, fill, force=force, not_replaceable=_not_replaceable_now)
    except FileExistsError:
        raise
    except OSError as e:  # the failing path is a temporary sibling the user never asked for: name out_dir
        raise CheckpointWriteError(f"{out}: cannot write the checkpoint there: {e.strerror or e}") from None
    except SafetensorError as e:  # safetensors' own error for a failed write (a full disk, ...)
        raise CheckpointWriteError(f"{out}: cannot write the checkpoint there: {e}") from None


def _load_config(file: Path) -> EncoderConfig:
    check_regular_file(file, "config")
    try:
        data = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{file} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from None
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read the config: {e.strerror or e}") from None
    try:
        return EncoderConfig.from_dict(data)
    except ValueError as e:  # a field of the wrong type or value, a missing or unknown field, a version
        raise CheckpointError(f"{file}: {e}") from None


def _load_weights(file: Path) -> dict[str, Tensor]:
    if not file.exists() and not file.is_symlink():
        raise CheckpointError(f"{file.parent} has a {FORMAT_NAME} config.json but no model.safetensors")
    check_regular_file(file, "weights file")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:  # truncated, garbage, unknown dtype
        raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from None


def load_native(path: Path) -> tuple[EncoderConfig, dict[str, Tensor]]:
    """The config and tensors of a checkpoint in our format.

    Raises:
        CheckpointError: a file is missing, unreadable, corrupt, or describes an invalid model.
    """
    # The two files are read one after the other: a checkpoint replaced in between (``save_pretrained(force=True)``
    # swaps in a new folder) would pair one's config with the other's weights. The folder itself tells:
    # every write makes a new one, so the same folder before and after means both files came from it.
    for _ in range(READ_TRIES):
        before = _folder_identity(path)
        config, state = _load_config(path / "config.json"), _load_weights(path / "model.safetensors")
        if _folder_identity(path) == before:
            return config, state
    raise CheckpointError(f"{path} was replaced while being read, {READ_TRIES} times in a row; load it again")


def _folder_identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
