"""``fleet.json``: the recipe and the devices, read and checked field by field; the lock of a fleet directory."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from keyedge.errors import KeyedgeError, OutputError
from keyedge.fileio import write_bytes_atomic
from keyedge.validate import FINGERPRINT, SHA256, read_dataclass, read_json

FLEET_FORMAT = "keyedge-fleet/1"
FLEET_MANIFEST = "fleet.json"
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


def read_fleet(directory: Path) -> Fleet:
    """``Fleet.read`` with a hint when the directory is not a fleet at all."""
    if not directory.is_dir():
        raise KeyedgeError(f"{directory} is not a fleet directory", f"create one with `keyedge fleet init {directory}`")
    return Fleet.read(directory)


__all__ = ["FLEET_FORMAT", "FLEET_MANIFEST", "NAME", "STAGES", "Device", "Fleet", "Recipe", "fleet_lock", "read_fleet"]
