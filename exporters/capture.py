"""Converter output and failures, captured: quiet while converting, one line when something breaks.

Converters are noisy (progress bars, version warnings, C++ logs written straight to file
descriptors 1 and 2): :class:`Quiet` runs them with stdout, stderr (at file-descriptor level),
warnings and logging captured, so keyedge's own output stays clean, and keeps what was captured
for an error's ``details``.  Converters also fail in their own words, over many lines and wrapped
in their own exception types: :func:`one_line` reduces a failure to the one line keyedge shows,
and :func:`environment_error` tells a full disk or a permission problem (which no converter option
fixes) apart from a converter that cannot handle the model.

Used by :meth:`keyedge.exporters.base.ExportBackend.export` and ``load`` around every converter and
runtime call, and by the backends; it imports nothing of keyedge, so every exporters module can use it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from typing import Any


class Quiet:
    """Capture stdout/stderr (Python objects *and* file descriptors 1 and 2), warnings and logging.

    Converters print progress bars, version warnings and C++ logs; keyedge's own output stays
    clean.  What was captured is available as :attr:`text` after the block (for error details).
    """

    def __init__(self) -> None:
        self.text = ""
        self._stack: contextlib.ExitStack | None = None
        self._py = io.StringIO()
        self._sink: Any = None
        self._saved: list[tuple[int, int]] = []
        self._logging_disable = logging.NOTSET

    def __enter__(self) -> Quiet:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        self._stack = stack = contextlib.ExitStack()
        try:  # a Ctrl-C or SIGTERM may land on any line: then undo what was done, so keyedge can still speak
            try:
                self._sink = tempfile.TemporaryFile(mode="w+b")
                for fd in (1, 2):
                    self._saved.append((fd, os.dup(fd)))
                    os.dup2(self._sink.fileno(), fd)
            except OSError:  # no usable descriptors (embedded interpreters): Python-level capture only
                self._restore_fds()
            stack.enter_context(contextlib.redirect_stdout(self._py))
            stack.enter_context(contextlib.redirect_stderr(self._py))
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")
            self._logging_disable = logging.root.manager.disable
            logging.disable(logging.WARNING)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        try:
            try:
                logging.disable(self._logging_disable)
            finally:
                if self._stack is not None:
                    self._stack.close()
            _flush_c_stdio()
        finally:  # even when a signal interrupts the lines above: the terminal is given back
            self._restore_fds()
            captured = ""
            if self._sink is not None:
                self._sink.seek(0)
                captured = self._sink.read().decode("utf-8", "replace")
                self._sink.close()
                self._sink = None
            self.text = (self._py.getvalue() + captured)[-20000:]

    def _restore_fds(self) -> None:
        """Point descriptors 1 and 2 back where they were; each one only once, so a retry after an interrupt is safe."""
        while self._saved:
            fd, saved = self._saved[-1]
            os.dup2(saved, fd)
            self._saved.pop()
            os.close(saved)


def _flush_c_stdio() -> None:
    if sys.platform == "win32":
        return
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).fflush(None)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def one_line(exc: BaseException, limit: int = 400) -> str:
    """``Type: message`` of an exception on one line, shortened.

    Converters put the cause on later lines, or wrap it (torch.onnx's TorchExportError): the
    message of the innermost ``__cause__`` is the informative one, so that is what is shown.
    """
    root = exc
    for _ in range(8):
        if root.__cause__ is None:
            break
        root = root.__cause__
    text = " ".join(line.strip() for line in _ANSI.sub("", str(root)).splitlines() if line.strip())
    text = f"{type(root).__name__}: {text}" if text else type(root).__name__
    if root is not exc:
        text = f"{type(exc).__name__} <- {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: OS errors that no converter option can fix: the disk or the permissions are the problem
_ENVIRONMENT = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EMFILE, errno.ENAMETOOLONG}


def environment_error(exc: BaseException) -> OSError | None:
    """The full-disk / read-only / permission OSError behind ``exc`` (a converter may wrap it), if any."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return None
        if isinstance(seen, OSError) and seen.errno in _ENVIRONMENT:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
