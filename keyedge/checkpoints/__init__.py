"""Checkpoints: a directory with safetensors weights and a ``keyedge.json`` manifest, written atomically.

Layout of ``runs/k1/``::

    keyedge.json                   manifest (below); written last, atomically
    weights-e003-<token>.safetensors   full: the backbone's state dict;
                                   LoRA: adapters + head + the backbone's buffers (BN statistics)
    state-e003-<token>.pt          optimizer/scheduler/RNG state for --resume (tensors only)

A save writes the new weight files under fresh names, then replaces the manifest
in one rename, then deletes the files the manifest no longer names: a process
killed at any point leaves the last good checkpoint loadable.  The manifest
records the key's **fingerprint** -- never the key -- and the SHA-256 of every
file, checked on load.  A model with a defense other than the key (a
:class:`~keyedge.defenses.volumetric.VolumizedModel`) adds ``"defense": {"name": ...,
its config}``, from which :func:`load_checkpoint` rebuilds it.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from keyedge import __version__
from keyedge.defenses import defense_of, defense_record, get_defense
from keyedge.deps import version_of
from keyedge.errors import SealError
from keyedge.fileio import note_kept, sha256_file, write_bytes_atomic
from keyedge.keys.keyfile import Key
from keyedge.keys.signing import CHECKPOINT_SIGNATURE, VerifyKey, check_signature, load_verify_key, sign_manifest
from keyedge.models.backbones import KeyedModel, ModelSpec, create_backbone, rebuild_backbone
from keyedge.models.lora import LoraSettings, adapter_state_dict, apply_lora, is_lora, load_adapter_state_dict
from keyedge.validate import FINGERPRINT, MAX_CLASSES, MAX_IMAGE_SIZE, SHA256, Fields, ManifestError, read_json

MANIFEST = "keyedge.json"
FORMAT = "keyedge-checkpoint"
VERSION = 1
SCHEMA = f"{FORMAT}/{VERSION}"


class CheckpointError(ManifestError):
    """A checkpoint directory is missing, corrupted, or does not match the key."""


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))


def model_tensors(model: KeyedModel) -> dict[str, torch.Tensor]:
    """What the checkpoint stores for this model (full backbone, or adapters + head + buffers)."""

    if not is_lora(model):
        return dict(model.backbone.state_dict())
    tensors = {f"adapter.{k}": v for k, v in adapter_state_dict(model).items()}
    base = model.backbone.get_base_model()
    persistent = set(base.state_dict())  # BN running statistics change in training: keep them
    tensors.update(
        {
            f"buffer.{k}": v
            for k, v in base.named_buffers()
            if k in persistent and "modules_to_save" not in k and "original_module" not in k
        }
    )
    return tensors


def save_checkpoint(
    directory: str | Path,
    model: KeyedModel,
    *,
    epoch: int,
    finetune: dict[str, Any],
    data: dict[str, Any],
    training: dict[str, Any],
    metrics: dict[str, Any],
    state: dict[str, Any] | None = None,
    sign: Any = None,
) -> Path:
    """Write (or replace) the checkpoint in ``directory`` atomically; return the manifest path.

    Weights that are not finite (a diverged run) are refused, never saved.  Interrupted before
    the manifest is replaced, the new files are removed again: the directory holds the last
    good checkpoint, or nothing it did not hold before.  ``sign`` (a
    :class:`~keyedge.keys.signing.SigningKey`) writes ``keyedge.sig`` over the manifest, which lists
    every file's SHA-256; without it a signature left by an earlier epoch is removed (it would not match).
    """
    directory = Path(directory)
    tensors = model_tensors(model)
    bad = non_finite(tensors)
    if bad:
        raise CheckpointError(
            f"epoch {epoch} produced non-finite weights ({bad}): training diverged, nothing was saved",
            "lower --lr (or raise --warmup-epochs) and train again",
        )
    made = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    token = f"e{epoch:03d}-{secrets.token_hex(3)}"
    files = {"weights": directory / f"weights-{token}.safetensors"}
    if state is not None:
        files["state"] = directory / f"state-{token}.pt"
    try:
        target = _write_checkpoint(directory, model, tensors, files, state, epoch, finetune, data, training, metrics)
        if sign is not None:
            sign_manifest(directory, sign, MANIFEST)
        else:
            (directory / CHECKPOINT_SIGNATURE).unlink(missing_ok=True)
    except BaseException:
        for path in files.values():
            path.unlink(missing_ok=True)
        if made:
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    keep = {p.name for p in files.values()}
    for stale in list(directory.glob("weights-*.safetensors")) + list(directory.glob("state-*.pt")):
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    note_kept(directory, f"checkpoint after epoch {epoch}; `keyedge train ... --resume` continues it")
    return target


def non_finite(tensors: dict[str, torch.Tensor]) -> str:
    """The first floating-point tensors holding NaN or Inf, by name (empty when all are finite)."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    return ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")


def _write_checkpoint(directory, model, tensors, files, state, epoch, finetune, data, training, metrics) -> Path:
    _save_tensors(files["weights"], tensors)
    if state is not None:
        torch.save(state, files["state"])

    manifest = CheckpointManifest(
        model=model.spec,
        key=KeyRecord(model.key_fingerprint, model.block_size) if model.keyed else None,
        finetune=finetune,
        files={role: FileRecord(path.name, sha256_file(path)) for role, path in files.items()},
        epoch=epoch,
        data=data,
        training=training,
        metrics=metrics,
        defense=defense_of(model).record(model),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        versions={
            "keyedge": __version__,
            "torch": torch.__version__,
            "timm": version_of("timm"),
            "peft": version_of("peft"),
        },
    )
    return manifest.write(directory)


@dataclass
class KeyRecord:
    """The key a model was trained with, by fingerprint only."""

    fingerprint: str
    block_size: int


@dataclass
class FileRecord:
    """A file of the checkpoint (a plain name inside its directory) and its SHA-256."""

    file: str
    sha256: str


@dataclass
class CheckpointManifest:
    """``keyedge.json``: what a checkpoint holds (schema ``keyedge-checkpoint/1``, docs/checkpoint.schema.json).

    :meth:`read` validates every field keyedge uses; a malformed, truncated, wrong-typed or
    out-of-range field is one :class:`~keyedge.validate.ManifestError` naming the file and field.
    """

    model: ModelSpec
    key: KeyRecord | None
    finetune: dict[str, Any]  # {"mode": "full" | "lora", "lora": LoraSettings dict or None, "recipe", "noise_aug"}
    files: dict[str, FileRecord]  # role (weights, state) -> file
    epoch: int
    data: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    defense: dict[str, Any] | None = None  # another defense's record ({"name": "volumize", ...})
    created: str = ""
    versions: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str | None:
        return self.key.fingerprint if self.key else None

    @property
    def finetune_mode(self) -> str:
        return self.finetune["mode"]

    @property
    def recipe(self) -> str:
        """How the model was fine-tuned, in one line (recorded since the LoRA recipes; derived for older ones)."""
        if self.finetune.get("recipe"):
            return self.finetune["recipe"]
        lr = self.training.get("learning_rate")
        at = f", lr {lr:g}" if isinstance(lr, (int, float)) else ""
        if self.finetune_mode != "lora":
            return f"{self.finetune_mode} fine-tune{at}"

        return LoraSettings.from_dict(self.finetune["lora"]).label() + at

    @property
    def noise_aug(self) -> float:
        """Std of the Gaussian noise it was trained with (``train --noise-aug``); 0: none, or an older checkpoint."""
        return float(self.finetune.get("noise_aug") or 0.0)

    @property
    def defense_name(self) -> str:
        return self.defense["name"] if self.defense else "keyed"

    @property
    def test_accuracy(self) -> float | None:
        value = self.metrics.get("test_accuracy")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "format": FORMAT,
            "version": VERSION,
            "created": self.created,
            "epoch": self.epoch,
            "model": self.model.to_dict(),
            "key": asdict(self.key) if self.key else None,
            **({"defense": self.defense} if self.defense else {}),
            "finetune": self.finetune,
            "data": self.data,
            "training": self.training,
            "metrics": self.metrics,
            "files": {role: asdict(f) for role, f in self.files.items()},
            "versions": self.versions,
        }

    @classmethod
    def from_fields(cls, f: Fields) -> CheckpointManifest:

        f.schema_version(SCHEMA, FORMAT, "checkpoint manifest")
        m = f.obj("model")
        spec = ModelSpec(
            name=m.str("name"),
            num_classes=m.int("num_classes", low=1, high=MAX_CLASSES),
            image_size=m.int("image_size", low=1, high=MAX_IMAGE_SIZE),
            mean=tuple(m.floats("mean", length=3)),
            std=tuple(m.floats("std", length=3, positive=True)),
            family=m.str("family", default="other"),
            weights=m.dict("weights", optional=True) or {"kind": "none"},
        )
        k = f.obj("key", optional=True)
        key = (
            None
            if k is None
            else KeyRecord(k.str("fingerprint", pattern=FINGERPRINT), k.int("block_size", low=1, high=spec.image_size))
        )
        defense = defense_record(f)
        owner = get_defense(defense["name"] if defense else None)
        if key is not None and not owner.takes_key:
            raise f.fail("key", f"must be null for a {owner.name} model, which takes no key")
        ft = f.obj("finetune")
        mode = ft.str("mode", choices=owner.finetune_modes)
        lora = ft.dict("lora", optional=True)
        if mode == "lora":
            if lora is None:
                raise ft.fail("lora", "is missing (a LoRA checkpoint records its adapter settings)")
            lf = ft.obj("lora")
            lf.int("r", low=1, high=4096)
            lf.float("alpha", low=0.0)
            lf.strs("targets")
            lf.strs("full", optional=True)
            lf.float("lr", low=0.0, optional=True)
        recipe = ft.str("recipe", optional=True)
        noise_aug = ft.float("noise_aug", low=0.0, high=1.0, optional=True)  # absent: trained without noise
        files_f = f.obj("files")
        files = {}
        for role in files_f.data:
            entry = files_f.obj(role)
            files[role] = FileRecord(entry.file_name("file"), entry.str("sha256", pattern=SHA256))
        if "weights" not in files:
            raise files_f.fail("weights", "is missing")
        return cls(
            model=spec,
            key=key,
            finetune={
                "mode": mode,
                "lora": lora,
                **({"recipe": recipe} if recipe else {}),
                **({"noise_aug": noise_aug} if noise_aug else {}),
            },
            files=files,
            epoch=f.int("epoch", low=0, default=0),
            data=f.dict("data", optional=True) or {},
            training=f.dict("training", optional=True) or {},
            metrics=f.dict("metrics", optional=True) or {},
            defense=defense,
            created=f.str("created", default=""),
            versions=f.dict("versions", optional=True) or {},
        )

    @classmethod
    def read(cls, directory: str | Path) -> CheckpointManifest:
        """Read and validate ``directory/keyedge.json`` (not the weights)."""
        directory = Path(directory)
        hint = "give a directory made by `keyedge train`"
        if not directory.is_dir():
            raise CheckpointError(f"checkpoint directory {directory} not found", hint)
        if not (directory / MANIFEST).is_file():
            raise CheckpointError(f"{directory} has no {MANIFEST}", hint)
        return cls.from_fields(
            read_json(
                directory / MANIFEST,
                "checkpoint manifest",
                "the checkpoint is corrupted or was hand-edited; re-train or restore it",
                CheckpointError,
            )
        )

    def write(self, directory: Path) -> Path:
        """Replace ``directory/keyedge.json`` atomically."""
        data = (json.dumps(self.to_dict(), indent=2) + "\n").encode()
        return write_bytes_atomic(directory / MANIFEST, data, overwrite=True)


def read_manifest(directory: str | Path) -> CheckpointManifest:
    """Read and validate a checkpoint manifest (not the weights)."""
    return CheckpointManifest.read(directory)


def _verified_file(directory: Path, entry: FileRecord) -> Path:
    path = directory / entry.file  # a plain file name: validated when the manifest was read
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint file {path} is missing", "the checkpoint is incomplete; re-train or restore it"
        )
    if sha256_file(path) != entry.sha256:
        raise CheckpointError(
            f"checkpoint file {path} does not match its manifest checksum",
            "the checkpoint is corrupted; re-train or restore it",
        )
    return path


def check_key(manifest: CheckpointManifest, key: Key | None, *, allow_mismatch: bool = False) -> str | None:
    """Compare a key with the checkpoint's; return a note when they differ and that is allowed."""

    recorded = manifest.key
    if key is not None and not get_defense(manifest.defense and manifest.defense_name).takes_key:
        raise CheckpointError(
            f"this checkpoint is a {manifest.defense_name} model, which takes no key", "drop --key-file"
        )
    if recorded is None and key is None:
        return None
    if recorded is not None and key is None:
        raise CheckpointError(
            f"this checkpoint is a keyed model (key {recorded.fingerprint}, block size {recorded.block_size})",
            "pass its key with --key-file",
        )
    assert key is not None
    if recorded is None:
        note = f"the checkpoint is a plain model; its input is shuffled with key {key.fingerprint}"
    elif recorded.fingerprint == key.fingerprint:
        return None
    else:
        note = f"key {key.fingerprint} differs from the key the model was trained with ({recorded.fingerprint})"
    if not allow_mismatch:
        raise CheckpointError(
            note + ": the model would lose most of its accuracy",
            "pass the right key file, or allow the mismatch deliberately (--allow-key-mismatch)",
        )
    return note


def load_checkpoint(
    directory: str | Path,
    key: Key | None = None,
    *,
    allow_key_mismatch: bool = False,
    map_location: str | torch.device = "cpu",
    manifest: CheckpointManifest | None = None,
    verify_key: Any = None,
) -> tuple[torch.nn.Module, CheckpointManifest]:
    """Rebuild the model a checkpoint holds (LoRA adapters attached, not merged) and return it with the manifest.

    ``key`` must be the key the model was trained with (checked by fingerprint)
    unless ``allow_key_mismatch``: then the model is built with the given key,
    which is the key-diversity experiment.  The model is a :class:`~keyedge.models.backbones.KeyedModel`
    or another defense's model (``keyedge.defenses``).  Pass ``manifest`` when it was read already.
    ``verify_key`` (a :class:`~keyedge.keys.signing.VerifyKey` or its file): refuse a checkpoint that is
    not signed by it, or whose manifest changed since -- hashes alone authenticate nothing (whoever swaps
    the weights can update their hash); the signature covers the manifest, and the manifest every file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    if verify_key is not None:
        check_checkpoint_signature(directory, verify_key)
        manifest = None  # read again below: what was signed is what is used
    manifest = manifest or read_manifest(directory)
    check_key(manifest, key, allow_mismatch=allow_key_mismatch)
    spec = manifest.model
    weights = _verified_file(directory, manifest.files["weights"])
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {weights}: {exc}", "the checkpoint is corrupted") from None
    bad = non_finite(tensors)
    if bad:
        raise CheckpointError(
            f"{weights} holds non-finite weights ({bad})", "the model is broken; train it again or restore a good copy"
        )
    lora = manifest.finetune_mode == "lora"
    backbone = rebuild_backbone(spec) if lora else _empty_backbone(spec)
    model = get_defense(manifest.defense and manifest.defense_name).build(backbone, spec, manifest.defense, key)
    if lora:
        base = model.backbone
        buffers = {k[len("buffer.") :]: v for k, v in tensors.items() if k.startswith("buffer.")}
        base.load_state_dict(buffers, strict=False)
        apply_lora(model, LoraSettings.from_dict(manifest.finetune["lora"]))
        load_adapter_state_dict(
            model, {k[len("adapter.") :]: v for k, v in tensors.items() if k.startswith("adapter.")}
        )
    else:
        try:
            model.backbone.load_state_dict(tensors)
        except RuntimeError as exc:
            raise CheckpointError(
                f"the weights in {weights} do not fit {spec.name}: {str(exc).splitlines()[0]}",
                "the checkpoint is corrupted",
            ) from None
    return model.to(map_location).eval(), manifest


def check_checkpoint_signature(directory: str | Path, verify_key: Any) -> str:
    """Raise :class:`~keyedge.errors.SealError` unless ``keyedge.sig`` is ``verify_key``'s valid signature of
    ``keyedge.json``; return the signer's fingerprint."""
    key = verify_key if isinstance(verify_key, VerifyKey) else load_verify_key(verify_key)
    return check_signature(Path(directory), key, MANIFEST)


def verify_checkpoint(directory: str | Path, *, verify_key: Any = None) -> dict[str, Any]:
    """``keyedge verify`` for a checkpoint: every listed file has its SHA-256, the signature (with a verify key)
    is valid, and the files the manifest does not list (refused when a verify key is given: nothing covers them)."""
    directory = Path(directory)
    signer = check_checkpoint_signature(directory, verify_key) if verify_key is not None else None
    manifest = read_manifest(directory)
    for entry in manifest.files.values():
        _verified_file(directory, entry)
    listed = {entry.file for entry in manifest.files.values()} | {MANIFEST, CHECKPOINT_SIGNATURE}
    unlisted = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and
                      str(p.relative_to(directory)) not in listed)  # fmt: skip
    if unlisted and verify_key is not None:
        raise SealError(
            f"{directory} holds files its signed manifest does not list, which the signature does not cover: "
            + ", ".join(unlisted[:5]),
            "remove them, or train and sign the checkpoint again",
        )
    return {"directory": str(directory), "files": len(manifest.files), "signed_by": signer, "unlisted": unlisted}


def _empty_backbone(spec: ModelSpec) -> torch.nn.Module:

    return create_backbone(spec.name, spec.num_classes, weights="none", image_size=spec.image_size)[0]


def load_training_state(directory: str | Path, manifest: CheckpointManifest) -> dict[str, Any]:
    """The optimizer/scheduler/RNG state of a checkpoint, for --resume (loaded with weights_only=True)."""
    entry = manifest.files.get("state")
    if entry is None:
        raise CheckpointError(f"{directory} holds no training state", "it cannot be resumed; train anew")
    path = _verified_file(Path(directory), entry)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # pickled objects (refused, never run) or a damaged file
        raise CheckpointError(
            f"{path} is not a plain tensor file (pickled objects are refused, never unpickled)",
            "the training state was tampered with or damaged; train anew with --overwrite",
        ) from None


def find_checkpoints(runs: Path) -> list[Path]:
    """Checkpoint directories under ``runs`` (itself, or its immediate subdirectories)."""
    runs = Path(runs)
    if (runs / MANIFEST).is_file():
        return [runs]
    found = sorted(p for p in runs.iterdir() if (p / MANIFEST).is_file()) if runs.is_dir() else []
    if not found:
        raise CheckpointError(
            f"no checkpoints (directories with {MANIFEST}) in {runs}",
            "give a directory made by `keyedge train`, or one holding several",
        )
    return found
