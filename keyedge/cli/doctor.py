"""``keyedge doctor``: installed extras, working export targets and runtimes, and how to fix what is missing."""

from __future__ import annotations

import json

import typer
from rich.table import Table
from rich.text import Text

from keyedge.cli._console import console


def doctor(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables.")) -> None:
    """Check which extras, export targets and runtimes work on this host."""
    from keyedge.app.doctor import collect
    from keyedge.host import describe

    report = collect()
    if as_json:
        print(json.dumps(report, indent=2))
        return
    console.print(f"keyedge {report['keyedge']} on Python {report['python']}, {report['platform']}", markup=False)
    cpu = report["cpu"]
    console.print(f"cpu: {describe(cpu['features'], cpu['cpu'])}", markup=False)
    for note in cpu["precision_notes"]:
        console.print(f"  {note}", markup=False)
    core = ", ".join(f"{name} {version or 'MISSING'}" for name, version in report["core"].items())
    console.print(f"core: {core}", markup=False)

    extras = Table(title="extras", title_justify="left")
    for column in ("extra", "packages", "for", "status"):
        extras.add_column(column)
    for name, info in report["extras"].items():
        packages = ", ".join(f"{dist} {ver or '-'}" for dist, ver in info["packages"].items())
        status = (
            Text("installed", style="green")
            if info["installed"]
            else Text.assemble(("missing", "yellow"), f": {info['install']}")
        )
        extras.add_row(name, packages, info["purpose"], status)
    console.print(extras)

    sections = (
        ("export", "export targets"),
        ("runtime", "runtimes on this host"),
        ("compatibility", "known conflicts"),
    )
    for section, title in sections:
        table = Table(title=title, title_justify="left")
        for column in ("name", "works", "detail"):
            table.add_column(column)
        for check in report["checks"]:
            if check["section"] != section:
                continue
            detail = check["detail"] + (f" -> {check['fix']}" if check["fix"] else "")
            table.add_row(check["name"], Text("yes", style="green") if check["ok"] else Text("no", style="red"), detail)
        console.print(table)


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
