"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""


class CapattnError(Exception):
    """Base class of errors whose message alone tells the user what is wrong and how to fix it."""


class ConfigError(CapattnError, ValueError):
    """A configuration value or command-line argument is out of range, of the wrong type, or unknown."""


class DataError(CapattnError, ValueError):
    """A dataset file or image is missing, corrupt or malformed."""


class VocabularyMismatchError(CapattnError, ValueError):
    """A checkpoint was trained with another vocabulary than the data now gives."""


class NonFiniteLossError(CapattnError, FloatingPointError):
    """The training loss became NaN or infinite."""
