"""The per-key jobs: top-level functions of plain arguments (paths, numbers, strings), so they run on Ray workers too.

A job reads its key from the key file itself: key material never travels in a job's arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from keyedge.checkpoints import MANIFEST
from keyedge.deploy.artifacts import ArtifactManifest
from keyedge.deploy.export import ExportRequest, ExportSettings, export_one
from keyedge.deploy.verify import describe, verify_set
from keyedge.errors import KeyedgeError
from keyedge.fileio import sha256_file
from keyedge.keys.keyfile import Key, load_key
from keyedge.training.loop import TrainConfig, key_accuracy, train


def _logger(log_file: str) -> Callable[[str], None]:
    def log(line: str) -> None:
        with open(log_file, "a", encoding="utf-8") as fh:
            fh.write(line.rstrip() + "\n")

    return log


def device_key(key_file: str, fingerprint: str) -> Key:
    """The device's key, read from its file and checked against the fingerprint fleet.json records for it.

    A key file replaced by another key, or a fleet.json pointing a device at another device's file, is
    refused here, in the job itself: no model is ever trained, exported or verified with the wrong key.
    """
    key = load_key(key_file)
    if key.fingerprint != fingerprint:
        raise KeyedgeError(
            f"{key_file} holds key {key.fingerprint}, but fleet.json records key {fingerprint} for this device",
            "restore the device's own key file (nothing was done with this one)",
        )
    return key


def train_job(
    checkpoint: str,
    key_file: str,
    fingerprint: str,
    recipe: dict[str, Any],
    resume: bool,
    device: str,
    log_file: str,
    sign_key: str | None = None,
):
    """Fine-tune one device's model (or continue it); the checkpoint manifest's SHA-256 and accuracy."""
    device_key(key_file, fingerprint)
    config = TrainConfig(
        out=checkpoint,
        key_file=key_file,
        key_fingerprint=fingerprint,
        sign_key=sign_key,
        device=device,
        resume=resume,
        **recipe,
    )
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
    fingerprint: str,
    out: str,
    targets: list[str],
    fuse: str,
    precision: str,
    template: bool,
    log_file: str,
):
    """Export one device's verified artifact set (from the worker's fleet template where the format allows)."""
    if len(_TEMPLATES) > 2:  # another fleet's architectures: keep memory bounded
        _TEMPLATES.clear()
    settings = ExportSettings(
        targets=targets, out=Path(out), fuse=fuse, precision=precision, overwrite=True, log=_logger(log_file)
    )
    request = ExportRequest(Path(checkpoint), device_key(key_file, fingerprint))
    directory = export_one(request, settings, templates=_TEMPLATES if template else None)
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


def verify_job(directory: str, key_file: str, fingerprint: str, log_file: str):
    """``keyedge verify`` on one device's set with its key: files, then parity against its checkpoint."""
    result = verify_set(directory, key=device_key(key_file, fingerprint))
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
    other_fingerprint: str | None,
    block_size: int,
    data: str,
    test_limit: int | None,
    seed: int,
    log_file: str,
):
    """Top-1 of one device's model on the recipe's test images shuffled with another key (key diversity)."""
    if other_key_file:
        other = device_key(other_key_file, other_fingerprint)
    else:  # a one-device fleet
        other = Key.generate(block_size)
    result = key_accuracy(checkpoint, other, data, limit=test_limit, seed=seed)
    accuracy, images = result["accuracy"], result["images"]
    _logger(log_file)(f"top-1 with key {other.fingerprint}: {accuracy:.2%} on {images} test images")
    return {
        "accuracy": accuracy,
        "with": other.fingerprint if other_key_file else "a fresh random key",
        "images": images,
        "checkpoint_sha256": sha256_file(Path(checkpoint) / MANIFEST),
    }


__all__ = ["device_key", "export_job", "other_key_job", "train_job", "verify_job"]
