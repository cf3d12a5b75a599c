"""The benchmark's one error type."""

from ..errors import UserError


class BenchError(UserError):
    """Bad input for the benchmark; reported as one line."""
