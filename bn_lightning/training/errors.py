"""The errors whose message says what went wrong and how to fix it; the CLI prints them without a traceback.

Kept apart from the modules that raise them, so that any module can catch them without importing another.
"""


class DataNotFoundError(FileNotFoundError):
    """The Fashion-MNIST files are not on disk and could not be downloaded."""


class CorruptDataError(ValueError):
    """A Fashion-MNIST file on disk is cut short or is not the file its name says: it must be replaced."""


class DataSizeError(ValueError):
    """A size setting that the data on disk cannot satisfy."""


class NonFiniteLossError(FloatingPointError):
    """Training diverged: a step's loss, or the weights it left, are NaN or infinite.

    Raised before any checkpoint can hold those weights; the in-memory model is not worth
    saving, and checkpoints written before this step are the last good ones.
    """


CLEAR_ERRORS = (DataNotFoundError, CorruptDataError, DataSizeError, NonFiniteLossError)
