"""Atomic file and directory output, and file hashing: nothing half-written, ever.

Writers produce their output in a temporary file beside the destination and
rename it into place only when it is complete, so an error or a killed process
never leaves a truncated file (or clobbers the previous good one).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from keyedge.errors import OutputError

# ---- what a command has kept, for an honest message when it is interrupted ---------------------------------------

_kept: dict[Path, str] = {}


def note_kept(path: str | os.PathLike, what: str = "") -> None:
    """Record that ``path`` is now complete output (a committed file or directory), described by ``what``.

    Writers here note every commit; callers add what it is (a checkpoint after epoch 2 and how to resume it).
    """
    path = Path(path)
    _kept[path] = what or _kept.get(path, "")


def kept_outputs() -> list[str]:
    """What this process has kept, outermost first: ``path (what)`` for each that still exists.

    Files inside a kept directory are left out, and so is anything since removed (a staging
    directory's files vanish with it).
    """
    alive = [p for p in _kept if p.exists() or p.is_symlink()]
    outer = [p for p in alive if not any(q != p and q in p.parents for q in alive)]
    return [f"{p} ({_kept[p]})" if _kept[p] else str(p) for p in outer]


def forget_kept() -> None:
    """Start a new ledger (one per command; tests run several in one process)."""
    _kept.clear()


# ---- a stop that was asked for, even where the exception it raised was swallowed ------------------------------------

_stops: list[BaseException] = []


def ask_stop(exc: BaseException) -> None:
    """Record a Ctrl-C / SIGTERM (the signal handler calls this, then raises ``exc``).

    CPython drops an exception raised inside a weakref callback or ``__del__`` ("Exception ignored in"),
    so a signal that lands there (seen during ExecuTorch's lowering) would be lost and the command would
    go on to commit its output.  Every commit asks :func:`raise_if_stopped` first.
    """
    _stops.append(exc)


def raise_if_stopped() -> None:
    """Raise the recorded stop again, if one was asked for: nothing is committed after a Ctrl-C."""
    if _stops:
        raise _stops[0]


def forget_stops() -> None:
    """Start a new command (tests run several in one process)."""
    _stops.clear()


def _exists(path: Path) -> bool:
    """``path.exists()``, but a dangling symlink counts, and a name the OS refuses is a one-line error."""
    try:
        return path.exists() or path.is_symlink()
    except OSError as exc:  # ENAMETOOLONG, ELOOP, EACCES on a parent...
        raise OutputError(f"cannot use output path {path}: {exc.strerror}", "choose a shorter or valid path") from None


def check_writable(path: str | os.PathLike, *, overwrite: bool, flag: str = "--overwrite") -> Path:
    """Validate an output path before any work is done; return it as a ``Path``.

    A symlink at ``path`` (even a dangling one) is an existing output: it is replaced only with ``flag``.
    """
    path = Path(path)
    exists = _exists(path)
    if path.is_dir():
        raise OutputError(f"output path {path} is a directory", "give a file name")
    if exists and not overwrite:
        raise OutputError(f"{path} already exists", f"choose another path or pass {flag} to replace it")
    parent = path.parent if str(path.parent) else Path(".")
    if _exists(parent) and not parent.is_dir():
        raise OutputError(f"output directory {parent} is a file", "choose a path inside a directory")
    if not parent.is_dir():
        raise OutputError(f"output directory {parent} does not exist", "create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"output directory {parent} is not writable", "choose a writable location")
    return path


def _temporary_beside(path: Path) -> tuple[int, Path]:
    """An open temporary file ``.NAME.tmp-PID-*`` beside ``path`` (stale ones of killed processes cleaned first)."""
    parent = path.parent if str(path.parent) else Path(".")
    try:
        for line in remove_stale_staging(parent):
            _stderr(line)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{path.name}.tmp-{os.getpid()}-", suffix=".tmp" + path.suffix, dir=parent
        )
    except OSError as exc:
        raise OutputError(f"cannot write to {parent}: {exc.strerror}", "choose a writable location") from None
    return fd, Path(tmp_name)


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike, *, mode: int = 0o644, overwrite: bool = False, flag: str = "--overwrite"
) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``.

    The temporary file is created with ``mode`` from the start (``0o600`` for
    secrets, so a key is never readable by others, not even briefly).  On any
    exception the temporary file is removed and ``path`` is left untouched.
    """
    path = check_writable(path, overwrite=overwrite, flag=flag)
    fd, tmp = _temporary_beside(path)
    try:
        os.fchmod(fd, mode)
        os.close(fd)
        yield tmp
        raise_if_stopped()
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path, flag)
        note_kept(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _link_new(tmp: Path, path: Path, flag: str) -> None:
    """Give the complete file ``tmp`` the name ``path`` only if no file has it: exclusive, even between processes.

    Checking first and then renaming is a race: two ``keyedge sealkey new -o k`` at once would both
    check, both rename, both say ``wrote``, and one sealing key would be gone.  A hard link fails
    with ``EEXIST`` atomically, so exactly one process creates the name.  Where the file system has
    no hard links, an ``O_EXCL`` create claims the name first (it is empty until the rename fills it).
    """
    try:
        os.link(tmp, path, follow_symlinks=False)
    except FileExistsError:
        raise OutputError(
            f"{path} was created by another process meanwhile; nothing was written",
            f"choose another path or pass {flag} to replace it",
        ) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
            raise
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        except FileExistsError:
            raise OutputError(
                f"{path} was created by another process meanwhile; nothing was written",
                f"choose another path or pass {flag} to replace it",
            ) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def write_new_files(
    files: list[tuple[str | os.PathLike, bytes, int]], *, overwrite: bool = False, flag: str = "--overwrite"
) -> list[Path]:
    """Write several files as one: all of them, or (on any error, a race lost, Ctrl-C) none.

    ``files`` is ``(path, data, mode)`` each.  Without ``overwrite`` every name is created
    exclusively (:func:`_link_new`); when one of them turns out to exist, the ones this call
    created are removed again, so a signing key never exists without its verify key.
    """
    paths = [check_writable(path, overwrite=overwrite, flag=flag) for path, _, _ in files]
    if len({p.resolve() for p in paths}) != len(paths):
        raise OutputError(f"{' and '.join(map(str, paths))} are the same file", "choose distinct names")
    created: list[Path] = []
    stack = contextlib.ExitStack()
    try:
        with stack:
            temps = [stack.enter_context(_staged_file(p, data, mode)) for p, (_, data, mode) in zip(paths, files)]
            raise_if_stopped()
            for tmp, path in zip(temps, paths):
                if overwrite:
                    os.replace(tmp, path)
                else:
                    _link_new(tmp, path, flag)
                created.append(path)
    except BaseException:
        if not overwrite:
            for path in created:
                with contextlib.suppress(OSError):
                    path.unlink()
        raise
    for path in paths:
        note_kept(path)
    return paths


@contextlib.contextmanager
def _staged_file(path: Path, data: bytes, mode: int) -> Iterator[Path]:
    """A complete temporary copy of ``data`` beside ``path`` (mode ``mode`` from the start), removed on exit."""
    fd, tmp = _temporary_beside(path)
    try:
        try:
            os.fchmod(fd, mode)
            with open(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise OutputError(f"cannot write {path}: {exc.strerror}", "check free space and permissions") from None
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_bytes_atomic(
    path: str | os.PathLike, data: bytes, *, mode: int = 0o644, overwrite: bool = False, flag: str = "--overwrite"
) -> Path:
    """Write ``data`` to ``path`` atomically with permissions ``mode`` (exclusively, without ``overwrite``)."""
    return write_new_files([(path, data, mode)], overwrite=overwrite, flag=flag)[0]


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---- directories -------------------------------------------------------------------------------------------------

#: ``.NAME.tmp-PID-RANDOM`` (staging directory or temporary file, the latter ending ``.tmp`` + NAME's suffix)
#: and ``.NAME.old-PID-RANDOM`` (an output renamed aside while being replaced)
_STAGING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-z_]+(?P<file>\.tmp(\.[^.]+)?)?$")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


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


def remove_stale_staging(parent: Path) -> list[str]:
    """Clean up after keyedge processes killed while writing into ``parent``; return what was done, one line each.

    ``.NAME.tmp-PID-*`` (an unfinished output, which may hold a keyed model) is removed;
    ``.NAME.old-PID-*`` (the previous output, renamed aside while being replaced) is put back
    as ``NAME`` when the kill came before the new one was in place, and removed otherwise.
    A directory whose process still runs is never touched.
    """
    done = []
    for entry in sorted(parent.glob(".*.*-*-*")):
        match = _STAGING.match(entry.name)
        if not match or _alive(int(match["pid"])) or (entry.is_symlink() and match["kind"] != "old"):
            continue
        if entry.is_symlink():  # a replaced output that was a link: the link goes
            final = parent / match["name"]
            if not (final.exists() or final.is_symlink()):
                with contextlib.suppress(OSError):
                    os.rename(entry, final)
                    done.append(f"restored {final}, which a killed keyedge process (pid {match['pid']}) was replacing")
                    continue
            with contextlib.suppress(OSError):
                entry.unlink()
                done.append(f"removed {entry}, the replaced output of a killed keyedge process (pid {match['pid']})")
            continue
        if match["file"]:  # a temporary file of atomic_output (a key file, a manifest...)
            if entry.is_file():
                with contextlib.suppress(OSError):
                    entry.unlink()
                    done.append(
                        f"removed {entry}, the unfinished file of a killed keyedge process (pid {match['pid']})"
                    )
            continue
        if not entry.is_dir():
            continue
        final = parent / match["name"]
        if match["kind"] == "old" and not (final.exists() or final.is_symlink()):
            with contextlib.suppress(OSError):
                os.rename(entry, final)
                done.append(f"restored {final}, which a killed keyedge process (pid {match['pid']}) was replacing")
                continue
        shutil.rmtree(entry, ignore_errors=True)
        what = "unfinished output" if match["kind"] == "tmp" else "replaced output"
        done.append(f"removed {entry}, the {what} of a killed keyedge process (pid {match['pid']})")
    return done


def commit_directory(staging: Path, final: Path, *, overwrite: bool, flag: str = "--overwrite") -> None:
    """Rename a complete ``staging`` directory onto ``final``; an old ``final`` is kept until the new one is in place.

    Replacing: the old directory is renamed aside, the new one renamed into place, then the
    old one removed -- at no moment is there no ``final`` that was once complete (if the
    second rename fails, the old directory is put back; if the process is killed between
    the two, the next writer puts it back: :func:`remove_stale_staging`).
    """
    if not final.exists() and not final.is_symlink():
        try:
            os.rename(staging, final)
            note_kept(final)
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
    note_kept(final)
    _remove_aside(old)


def _remove_aside(old: Path) -> None:
    """Remove what was renamed aside: a directory keyedge wrote, or a symlink (only the link: its target is not ours).

    ``shutil.rmtree`` refuses a symlink, and with ``ignore_errors`` said nothing: replacing a set that was a
    link left a hidden ``.NAME.old-*`` link behind.
    """
    if old.is_symlink() or not old.is_dir():
        with contextlib.suppress(FileNotFoundError):
            old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)


def _make_parents(directory: Path) -> list[Path]:
    """``mkdir -p directory``; return the directories it created, deepest first (to remove them again)."""
    made = []
    for d in [directory, *directory.parents]:
        if d.exists():
            break
        made.append(d)
    directory.mkdir(parents=True, exist_ok=True)
    return made


def check_output_directory(final: str | os.PathLike, *, overwrite: bool, flag: str = "--overwrite") -> Path:
    """Validate an output directory before any work: free (or ``overwrite``), and creatable where it would go.

    The nearest existing ancestor must be a writable directory: a report directory under a file, a
    read-only mount or ``/proc`` is refused now, not after every attack has run.
    """
    final = Path(final)
    if _exists(final) and not overwrite:
        raise OutputError(f"{final} already exists", f"pass {flag} to replace it, or choose another location")
    if _exists(final) and not final.is_dir():
        raise OutputError(f"output path {final} is a file", "give a directory")
    ancestor = final.parent
    while not _exists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{ancestor} is a file, so {final} cannot be made", "choose a path inside a directory")
    try:  # really try (os.access says yes to root, and knows nothing of /proc or a read-only mount)
        os.rmdir(tempfile.mkdtemp(prefix=f".{final.name}.probe-", dir=ancestor))
    except OSError as exc:
        raise OutputError(
            f"cannot write {final}: {ancestor} refuses new entries ({exc.strerror})", "choose a writable location"
        ) from None
    return final


@contextlib.contextmanager
def staged_directory(
    final: str | os.PathLike,
    *,
    overwrite: bool,
    mode: int = 0o700,
    flag: str = "--overwrite",
    log: Callable[[str], None] | None = None,
) -> Iterator[Path]:
    """Yield a fresh hidden directory beside ``final``; on success it replaces ``final`` (:func:`commit_directory`).

    On any exception (or Ctrl-C) the staging directory is removed, so are the parent directories
    made for it, and ``final`` is left as it was.  The name carries this process's PID, so clean-up
    of stale ones (said through ``log``) never touches a live writer's.
    """
    final = Path(final)
    if _exists(final) and not overwrite:
        raise OutputError(f"{final} already exists", f"pass {flag} to replace it, or choose another location")
    parent = final.parent
    if _exists(parent) and not parent.is_dir():
        raise OutputError(f"output directory {parent} is a file", "choose a path inside a directory")
    try:
        made = _make_parents(parent)
        for line in remove_stale_staging(parent):
            (log or _stderr)(line)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-{os.getpid()}-", dir=parent))
        os.chmod(staging, mode)
    except OSError as exc:
        raise OutputError(f"cannot write to {parent}: {exc.strerror}", "choose a writable location") from None
    try:
        yield staging
        raise_if_stopped()
        commit_directory(staging, final, overwrite=overwrite, flag=flag)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for d in made:
            with contextlib.suppress(OSError):
                d.rmdir()  # only if still empty
        raise


# ---- files that never reach a disk -------------------------------------------------------------------------------


def memory_files_supported() -> tuple[bool, str]:
    """Whether :class:`MemoryFiles` works here (Linux: ``memfd_create`` and ``/proc/<pid>/fd``), and why not."""
    if not hasattr(os, "memfd_create"):
        return False, "this OS has no in-memory files (memfd_create is Linux-only)"
    if not Path(f"/proc/{os.getpid()}/fd").is_dir():
        return False, "/proc is not mounted, so in-memory files cannot be reached by path"
    return True, "memfd"


class MemoryFiles:
    """Named files that live only in this process's memory, reachable by path for tools that write to paths.

    Converters (``onnx.save``, OpenVINO's ``save_model``...) write to file names.  Each name here is a
    symlink, in a private 0700 directory, to an anonymous in-memory file (Linux ``memfd``) as
    ``/proc/<pid>/fd/<n>``: whatever is written through the path stays in RAM and vanishes with the
    process; the directory on disk holds only the links.  :meth:`read` refuses a name whose link a
    tool replaced by a real file (that file is removed), so a converter that writes through a
    temporary file and renames it cannot put plaintext on disk unnoticed.
    """

    def __init__(self, names: list[str]):
        self.names = list(names)
        self.directory: Path | None = None
        self._fds: dict[str, int] = {}

    def __enter__(self) -> MemoryFiles:
        ok, why = memory_files_supported()
        if not ok:
            raise OutputError(f"cannot keep files in memory: {why}", "seal on Linux")
        root = Path(tempfile.gettempdir())
        for stale in root.glob("keyedge-memory-*-*"):  # links left by killed processes (their memory is gone)
            pid = stale.name.split("-")[2]
            if pid.isdigit() and not _alive(int(pid)) and stale.is_dir() and stale.stat().st_uid == os.getuid():
                shutil.rmtree(stale, ignore_errors=True)
        self.directory = Path(tempfile.mkdtemp(prefix=f"keyedge-memory-{os.getpid()}-", dir=root))
        try:
            for name in self.names:
                fd = os.memfd_create(name, getattr(os, "MFD_CLOEXEC", 0))
                self._fds[name] = fd
                os.symlink(self._target(name), self.directory / name)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _target(self, name: str) -> str:
        return f"/proc/{os.getpid()}/fd/{self._fds[name]}"

    def path(self, name: str) -> Path:
        assert self.directory is not None, "use MemoryFiles as a context manager"
        return self.directory / name

    def read(self, name: str) -> bytes:
        """The bytes written to ``name``; :class:`OutputError` when a tool bypassed the in-memory file."""
        link = self.path(name)
        if not link.is_symlink() or os.readlink(link) != self._target(name):
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            raise OutputError(
                f"a converter replaced {name} with a file on disk instead of writing it in memory (it was removed)",
                "report this as a bug; export without sealing meanwhile",
            )
        fd, chunks, offset = self._fds[name], [], 0
        while chunk := os.pread(fd, 1 << 26, offset):
            chunks.append(chunk)
            offset += len(chunk)
        return b"".join(chunks)

    def __exit__(self, *exc_info: object) -> None:
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = {}
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
