"""Atomic file output: nothing half-written, ever.

Writers produce their output in a temporary file beside the destination and
rename it into place only when it is complete, so an error or a killed process
never leaves a truncated file (or clobbers the previous good one).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from keyedge.errors import OutputError


def check_writable(path: str | os.PathLike, *, overwrite: bool, flag: str = "--force") -> Path:
    """Validate an output path before any work is done; return it as a ``Path``."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"output path {path} is a directory", "give a file name")
    if path.exists() and not overwrite:
        raise OutputError(f"{path} already exists", f"choose another path or pass {flag} to replace it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output directory {parent} does not exist", "create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output directory {parent} is not writable", "choose a writable location")
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, *, mode: int = 0o644, overwrite: bool = False,
                  flag: str = "--force") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    The temporary file is created with ``mode`` from the start (``0o600`` for
    secrets, so a key is never readable by others, not even briefly).  On any
    exception the temporary file is removed and ``path`` is left untouched.
    """
    path = check_writable(path, overwrite=overwrite, flag=flag)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix,
                                        dir=path.parent if str(path.parent) else ".")
    except OSError as exc:
        raise OutputError(f"cannot write to {path.parent}: {exc.strerror}", "choose a writable location") from None
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, mode)
        os.close(fd)
        yield tmp
        if not overwrite and path.exists():
            raise OutputError(f"{path} appeared while writing", f"pass {flag} to replace it")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, mode: int = 0o644, overwrite: bool = False,
                       flag: str = "--force") -> Path:
    """Write ``data`` to ``path`` atomically with permissions ``mode``; return the path."""
    with atomic_output(path, mode=mode, overwrite=overwrite, flag=flag) as tmp:
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror}", "check free space and permissions") from None
    return Path(path)
