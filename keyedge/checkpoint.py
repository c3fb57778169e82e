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
:class:`~keyedge.volumetric.VolumizedModel`) adds ``"defense": {"name": ...,
its config}``, from which :func:`load_checkpoint` rebuilds it.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

import torch

from keyedge import __version__
from keyedge.deps import version_of
from keyedge.errors import KeyedgeError
from keyedge.fileio import write_bytes_atomic
from keyedge.keys import Key
from keyedge.models import KeyedModel, ModelSpec, rebuild_backbone, sha256_file

MANIFEST = "keyedge.json"
FORMAT = "keyedge-checkpoint"
VERSION = 1


class CheckpointError(KeyedgeError):
    """A checkpoint directory is missing, corrupted, or does not match the key."""


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))


def model_tensors(model: KeyedModel) -> dict[str, torch.Tensor]:
    """What the checkpoint stores for this model (full backbone, or adapters + head + buffers)."""
    from keyedge.lora import adapter_state_dict, is_lora

    if not is_lora(model):
        return dict(model.backbone.state_dict())
    tensors = {f"adapter.{k}": v for k, v in adapter_state_dict(model).items()}
    base = model.backbone.get_base_model()
    persistent = set(base.state_dict())  # BN running statistics change in training: keep them
    tensors.update({f"buffer.{k}": v for k, v in base.named_buffers()
                    if k in persistent and "modules_to_save" not in k and "original_module" not in k})
    return tensors


def save_checkpoint(directory: str | Path, model: KeyedModel, *, epoch: int, finetune: dict[str, Any],
                    data: dict[str, Any], training: dict[str, Any], metrics: dict[str, Any],
                    state: dict[str, Any] | None = None) -> Path:
    """Write (or replace) the checkpoint in ``directory`` atomically; return the manifest path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    token = f"e{epoch:03d}-{secrets.token_hex(3)}"
    weights = directory / f"weights-{token}.safetensors"
    _save_tensors(weights, model_tensors(model))
    files = {"weights": weights}
    if state is not None:
        files["state"] = directory / f"state-{token}.pt"
        torch.save(state, files["state"])
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "epoch": epoch,
        "model": model.spec.to_dict(),
        "key": ({"fingerprint": model.key_fingerprint, "block_size": model.block_size} if model.keyed else None),
        **({"defense": model.defense()} if hasattr(model, "defense") else {}),
        "finetune": finetune,
        "data": data,
        "training": training,
        "metrics": metrics,
        "files": {role: {"file": path.name, "sha256": sha256_file(path)} for role, path in files.items()},
        "versions": {"keyedge": __version__, "torch": torch.__version__, "timm": version_of("timm"),
                     "peft": version_of("peft")},
    }
    target = write_bytes_atomic(directory / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode(),
                                overwrite=True)
    keep = {p.name for p in files.values()}
    for stale in list(directory.glob("weights-*.safetensors")) + list(directory.glob("state-*.pt")):
        if stale.name not in keep:
            stale.unlink(missing_ok=True)
    return target


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Read and validate a checkpoint manifest (not the weights)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} not found", "give a directory made by `keyedge train`")
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {MANIFEST}", "give a directory made by `keyedge train`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc.__class__.__name__})",
                              "the checkpoint is corrupted") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a keyedge checkpoint manifest", "the checkpoint is corrupted")
    if not isinstance(manifest.get("version"), int) or manifest["version"] > VERSION:
        raise CheckpointError(f"{path} has checkpoint version {manifest.get('version')}, newer than this keyedge "
                              f"reads ({VERSION})", "upgrade keyedge")
    try:
        ModelSpec.from_dict(manifest["model"])
        manifest["files"]["weights"]["file"]
        manifest["finetune"]["mode"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} lacks a required field ({exc})", "the checkpoint is corrupted") from None
    return manifest


def _verified_file(directory: Path, entry: dict[str, str]) -> Path:
    path = directory / Path(entry["file"]).name
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing", "the checkpoint is incomplete; re-train or restore it")
    if sha256_file(path) != entry.get("sha256"):
        raise CheckpointError(f"checkpoint file {path} does not match its manifest checksum",
                              "the checkpoint is corrupted; re-train or restore it")
    return path


def _defense_name(manifest: dict[str, Any]) -> str:
    defense = manifest.get("defense")
    return str(defense.get("name") if isinstance(defense, dict) else defense)


def check_key(manifest: dict[str, Any], key: Key | None, *, allow_mismatch: bool = False) -> str | None:
    """Compare a key with the checkpoint's; return a note when they differ and that is allowed."""
    recorded = manifest.get("key")
    if manifest.get("defense") and key is not None:
        raise CheckpointError(f"this checkpoint is a {_defense_name(manifest)} model, which takes no key",
                              "drop --key-file")
    if recorded is None and key is None:
        return None
    if recorded is not None and key is None:
        raise CheckpointError(f"this checkpoint is a keyed model (key {recorded['fingerprint']}, block size "
                              f"{recorded['block_size']})", "pass its key with --key-file")
    assert key is not None
    if recorded is None:
        note = f"the checkpoint is a plain model; its input is shuffled with key {key.fingerprint}"
    elif recorded["fingerprint"] == key.fingerprint:
        return None
    else:
        note = (f"key {key.fingerprint} differs from the key the model was trained with ({recorded['fingerprint']})")
    if not allow_mismatch:
        raise CheckpointError(note + ": the model would lose most of its accuracy",
                              "pass the right key file, or allow the mismatch deliberately")
    return note


def load_checkpoint(directory: str | Path, key: Key | None = None, *, allow_key_mismatch: bool = False,
                    map_location: str | torch.device = "cpu") -> tuple[KeyedModel, dict[str, Any]]:
    """Rebuild the model a checkpoint holds (LoRA adapters attached, not merged) and return it with the manifest.

    ``key`` must be the key the model was trained with (checked by fingerprint)
    unless ``allow_key_mismatch``: then the model is built with the given key,
    which is the key-diversity experiment.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    manifest = read_manifest(directory)
    check_key(manifest, key, allow_mismatch=allow_key_mismatch)
    spec = ModelSpec.from_dict(manifest["model"])
    weights = _verified_file(directory, manifest["files"]["weights"])
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {weights}: {exc}", "the checkpoint is corrupted") from None
    defense = manifest.get("defense")
    if defense and manifest["finetune"]["mode"] != "full":
        raise CheckpointError(f"{directory}: a {_defense_name(manifest)} model must be fully fine-tuned",
                              "the checkpoint is corrupted")
    backbone = rebuild_backbone(spec) if manifest["finetune"]["mode"] == "lora" else _empty_backbone(spec)
    if defense:
        from keyedge.volumetric import model_from_defense

        model = model_from_defense(backbone, spec, defense)
    else:
        model = KeyedModel(backbone, spec, key)
    if manifest["finetune"]["mode"] == "lora":
        from keyedge.lora import LoraSettings, apply_lora, load_adapter_state_dict

        base = model.backbone
        buffers = {k[len("buffer."):]: v for k, v in tensors.items() if k.startswith("buffer.")}
        base.load_state_dict(buffers, strict=False)
        apply_lora(model, LoraSettings.from_dict(manifest["finetune"]["lora"]))
        load_adapter_state_dict(model, {k[len("adapter."):]: v for k, v in tensors.items() if k.startswith("adapter.")})
    else:
        try:
            model.backbone.load_state_dict(tensors)
        except RuntimeError as exc:
            raise CheckpointError(f"the weights in {weights} do not fit {spec.name}: {str(exc).splitlines()[0]}",
                                  "the checkpoint is corrupted") from None
    return model.to(map_location).eval(), manifest


def _empty_backbone(spec: ModelSpec) -> torch.nn.Module:
    from keyedge.models import create_backbone

    return create_backbone(spec.name, spec.num_classes, weights="none", image_size=spec.image_size)[0]


def load_training_state(directory: str | Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The optimizer/scheduler/RNG state of a checkpoint, for --resume (loaded with weights_only=True)."""
    entry = manifest["files"].get("state")
    if entry is None:
        raise CheckpointError(f"{directory} holds no training state", "it cannot be resumed; train anew")
    path = _verified_file(Path(directory), entry)
    return torch.load(path, map_location="cpu", weights_only=True)


