"""Convert Hugging Face checkpoints onto packvit-native modules."""

from .convert import convert_checkpoint, convert_loaded
from .errors import ConversionError

__all__ = ["ConversionError", "convert_checkpoint", "convert_loaded"]
