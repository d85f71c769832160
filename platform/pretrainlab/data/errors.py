"""The one exception raised for bad dataset input."""


class DatasetError(ValueError):
    """A dataset file, row or field is missing, malformed or inconsistent.

    The message names the file, and the row or field where they are known.
    """
