"""The benchmark's one error type."""


class BenchError(RuntimeError):
    """Bad input for the benchmark; reported as one line."""
