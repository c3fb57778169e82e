"""``fleet.json`` (schema ``keyedge-fleet/1``, docs/fleet.schema.json): the recipe and the devices; the fleet's lock.

:class:`FleetManifest` is the only reader and writer of ``fleet.json``.  :meth:`FleetManifest.read` checks
every field through :class:`~keyedge.validate.Fields`, so a hand-edited, truncated or foreign manifest is
one :class:`~keyedge.validate.ManifestError` naming the file and the field.  A fleet written by an earlier
keyedge (``"format": "keyedge-fleet/1"`` instead of ``"schema"``) is read, and written with ``schema``
the next time it is written.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from keyedge.errors import KeyedgeError, OutputError
from keyedge.fileio import write_bytes_atomic
from keyedge.validate import FINGERPRINT, MAX_IMAGE_SIZE, MAX_SEED, SHA256, Fields, read_json

FLEET_SCHEMA = "keyedge-fleet/1"
LEGACY_FORMAT = "keyedge-fleet/1"  # what the releases before the schema field wrote, as "format" (no version)
FLEET_MANIFEST = "fleet.json"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_BLOCK_SIZE = 64
RECORDS = ("trained", "exported", "verified", "other_key", "failed")


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

    @classmethod
    def from_fields(cls, r: Fields) -> Recipe:
        """The recipe of ``fleet.json``; a field this keyedge does not know is refused (it would be ignored)."""
        known = {f.name for f in fields(cls)}
        for name in r.data:
            if name not in known:
                raise r.fail(name, f"is not a recipe field (known: {', '.join(sorted(known))})")
        return cls(
            model=r.str("model"),
            data=r.str("data"),
            weights=r.str("weights", default="hub"),
            image_size=r.int("image_size", low=8, high=MAX_IMAGE_SIZE, optional=True),
            finetune=r.str("finetune", choices=("full", "lora"), default="full"),
            lora_r=r.int("lora_r", low=1, high=4096, optional=True),
            epochs=r.int("epochs", low=1, default=3),
            batch_size=r.int("batch_size", low=1, default=64),
            lr=r.float("lr", low=0.0, optional=True),
            seed=r.int("seed", low=0, high=MAX_SEED, default=0),
            train_limit=r.int("train_limit", low=1, optional=True),
            test_limit=r.int("test_limit", low=1, optional=True),
        )


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

    @classmethod
    def from_fields(cls, d: Fields) -> Device:
        name, fingerprint = d.str("name"), d.str("fingerprint")
        if not NAME.fullmatch(name):
            raise d.fail("name", f"must be a name of letters, digits, . _ -, got {name!r}")
        if not FINGERPRINT.fullmatch(fingerprint):
            raise d.fail("fingerprint", "must be 16 hex digits")
        records = {record: d.dict(record, optional=True) for record in RECORDS}
        for record in ("trained", "exported", "verified"):
            sha = (records[record] or {}).get("sha256", "")
            if records[record] is not None and not (isinstance(sha, str) and SHA256.fullmatch(sha)):
                raise d.fail(f"{record}.sha256", "must be a SHA-256 (64 hex digits)")
        for stage, failure in (records["failed"] or {}).items():
            if not (isinstance(failure, dict) and isinstance(failure.get("error"), str)):
                raise d.fail(f"failed.{stage}", 'must be {"error": "...", "attempts": N}')
        return cls(name, fingerprint, _inside(d, "key_file"), _inside(d, "checkpoint"), **records)


def _inside(d: Fields, name: str) -> str:
    """A path relative to the fleet directory that stays inside it."""
    value = d.str(name)
    parts = Path(value).parts
    if not parts or Path(value).is_absolute() or ".." in parts:
        raise d.fail(name, f"must be a path inside the fleet directory, got {value!r}")
    return value


def _schema_version(f: Fields) -> int:
    """1 for ``"schema": "keyedge-fleet/1"`` or the earlier ``"format": "keyedge-fleet/1"``; else one error."""
    if f.raw("schema", None) is None and f.raw("format", None) == LEGACY_FORMAT:
        return 1
    return f.schema_version(FLEET_SCHEMA, LEGACY_FORMAT, "fleet manifest")


@dataclass
class FleetManifest:
    """``fleet.json``: the recipe and the devices; :meth:`write` after each finished job.

    ``directory`` is where the fleet lives (not written): the devices' paths are relative to it.
    """

    created: str
    block_size: int
    recipe: Recipe
    devices: list[Device]
    directory: Path = field(default=Path("."), repr=False, compare=False)

    def path(self, relative: str) -> Path:
        return self.directory / relative

    def device(self, name: str) -> Device:
        return next(d for d in self.devices if d.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": FLEET_SCHEMA,
            "created": self.created,
            "block_size": self.block_size,
            "recipe": asdict(self.recipe),
            "devices": [asdict(d) for d in self.devices],
        }

    def write(self) -> None:
        """``DIR/fleet.json``, atomically (a reader sees the old manifest or the new one, never half of one)."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        write_bytes_atomic(self.directory / FLEET_MANIFEST, text.encode(), overwrite=True)

    @classmethod
    def from_fields(cls, f: Fields, directory: Path = Path(".")) -> FleetManifest:
        _schema_version(f)
        devices = [Device.from_fields(d) for d in f.objs("devices")]
        if not devices:
            raise f.fail("devices", "must list at least one device")
        for attribute in ("name", "fingerprint", "key_file", "checkpoint"):  # one key, one model, one device
            seen: set[str] = set()
            for i, device in enumerate(devices):
                value = getattr(device, attribute)
                if os.path.normpath(value) in seen:
                    raise f.fail(f"devices[{i}].{attribute}", f"must be unique to the device, got {value!r} twice")
                seen.add(os.path.normpath(value))
        return cls(
            created=f.str("created"),
            block_size=f.int("block_size", low=1, high=MAX_BLOCK_SIZE),
            recipe=Recipe.from_fields(f.obj("recipe")),
            devices=devices,
            directory=directory,
        )

    @classmethod
    def read(cls, directory: str | os.PathLike) -> FleetManifest:
        """Read and check ``DIR/fleet.json``; a hand-edited or foreign one is a one-line error naming the field."""
        directory = Path(directory)
        hint = f"create the fleet with `keyedge fleet init {directory}`"
        fields = read_json(directory / FLEET_MANIFEST, "fleet manifest", hint)
        fields.hint = f"correct it, or create the fleet again with `keyedge fleet init {directory}`"
        return cls.from_fields(fields, directory)


def read_fleet(directory: Path) -> FleetManifest:
    """:meth:`FleetManifest.read` with a hint when the directory is not a fleet at all."""
    if not directory.is_dir():
        raise KeyedgeError(f"{directory} is not a fleet directory", f"create one with `keyedge fleet init {directory}`")
    return FleetManifest.read(directory)


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


__all__ = [
    "FLEET_MANIFEST",
    "FLEET_SCHEMA",
    "NAME",
    "Device",
    "FleetManifest",
    "Recipe",
    "fleet_lock",
    "read_fleet",
]
