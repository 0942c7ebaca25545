"""The converter's one error type."""

from packvit_native.errors import CheckpointError

__all__ = ["ConversionError"]


class ConversionError(CheckpointError):
    """A checkpoint cannot be converted: unknown, missing or mis-shaped keys, or an unsupported config."""
