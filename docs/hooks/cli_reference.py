"""mkdocs hook: the click command behind keyedge's Typer app, for the generated CLI reference.

docs/cli.md renders it with mkdocs-click (``:module: keyedge_cli_reference``, ``:command: command``), so the
reference is built from ``keyedge.cli.app`` on every ``mkdocs build`` and never copied by hand.
"""

from __future__ import annotations

import sys

import typer

import keyedge.cli

#: the whole ``keyedge`` command tree, as click sees it
command = typer.main.get_command(keyedge.cli.app)

# mkdocs registers a hook module under its path in mkdocs.yml; give it an importable name for mkdocs-click
sys.modules["keyedge_cli_reference"] = sys.modules[__name__]
