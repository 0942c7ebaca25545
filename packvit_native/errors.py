"""The one exception type for checkpoints that cannot be read, converted or loaded."""

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint (ours or a foreign one) cannot be used: its message names the file and the problem.

    A ``ValueError``, so code that catches bad input in general catches this too.
    """
