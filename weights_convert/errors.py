"""The converter's one error type."""


class ConversionError(ValueError):
    """A checkpoint cannot be converted: unknown, missing or mis-shaped keys, or an unsupported config."""
