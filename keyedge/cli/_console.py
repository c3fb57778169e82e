"""Shared rich consoles: results on stdout, messages and errors on stderr.

Markup is off: paths, model names and labels come from the user (a file named ``k[/x].bin`` is
text, never markup); styled output uses :class:`rich.text.Text` objects.
"""

import unicodedata

from rich.console import Console

console = Console(highlight=False, soft_wrap=True, markup=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)


def progress_bar(*, counts: bool = True):
    """The commands' progress bar on stderr: description, bar, done/total (``counts``), elapsed; gone when done."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("{task.description}", markup=False), BarColumn()]
    columns += [MofNCompleteColumn()] if counts else []
    return Progress(*columns, TimeElapsedColumn(), console=err_console, transient=True)


def one_line(text: str) -> str:
    """``text`` with every control or format character escaped (``\\n``, ``\\x1b``, ``\\u202e``): one line, always.

    A file name may hold a newline, an escape sequence or a right-to-left override; printed as is it
    would split an error over lines or rewrite the terminal.  Escaped, the name is still recognisable.
    """
    if text.isprintable():
        return text
    return "".join(
        ch if ch == " " or unicodedata.category(ch)[0] not in "CZ" else ch.encode("unicode_escape").decode("ascii")
        for ch in text
    )
