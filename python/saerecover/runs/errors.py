"""The one error type of run directories and collections."""


class RunDirectoryError(Exception):
    """Anything wrong with a run directory: in use, config mismatch, corrupt records, bad names."""
