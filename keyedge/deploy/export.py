"""``keyedge export``: one verified, self-contained artifact set per key.

For each checkpoint (and its key) this builds the deployable module -- LoRA
merged, normalization inside, the shuffle as one gather (``fuse="gather"``) or
folded into a patchify first layer (``"fold"``; ``"auto"`` folds where exact) --
exports it to each target (:mod:`keyedge.exporters`), verifies every artifact
against the PyTorch keyed model on random and real inputs (max abs diff <= 1e-4,
scaled by the largest logit when that exceeds 1, at fp32 and identical top-1;
CoreML off macOS: structure only), checks the graph
(exactly one gather on the input path, or none when folded), and writes
``OUT/<model>-<fingerprint>/`` with a ``manifest.json`` (fingerprint, never the key).

Everything is written into a hidden temporary directory beside the result and
renamed into place only when all targets verified: a failure or a killed process
leaves no artifact set behind.  The directory is created 0700: an artifact
embeds its key, so it is a secret at rest (docs/design.md §3).

``--precision int8`` quantizes each target statically, calibrated on the checkpoint's own training
images (``calibration_images``), the key's shuffle kept exact (:mod:`keyedge.exporters`); such an
artifact cannot match fp32 to 1e-4, so it is verified by agreement instead (:func:`check_agreement`):
top-1 agreement with the fp32 keyed model on the checkpoint's real test images (default >= 98%) and
an accuracy drop of at most 1 point, both recorded in the manifest.  Its set is
``OUT/<model>-<fingerprint>-int8/``, beside the fp32 one.

With a sealing key (``ExportSettings.seal``, ``--seal``) each target is written into in-memory
files (:class:`keyedge.fileio.MemoryFiles`), inspected and verified there, and only its sealed
form (:mod:`keyedge.keys.seal`, bound to the finished manifest) reaches the disk.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from keyedge import __version__
from keyedge.checkpoints import MANIFEST as CHECKPOINT_MANIFEST
from keyedge.checkpoints import CheckpointManifest, check_key, find_checkpoints, load_checkpoint, read_manifest
from keyedge.defenses import Deployable, defense_of
from keyedge.defenses.keyed import FUSE_MODES, conv_variant
from keyedge.deploy.artifacts import PRECISIONS, ArtifactManifest, TargetRecord
from keyedge.deps import version_of
from keyedge.errors import KeyedgeError, OutputError
from keyedge.fileio import MemoryFiles, memory_files_supported, sha256_file, staged_directory, write_bytes_atomic
from keyedge.keys.keyfile import Key, key_for, load_keys
from keyedge.keys.seal import CIPHER, SEALED_FORMAT, SEALED_SUFFIX, SealKey, seal

FP32_ATOL = 1e-4  # times max(1, largest reference logit)
FP16_RTOL = 2e-2  # likewise
MIN_AGREEMENT = 0.98  # int8: top-1 agreement with the fp32 keyed model on real test images
MAX_ACCURACY_DROP = 1.0  # int8: percentage points of test accuracy
__all__ = [
    "FUSE_MODES",
    "ExportRequest",
    "ExportSettings",
    "VerificationError",
    "checkpoints_for_keys",
    "deployable",
    "export_many",
    "export_one",
    "load_checkpoint_runner",
    "plan_requests",
]


class VerificationError(KeyedgeError):
    """An exported artifact does not reproduce the PyTorch keyed model."""


def deployable(model: nn.Module, key: Key | None, fuse: str = "gather") -> Deployable:
    """The module to export for ``model``: its defense's deployable form (``keyedge.defenses``)."""
    return defense_of(model).deployable(model, key, fuse)


def _files(paths: Sequence[Path], root: Path) -> list[dict[str, str]]:
    """Every file of the artifacts (walking .mlpackage directories), with its SHA-256."""
    out = []
    for path in paths:
        members = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        out += [{"path": str(p.relative_to(root)), "sha256": sha256_file(p)} for p in members]
    return out


def real_inputs(manifest: CheckpointManifest, image_size: int, count: int = 8) -> tuple[np.ndarray | None, str]:
    """Real images for parity checks: the checkpoint's test data, else scikit-image's photos.

    Read once per (dataset, size, count) in a process: a fleet's keys share their data (issue 14).
    """
    data = manifest.data
    images, source = _real_inputs(data.get("name"), data.get("source"), image_size, count)
    return (None if images is None else images.copy()), source


def _dataset_specs(data: dict[str, Any]) -> list[str]:
    """The dataset specs a checkpoint's data may be loaded by, in order (its name, then where it came from)."""
    name, source = data.get("name"), data.get("source")
    return [str(c) for c in (name, f"{name}:{source}" if name and source else None, source) if c]


def _load_images(specs: Sequence[str], split: str, image_size: int, count: int, seed: int):
    """The first of ``specs`` that loads: ``(images, labels, info)``, or None when none does."""
    from keyedge.data.datasets import load_dataset

    for spec in specs:
        try:
            dataset, info = load_dataset(spec, split, image_size, limit=count, seed=seed)
        except KeyedgeError:
            continue
        items = [dataset[i] for i in range(len(dataset))]
        return np.stack([x.numpy() for x, _ in items]), np.array([int(y) for _, y in items]), info
    return None


@functools.lru_cache(maxsize=8)
def _real_inputs(name: str | None, source: str | None, image_size: int, count: int) -> tuple[np.ndarray | None, str]:
    loaded = _load_images(_dataset_specs({"name": name, "source": source}), "test", image_size, count, 0)
    if loaded is not None:
        return loaded[0], f"{loaded[2].name} test images"
    try:
        from keyedge.data.datasets import to_model_input
        from keyedge.data.samples import PHOTOS, sample_photo

        photos = [to_model_input(sample_photo(name), image_size).numpy() for name in PHOTOS]
        return np.stack(photos), "scikit-image photos"
    except KeyedgeError:
        return None, "no real images available (install keyedge[samples])"


def labelled_test_images(manifest: CheckpointManifest, image_size: int, count: int):
    """The checkpoint's real test images with labels, ``(images, labels, source)``, or None when not here."""
    loaded = _load_images(_dataset_specs(manifest.data), "test", image_size, count, 0)
    return None if loaded is None else (loaded[0], loaded[1], f"{loaded[2].name} test images")


def agreement_inputs(
    manifest: CheckpointManifest, image_size: int, count: int
) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """The images an int8 artifact is checked on: labelled test images, else unlabelled real ones (or none)."""
    labelled = labelled_test_images(manifest, image_size, count)
    if labelled is not None:
        return labelled
    images, source = real_inputs(manifest, image_size, count)
    return images, None, source


def calibration_images(
    manifest: CheckpointManifest, image_size: int, data: str | None, count: int, seed: int
) -> tuple[np.ndarray, str]:
    """int8 calibration images: ``count`` training images (class-stratified, ``seed``) of the checkpoint's data.

    They are the raw [0, 1] images the artifact receives: its in-graph shuffle turns them into what the
    keyed model was trained on, so every quantized layer is calibrated on shuffled data.  ``data``
    (``--calibration-data``: a dataset spec as ``keyedge train --data`` takes, or an image directory)
    overrides the checkpoint's.
    """
    if data is not None:
        specs = [f"imagefolder:{data}" if Path(data).expanduser().is_dir() and ":" not in data else data]
    else:
        specs = _dataset_specs(manifest.data)
    loaded = _load_images(specs, "train", image_size, count, seed)
    if loaded is None:
        what = (
            f"--calibration-data {data}" if data is not None else f"the checkpoint's data ({manifest.data.get('name')})"
        )
        raise KeyedgeError(
            f"int8 needs calibration images, and {what} cannot be loaded here",
            "pass --calibration-data with a dataset (as `keyedge train --data` takes) or a directory of images",
        )
    return loaded[0], f"{len(loaded[0])} {loaded[2].name} training images (seed {seed})"


def check_agreement(
    reference: np.ndarray,
    got: np.ndarray,
    labels: np.ndarray | None,
    *,
    min_agreement: float = MIN_AGREEMENT,
    max_drop: float = MAX_ACCURACY_DROP,
) -> dict[str, Any]:
    """The int8 rule: top-1 agreement with the fp32 reference, and (with labels) the accuracy drop in points."""
    ref_top, got_top = reference.argmax(1), got.argmax(1)
    result: dict[str, Any] = {
        "images": len(reference),
        "top1_agreement": float((ref_top == got_top).mean()),
        "min_agreement": min_agreement,
        "max_abs_diff": float(np.abs(reference - got).max()),
    }
    passed = result["top1_agreement"] >= min_agreement
    if labels is not None:
        fp32, int8 = float((ref_top == labels).mean()), float((got_top == labels).mean())
        drop = round(100 * (fp32 - int8), 6)
        result |= {"accuracy_fp32": fp32, "accuracy": int8, "accuracy_drop_points": drop, "max_drop_points": max_drop}
        passed &= drop <= max_drop
    else:
        result["accuracy"] = None  # no labelled test data here: agreement only
    result["passed"] = bool(passed)
    return result


def check_parity(reference: np.ndarray, got: np.ndarray, precision: str) -> dict[str, Any]:
    """Compare artifact outputs with PyTorch's: max abs diff and top-1 agreement, against the tolerance."""
    diff = float(np.abs(reference - got).max())
    scale = max(1.0, float(np.abs(reference).max()))  # float32 error grows with the logits' magnitude
    tol = (FP32_ATOL if precision == "fp32" else FP16_RTOL) * scale
    ref_top, got_top = reference.argmax(1), got.argmax(1)
    mismatched = ref_top != got_top
    if precision == "fp16":  # a flip is acceptable only where the reference's top-2 margin is within tolerance
        top2 = np.sort(reference, axis=1)[:, -2:]
        mismatched &= (top2[:, 1] - top2[:, 0]) > tol
    return {
        "max_abs_diff": diff,
        "tolerance": tol,
        "top1_agreement": float((ref_top == got_top).mean()),
        "passed": bool(diff <= tol and not mismatched.any()),
        "images": len(reference),
    }


@dataclass
class ExportRequest:
    """One checkpoint (and its key) to export."""

    checkpoint: Path
    key: Key | None
    allow_key_mismatch: bool = False  # allow a key whose fingerprint differs from the checkpoint's
    _manifest: CheckpointManifest | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.checkpoint = Path(self.checkpoint)

    def manifest(self) -> CheckpointManifest:
        """The checkpoint's manifest, read (and validated) once."""
        if self._manifest is None:
            self._manifest = read_manifest(self.checkpoint)
        return self._manifest


@dataclass
class ExportSettings:
    targets: list[str]
    out: Path
    fuse: str = "gather"
    batch: int | None = 1
    precision: str = "fp32"
    verify: bool = True
    overwrite: bool = False
    random_inputs: int = 8
    real_inputs: int = 8
    template: bool = True  # fleet export: trace once per architecture (keyedge.exporters.template, MilTemplate)
    # int8 only: the calibration images (None: the checkpoint's training data), how many, drawn with which seed,
    # and the verification rule: top-1 agreement and accuracy drop on (up to) agreement_images real test images
    calibration_data: str | None = None
    calibration_size: int = 300
    calibration_seed: int = 0
    min_agreement: float = MIN_AGREEMENT
    max_accuracy_drop: float = MAX_ACCURACY_DROP
    agreement_images: int = 500
    seal: SealKey | None = None  # write every model file sealed (AES-256-GCM), never in plaintext on disk
    sign: Any = None  # a keyedge.keys.signing.SigningKey: write manifest.sig (Ed25519) beside the manifest
    log: Callable[[str], None] = field(default=lambda _line: None)

    def __post_init__(self) -> None:
        self.out = Path(self.out)  # a str from library callers
        if self.precision not in PRECISIONS:
            raise KeyedgeError(f"unknown precision {self.precision!r}", f"use {', '.join(PRECISIONS)}")
        if self.precision == "int8":
            if self.calibration_size < 1 or self.agreement_images < 1:
                raise KeyedgeError(
                    "--calibration-size and the agreement images must be at least 1", "e.g. --calibration-size 300"
                )
            if not 0.0 <= self.min_agreement <= 1.0 or self.max_accuracy_drop < 0:
                raise KeyedgeError(
                    f"--min-agreement must be in [0, 1] and --max-accuracy-drop >= 0 (points), got "
                    f"{self.min_agreement} and {self.max_accuracy_drop}",
                    "e.g. --min-agreement 0.98 --max-accuracy-drop 1",
                )
            if self.seal is not None:
                raise KeyedgeError(
                    "keyedge does not seal int8 artifacts yet: the quantizers write their intermediate models to disk",
                    "export int8 without --seal, or seal the fp32/fp16 set",
                )


def artifact_directory(out: Path, name: str, precision: str) -> Path:
    """``OUT/<model>-<fingerprint>/``; an int8 set sits beside its fp32 one as ``...-int8/``."""
    return out / (name + ("-int8" if precision == "int8" else ""))


def export_many(requests: Sequence[ExportRequest], settings: ExportSettings) -> list[Path]:
    """Export several checkpoints; keys sharing an architecture share one template (``supports_template`` targets)."""
    manifests = [request.manifest() for request in requests]
    counts: dict[str, int] = {}
    for manifest in manifests:
        counts[manifest.model.name] = counts.get(manifest.model.name, 0) + 1
    templates: dict[tuple, Any] = {}
    directories = []
    for request, manifest in zip(requests, manifests):
        settings.log(f"exporting {request.checkpoint} to {', '.join(settings.targets)}")
        shared = templates if counts[manifest.model.name] > 1 else None
        directories.append(export_one(request, settings, templates=shared))
        settings.log(f"wrote {directories[-1]}")
    return directories


def export_one(request: ExportRequest, settings: ExportSettings, *, templates: dict[tuple, Any] | None = None) -> Path:
    """Export one checkpoint to every target; return the artifact directory.

    With a ``templates`` cache (fleet export) the targets that support it write their artifacts
    from the architecture's template when the module fits it (:mod:`keyedge.exporters.template`).
    """
    from keyedge.exporters import ExportOptions, get_backend

    manifest = request.manifest()
    note = check_key(manifest, request.key, allow_mismatch=request.allow_key_mismatch)
    model, manifest = load_checkpoint(
        request.checkpoint, request.key, allow_key_mismatch=request.allow_key_mismatch, manifest=manifest
    )
    defense = defense_of(model)
    final = artifact_directory(
        settings.out, defense.artifact_name(model.spec.name, model.key_fingerprint), settings.precision
    )
    if final.exists() and not settings.overwrite:
        raise OutputError(f"{final} already exists", "pass --overwrite to replace it, or choose another --out")
    backends = sorted((get_backend(t) for t in settings.targets), key=lambda b: b.name != "onnx")  # onnx first
    for backend in backends:
        ok, reason = backend.available()
        if not ok:
            raise KeyedgeError(f"cannot export to {backend.name}: {reason}")
        backend.check_precision(settings.precision)
    if settings.seal is not None:
        check_sealable(backends)
    deploy = defense.deployable(model, request.key, settings.fuse)
    calibration, calibration_source = None, None
    if settings.precision == "int8":
        size = model.spec.image_size
        calibration, calibration_source = calibration_images(
            manifest, size, settings.calibration_data, settings.calibration_size, settings.calibration_seed
        )
        settings.log(f"  int8: calibrating on {calibration_source}")
    options = ExportOptions(
        batch=settings.batch, precision=settings.precision, image_size=model.spec.image_size, calibration=calibration
    )
    with staged_directory(final, overwrite=settings.overwrite, log=settings.log) as staging:  # 0700: keyed files
        use_templates = settings.template and options.precision == "fp32" and settings.seal is None
        fleet = templates if use_templates else None
        plaintexts: dict[str, dict[str, bytes]] = {}
        record = _export_targets(
            model, deploy, backends, options, staging, manifest, request, settings, note, fleet, plaintexts
        )
        if calibration_source is not None:
            record.verification["calibration"] = {
                "source": calibration_source,
                "images": len(calibration),
                "seed": settings.calibration_seed,
                "data": settings.calibration_data or "the checkpoint's training data",
            }
        if settings.seal is not None:
            _seal_targets(record, plaintexts, settings.seal, staging)
            settings.log(f"  sealed with sealing key {settings.seal.fingerprint} ({CIPHER})")
        record.write(staging)
        if settings.sign is not None:
            from keyedge.keys.signing import sign_manifest

            sign_manifest(staging, settings.sign)
            settings.log(f"  signed the manifest with signing key {settings.sign.fingerprint}")
    return final


def check_sealable(backends: Sequence) -> None:
    """Refuse ``--seal`` (one line) for targets keyedge does not seal, or where files cannot stay in memory."""
    unsealable = [b.name for b in backends if not b.sealable]
    if unsealable:
        raise KeyedgeError(
            f"keyedge does not seal {', '.join(unsealable)} artifacts (CoreML models are encrypted by Xcode; "
            "LiteRT and ExecuTorch files are not sealed yet)",
            "seal -t onnx -t openvino; export the other targets without --seal (docs/sealed-format.md)",
        )
    ok, why = memory_files_supported()
    if not ok:
        raise KeyedgeError(f"cannot seal on this machine: {why}", "export sealed artifacts on Linux")


def _seal_targets(
    record: ArtifactManifest, plaintexts: dict[str, dict[str, bytes]], sealkey: SealKey, staging: Path
) -> None:
    """Encrypt each verified model file (held in memory) into ``NAME.sealed``, bound to the finished manifest."""
    record.seal = {
        "format": SEALED_FORMAT,
        "cipher": CIPHER,
        "sealkey": sealkey.fingerprint,
        "set": secrets.token_hex(8),
    }
    for target, files in plaintexts.items():
        record.targets[target].files = [{"path": name + SEALED_SUFFIX, "sha256": ""} for name in files]
    binding = record.binding()  # the manifest as written, without the files' digests
    for target, files in plaintexts.items():
        for entry, (name, data) in zip(record.targets[target].files, files.items()):
            sealed = seal(data, sealkey, binding, name)
            write_bytes_atomic(staging / entry["path"], sealed, mode=0o600)
            entry["sha256"] = hashlib.sha256(sealed).hexdigest()


def _export_targets(
    model: nn.Module,
    deploy: Deployable,
    backends: list,
    options,
    staging: Path,
    manifest: CheckpointManifest,
    request: ExportRequest,
    settings: ExportSettings,
    key_note: str | None,
    templates: dict[tuple, Any] | None = None,
    plaintexts: dict[str, dict[str, bytes]] | None = None,
) -> ArtifactManifest:
    """Export, inspect and verify every target; a sealed export keeps each target's files in memory only,
    returned in ``plaintexts`` (target -> file name -> bytes) for sealing.

    With a fleet's ``templates`` cache, a backend that supports templates writes the key's artifact from its
    architecture's template (built once per architecture, fuse and batch) when the module fits it.
    """
    generator = torch.Generator().manual_seed(0)
    size = model.spec.image_size
    random_x = torch.rand(settings.random_inputs, 3, size, size, generator=generator).numpy()
    labels = None
    if options.precision == "int8":  # agreement on the real test images (labelled where the data is here)
        real_x, labels, real_source = agreement_inputs(manifest, size, settings.agreement_images)
        if real_x is None:
            raise VerificationError(
                "an int8 artifact is verified on real images, and none are here (no test data, no sample photos)",
                "install keyedge[samples], make the checkpoint's data available, or pass --no-verify",
            )
        inputs = {"real": real_x}
    else:
        real_x, real_source = real_inputs(manifest, size, settings.real_inputs)
        inputs = {"random": random_x} | ({"real": real_x} if real_x is not None else {})
    with torch.no_grad():
        reference = {kind: _logits(model, x) for kind, x in inputs.items()}
    targets: dict[str, TargetRecord] = {}
    for backend in backends:
        target_deploy = deploy
        if settings.fuse == "auto" and deploy.fuse == "gather" and not backend.runs_gather:
            target_deploy = conv_variant(deploy.module, request.key)  # no gather reaches the accelerator
        template = None
        if templates is not None and backend.supports_template:
            spec = model.spec
            ident = (spec.name, spec.image_size, spec.num_classes, target_deploy.fuse, options.batch, options.precision)
            template = backend.template_for(templates, ident, target_deploy.module, options)
        templated = template is not None
        settings.log(
            f"  {backend.name}: exporting ({target_deploy.fuse}{', from the fleet template' if templated else ''})"
        )
        path = staging / f"model{backend.suffix}"
        with contextlib.ExitStack() as stack:
            memory = None
            if settings.seal is not None:  # converters write through links into memory-only files
                memory = stack.enter_context(MemoryFiles([p.name for p in backend.planned_outputs(path)]))
                path = memory.path(path.name)
            if templated:
                written = backend.export_from_template(template, target_deploy.module, path, options)
            else:
                written = backend.export(target_deploy.module, path, options, placeholders=memory is not None)
            graph = backend.inspect(path)
            io = backend.describe_io(path)
            _check_graph(backend.name, graph, target_deploy.fuse)
            record = TargetRecord(
                fuse=target_deploy.fuse,
                files=_files(written, staging) if memory is None else [],
                graph=graph.to_dict(),
                io=io,
                source="fleet-template" if templated else "full-export",
            )
            if settings.verify:  # a sealed artifact is verified from memory, like any other
                record.parity = _verify(
                    backend, path, inputs, reference, options, io, model.spec.num_classes, labels, settings
                )
                settings.log(f"  {backend.name}: " + _parity_line(record.parity))
            else:
                record.parity = {"skipped": "--no-verify"}
            if memory is not None and plaintexts is not None:
                contents = {p.name: memory.read(p.name) for p in written}
                plaintexts[backend.name] = {n: d for n, d in contents.items() if d or n == path.name}
        targets[backend.name] = record
    spec = model.spec
    return ArtifactManifest(
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        fingerprint=model.key_fingerprint,
        block_size=model.block_size,
        key_note=key_note,
        defense=manifest.defense,  # e.g. the volumization settings; None for keyed and plain models
        model={
            "name": spec.name,
            "family": spec.family,
            "num_classes": spec.num_classes,
            "classes": manifest.data.get("classes"),
            "weights": spec.weights.get("kind"),
        },
        finetune=manifest.finetune_mode,
        lora_merged=manifest.finetune_mode == "lora",
        fuse=deploy.fuse,
        fuse_requested=settings.fuse,
        fuse_note=deploy.note,
        precision=options.precision,
        input={
            "name": options.input_name,
            "shape": list(options.input_shape),
            "dtype": "float32",
            "layout": "NCHW",
            "range": [0.0, 1.0],
            "channels": "RGB",
        },
        output={
            "name": options.output_name,
            "shape": [options.batch or -1, spec.num_classes],
            "dtype": "float32",
            "meaning": "logits",
        },
        normalization={
            "mean": list(spec.mean),
            "std": list(spec.std),
            "where": "folded into the first layer" if deploy.fuse == "fold" else "inside the graph",
        },
        checkpoint={
            "path": str(Path(request.checkpoint).resolve()),
            "manifest_sha256": sha256_file(Path(request.checkpoint) / CHECKPOINT_MANIFEST),
            "epoch": manifest.epoch,
            "test_accuracy": manifest.test_accuracy,
        },
        verification={
            "inputs": {k: len(v) for k, v in inputs.items()},
            "real_source": real_source,
            "seed": 0,
            "fp32_atol": FP32_ATOL,
        }
        | (
            {
                "rule": "int8: top-1 agreement with the fp32 keyed model, and the test accuracy drop",
                "min_agreement": settings.min_agreement,
                "max_accuracy_drop_points": settings.max_accuracy_drop,
                "labelled": labels is not None,
            }
            if options.precision == "int8"
            else {}
        ),
        targets=targets,
        versions={
            "keyedge": __version__,
            "torch": torch.__version__,
            "timm": version_of("timm"),
            "onnx": version_of("onnx"),
            "onnxruntime": version_of("onnxruntime"),
            "openvino": version_of("openvino"),
            "coremltools": version_of("coremltools"),
            "litert-torch": version_of("litert-torch"),
            "ai-edge-litert": version_of("ai-edge-litert"),
            "executorch": version_of("executorch"),
        },
    )


def _check_graph(target: str, graph, fuse: str) -> None:
    expected = 1 if fuse == "gather" else 0  # fold, conv and plain models hold no gather on the input
    if graph.gathers_on_input != expected:
        raise VerificationError(
            f"the {target} graph has {graph.gathers_on_input} gather ops on the input, expected {expected} ({fuse})",
            "report this as a bug",
        )
    if fuse == "gather":
        layout = [op for op in graph.input_path if op.lower() in ("transpose", "permute", "reshape")]
        if any(op.lower() in ("transpose", "permute") for op in layout) or len(layout) > 2:
            raise VerificationError(
                f"the {target} graph's input path is {' -> '.join(graph.input_path)}: more "
                "than flatten -> gather -> unflatten",
                "report this as a bug",
            )


def _logits(model: nn.Module, x: np.ndarray, chunk: int = 64) -> np.ndarray:
    return np.concatenate([model(torch.from_numpy(x[i : i + chunk])).numpy() for i in range(0, len(x), chunk)])


def _verify(
    backend,
    path: Path,
    inputs: dict[str, np.ndarray],
    reference: dict[str, np.ndarray],
    options,
    io: dict[str, Any],
    num_classes: int,
    labels: np.ndarray | None = None,
    settings: ExportSettings | None = None,
) -> dict[str, Any]:
    can_run, why = backend.can_run()
    if not can_run:
        structural = _check_io(backend.name, io, options, num_classes)
        return {"ran": False, "reason": why, "structural": structural, "passed": True}
    with backend.load(path) as runner:
        got = {kind: runner.predict(x) for kind, x in inputs.items()}
    if options.precision == "int8":
        rule = {"min_agreement": settings.min_agreement, "max_drop": settings.max_accuracy_drop} if settings else {}
        result = check_agreement(reference["real"], got["real"], labels, **rule)
        if not result["passed"]:
            drop = result.get("accuracy_drop_points")
            raise VerificationError(
                f"the int8 {backend.name} artifact agrees with the fp32 model on {result['top1_agreement']:.1%} "
                f"of {result['images']} real images (needs {result['min_agreement']:.0%})"
                + (
                    f", accuracy drop {drop:.1f} points (at most {result['max_drop_points']:g})"
                    if drop is not None
                    else ""
                ),
                "nothing was written; calibrate on more images (--calibration-size), or loosen "
                "--min-agreement / --max-accuracy-drop knowingly",
            )
        return {"ran": True, "kind": "agreement", "real": result, "passed": True}
    results = {kind: check_parity(reference[kind], got[kind], options.precision) for kind, x in inputs.items()}
    passed = all(r["passed"] for r in results.values())
    if not passed:
        bad = next(k for k, r in results.items() if not r["passed"])
        r = results[bad]
        raise VerificationError(
            f"{backend.name} artifact does not reproduce the PyTorch model on {bad} inputs "
            f"(max abs diff {r['max_abs_diff']:.2e} > {r['tolerance']:.0e} or top-1 differs, "
            f"agreement {r['top1_agreement']:.1%})",
            "nothing was written; report this as a bug",
        )
    return {"ran": True, **results, "passed": True}


def _check_io(target: str, io: dict[str, Any], options, num_classes: int) -> dict[str, Any]:
    (inp,), (out,) = io["inputs"], io["outputs"]
    expected_in = list(options.input_shape)
    problems = []
    if inp["name"] != options.input_name or out["name"] != options.output_name:
        problems.append(f"names {inp['name']}/{out['name']}")
    if inp.get("dtype") != "float32" or out.get("dtype") != "float32":
        problems.append(f"dtypes {inp.get('dtype')}/{out.get('dtype')}")
    if options.batch is not None and list(inp["shape"]) != expected_in:
        problems.append(f"input shape {inp['shape']}")
    if list(out["shape"])[-1:] != [num_classes]:
        problems.append(f"output shape {out['shape']}")
    if problems:
        raise VerificationError(
            f"the {target} artifact's interface is wrong: {', '.join(problems)}", "report this as a bug"
        )
    return {"inputs": io["inputs"], "outputs": io["outputs"]}


def _parity_line(parity: dict[str, Any]) -> str:
    if not parity.get("ran"):
        return f"checked structurally ({parity['reason']})"
    if parity.get("kind") == "agreement":
        r = parity["real"]
        accuracy = (
            f", accuracy {r['accuracy']:.1%} vs fp32 {r['accuracy_fp32']:.1%}" if r.get("accuracy") is not None else ""
        )
        return f"verified (top-1 agreement with fp32 {r['top1_agreement']:.1%} on {r['images']} real images{accuracy})"
    parts = [
        f"{k}: max abs diff {v['max_abs_diff']:.1e}, top-1 {v['top1_agreement']:.0%}"
        for k, v in parity.items()
        if isinstance(v, dict)
    ]
    return "verified (" + "; ".join(parts) + ")"


# ---- many keys -------------------------------------------------------------------------------------------------------


def plan_requests(
    checkpoints: Sequence[Path], key_paths: Sequence[Path], *, allow_key_mismatch: bool = False
) -> list[ExportRequest]:
    """Pair each checkpoint with its key by fingerprint.

    With exactly one checkpoint and one key file whose fingerprints differ, the
    export is refused unless ``allow_key_mismatch`` (the artifact would lose most of its accuracy).
    """
    keys = load_keys(key_paths)
    requests = []
    for ckpt in checkpoints:
        manifest = read_manifest(ckpt)
        if manifest.fingerprint not in keys and len(checkpoints) == 1 and (len(keys) == 1):
            request = ExportRequest(ckpt, next(iter(keys.values())), allow_key_mismatch, manifest)
            check_key(manifest, request.key, allow_mismatch=allow_key_mismatch)
        else:
            request = ExportRequest(ckpt, key_for(manifest.fingerprint, keys, owner=ckpt), False, manifest)
        requests.append(request)
    return requests


DEFAULT_RUNS = Path("runs")  # where `keyedge train` and the quickstart put checkpoints


def checkpoints_for_keys(key_paths: Sequence[Path], runs: Path = DEFAULT_RUNS) -> list[Path]:
    """The checkpoint each key trained, found by fingerprint under ``runs`` (``export --key-file k1.bin`` alone).

    No match, or several, is a one-line error listing what ``runs`` holds.
    """
    keys = load_keys(key_paths)
    if not runs.is_dir():
        raise KeyedgeError(
            f"nothing to export: no --checkpoint given, and no {runs}/ directory here to find the key's model in",
            "pass --checkpoint DIR, or --runs DIR (where `keyedge train --out` wrote it)",
        )
    by_fingerprint: dict[str | None, list[Path]] = {}
    for checkpoint in find_checkpoints(runs):
        try:
            by_fingerprint.setdefault(read_manifest(checkpoint).fingerprint, []).append(checkpoint)
        except KeyedgeError:
            continue  # a broken checkpoint is reported when it is the one asked for, not here
    shown = ", ".join(
        f"{c} ({f'key {fp}' if fp else 'plain'})" for fp, paths in by_fingerprint.items() for c in paths[:4]
    )
    chosen = []
    for fingerprint in keys:
        matches = by_fingerprint.get(fingerprint, [])
        if not matches:
            raise KeyedgeError(
                f"no checkpoint under {runs} was trained with key {fingerprint} (found: {shown or 'none readable'})",
                "pass --checkpoint DIR, or --runs DIR where that key's model is",
            )
        if len(matches) > 1:
            raise KeyedgeError(
                f"{len(matches)} checkpoints under {runs} were trained with key {fingerprint}: "
                + ", ".join(map(str, matches)),
                "pick one with --checkpoint DIR",
            )
        chosen.append(matches[0])
    return chosen


# ---- the PyTorch reference runner ------------------------------------------------------------------------------------


class TorchRunner:
    """A checkpoint rebuilt as the module that was exported (same fuse), run eagerly under ``inference_mode``.

    The reference that exported artifacts are timed against (``bench latency``'s ``torch`` runtime);
    the same interface as :class:`keyedge.exporters.base.Runner`.
    """

    backend = "torch"
    providers = None

    def __init__(
        self, directory: Path, module: nn.Module, device: torch.device, image_size: int, settings: dict[str, Any]
    ):
        self.path = Path(directory)
        self.module = module
        self.device = device
        self.input_shape = [None, 3, image_size, image_size]
        self.settings = settings

    def infer(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():  # .cpu() waits for CUDA/MPS: the copy back is part of the call, as elsewhere
            return self.module(torch.from_numpy(x).to(self.device)).cpu().numpy()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.infer(np.ascontiguousarray(x, dtype=np.float32))

    def predict(self, x: np.ndarray, *, chunk: int = 64) -> np.ndarray:
        return np.concatenate([self(x[i : i + chunk]) for i in range(0, len(x), chunk)])

    def describe(self) -> dict[str, Any]:
        return {"backend": "torch", "path": str(self.path), "device": str(self.device), **self.settings}

    def close(self) -> None:
        self.module = None

    def __enter__(self) -> TorchRunner:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def torch_available(device: str | None) -> tuple[bool, str]:
    """Whether PyTorch can run on ``device`` (cpu, cuda, mps) here, and why not."""
    if device == "cuda" and not torch.cuda.is_available():
        return False, "torch: CUDA is not available on this host"
    if device == "mps" and not torch.backends.mps.is_available():
        return False, "torch: MPS is not available on this host"
    return True, f"torch {torch.__version__}"


def load_checkpoint_runner(
    directory: Path, key: Key | None, *, fuse: str | None = None, device: str | None = None, threads: int | None = None
) -> TorchRunner:
    """Load a checkpoint for eager inference as it would be exported (``fuse``: gather, fold, conv)."""
    ok, why = torch_available(device)
    if not ok:
        raise KeyedgeError(why, "pick another device")
    if threads:
        torch.set_num_threads(threads)
    target = torch.device(device or "cpu")
    model, manifest = load_checkpoint(directory, key)
    chosen = fuse if fuse in ("gather", "fold", "conv") else "gather"
    module = defense_of(model).deployable(model, key, chosen).module.to(target).eval()
    return TorchRunner(
        Path(directory),
        module,
        target,
        manifest.model.image_size,
        {"device": str(target), "threads": threads, "fuse": chosen},
    )
