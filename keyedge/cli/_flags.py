"""Retired flag spellings: hidden options that fail with one line naming the flag to use instead."""

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
