"""The one error every checkpoint reader, writer and check raises for bad input."""


class CheckpointError(ValueError):
    """A bad checkpoint file or tensor; the message (one line) names it."""
