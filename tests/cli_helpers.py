"""Helpers shared by the tests that drive the CLI in-process."""

import hashlib

import pytest

from kcompile.cli import main


def run(argv, capsys):
    """Run `kcompile ARGV`; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def sha(path) -> str:
    """SHA-256 of a file's bytes (to check that inputs stay untouched)."""
    return hashlib.sha256(open(path, "rb").read()).hexdigest()
