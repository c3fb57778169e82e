"""The fleet's stages (train, export, verify, report): each finds what is missing or stale and runs one job per key."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from keyedge.app.engine import Job, Outcome
from keyedge.app.fleet.jobs import export_job, other_key_job, train_job, verify_job
from keyedge.app.fleet.manifest import Device, FleetManifest
from keyedge.app.fleet.report import build_report, write_report
from keyedge.app.fleet.state import artifact_sets, checkpoint_state, current_set, export_state, key_problem
from keyedge.checkpoints import MANIFEST, read_manifest
from keyedge.deploy.artifacts import ArtifactManifest
from keyedge.deploy.verify import check_files
from keyedge.errors import KeyedgeError
from keyedge.exporters import get_backend
from keyedge.fileio import note_kept, remove_stale_staging, sha256_file


@dataclass
class StageResult:
    """What one stage did: devices already done, done now, failed (name -> line) and waiting on an earlier stage."""

    stage: str
    skipped: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    waiting: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        parts = [f"{len(self.done)} done now", f"{len(self.skipped)} already done"]
        if self.failed:
            parts.append(f"{len(self.failed)} failed ({', '.join(self.failed)})")
        if self.waiting:
            parts.append(
                f"{len(self.waiting)} waiting ({', '.join(self.waiting)}: {next(iter(self.waiting.values()))})"
            )
        return f"fleet {self.stage}: " + ", ".join(parts) + f" in {self.seconds:.1f} s"


def _log_file(fleet: FleetManifest, device: Device, stage: str) -> str:
    logs = fleet.path("logs")
    logs.mkdir(exist_ok=True)
    return str((logs / f"{device.name}.{stage}.log").resolve())


def _run(
    fleet: FleetManifest,
    stage: str,
    jobs: list[Job],
    engine,
    retries: int,
    result: StageResult,
    record: Callable[[Device, Outcome], None],
    on_event: Callable[[str, Any], None],
) -> None:
    """Run ``jobs`` on ``engine``; record each outcome in fleet.json as it arrives.

    ``on_event("jobs", count)`` first, then ``on_event("done", outcome)`` per finished job (a progress bar).
    """

    def done(outcome: Outcome) -> None:
        device = fleet.device(outcome.name)
        failures = dict(device.failed or {})
        if outcome.ok:
            record(device, outcome)
            failures.pop(stage, None)
            result.done.append(device.name)
        else:
            failures[stage] = {"error": outcome.error, "attempts": outcome.attempts}
            tries = f"{outcome.attempts} attempt{'s' if outcome.attempts != 1 else ''}"
            result.failed[device.name] = f"{outcome.error} (after {tries})"
        device.failed = failures or None
        fleet.write()
        on_event("done", outcome)

    for folder in ("runs", "artifacts"):  # what a killed earlier run left, said on the terminal (not only in a log)
        if fleet.path(folder).is_dir():
            for line in remove_stale_staging(fleet.path(folder)):
                on_event("cleaned", line)
    on_event("jobs", len(jobs))
    if jobs:
        engine.run(jobs, retries=retries, on_done=done)


def train_stage(
    fleet: FleetManifest,
    engine,
    *,
    retries: int = 1,
    device: str = "auto",
    on_event=lambda *_: None,
    sign_key: Path | None = None,
):
    """Fine-tune every device whose checkpoint is missing or unfinished (finished ones are left alone).

    ``sign_key``: a signing key file; every checkpoint a job writes is signed (it travels between machines).
    """
    started = time.perf_counter()
    result = StageResult("train")
    jobs = []
    recipe = asdict(fleet.recipe)
    for d in fleet.devices:
        state, detail = checkpoint_state(fleet, d)
        if state == "done":
            _record_trained(fleet, d)
            _clear_failure(d, "train")
            result.skipped.append(d.name)
        elif state == "blocked":
            _blocked(d, "train", detail, result)
        else:
            d.trained = None  # what is on disk is not (or no longer) a finished checkpoint
            kwargs = {
                "checkpoint": str(fleet.path(d.checkpoint).resolve()),
                "key_file": str(fleet.path(d.key_file).resolve()),
                "fingerprint": d.fingerprint,
                "recipe": recipe,
                "resume": state == "resume",
                "device": device,
                "sign_key": str(Path(sign_key).resolve()) if sign_key else None,
                "log_file": _log_file(fleet, d, "train"),
            }
            jobs.append(Job(d.name, train_job, kwargs))
    fleet.write()

    def record(d: Device, outcome: Outcome) -> None:
        d.trained = {**outcome.result, "seconds": round(outcome.seconds, 2)}
        note_kept(fleet.path(d.checkpoint).resolve(), f"{d.name}'s checkpoint; a rerun leaves it as it is")

    _run(fleet, "train", jobs, engine, retries, result, record, on_event)
    result.seconds = time.perf_counter() - started
    return result


def _blocked(d: Device, stage: str, detail: str, result: StageResult) -> None:
    """A device this stage refuses before any job (its key file is not its key, its checkpoint another key's)."""
    result.failed[d.name] = detail
    d.failed = {**(d.failed or {}), stage: {"error": detail, "attempts": 0}}


def _clear_failure(d: Device, stage: str) -> None:
    """A stage found done on disk has no failure left to report."""
    if d.failed and stage in d.failed:
        d.failed = {k: v for k, v in d.failed.items() if k != stage} or None


def _record_trained(fleet: FleetManifest, d: Device) -> None:

    directory = fleet.path(d.checkpoint)
    sha = sha256_file(directory / MANIFEST)
    if d.trained is None or d.trained.get("sha256") != sha:
        manifest = read_manifest(directory)
        d.trained = {"sha256": sha, "epoch": manifest.epoch, "test_accuracy": manifest.test_accuracy}


def export_stage(
    fleet: FleetManifest,
    engine,
    *,
    targets: list[str],
    fuse: str = "gather",
    precision: str = "fp32",
    retries: int = 1,
    on_event=lambda *_: None,
) -> StageResult:
    """Export every trained device whose artifact set is missing or stale, to ``targets``."""
    for t in targets:
        ok, why = get_backend(t).available()
        if not ok:
            raise KeyedgeError(f"cannot export to {t}: {why}")
    started = time.perf_counter()
    result = StageResult("export")
    sets = artifact_sets(fleet)
    pending: list[tuple[Device, str]] = []
    for d in fleet.devices:
        state, detail = export_state(fleet, d, targets, fuse, precision, sets)
        if state == "done":
            _record_exported(fleet, d, sets[d.fingerprint])
            _clear_failure(d, "export")
            result.skipped.append(d.name)
        elif state == "waiting":
            result.waiting[d.name] = detail
        elif state == "blocked":
            _blocked(d, "export", detail, result)
        else:
            pending.append((d, detail))
    fleet.write()
    jobs = [
        Job(
            d.name,
            export_job,
            {
                "checkpoint": str(fleet.path(d.checkpoint).resolve()),
                "key_file": str(fleet.path(d.key_file).resolve()),
                "fingerprint": d.fingerprint,
                "out": str(fleet.path("artifacts").resolve()),
                "targets": list(targets),
                "fuse": fuse,
                "precision": precision,
                "template": len(pending) > 1,
                "log_file": _log_file(fleet, d, "export"),
            },
        )
        for d, _ in pending
    ]

    def record(d: Device, outcome: Outcome) -> None:
        r = dict(outcome.result)
        r["path"] = os.path.relpath(r["path"], fleet.directory.resolve())
        d.exported = {**r, "seconds": round(outcome.seconds, 2)}
        d.verified = None  # a new set: verify it again
        note_kept(fleet.directory.resolve() / r["path"], f"{d.name}'s artifact set")

    _run(fleet, "export", jobs, engine, retries, result, record, on_event)
    result.seconds = time.perf_counter() - started
    return result


def _record_exported(fleet: FleetManifest, d: Device, directory: Path) -> None:

    sha = sha256_file(directory / "manifest.json")
    if d.exported is None or d.exported.get("sha256") != sha:
        manifest = ArtifactManifest.read(directory)
        d.exported = {
            "path": str(directory.relative_to(fleet.directory)),
            "sha256": sha,
            "checkpoint_sha256": manifest.checkpoint.get("manifest_sha256"),
            "targets": sorted(manifest.targets),
            "fuse": manifest.fuse_requested,
            "precision": manifest.precision,
        }


def verify_stage(fleet: FleetManifest, engine, *, retries: int = 0, on_event=lambda *_: None) -> StageResult:
    """``keyedge verify`` every artifact set not yet verified in its current form (files and parity)."""
    started = time.perf_counter()
    result = StageResult("verify")
    sets = artifact_sets(fleet)
    jobs = []
    for d in fleet.devices:
        problem = key_problem(fleet, d)
        if problem:
            _blocked(d, "verify", problem, result)
            continue
        directory = current_set(fleet, d, sets)
        if directory is None:
            result.waiting[d.name] = "not exported yet"
            continue
        if _still_verified(d, directory):
            result.skipped.append(d.name)
            continue
        kwargs = {
            "directory": str(directory.resolve()),
            "key_file": str(fleet.path(d.key_file).resolve()),
            "fingerprint": d.fingerprint,
            "log_file": _log_file(fleet, d, "verify"),
        }
        jobs.append(Job(d.name, verify_job, kwargs))

    if result.failed:
        fleet.write()

    def record(d: Device, outcome: Outcome) -> None:
        d.verified = dict(outcome.result)

    _run(fleet, "verify", jobs, engine, retries, result, record, on_event)
    result.seconds = time.perf_counter() - started
    return result


def _still_verified(d: Device, directory: Path) -> bool:
    """The set was verified as it is now: the same manifest, and every file it lists hashes as listed again.

    The manifest's hash alone is not enough: a model file changed under an unchanged manifest
    (one flipped byte) would be reused as verified.  Re-hashing costs a read of the set; parity
    is what the verify job adds, and it is rerun whenever the files are not as verified.
    """
    if d.verified is None or d.verified.get("sha256") != sha256_file(directory / "manifest.json"):
        return False
    try:
        check_files(ArtifactManifest.read(directory))
    except KeyedgeError:
        d.verified = None
        return False
    return True


def report_stage(
    fleet: FleetManifest, engine, *, retries: int = 0, latency: bool = True, on_event=lambda *_: None, log=print
) -> tuple[StageResult, dict[str, Any]]:
    """Per-device accuracy with another key (jobs, once per checkpoint), then the fleet table: md, JSON, plot."""
    started = time.perf_counter()
    result = StageResult("report")
    jobs = []
    for i, d in enumerate(fleet.devices):
        state, detail = checkpoint_state(fleet, d)
        if state == "blocked":
            _blocked(d, "report", detail, result)
            continue
        if state != "done":
            result.waiting[d.name] = "not trained yet"
            continue
        sha = sha256_file(fleet.path(d.checkpoint) / MANIFEST)
        if d.other_key is not None and d.other_key.get("checkpoint_sha256") == sha:
            result.skipped.append(d.name)
            continue
        other = fleet.devices[(i + 1) % len(fleet.devices)]
        problem = key_problem(fleet, other) if other is not d else None
        if problem:
            _blocked(d, "report", f"the other key it is scored with: {problem}", result)
            continue
        kwargs = {
            "checkpoint": str(fleet.path(d.checkpoint).resolve()),
            "other_key_file": str(fleet.path(other.key_file).resolve()) if other is not d else None,
            "other_fingerprint": other.fingerprint if other is not d else None,
            "block_size": fleet.block_size,
            "data": fleet.recipe.data,
            "test_limit": fleet.recipe.test_limit,
            "seed": fleet.recipe.seed,
            "log_file": _log_file(fleet, d, "report"),
        }
        jobs.append(Job(d.name, other_key_job, kwargs))

    def record(d: Device, outcome: Outcome) -> None:
        d.other_key = dict(outcome.result)

    _run(fleet, "report", jobs, engine, retries, result, record, on_event)
    report = build_report(fleet, latency=latency, log=log)
    write_report(fleet, report)
    result.seconds = time.perf_counter() - started
    return result, report


__all__ = ["StageResult", "export_stage", "report_stage", "train_stage", "verify_stage"]
