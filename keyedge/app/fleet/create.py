"""``keyedge fleet init``: device names, one fresh key per device and ``fleet.json``, written whole or not at all."""

from __future__ import annotations

import time
from pathlib import Path

from keyedge.app.fleet.manifest import FLEET_MANIFEST, NAME, Device, FleetManifest, Recipe
from keyedge.errors import KeyedgeError, OutputError
from keyedge.fileio import staged_directory
from keyedge.keys.keyfile import Key
from keyedge.models.backbones import check_model_name
from keyedge.validate import Fields, ManifestError


def device_names(count: int | None, names: list[str] | None, prefix: str = "device") -> list[str]:
    """``--devices N`` (device-000, device-001...) or explicit ``--name`` values; one-line errors for bad ones."""
    if names:
        bad = [n for n in names if not NAME.fullmatch(n)]
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


def init_fleet(directory: Path, names: list[str], block_size: int, recipe: Recipe, *, log=print) -> FleetManifest:
    """Make a fleet directory: one fresh key per device and ``fleet.json``; written whole or not at all."""
    check_model_name(recipe.model)  # a typo is said now, not after N keys were made
    if recipe.epochs < 1 or recipe.batch_size < 1:
        raise KeyedgeError("--epochs and --batch-size must be positive")
    if recipe.finetune == "lora" and recipe.weights == "none":
        raise KeyedgeError(
            "LoRA adapts pretrained weights, and --weights none gives none", "pass --weights, or --finetune full"
        )
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    _check_readable(created, names, block_size, recipe)
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
        fleet = FleetManifest(created, block_size, recipe, devices, staging)
        fleet.write()
    fleet.directory = directory
    return fleet


class _OptionError(ManifestError):
    """A ``fleet init`` option the fleet manifest's reader would refuse, named as the option (``--block-size``)."""

    def __init__(self, message: str, hint: str | None = None):
        _, found, rest = message.partition(": field '")  # Fields.fail: "SOURCE: field 'PATH' PROBLEM"
        path, _, problem = rest.partition("' ")
        if found and problem:
            option = "--name" if path.startswith("devices[") else "--" + path.removeprefix("recipe.").replace("_", "-")
            message = f"{option} {problem}"
        super().__init__(message, hint)


def _check_readable(created: str, names: list[str], block_size: int, recipe: Recipe) -> None:
    """Refuse now what every later ``keyedge fleet`` command would refuse to read: the manifest's own checks."""
    draft = FleetManifest(
        created, block_size, recipe, [Device(n, f"{i:016x}", f"keys/{n}.bin", f"runs/{n}") for i, n in enumerate(names)]
    )
    fields = Fields(draft.to_dict(), "fleet init", "no fleet was created", error=_OptionError)
    FleetManifest.from_fields(fields)


__all__ = ["device_names", "init_fleet"]
