"""The ``keyedge`` command line: one Typer sub-command per verb.

Every :class:`~keyedge.errors.KeyedgeError` raised by a command becomes one
line on stderr (``error: what is wrong; how to fix it``) and exit code 2.
"""

from __future__ import annotations

import typer
from typer.core import TyperGroup

try:  # typer >= 0.20 ships its own copy of click; older ones use click itself
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - depends on the typer release
    from click.exceptions import NoArgsIsHelpError, UsageError

from keyedge.cli._console import err_console
from keyedge.errors import KeyedgeError


class _KeyedgeGroup(TyperGroup):
    """Turns keyedge's errors into a one-line message and exit code 2, never a traceback."""

    def invoke(self, ctx):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except KeyedgeError as exc:
            err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("interrupted: nothing was written", markup=False, highlight=False)
            raise typer.Exit(130) from None
        except NoArgsIsHelpError:
            raise  # `keyedge bench` alone: its help, as asked
        except UsageError as exc:  # a bad option or argument of a sub-command: one line too, not a panel
            command = exc.ctx.command_path if exc.ctx is not None else "keyedge"
            message = " ".join(exc.format_message().split()).rstrip(".")
            err_console.print(
                f"error: {message}; see '{command} --help'", markup=False, highlight=False, soft_wrap=True
            )
            raise typer.Exit(2) from None


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
from keyedge.cli import keys as _keys  # noqa: E402
from keyedge.cli import quickstart as _quickstart  # noqa: E402
from keyedge.cli import shuffle as _shuffle  # noqa: E402
from keyedge.cli import train as _train  # noqa: E402

_keys.register(app)
_shuffle.register(app)
_train.register(app)
_export.register(app)
_doctor.register(app)
_bench.register(app)
_quickstart.register(app)


def main() -> None:
    """Console-script entry point."""
    app()
