"""``keyedge fleet``: N devices, N keys, N fine-tunes, N verified artifact sets -- one resumable command group.

A fleet directory holds::

    fleet.json            the fleet manifest: device names <-> key fingerprints <-> checkpoints <-> artifacts
    keys/NAME.bin         one secret key per device (0600; never copied into any manifest)
    runs/NAME/            one checkpoint per device (``keyedge train``'s format)
    artifacts/MODEL-FP/   one verified artifact set per device (``keyedge export``'s format)
    logs/NAME.STAGE.log   what each job said
    report/               ``fleet report``: fleet-report.md, fleet-report.json, accuracy.png

Each stage (train, export, verify, report) looks at what is on disk, never only at
the manifest, and does only what is missing or stale: a checkpoint is finished when its
manifest has the recipe's epochs and the device's fingerprint (an unfinished one is resumed);
an artifact set is current when its manifest names the SHA-256 of the device's checkpoint
manifest, holds the requested targets and every file matches its SHA-256; a verification is
current when it was run on the artifact manifest with today's SHA-256.  So a rerun after a
failure, a Ctrl-C or a killed driver redoes nothing that finished.  ``fleet.json`` is rewritten
(atomically) after every finished job, and only one ``keyedge fleet`` command works on a fleet
at a time (a lock file).

Per-key jobs run on an engine (:mod:`keyedge.app.engine`): this machine, or Ray tasks.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from keyedge.app.engine import Job, Outcome
from keyedge.errors import KeyedgeError, OutputError
from keyedge.fileio import note_kept, sha256_file, staged_directory, write_bytes_atomic
from keyedge.validate import FINGERPRINT, SHA256, read_dataclass, read_json

FLEET_FORMAT = "keyedge-fleet/1"
FLEET_MANIFEST = "fleet.json"
REPORT_FORMAT = "keyedge-fleet-report/1"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
STAGES = ("train", "export", "verify", "report")


@dataclass
class Recipe:
    """How every device's model is fine-tuned (``keyedge train``'s options; the same for the whole fleet)."""

    model: str
    data: str
    weights: str = "hub"
    image_size: int | None = None
    finetune: str = "full"
    lora_r: int | None = None
    epochs: int = 3
    batch_size: int = 64
    lr: float | None = None
    seed: int = 0
    train_limit: int | None = None
    test_limit: int | None = None


@dataclass
class Device:
    """One device of the fleet and what has been done for it (never its key: only the fingerprint)."""

    name: str
    fingerprint: str
    key_file: str  # relative to the fleet directory
    checkpoint: str  # relative to the fleet directory
    trained: dict[str, Any] | None = None  # sha256 (of the checkpoint manifest), epoch, test_accuracy, seconds
    exported: dict[str, Any] | None = None  # path, sha256 (artifact manifest), checkpoint_sha256, targets, ...
    verified: dict[str, Any] | None = None  # sha256 (artifact manifest verified), files, parity
    other_key: dict[str, Any] | None = None  # accuracy with another device's key, for a checkpoint_sha256
    failed: dict[str, Any] | None = None  # stage -> {"error": line, "attempts": n}: the last failure per stage


@dataclass
class Fleet:
    """``fleet.json``: the recipe and the devices; :meth:`write` after each finished job."""

    format: str
    created: str
    block_size: int
    recipe: Recipe
    devices: list[Device]
    directory: Path = field(default=Path("."), repr=False)

    def path(self, relative: str) -> Path:
        return self.directory / relative

    def device(self, name: str) -> Device:
        return next(d for d in self.devices if d.name == name)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("directory")
        return data

    def write(self) -> None:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        write_bytes_atomic(self.directory / FLEET_MANIFEST, text.encode(), overwrite=True)

    @classmethod
    def read(cls, directory: str | os.PathLike) -> Fleet:
        """Read and check ``DIR/fleet.json``; a hand-edited or foreign one is a one-line error naming the field."""
        directory = Path(directory)
        fields = read_json(
            directory / FLEET_MANIFEST, "fleet manifest", f"create the fleet with `keyedge fleet init {directory}`"
        )
        if fields.raw("format", None) != FLEET_FORMAT:
            raise fields.fail("format", f"must be {FLEET_FORMAT!r} (a fleet manifest of this keyedge)")
        fleet = read_dataclass(cls, fields, nested={"Recipe": Recipe, "Device": Device}, skip=("directory",))
        fleet.directory = directory
        _check_fleet(fleet, fields)
        return fleet


def _check_fleet(fleet: Fleet, fields) -> None:
    seen: set[str] = set()
    if not fleet.devices:
        raise fields.fail("devices", "must list at least one device")
    for i, device in enumerate(fleet.devices):
        where = f"devices[{i}]"
        if not NAME.match(device.name) or device.name in seen:
            raise fields.fail(f"{where}.name", f"must be a unique name of letters, digits, . _ -, got {device.name!r}")
        seen.add(device.name)
        if not FINGERPRINT.match(device.fingerprint):
            raise fields.fail(f"{where}.fingerprint", "must be 16 hex digits")
        for name in ("key_file", "checkpoint"):
            value = getattr(device, name)
            parts = Path(value).parts
            if not parts or Path(value).is_absolute() or ".." in parts:
                raise fields.fail(f"{where}.{name}", f"must be a path inside the fleet directory, got {value!r}")
        for name in ("trained", "exported", "verified", "other_key", "failed"):
            record = getattr(device, name)
            if record is not None and not isinstance(record, dict):
                raise fields.fail(f"{where}.{name}", "must be an object or null")
        for name in ("trained", "exported", "verified"):
            record = getattr(device, name)
            if record is not None and not (isinstance(record.get("sha256"), str) and SHA256.match(record["sha256"])):
                raise fields.fail(f"{where}.{name}.sha256", "must be a SHA-256 (64 hex digits)")
        for stage, failure in (device.failed or {}).items():
            if not (isinstance(failure, dict) and isinstance(failure.get("error"), str)):
                raise fields.fail(f"{where}.failed.{stage}", 'must be {"error": "...", "attempts": N}')
    if not 1 <= fleet.block_size <= 64:
        raise fields.fail("block_size", "must be an integer in 1..64")


# ---- init ------------------------------------------------------------------------------------------------------------


def device_names(count: int | None, names: list[str] | None, prefix: str = "device") -> list[str]:
    """``--devices N`` (device-000, device-001...) or explicit ``--name`` values; one-line errors for bad ones."""
    if names:
        bad = [n for n in names if not NAME.match(n)]
        if bad:
            raise KeyedgeError(
                f"device name {bad[0]!r} is not usable as a file name", "use letters, digits, '.', '_' and '-'"
            )
        if len(set(names)) != len(names):
            raise KeyedgeError("device names must be unique", "give each --name once")
        if count is not None and count != len(names):
            raise KeyedgeError(f"--devices {count} but {len(names)} --name values", "pass one of them")
        return list(names)
    if not count or count < 1:
        raise KeyedgeError("a fleet needs at least one device", "pass --devices N or --name NAME (repeatable)")
    width = max(3, len(str(count - 1)))
    return [f"{prefix}-{i:0{width}d}" for i in range(count)]


def init_fleet(directory: Path, names: list[str], block_size: int, recipe: Recipe, *, log=print) -> Fleet:
    """Make a fleet directory: one fresh key per device and ``fleet.json``; written whole or not at all."""
    from keyedge.keys.keyfile import Key
    from keyedge.models.backbones import check_model_name

    check_model_name(recipe.model)  # a typo is said now, not after N keys were made
    if recipe.epochs < 1 or recipe.batch_size < 1:
        raise KeyedgeError("--epochs and --batch-size must be positive")
    if recipe.finetune == "lora" and recipe.weights == "none":
        raise KeyedgeError(
            "LoRA adapts pretrained weights, and --weights none gives none", "pass --weights, or --finetune full"
        )
    if (directory / FLEET_MANIFEST).exists():
        raise OutputError(
            f"{directory} already holds a fleet", "continue it with `keyedge fleet train`, or choose another directory"
        )
    if directory.exists() and any(directory.iterdir()):
        raise OutputError(f"{directory} is not empty", "choose a new or empty directory for the fleet")
    if directory.exists():
        directory.rmdir()  # empty: staged_directory puts the whole fleet in its place
    devices = []
    with staged_directory(directory, overwrite=False, log=log) as staging:
        (staging / "keys").mkdir(mode=0o700)
        for name in names:
            key = Key.generate(block_size)
            key.save(staging / "keys" / f"{name}.bin")
            devices.append(Device(name, key.fingerprint, f"keys/{name}.bin", f"runs/{name}"))
        fleet = Fleet(
            FLEET_FORMAT, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), block_size, recipe, devices, staging
        )
        fleet.write()
    fleet.directory = directory
    return fleet


@contextlib.contextmanager
def fleet_lock(directory: Path) -> Iterator[None]:
    """Hold ``DIR/.fleet.lock`` for one command: a second ``keyedge fleet`` command on the fleet is refused."""
    path = directory / ".fleet.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise OutputError(f"cannot open {path}: {exc.strerror}", "check the fleet directory's permissions") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise KeyedgeError(
                f"another keyedge fleet command (pid {holder}) is working on {directory}",
                "wait for it to finish, or stop it",
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


# ---- what is done, from the disk -------------------------------------------------------------------------------------


def checkpoint_state(fleet: Fleet, device: Device) -> tuple[str, str]:
    """(``done`` | ``resume`` | ``new`` | ``blocked``, detail) for one device's checkpoint."""
    from keyedge.checkpoints import MANIFEST, read_manifest

    directory = fleet.path(device.checkpoint)
    if not (directory / MANIFEST).is_file():
        return "new", "not trained"
    try:
        manifest = read_manifest(directory)
    except KeyedgeError as exc:
        return "blocked", f"its checkpoint cannot be read ({exc.message}); move {directory} away to retrain it"
    if manifest.fingerprint != device.fingerprint:
        return "blocked", f"{directory} holds a model of another key ({manifest.fingerprint}); move it away"
    if manifest.epoch < fleet.recipe.epochs:
        return "resume", f"epoch {manifest.epoch} of {fleet.recipe.epochs}"
    return "done", f"epoch {manifest.epoch}, top-1 {manifest.test_accuracy:.1%}"


def _artifact_sets(fleet: Fleet) -> dict[str, Path]:
    """Fingerprint -> the artifact set under ``artifacts/`` (read from each set's manifest)."""
    from keyedge.deploy.artifacts import ArtifactManifest

    found: dict[str, Path] = {}
    root = fleet.path("artifacts")
    for manifest_path in sorted(root.glob("*/manifest.json")) if root.is_dir() else []:
        try:
            manifest = ArtifactManifest.read(manifest_path.parent)
        except KeyedgeError:
            continue  # a broken set is not current: the export stage replaces it
        if manifest.fingerprint:
            found[manifest.fingerprint] = manifest_path.parent
    return found


def export_state(
    fleet: Fleet, device: Device, targets: list[str], fuse: str, precision: str, sets: dict[str, Path]
) -> tuple[str, str]:
    """(``done`` | ``stale`` | ``new`` | ``waiting``, detail) for one device's artifact set."""
    from keyedge.checkpoints import MANIFEST
    from keyedge.deploy.artifacts import ArtifactManifest
    from keyedge.deploy.verify import check_files

    state, _ = checkpoint_state(fleet, device)
    if state != "done":
        return "waiting", "not trained yet"
    directory = sets.get(device.fingerprint)
    if directory is None:
        return "new", "not exported"
    manifest = ArtifactManifest.read(directory)
    checkpoint_sha = sha256_file(fleet.path(device.checkpoint) / MANIFEST)
    if manifest.checkpoint.get("manifest_sha256") != checkpoint_sha:
        return "stale", "its checkpoint changed since it was exported"
    missing = [t for t in targets if t not in manifest.targets]
    if missing:
        return "stale", f"no {', '.join(missing)} artifact"
    if manifest.fuse_requested != fuse or manifest.precision != precision:
        return "stale", f"exported with --fuse {manifest.fuse_requested} at {manifest.precision}"
    try:
        check_files(manifest)
    except KeyedgeError as exc:
        return "stale", exc.message
    return "done", str(directory.relative_to(fleet.directory))


# ---- the per-key jobs (top-level functions: they run on Ray workers too) ---------------------------------------------


def _logger(log_file: str) -> Callable[[str], None]:
    def log(line: str) -> None:
        with open(log_file, "a", encoding="utf-8") as fh:
            fh.write(line.rstrip() + "\n")

    return log


def train_job(checkpoint: str, key_file: str, recipe: dict[str, Any], resume: bool, device: str, log_file: str):
    """Fine-tune one device's model (or continue it); the checkpoint manifest's SHA-256 and accuracy."""
    from keyedge.checkpoints import MANIFEST
    from keyedge.training.loop import TrainConfig, train

    config = TrainConfig(out=checkpoint, key_file=key_file, device=device, resume=resume, **recipe)
    manifest = train(config, progress=False, log=_logger(log_file))
    return {
        "sha256": sha256_file(Path(checkpoint) / MANIFEST),
        "epoch": manifest.epoch,
        "test_accuracy": manifest.test_accuracy,
    }


_TEMPLATES: dict[tuple, Any] = {}  # one fleet template per architecture, kept by the worker process between keys


def export_job(
    checkpoint: str,
    key_file: str,
    out: str,
    targets: list[str],
    fuse: str,
    precision: str,
    template: bool,
    log_file: str,
):
    """Export one device's verified artifact set (from the worker's fleet template where the format allows)."""
    from keyedge.deploy.artifacts import ArtifactManifest
    from keyedge.deploy.export import ExportRequest, ExportSettings, export_one
    from keyedge.keys.keyfile import load_key

    if len(_TEMPLATES) > 2:  # another fleet's architectures: keep memory bounded
        _TEMPLATES.clear()
    settings = ExportSettings(
        targets=targets, out=Path(out), fuse=fuse, precision=precision, overwrite=True, log=_logger(log_file)
    )
    directory = export_one(
        ExportRequest(Path(checkpoint), load_key(key_file)), settings, templates=_TEMPLATES if template else None
    )
    manifest = ArtifactManifest.read(directory)
    return {
        "path": str(directory),
        "sha256": sha256_file(directory / "manifest.json"),
        "checkpoint_sha256": manifest.checkpoint.get("manifest_sha256"),
        "targets": sorted(manifest.targets),
        "sources": {t: r.source for t, r in manifest.targets.items()},
        "fuse": manifest.fuse_requested,
        "precision": manifest.precision,
    }


def verify_job(directory: str, key_file: str, log_file: str):
    """``keyedge verify`` on one device's set with its key: files, then parity against its checkpoint."""
    from keyedge.deploy.verify import describe, verify_set
    from keyedge.keys.keyfile import load_key

    result = verify_set(directory, key=load_key(key_file))
    _logger(log_file)(describe(result))
    parity = {
        t: (r["max_abs_diff"] if "max_abs_diff" in r else r.get("skipped"))
        for t, r in result["parity"].items()
        if isinstance(r, dict)
    }
    return {"sha256": sha256_file(Path(directory) / "manifest.json"), "files": result["files"], "parity": parity}


def other_key_job(
    checkpoint: str,
    other_key_file: str | None,
    block_size: int,
    data: str,
    test_limit: int | None,
    seed: int,
    log_file: str,
):
    """Top-1 of one device's model on the recipe's test images shuffled with another key (key diversity)."""
    from keyedge.checkpoints import MANIFEST, load_checkpoint
    from keyedge.data.datasets import load_dataset
    from keyedge.keys.keyfile import Key, load_key
    from keyedge.training.loop import evaluate

    other = load_key(other_key_file) if other_key_file else Key.generate(block_size)  # a one-device fleet
    model, _ = load_checkpoint(checkpoint, other, allow_key_mismatch=True)
    data, _ = load_dataset(data, "test", model.spec.image_size, limit=test_limit, seed=seed)
    accuracy = evaluate(model, data)["accuracy"]
    _logger(log_file)(f"top-1 with key {other.fingerprint}: {accuracy:.2%} on {len(data)} test images")
    return {
        "accuracy": accuracy,
        "with": other.fingerprint if other_key_file else "a fresh random key",
        "images": len(data),
        "checkpoint_sha256": sha256_file(Path(checkpoint) / MANIFEST),
    }


# ---- stages ----------------------------------------------------------------------------------------------------------


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


def _log_file(fleet: Fleet, device: Device, stage: str) -> str:
    logs = fleet.path("logs")
    logs.mkdir(exist_ok=True)
    return str((logs / f"{device.name}.{stage}.log").resolve())


def _run(
    fleet: Fleet,
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

    on_event("jobs", len(jobs))
    if jobs:
        engine.run(jobs, retries=retries, on_done=done)


def train_stage(fleet: Fleet, engine, *, retries: int = 1, device: str = "auto", on_event=lambda *_: None):
    """Fine-tune every device whose checkpoint is missing or unfinished (finished ones are left alone)."""
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
            result.failed[d.name] = detail
            d.failed = {**(d.failed or {}), "train": {"error": detail, "attempts": 0}}
        else:
            d.trained = None  # what is on disk is not (or no longer) a finished checkpoint
            kwargs = {
                "checkpoint": str(fleet.path(d.checkpoint).resolve()),
                "key_file": str(fleet.path(d.key_file).resolve()),
                "recipe": recipe,
                "resume": state == "resume",
                "device": device,
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


def _clear_failure(d: Device, stage: str) -> None:
    """A stage found done on disk has no failure left to report."""
    if d.failed and stage in d.failed:
        d.failed = {k: v for k, v in d.failed.items() if k != stage} or None


def _record_trained(fleet: Fleet, d: Device) -> None:
    from keyedge.checkpoints import MANIFEST, read_manifest

    directory = fleet.path(d.checkpoint)
    sha = sha256_file(directory / MANIFEST)
    if d.trained is None or d.trained.get("sha256") != sha:
        manifest = read_manifest(directory)
        d.trained = {"sha256": sha, "epoch": manifest.epoch, "test_accuracy": manifest.test_accuracy}


def export_stage(
    fleet: Fleet,
    engine,
    *,
    targets: list[str],
    fuse: str = "gather",
    precision: str = "fp32",
    retries: int = 1,
    on_event=lambda *_: None,
) -> StageResult:
    """Export every trained device whose artifact set is missing or stale, to ``targets``."""
    from keyedge.exporters import get_backend

    for t in targets:
        ok, why = get_backend(t).available()
        if not ok:
            raise KeyedgeError(f"cannot export to {t}: {why}")
    started = time.perf_counter()
    result = StageResult("export")
    sets = _artifact_sets(fleet)
    pending: list[tuple[Device, str]] = []
    for d in fleet.devices:
        state, detail = export_state(fleet, d, targets, fuse, precision, sets)
        if state == "done":
            _record_exported(fleet, d, sets[d.fingerprint])
            _clear_failure(d, "export")
            result.skipped.append(d.name)
        elif state == "waiting":
            result.waiting[d.name] = detail
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


def _record_exported(fleet: Fleet, d: Device, directory: Path) -> None:
    from keyedge.deploy.artifacts import ArtifactManifest

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


def _current_set(fleet: Fleet, d: Device, sets: dict[str, Path]) -> Path | None:
    directory = sets.get(d.fingerprint)
    return directory if directory is not None and checkpoint_state(fleet, d)[0] == "done" else None


def verify_stage(fleet: Fleet, engine, *, retries: int = 0, on_event=lambda *_: None) -> StageResult:
    """``keyedge verify`` every artifact set not yet verified in its current form (files and parity)."""
    started = time.perf_counter()
    result = StageResult("verify")
    sets = _artifact_sets(fleet)
    jobs = []
    for d in fleet.devices:
        directory = _current_set(fleet, d, sets)
        if directory is None:
            result.waiting[d.name] = "not exported yet"
            continue
        sha = sha256_file(directory / "manifest.json")
        if d.verified is not None and d.verified.get("sha256") == sha:
            result.skipped.append(d.name)
            continue
        kwargs = {
            "directory": str(directory.resolve()),
            "key_file": str(fleet.path(d.key_file).resolve()),
            "log_file": _log_file(fleet, d, "verify"),
        }
        jobs.append(Job(d.name, verify_job, kwargs))

    def record(d: Device, outcome: Outcome) -> None:
        d.verified = dict(outcome.result)

    _run(fleet, "verify", jobs, engine, retries, result, record, on_event)
    result.seconds = time.perf_counter() - started
    return result


def report_stage(
    fleet: Fleet, engine, *, retries: int = 0, latency: bool = True, on_event=lambda *_: None, log=print
) -> tuple[StageResult, dict[str, Any]]:
    """Per-device accuracy with another key (jobs, once per checkpoint), then the fleet table: md, JSON, plot."""
    from keyedge.checkpoints import MANIFEST

    started = time.perf_counter()
    result = StageResult("report")
    jobs = []
    for i, d in enumerate(fleet.devices):
        if checkpoint_state(fleet, d)[0] != "done":
            result.waiting[d.name] = "not trained yet"
            continue
        sha = sha256_file(fleet.path(d.checkpoint) / MANIFEST)
        if d.other_key is not None and d.other_key.get("checkpoint_sha256") == sha:
            result.skipped.append(d.name)
            continue
        other = fleet.devices[(i + 1) % len(fleet.devices)]
        kwargs = {
            "checkpoint": str(fleet.path(d.checkpoint).resolve()),
            "other_key_file": str(fleet.path(other.key_file).resolve()) if other is not d else None,
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


# ---- the report ------------------------------------------------------------------------------------------------------


def _fleet_latency(fleet: Fleet, sets: dict[str, Path], log) -> dict[str, Any]:
    """Each device's ONNX artifact against the plain twin of the fleet's architecture, interleaved (onnxruntime)."""
    import tempfile

    from keyedge.benchmarks.latency import BenchSettings, run_latency
    from keyedge.benchmarks.profiles import parse_profile
    from keyedge.benchmarks.workbench import export_for_timing, untrained_checkpoint
    from keyedge.checkpoints import load_checkpoint
    from keyedge.deploy.artifacts import ArtifactManifest
    from keyedge.exporters import get_backend
    from keyedge.keys.keyfile import load_key
    from keyedge.models.backbones import build_model

    onnx_sets = {fp: d for fp, d in sets.items() if "onnx" in ArtifactManifest.read(d).targets}
    if not onnx_sets:
        return {"skipped": "no ONNX artifacts (export with -t onnx)"}
    ok, why = get_backend("onnx").can_run()
    if not ok:
        return {"skipped": why}
    first = next(d for d in fleet.devices if d.fingerprint in onnx_sets)
    model, _ = load_checkpoint(fleet.path(first.checkpoint), load_key(fleet.path(first.key_file)))
    spec = model.spec
    plain = build_model(spec.name, spec.num_classes, weights="none", image_size=spec.image_size).eval()
    plain.backbone.load_state_dict(model.backbone.state_dict())
    profile = parse_profile(
        {"name": "fleet-report", "threads": 2, "batch_sizes": [1], "runtime": [{"name": "onnxruntime"}]}
    )
    settings = BenchSettings(min_seconds=0.3, min_iterations=20, warmup=5, rounds=6)
    log(f"timing {len(onnx_sets)} ONNX artifacts against the plain twin of {spec.name} (onnxruntime, batch 1)")
    with tempfile.TemporaryDirectory(prefix=".fleet-latency-", dir=fleet.directory) as tmp:
        twin = export_for_timing(untrained_checkpoint(Path(tmp) / "plain-ckpt", plain), None, Path(tmp), ["onnx"])
        report = run_latency([str(twin), *map(str, onnx_sets.values())], profile, settings)
    ratios = {}
    for c in report.comparisons:
        if c.kind == "keyed/plain":
            ratios[c.numerator.rsplit("-", 1)[-1]] = {
                "median": c.median,
                "p10": c.p10,
                "p90": c.p90,
                "rounds": c.rounds,
            }
    return {"runtime": "onnxruntime", "batch": 1, "threads": 2, "keyed_over_plain": ratios}


def build_report(fleet: Fleet, *, latency: bool = True, log=print) -> dict[str, Any]:
    """One row per device: accuracies, parity, artifact hashes and keyed/plain latency (JSON-ready)."""
    from keyedge.deploy.artifacts import ArtifactManifest

    sets = {fp: d for fp, d in _artifact_sets(fleet).items() if any(x.fingerprint == fp for x in fleet.devices)}
    current = {d.fingerprint: _current_set(fleet, d, sets) for d in fleet.devices}
    timing = _fleet_latency(fleet, {fp: s for fp, s in current.items() if s is not None}, log) if latency else {}
    rows = []
    for d in fleet.devices:
        directory = current.get(d.fingerprint)
        row: dict[str, Any] = {
            "device": d.name,
            "fingerprint": d.fingerprint,
            "checkpoint": d.checkpoint,
            "trained": checkpoint_state(fleet, d)[0] == "done",
            "accuracy": (d.trained or {}).get("test_accuracy"),
            "accuracy_other_key": (d.other_key or {}).get("accuracy"),
            "artifacts": None,
            "failed": d.failed,
        }
        if directory is not None:
            manifest = ArtifactManifest.read(directory)
            parity = {}
            for target, record in manifest.targets.items():
                diffs = [
                    v["max_abs_diff"] for v in record.parity.values() if isinstance(v, dict) and "max_abs_diff" in v
                ]
                parity[target] = max(diffs) if diffs else record.parity.get("reason") or record.parity.get("skipped")
            sha = sha256_file(directory / "manifest.json")
            row["artifacts"] = {
                "path": str(directory.relative_to(fleet.directory)),
                "manifest_sha256": sha,
                "files": {f["path"]: f["sha256"] for r in manifest.targets.values() for f in r.files},
                "parity": parity,
                "verified": bool(d.verified and d.verified.get("sha256") == sha),
            }
        ratio = timing.get("keyed_over_plain", {}).get(d.fingerprint)
        row["keyed_over_plain"] = ratio
        rows.append(row)
    return {
        "format": REPORT_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "recipe": asdict(fleet.recipe),
        "block_size": fleet.block_size,
        "devices": rows,
        "latency": timing,
    }


def _pct(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, (int, float)) else "-"


def _ratio(ratio: dict[str, Any] | None) -> str:
    return f"{ratio['median']:.3f} [{ratio['p10']:.3f}-{ratio['p90']:.3f}]" if ratio else "-"


def to_markdown(report: dict[str, Any]) -> str:
    recipe = report["recipe"]
    lines = [
        f"# Fleet report ({len(report['devices'])} devices)",
        "",
        f"{recipe['model']} on {recipe['data']}, {recipe['finetune']} fine-tune, {recipe['epochs']} epochs, "
        f"block size {report['block_size']}. Accuracy on the checkpoint's test images; *other key*: the same model "
        "fed images shuffled with the next device's key (a keyless or wrong-key use of the model).",
        "",
        "| device | key | accuracy | other key | parity (max abs diff) | verified | keyed/plain (ORT) "
        "| manifest SHA-256 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["devices"]:
        art = row["artifacts"] or {}
        parity = ", ".join(
            f"{t} {v:.1e}" if isinstance(v, float) else f"{t} not run" for t, v in (art.get("parity") or {}).items()
        )
        ratio = row["keyed_over_plain"]
        lines.append(
            f"| {row['device']} | {row['fingerprint']} | {_pct(row['accuracy'])} | {_pct(row['accuracy_other_key'])} "
            f"| {parity or '-'} | {'yes' if art.get('verified') else 'no'} "
            f"| {_ratio(ratio)} "
            f"| {art.get('manifest_sha256', '-')[:16]} |"
        )
    failed = [(r["device"], s, f["error"]) for r in report["devices"] for s, f in (r["failed"] or {}).items()]
    if failed:
        lines += ["", "Failed:", ""] + [f"- {name} ({stage}): {error}" for name, stage, error in failed]
    if report["latency"].get("skipped"):
        lines += ["", f"Latency not measured: {report['latency']['skipped']}."]
    return "\n".join(lines) + "\n"


def write_report(fleet: Fleet, report: dict[str, Any]) -> Path:
    """``report/fleet-report.{json,md}`` and, with the plots extra, ``report/accuracy.png``."""
    out = fleet.path("report")
    out.mkdir(exist_ok=True)
    write_bytes_atomic(out / "fleet-report.json", (json.dumps(report, indent=2) + "\n").encode(), overwrite=True)
    write_bytes_atomic(out / "fleet-report.md", to_markdown(report).encode(), overwrite=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return out
    rows = report["devices"]
    names = [r["device"] for r in rows]
    own = [r["accuracy"] or 0.0 for r in rows]
    other = [r["accuracy_other_key"] or 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(rows) + 2), 3.2))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], own, 0.4, label="own key")
    ax.bar([x + 0.2 for x in xs], other, 0.4, label="another key")
    ax.set_xticks(list(xs), names, rotation=45, ha="right")
    ax.set_ylabel("top-1 accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    with contextlib.suppress(OSError):
        tmp = out / f".accuracy.tmp-{os.getpid()}.png"
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, out / "accuracy.png")
    plt.close(fig)
    return out


def status_rows(fleet: Fleet, targets: list[str] | None = None) -> list[dict[str, str]]:
    """Per device: the state of each stage, as the next ``fleet`` command would see it."""
    sets = _artifact_sets(fleet)
    rows = []
    for d in fleet.devices:
        train_state, train_detail = checkpoint_state(fleet, d)
        directory = _current_set(fleet, d, sets)
        wanted = targets or (d.exported or {}).get("targets") or ["onnx"]
        if directory is None:
            export = "waiting" if train_state != "done" else "not exported"
        else:
            from keyedge.deploy.artifacts import ArtifactManifest

            manifest = ArtifactManifest.read(directory)
            export = export_state(fleet, d, wanted, manifest.fuse_requested, manifest.precision, sets)[0]
        verified = bool(
            directory and d.verified and d.verified.get("sha256") == sha256_file(directory / "manifest.json")
        )
        rows.append(
            {
                "device": d.name,
                "fingerprint": d.fingerprint,
                "train": f"{train_state} ({train_detail})",
                "export": export,
                "verified": "yes" if verified else "no",
                "failed": "; ".join(f"{s}: {f['error']}" for s, f in (d.failed or {}).items()) or "",
            }
        )
    return rows


def read_fleet(directory: Path) -> Fleet:
    """``Fleet.read`` with a hint when the directory is not a fleet at all."""
    if not directory.is_dir():
        raise KeyedgeError(f"{directory} is not a fleet directory", f"create one with `keyedge fleet init {directory}`")
    return Fleet.read(directory)


__all__ = [
    "FLEET_FORMAT",
    "Device",
    "Fleet",
    "Recipe",
    "StageResult",
    "build_report",
    "device_names",
    "export_stage",
    "fleet_lock",
    "init_fleet",
    "read_fleet",
    "report_stage",
    "status_rows",
    "train_stage",
    "verify_stage",
]
