"""Shared rich consoles: results on stdout, messages and errors on stderr.

Markup is off: paths, model names and labels come from the user (a file named ``k[/x].bin`` is
text, never markup); styled output uses :class:`rich.text.Text` objects.
"""

from rich.console import Console

console = Console(highlight=False, soft_wrap=True, markup=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)


def progress_bar(*, counts: bool = True):
    """The commands' progress bar on stderr: description, bar, done/total (``counts``), elapsed; gone when done."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("{task.description}", markup=False), BarColumn()]
    columns += [MofNCompleteColumn()] if counts else []
    return Progress(*columns, TimeElapsedColumn(), console=err_console, transient=True)
