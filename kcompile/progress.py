"""Rich progress bars on stderr (quiet when KCOMPILE_QUIET=1 or when disabled)."""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

stderr = Console(stderr=True)


def progress(enabled: bool = True) -> Progress:
    """A Progress context for long loops (training epochs, benchmarks, clustering)."""
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
        console=stderr, disable=not enabled or os.environ.get("KCOMPILE_QUIET") == "1", transient=False,
    )
