"""Atomic file and directory output, and file hashing: nothing half-written, ever.

Writers produce their output in a temporary file beside the destination and
rename it into place only when it is complete, so an error or a killed process
never leaves a truncated file (or clobbers the previous good one).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

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
def atomic_output(
    path: str | os.PathLike, *, mode: int = 0o644, overwrite: bool = False, flag: str = "--force"
) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    The temporary file is created with ``mode`` from the start (``0o600`` for
    secrets, so a key is never readable by others, not even briefly).  On any
    exception the temporary file is removed and ``path`` is left untouched.
    """
    path = check_writable(path, overwrite=overwrite, flag=flag)
    try:
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent if str(path.parent) else "."
        )
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


def write_bytes_atomic(
    path: str | os.PathLike, data: bytes, *, mode: int = 0o644, overwrite: bool = False, flag: str = "--force"
) -> Path:
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


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---- directories -------------------------------------------------------------------------------------------------

_STAGING = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[0-9a-z_]+$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_staging(parent: Path, name: str) -> None:
    """Remove ``.NAME.tmp-PID-*`` directories left by killed processes (never one whose process still runs)."""
    for entry in parent.glob(f".{glob.escape(name)}.tmp-*"):
        match = _STAGING.match(entry.name)
        if match and match["name"] == name and not _alive(int(match["pid"])) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def commit_directory(staging: Path, final: Path, *, overwrite: bool, flag: str = "--overwrite") -> None:
    """Rename a complete ``staging`` directory onto ``final``; an old ``final`` is kept until the new one is in place.

    Replacing: the old directory is renamed aside, the new one renamed into place, then the
    old one removed -- at no moment is there no ``final`` that was once complete (if the
    second rename fails, the old directory is put back).
    """
    if not final.exists() and not final.is_symlink():
        try:
            os.rename(staging, final)
            return
        except OSError as exc:  # another process committed first (ENOTEMPTY/EEXIST)
            if not final.exists():
                raise OutputError(f"cannot create {final}: {exc.strerror}", "check permissions and space") from None
    if not overwrite:
        raise OutputError(f"{final} appeared while writing", f"pass {flag} to replace it")
    old = final.with_name(f".{final.name}.old-{os.getpid()}-{secrets.token_hex(3)}")
    os.rename(final, old)
    try:
        os.rename(staging, final)
    except BaseException:
        os.rename(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(
    final: str | os.PathLike, *, overwrite: bool, mode: int = 0o700, flag: str = "--overwrite"
) -> Iterator[Path]:
    """Yield a fresh hidden directory beside ``final``; on success it replaces ``final`` (:func:`commit_directory`).

    On any exception (or Ctrl-C) the staging directory is removed and ``final`` is left as it was.
    The name carries this process's PID, so clean-up of stale ones never touches a live writer's.
    """
    final = Path(final)
    if (final.exists() or final.is_symlink()) and not overwrite:
        raise OutputError(f"{final} already exists", f"pass {flag} to replace it, or choose another location")
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(parent, final.name)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=parent))
        os.chmod(staging, mode)
    except OSError as exc:
        raise OutputError(f"cannot write to {parent}: {exc.strerror}", "choose a writable location") from None
    try:
        yield staging
        commit_directory(staging, final, overwrite=overwrite, flag=flag)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
