"""Errors that the CLI turns into one-line messages and exit codes (no traceback)."""


class KcompileError(Exception):
    """A failure caused by the input (bad file, impossible request): exit code 1."""

    exit_code = 1


class UsageError(KcompileError):
    """A malformed request (unknown option value, bad shape string): exit code 2."""

    exit_code = 2
