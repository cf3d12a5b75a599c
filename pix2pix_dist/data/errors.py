"""The one exception type the input pipeline raises for problems a user can fix."""


class DataError(Exception):
    """A data problem (missing shards, too few samples, corrupt JPEG), reported as one line."""
