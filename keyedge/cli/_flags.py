"""Flags shared by commands: retired spellings (hidden, one-line refusal) and the --target list."""

from __future__ import annotations

from typing import Any

import typer

from keyedge.errors import KeyedgeError


def retired(*names: str, message: str, hint: str, flag: bool = False) -> Any:
    """A hidden ``typer.Option`` under the old ``names``: given at all, it raises ``KeyedgeError(message, hint)``."""

    def refuse(value: Any) -> None:
        if value not in (None, False):
            raise KeyedgeError(message, hint)

    return typer.Option(False if flag else None, *names, hidden=True, is_eager=True, callback=refuse)


def expand_targets(names: list[str], precision: str = "fp32") -> list[str]:
    """``--target`` values in order, duplicates dropped; unknown: one line.

    ``all`` is every backend whose extra is installed and that exports ``precision`` (every backend when none
    is installed: the export then names the extra); a target named explicitly is kept, and refused later.
    """
    from keyedge.deps import installed
    from keyedge.exporters import get_backend, list_backends

    present = [t for t in list_backends() if installed(get_backend(t).extra)] or list_backends()
    present = [t for t in present if precision in get_backend(t).precisions]
    targets: list[str] = []
    for name in names:
        for target in present if name == "all" else [name]:
            get_backend(target)  # unknown target: a clear error before any work
            if target not in targets:
                targets.append(target)
    return targets
