"""Writing outputs atomically: a temporary file in the target folder, then a rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .errors import KcompileError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    On any exception the temporary file is removed, so no partial output is ever left.
    Raises KcompileError if the folder does not exist or is not writable.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise KcompileError(f"cannot write {path}: folder {folder} does not exist")
    if path.is_dir():
        raise KcompileError(f"cannot write {path}: it is a directory")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=folder)
    except OSError as e:
        raise KcompileError(f"cannot write {path}: {e.strerror}") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        if os.path.isfile(tmp):
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
