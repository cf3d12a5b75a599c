"""The one exception users see: a short, actionable, one-line message (the CLI adds no traceback)."""

from ..errors import UserError


class ShardError(UserError):
    """A user-facing problem (missing/empty source, unwritable output, bad option...)."""
