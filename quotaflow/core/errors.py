"""Errors every layer may raise and the CLI knows how to print."""


class OperatorError(RuntimeError):
    """A problem the operator can fix; printed as one clear line, not a traceback."""
