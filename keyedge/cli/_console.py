"""Shared rich consoles: results on stdout, messages and errors on stderr.

Markup is off: paths, model names and labels come from the user (a file named ``k[/x].bin`` is
text, never markup); styled output uses :class:`rich.text.Text` objects.
"""

from rich.console import Console

console = Console(highlight=False, soft_wrap=True, markup=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)
