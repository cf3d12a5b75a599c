"""The one exception type the input pipeline raises for problems a user can fix."""

from ..errors import UserError


class DataError(UserError):
    """A data problem (missing shards, too few samples, corrupt JPEG), reported as one line."""
