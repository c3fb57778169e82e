"""The ``keyedge`` command line: one Typer sub-command per verb.

Every :class:`~keyedge.errors.KeyedgeError` raised by a command becomes one
line on stderr (``error: what is wrong; how to fix it``) and exit code 2; so
does an operating-system error no check caught (a full disk, a read-only file
system), and a usage error.  Ctrl-C, ``kill`` (SIGTERM) and a closed terminal
(SIGHUP) stop the command through the same clean-up path, and the message
says truthfully what was kept.  ``KEYEDGE_TRACEBACK=1`` shows tracebacks.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import warnings

import typer
from typer.core import TyperGroup

try:  # typer >= 0.20 ships its own copy of click; older ones use click itself
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - depends on the typer release
    from click.exceptions import NoArgsIsHelpError, UsageError

from keyedge.cli._console import err_console, one_line
from keyedge.errors import KeyedgeError
from keyedge.fileio import ask_stop, forget_kept, forget_stops, kept_outputs, raise_if_stopped


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the signal arrives so every clean-up runs as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, _frame):
    signal.signal(signum, signal.SIG_DFL)  # a second one kills outright; the next run cleans up after it
    ask_stop(Terminated(signum))
    raise Terminated(signum)


def _interrupt(_signum, _frame):
    ask_stop(KeyboardInterrupt())  # remembered: an interrupt swallowed by a library still stops the command
    raise KeyboardInterrupt


_terminal: list[tuple[int, int]] = []  # (fd, a duplicate of it as main() found it): the process's own stdout/stderr


def _reclaim_terminal() -> None:
    """Before the last word: stdout and stderr back to where the process started.

    A signal can land while a converter's output is being captured (descriptors 1 and 2 pointed at a
    temporary file); the capture undoes itself, but this makes sure the message is seen whatever happened.
    """
    if not _terminal:
        return  # not started by main() (tests, an embedding program): their streams are theirs
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    for fd, saved in _terminal:
        with contextlib.suppress(OSError):
            os.dup2(saved, fd)


def _say(line: str) -> None:
    _reclaim_terminal()
    err_console.print(one_line(line), markup=False, highlight=False, soft_wrap=True)


def interrupted_line(exc: KeyboardInterrupt) -> tuple[str, int]:
    """The message and exit code for a stopped command: the complete outputs it kept, or that it kept none."""
    if isinstance(exc, Terminated):
        what, code = f"terminated ({signal.Signals(exc.signum).name})", 128 + exc.signum
    else:
        what, code = "interrupted", 130
    kept = kept_outputs()
    if not kept:
        return f"{what}: nothing was written", code
    shown = ", ".join(kept[:6]) + (f" and {len(kept) - 6} more" if len(kept) > 6 else "")
    return f"{what}: unfinished output was removed; kept what was complete: {shown}", code


def _os_error_line(exc: OSError) -> str:
    where = f": {exc.filename}" if exc.filename else ""
    reason = (exc.strerror or str(exc)).lower()
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        hint = "free some space, or write somewhere else"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = "choose a writable location"
    elif exc.errno == errno.ENAMETOOLONG:
        hint = "choose a shorter path"
    else:
        hint = "check the path, free space and permissions"
    return f"error: {reason}{where}; {hint}"


class _KeyedgeGroup(TyperGroup):
    """Turns keyedge's errors into a one-line message and exit code 2, never a traceback."""

    def invoke(self, ctx):  # type: ignore[override]
        """Run the command; Python warnings raised meanwhile are shown after it, unless it ends in an error.

        A library's warning printed before ``error: ...`` would break the one-line promise, and says
        nothing the error does not: it is dropped then (``KEYEDGE_TRACEBACK=1`` shows everything).
        """
        forget_kept()
        forget_stops()
        if os.environ.get("KEYEDGE_TRACEBACK"):
            return self._invoke(ctx)
        shown = True
        try:
            with warnings.catch_warnings(record=True) as caught:
                try:
                    return self._invoke(ctx)
                except typer.Exit as exit_:
                    shown = exit_.exit_code in (0, 1)  # done, or done with failures it reported
                    raise
                except BaseException:
                    shown = False
                    raise
        finally:
            for w in caught if shown else []:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)

    def parse_args(self, ctx, args):  # type: ignore[override]
        _bound_integers(self)
        return super().parse_args(ctx, args)

    def _invoke(self, ctx):
        try:
            result = super().invoke(ctx)
            raise_if_stopped()  # a stop some library swallowed: say so, and exit as stopped
            return result
        except KeyedgeError as exc:
            _say(f"error: {exc}")
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:
            line, code = interrupted_line(exc)
            _say(line)
            raise typer.Exit(code) from None
        except BrokenPipeError:  # stdout closed by its reader (`keyedge ... | head`): nothing more to say
            _stdout_gone(BrokenPipeError(errno.EPIPE, "broken pipe"))
            raise typer.Exit(141) from None
        except OSError as exc:  # the OS refused what no check foresaw: a full disk, a read-only mount
            if os.environ.get("KEYEDGE_TRACEBACK"):
                raise
            _stdout_gone(exc)
            _say(_os_error_line(exc))
            raise typer.Exit(2) from None
        except NoArgsIsHelpError:
            raise  # `keyedge bench` alone: its help, as asked
        except UsageError as exc:  # a bad option or argument of a sub-command: one line too, not a panel
            command = exc.ctx.command_path if exc.ctx is not None else "keyedge"
            message = " ".join(exc.format_message().split()).rstrip(".")
            _say(f"error: {message}; see '{command} --help'")
            raise typer.Exit(2) from None


#: the largest value an integer flag takes unless it says otherwise: beyond it, numbers overflow C types
#: (``torch.rand`` of a batch of 10**20 is a traceback) or allocate what no machine has
MAX_INT_FLAG = 2**31 - 1
#: tighter bounds, by flag, where a value past them can only exhaust memory or time
INT_FLAG_BOUNDS = {"--batch-size": 65536, "--batch": 65536, "--image-size": 4096, "--devices": 100_000}


def _bound_integers(command) -> None:
    """Give every integer flag of every command an upper bound (its own, or :data:`INT_FLAG_BOUNDS`, or
    :data:`MAX_INT_FLAG`): a value past it is a usage error naming the range, never an overflow traceback
    or a fleet of 10**20 devices.  One rule for all commands, applied before any sub-command parses."""
    for sub in getattr(command, "commands", {}).values():
        _bound_integers(sub)
    for param in getattr(command, "params", []):
        descriptor = getattr(param, "type_descriptor", None)
        info = getattr(descriptor, "parameter_info", None)
        if descriptor is None or info is None or getattr(info, "max", 0) is not None:
            continue
        if descriptor.annotation in (int, int | None, list[int], list[int] | None):
            info.max = param.max = INT_FLAG_BOUNDS.get(param.opts[0], MAX_INT_FLAG)  # typer checks the info's


app = typer.Typer(
    cls=_KeyedgeGroup,
    name="keyedge",
    help="Deploy key-based adversarially defended image classifiers: one secret key, one model, one device.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

from keyedge.cli import bench as _bench  # noqa: E402  (registration imports)
from keyedge.cli import doctor as _doctor  # noqa: E402
from keyedge.cli import export as _export  # noqa: E402
from keyedge.cli import fleet as _fleet  # noqa: E402
from keyedge.cli import guard as _guard  # noqa: E402
from keyedge.cli import keys as _keys  # noqa: E402
from keyedge.cli import quickstart as _quickstart  # noqa: E402
from keyedge.cli import shuffle as _shuffle  # noqa: E402
from keyedge.cli import train as _train  # noqa: E402

_keys.register(app)
_shuffle.register(app)
_train.register(app)
_export.register(app)
_fleet.register(app)
_guard.register(app)
_doctor.register(app)
_bench.register(app)
_quickstart.register(app)


def _stdout_gone(exc: OSError) -> None:
    """After a failed write to stdout (``| head``, ``> /dev/full``), make sure exiting does not fail again."""
    if exc.errno in (errno.EPIPE, errno.ENOSPC) or isinstance(exc, BrokenPipeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


def main() -> None:
    """Console-script entry point: SIGTERM and SIGHUP stop a command as Ctrl-C does (clean-up, honest message)."""
    with contextlib.suppress(OSError):
        _terminal[:] = [(fd, os.dup(fd)) for fd in (1, 2)]
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is signal.SIG_DFL:
            signal.signal(signum, _terminate)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt)
    try:
        app()
    except BrokenPipeError:  # stdout closed by the reader (`keyedge ... | head`): nothing more to say
        _stdout_gone(BrokenPipeError(errno.EPIPE, "broken pipe"))
        sys.exit(141)
