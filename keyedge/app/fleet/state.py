"""What is done, read from the disk (never only from the manifest): checkpoints, artifact sets, verifications."""

from __future__ import annotations

from pathlib import Path

from keyedge.app.fleet.manifest import Device, FleetManifest
from keyedge.checkpoints import MANIFEST, read_manifest
from keyedge.deploy.artifacts import ArtifactManifest
from keyedge.deploy.verify import check_files
from keyedge.errors import KeyedgeError
from keyedge.fileio import sha256_file
from keyedge.keys.keyfile import load_key


def key_problem(fleet: FleetManifest, device: Device) -> str | None:
    """Why ``device``'s key file is not the key fleet.json records for it (missing, unreadable, another key); else None.

    Every stage asks this before it runs a job for the device: a replaced key file, or a fleet.json
    pointing the device at another device's file, would otherwise train or ship a model with the wrong key.
    """
    path = fleet.path(device.key_file)
    try:
        key = load_key(path)
    except KeyedgeError as exc:
        return f"its key file cannot be used ({exc.message}); restore {path}"
    if key.fingerprint != device.fingerprint:
        return (
            f"{path} holds key {key.fingerprint}, but fleet.json records key {device.fingerprint} for "
            f"{device.name}; restore its own key file"
        )
    return None


def checkpoint_state(fleet: FleetManifest, device: Device) -> tuple[str, str]:
    """(``done`` | ``resume`` | ``new`` | ``blocked``, detail) for one device's checkpoint."""
    problem = key_problem(fleet, device)
    if problem:
        return "blocked", problem
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


def artifact_sets(fleet: FleetManifest) -> dict[str, Path]:
    """Fingerprint -> the artifact set under ``artifacts/`` (read from each set's manifest)."""
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
    fleet: FleetManifest, device: Device, targets: list[str], fuse: str, precision: str, sets: dict[str, Path]
) -> tuple[str, str]:
    """(``done`` | ``stale`` | ``new`` | ``waiting`` | ``blocked``, detail) for one device's artifact set."""
    state, detail = checkpoint_state(fleet, device)
    if state == "blocked":
        return state, detail
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


def current_set(fleet: FleetManifest, d: Device, sets: dict[str, Path]) -> Path | None:
    directory = sets.get(d.fingerprint)
    return directory if directory is not None and checkpoint_state(fleet, d)[0] == "done" else None


def status_rows(fleet: FleetManifest, targets: list[str] | None = None) -> list[dict[str, str]]:
    """Per device: the state of each stage, as the next ``fleet`` command would see it."""
    sets = artifact_sets(fleet)
    rows = []
    for d in fleet.devices:
        train_state, train_detail = checkpoint_state(fleet, d)
        directory = current_set(fleet, d, sets)
        wanted = targets or (d.exported or {}).get("targets") or ["onnx"]
        if directory is None:
            export = "waiting" if train_state != "done" else "not exported"
        else:
            manifest = ArtifactManifest.read(directory)
            export = export_state(fleet, d, wanted, manifest.fuse_requested, manifest.precision, sets)[0]
        verified = bool(  # export "done" re-hashed every file: a set changed under its manifest is not verified
            directory
            and export == "done"
            and d.verified
            and d.verified.get("sha256") == sha256_file(directory / "manifest.json")
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


__all__ = ["artifact_sets", "checkpoint_state", "current_set", "export_state", "key_problem", "status_rows"]
