"""Opening deployed artifacts, sealed or plain: the device-side entry point.

    from keyedge.runtime import open_sealed
    model = open_sealed("artifacts/resnet18-0a1b2c3d4e5f6a7b", "device.seal")   # or .../model.onnx.sealed
    logits = model(images)        # (B, 3, S, S) float32 in [0, 1] -> (B, classes) float32

A sealed artifact (``keyedge export --seal``) is decrypted into memory and handed to its runtime
from there -- ONNX Runtime's ``InferenceSession(bytes)``, OpenVINO's ``read_model`` with the weights
as a tensor -- so the plaintext model never touches the device's disk (docs/sealed-format.md).
Everything that runs artifacts (``bench latency``, ``bench robustness --artifacts``) opens them here.

A set exported with a posture (``keyedge export --posture``) answers what its graph computes (scores, top-k
or a label, noise included); a query guard or rate limit in its posture is enforced here, around the runner
(:class:`keyedge.postures.guard.Guarded`): a refused query's row is NaN and ``runner.verdicts`` says why::

    model = open_artifact("artifacts/k1-set", "onnx", guard_state="/var/lib/camera/guard.npz")

The guard's history lives in ``guard_state`` (saved atomically at most every second, and at once when it
locks), so a restart does not forget an attack in progress; a state file that is corrupt or another set's
is refused in one line.  ``guard_state=":memory:"`` keeps it in memory only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from keyedge.deploy.artifacts import ArtifactManifest, is_export_directory
from keyedge.errors import KeyedgeError, SealError
from keyedge.exporters import get_backend, target_of
from keyedge.exporters.base import Runner
from keyedge.keys.seal import SEALED_SUFFIX, SealKey, as_sealkey, unseal
from keyedge.keys.signing import VerifyKey, check_signature, load_verify_key
from keyedge.postures.guard import GuardConfig, Guarded, QueryGuard

__all__ = [
    "IN_MEMORY",
    "artifact_target",
    "enforce_posture",
    "guard_for",
    "open_artifact",
    "open_sealed",
    "unseal_target",
]

IN_MEMORY = ":memory:"  # guard_state that keeps a guard's history in memory only
SAVE_INTERVAL = 1.0  # seconds between a guard's autosaves


def artifact_target(path: Path) -> str | None:
    """The target an artifact file belongs to, from its name (``model.xml.sealed`` -> openvino); None if unknown."""
    return target_of(path)


def unseal_target(manifest: ArtifactManifest, target: str, sealkey: SealKey) -> dict[str, bytes]:
    """Decrypt ``target``'s sealed files of an export directory into memory: plaintext name -> bytes."""
    binding = manifest.binding()
    files = {}
    for entry, path in manifest.target_files(target):
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SealError(f"cannot read {path}: {exc.strerror}", "copy the artifact set again") from None
        name = Path(entry["path"]).name.removesuffix(SEALED_SUFFIX)
        files[name] = unseal(data, sealkey, binding, name, where=str(path))
    return files


def open_artifact(
    path: str | os.PathLike,
    target: str | None = None,
    *,
    sealkey: SealKey | str | os.PathLike | Sequence[SealKey] | None = None,
    verify_key: Any = None,
    guard_state: str | os.PathLike | None = None,
    posture: bool = True,
    **settings: Any,
) -> Runner | Guarded:
    """A runner for an export directory (its ``target``, or its only one) or one artifact file, sealed or not.

    ``sealkey`` (a :class:`SealKey`, a sealing key file, or several keys: the one whose fingerprint the
    manifest names is used) opens sealed sets; ``verify_key`` (a :class:`~keyedge.keys.signing.VerifyKey`
    or its file) refuses a set whose manifest is not signed by it or whose files do not match it;
    ``guard_state`` is where the posture's query guard keeps its history (required when the set's posture has a
    guard or rate limit; :data:`IN_MEMORY` for none; a ``lock`` or ``flag`` guard inspects each query beside the
    model, :class:`~keyedge.postures.guard.Guarded`); ``posture=False`` opens the bare model (benchmarks of the
    model itself); ``settings`` are
    :meth:`~keyedge.exporters.base.ExportBackend.load`'s (threads, device, providers...).
    """
    path = Path(path)
    if path.is_dir() and is_export_directory(path):
        manifest = ArtifactManifest.read(path)
        if target is None:
            if len(manifest.targets) != 1:
                raise KeyedgeError(
                    f"{path} holds {', '.join(manifest.targets)} artifacts", "say which one to open (target=...)"
                )
            target = next(iter(manifest.targets))
        if target not in manifest.targets:
            raise KeyedgeError(f"{path} has no {target} artifact", f"it has {', '.join(manifest.targets)}")
        main = manifest.artifact(target)
    else:
        target = target or artifact_target(path)
        if target is None:
            raise KeyedgeError(f"{path}: not an artifact keyedge knows", "pass an export directory or a model file")
        main = path
        manifest = ArtifactManifest.read(path.parent) if main.name.endswith(SEALED_SUFFIX) else None
    backend = get_backend(target)
    if verify_key is not None:
        _check_signed(path if manifest is None else manifest.directory, target, verify_key)
    if posture and manifest is None and is_export_directory(main.parent):
        manifest = ArtifactManifest.read(main.parent)  # a model file of a set: the set's posture applies
    guard = guard_for(manifest, guard_state) if posture and manifest is not None else None
    if manifest is None or manifest.seal is None:
        if main.name.endswith(SEALED_SUFFIX):
            raise SealError(f"{main} is sealed but its manifest.json says nothing of it", "copy the artifact set again")
        return enforce_posture(backend.load(main, **settings), guard, manifest)
    if sealkey is None or (isinstance(sealkey, (list, tuple)) and not sealkey):
        raise SealError(
            f"{manifest.directory} is sealed (sealing key {manifest.seal['sealkey']})",
            "pass the device's sealing key (--seal FILE)",
        )
    files = unseal_target(manifest, target, _matching(sealkey, manifest))
    plain = main.with_name(main.name.removesuffix(SEALED_SUFFIX))
    runner = backend.load(plain, files=files, **settings)
    runner.path = main
    return enforce_posture(runner, guard, manifest)


def guard_for(manifest: ArtifactManifest, guard_state: str | os.PathLike | None) -> QueryGuard | None:
    """The query guard / rate limit of the set's posture, its state at ``guard_state``; None when it has neither."""
    posture = manifest.deployed_posture
    if posture.guard is None and posture.rate is None:
        return None
    if guard_state is None:
        raise KeyedgeError(
            f"{manifest.directory}'s posture ({posture}) has a query guard or rate limit, which keeps its history "
            "in a state file",
            f"pass guard_state=PATH (a file this device keeps across restarts), or {IN_MEMORY!r} to keep it in memory",
        )
    state = None if str(guard_state) == IN_MEMORY else Path(guard_state)
    owner = f"{manifest.model_name}-{manifest.fingerprint or 'plain'}"
    return QueryGuard(
        GuardConfig(), posture.guard, rate=posture.rate, state=state, owner=owner, save_interval=SAVE_INTERVAL
    )


def enforce_posture(runner: Runner, guard: QueryGuard | None, manifest: ArtifactManifest | None) -> Runner | Guarded:
    """``runner`` behind the posture's guard (NaN rows for refused queries), or as it is without one."""
    if guard is None or manifest is None:
        return runner
    return Guarded(runner, guard, int(manifest.model["num_classes"]))


def _check_signed(where: Path | None, target: str, verify_key: Any) -> None:
    directory = where if where is not None and where.is_dir() else Path(where or ".").parent
    if not is_export_directory(directory):
        raise SealError(f"{where} has no manifest.json beside it to check a signature of", "open an export directory")
    check_signature(directory, verify_key if isinstance(verify_key, VerifyKey) else load_verify_key(verify_key))
    ArtifactManifest.read(directory).check_files([target])


def check_sealkeys(paths: list[str | os.PathLike], sealkeys: Any) -> None:
    """Refuse now, in one line, a sealed set among ``paths`` that none of ``sealkeys`` opens.

    Long commands (``bench robustness --artifact``, ``bench latency``) call this before their first
    attack or measurement, not when they reach the set an hour later.
    """
    for path in map(Path, paths):
        directory = path if path.is_dir() else path.parent
        if not is_export_directory(directory):
            continue
        manifest = ArtifactManifest.read(directory)
        if manifest.seal is None:
            continue
        if not sealkeys:
            raise SealError(
                f"{manifest.directory} is sealed (sealing key {manifest.seal['sealkey']})",
                "pass the device's sealing key (--seal FILE)",
            )
        _matching(list(sealkeys), manifest)


def _matching(sealkey: Any, manifest: ArtifactManifest) -> SealKey:
    if isinstance(sealkey, (SealKey, str, os.PathLike)):
        return as_sealkey(sealkey)
    wanted = manifest.seal["sealkey"]
    keys = list(sealkey)
    found = next((k for k in keys if k.fingerprint == wanted), None)
    if found is None:
        given = ", ".join(k.fingerprint for k in keys) or "none"
        raise SealError(
            f"{manifest.directory} is sealed with sealing key {wanted}; the given sealing keys are {given}",
            "pass the device's sealing key (--seal FILE)",
        )
    return found


def open_sealed(path: str | os.PathLike, sealkey: SealKey | str | os.PathLike, **settings: Any) -> Runner:
    """Decrypt a sealed artifact (its directory or sealed file) into memory and load it; see :func:`open_artifact`."""
    return open_artifact(path, settings.pop("target", None), sealkey=sealkey, **settings)
