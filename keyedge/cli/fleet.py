"""``keyedge fleet``: keys, fine-tunes, artifacts, verification and one report for N devices; resumable.

:mod:`keyedge.app.fleet` is imported inside each command: it brings torch and the exporters, which
``keyedge --help`` and the other commands do without.  The engine module is light (Ray is imported only
when a Ray engine is made).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import typer

from keyedge.app.engine import make_engine
from keyedge.cli._console import console, err_console, one_line, progress_bar
from keyedge.cli._flags import device_option, expand_targets, seed_option, sign_key_option, target_option
from keyedge.errors import KeyedgeError

fleet_app = typer.Typer(
    help="A fleet of devices, one key and one model each: init, train, export, verify, report (resumable).",
    no_args_is_help=True,
)

ENGINE = typer.Option("local", "--engine", help="local (this machine, one job at a time) or ray (Ray tasks).")
ADDRESS = typer.Option(
    None, "--address", help="Ray cluster to join: auto or HOST:PORT (default: start a local Ray instance)."
)
CPUS = typer.Option(1.0, "--cpus-per-job", help="Ray: CPUs per job (also its torch threads).")
GPUS = typer.Option(0.0, "--gpus-per-job", help="Ray: GPUs per job (training then runs on CUDA).")
RETRIES = typer.Option(1, "--retries", min=0, help="Attempts after a key's job fails, before it is reported failed.")


def _say(line: str) -> None:
    console.print(line, markup=False, highlight=False)


@contextlib.contextmanager
def _session(directory: Path, engine: str, address, cpus: float, gpus: float):
    """The fleet (locked for this command) and its engine, closed afterwards."""
    from keyedge.app.fleet import fleet_lock, read_fleet

    fleet = read_fleet(directory)
    with fleet_lock(directory):
        fleet = read_fleet(directory)  # as it is now that this command holds the fleet
        runner = make_engine(engine, address=address, cpus_per_job=cpus, gpus_per_job=gpus)
        try:
            _say(f"fleet {directory}: {len(fleet.devices)} devices; engine: {runner.describe()}")
            yield fleet, runner
        finally:
            runner.close()


@contextlib.contextmanager
def _progress(stage: str):
    """A progress bar over keys, and the ``on_event`` callback that drives it."""
    with progress_bar() as bar:
        task: dict[str, Any] = {}

        def on_event(kind: str, payload: Any) -> None:
            if kind == "cleaned":  # a killed earlier run's leftovers, removed or put back
                bar.console.print(f"  {payload}", markup=False, highlight=False, soft_wrap=True)
            elif kind == "jobs":
                task["id"] = bar.add_task(stage, total=payload)
            elif kind == "done":
                bar.advance(task["id"])
                state = "done" if payload.ok else f"FAILED: {payload.error}"
                retried = f", {payload.attempts} attempts" if payload.attempts > 1 else ""
                bar.console.print(f"  {payload.name}: {state} ({payload.seconds:.1f} s{retried})", markup=False)

        yield on_event


def _finish(result) -> None:
    _say(result.summary())
    if result.failed:
        for name, line in result.failed.items():
            err_console.print(one_line(f"  {name}: {line}"), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1)


@fleet_app.command("init")
def init(
    directory: Path = typer.Argument(..., help="New fleet directory."),
    devices: int | None = typer.Option(None, "--devices", "-n", min=1, help="Number of devices (device-000...)."),
    name: list[str] | None = typer.Option(None, "--name", help="Device name (repeatable), instead of --devices."),
    block_size: int = typer.Option(4, "--block-size", "-b", min=1, help="Shuffle block size of every key."),
    model: str = typer.Option(..., "--model", "-m", help="timm model name, e.g. tf_efficientnet_lite0."),
    data: str = typer.Option(..., "--data", "-d", help="Training data, as for `keyedge train`."),
    weights: str = typer.Option("hub", "--weights", help="As for `keyedge train`."),
    image_size: int | None = typer.Option(None, "--image-size", min=8),
    finetune: str = typer.Option("full", "--finetune", help="full or lora."),
    lora_r: int | None = typer.Option(None, "--lora-r", min=1),
    epochs: int = typer.Option(3, "--epochs", min=1),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    lr: float | None = typer.Option(None, "--lr"),
    seed: int = seed_option("Seed of new layers, data order and the limited subsets."),
    train_limit: int | None = typer.Option(None, "--train-limit", min=1),
    test_limit: int | None = typer.Option(None, "--test-limit", min=1),
) -> None:
    """Create a fleet: one fresh secret key per device and fleet.json (the recipe every device is trained with)."""
    from keyedge.app.fleet import Recipe, device_names, init_fleet

    if finetune not in ("full", "lora"):
        raise KeyedgeError(f"unknown --finetune {finetune!r}", "use full or lora")
    names = device_names(devices, list(name or []))
    recipe = Recipe(
        model=model,
        data=data,
        weights=weights,
        image_size=image_size,
        finetune=finetune,
        lora_r=lora_r,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        train_limit=train_limit,
        test_limit=test_limit,
    )
    fleet = init_fleet(directory, names, block_size, recipe, log=_say)
    _say(
        f"fleet {directory}: {len(fleet.devices)} keys in {directory / 'keys'} (0600), manifest {directory}/fleet.json"
    )
    _say(f"next: keyedge fleet train {directory}")


@fleet_app.command("train")
def train(
    directory: Path = typer.Argument(..., help="Fleet directory."),
    engine: str = ENGINE,
    address: str | None = ADDRESS,
    cpus_per_job: float = CPUS,
    gpus_per_job: float = GPUS,
    retries: int = RETRIES,
    device: str = device_option("Torch device of each job (local engine; on Ray: --gpus-per-job decides)."),
    sign_key: Path | None = sign_key_option("every checkpoint the jobs write (keyedge.sig)"),
) -> None:
    """Fine-tune one model per key; finished keys are left alone, unfinished ones resumed."""
    from keyedge.app.fleet import train_stage
    from keyedge.keys.signing import load_signing_key

    if sign_key is not None:
        load_signing_key(sign_key)  # a bad or world-readable key file: said now, not by every job

    if engine == "ray" and device not in ("auto", "cpu") and not gpus_per_job:
        raise KeyedgeError(
            f"--device {device} with --engine ray: Ray gives a job a GPU only when asked",
            "pass --gpus-per-job 1 (jobs then train on the GPU Ray assigns)",
        )
    with _session(directory, engine, address, cpus_per_job, gpus_per_job) as (fleet, runner), _progress("train") as ev:
        chosen = device if engine == "local" else ("cuda" if gpus_per_job > 0 else "cpu")
        result = train_stage(fleet, runner, retries=retries, device=chosen, on_event=ev, sign_key=sign_key)
    _finish(result)


@fleet_app.command("export")
def export(
    directory: Path = typer.Argument(..., help="Fleet directory."),
    target: list[str] = target_option(),
    fuse: str = typer.Option(
        "gather", "--fuse", help="gather, elements, conv, planes, fold, auto or fastest (as for `keyedge export`)."
    ),
    precision: str = typer.Option("fp32", "--precision", help="fp32 or fp16."),
    engine: str = ENGINE,
    address: str | None = ADDRESS,
    cpus_per_job: float = CPUS,
    gpus_per_job: float = GPUS,
    retries: int = RETRIES,
) -> None:
    """Export every trained key to every target, verified; current artifact sets are left alone."""
    from keyedge.app.fleet import export_stage

    if precision not in ("fp32", "fp16"):  # a fleet keeps one set per device; int8 sets sit beside them
        raise KeyedgeError(
            f"fleet export takes --precision fp32 or fp16, not {precision!r}",
            "export int8 per key: keyedge export --runs FLEET/runs --keys FLEET/keys --precision int8",
        )
    targets = expand_targets(target, precision)
    with _session(directory, engine, address, cpus_per_job, gpus_per_job) as (fleet, runner), _progress("export") as ev:
        result = export_stage(
            fleet, runner, targets=targets, fuse=fuse, precision=precision, retries=retries, on_event=ev
        )
    _finish(result)


@fleet_app.command("verify")
def verify(
    directory: Path = typer.Argument(..., help="Fleet directory."),
    engine: str = ENGINE,
    address: str | None = ADDRESS,
    cpus_per_job: float = CPUS,
    retries: int = typer.Option(0, "--retries", min=0),
) -> None:
    """Re-check every artifact set (file hashes, parity with its checkpoint); verified sets are not redone."""
    from keyedge.app.fleet import verify_stage

    with _session(directory, engine, address, cpus_per_job, 0) as (fleet, runner), _progress("verify") as ev:
        result = verify_stage(fleet, runner, retries=retries, on_event=ev)
    _finish(result)


@fleet_app.command("report")
def report(
    directory: Path = typer.Argument(..., help="Fleet directory."),
    latency: bool = typer.Option(True, "--latency/--no-latency", help="Time keyed/plain on onnxruntime per key."),
    engine: str = ENGINE,
    address: str | None = ADDRESS,
    cpus_per_job: float = CPUS,
) -> None:
    """One table for the fleet: accuracy, accuracy with another key, parity, hashes, keyed/plain latency."""
    from keyedge.app.fleet import report_stage, to_markdown

    with _session(directory, engine, address, cpus_per_job, 0) as (fleet, runner), _progress("report") as ev:
        result, table = report_stage(fleet, runner, latency=latency, on_event=ev, log=_say)
    console.print(to_markdown(table), markup=False, highlight=False)
    _say(
        f"wrote {directory / 'report'}/fleet-report.md, fleet-report.json"
        + (", accuracy.png" if (directory / "report" / "accuracy.png").exists() else "")
    )
    _finish(result)


@fleet_app.command("status")
def status(directory: Path = typer.Argument(..., help="Fleet directory.")) -> None:
    """What each device has: checkpoint, artifacts, verification, last failure (reads only)."""
    from keyedge.app.fleet import read_fleet, status_rows

    fleet = read_fleet(directory)
    for row in status_rows(fleet):
        line = f"{row['device']} ({row['fingerprint']}): train {row['train']}; export {row['export']}"
        line += f"; verified {row['verified']}" + (f"; last failure: {row['failed']}" if row["failed"] else "")
        _say(line)


def register(app: typer.Typer) -> None:
    app.add_typer(fleet_app, name="fleet")
