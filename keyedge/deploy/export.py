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

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from keyedge.checkpoints import check_key, load_checkpoint
from keyedge.defenses import Deployable, defense_of
from keyedge.defenses.keyed import FUSE_MODES
from keyedge.deploy.inputs import (
    agreement_inputs,
    calibration_images,
    int8_images,
    labelled_test_images,
    real_inputs,
)
from keyedge.deploy.parity import (
    FP16_RTOL,
    FP32_ATOL,
    MAX_ACCURACY_DROP,
    MIN_AGREEMENT,
    Parity,
    VerificationError,
    check_agreement,
    check_parity,
)
from keyedge.deploy.settings import (
    DEFAULT_RUNS,
    VALIDATION_IMAGES,
    ExportRequest,
    ExportSettings,
    artifact_directory,
    checkpoints_for_keys,
    plan_requests,
)
from keyedge.deploy.targets import check_sealable, export_targets, seal_targets
from keyedge.deploy.torch_runner import TorchRunner, load_checkpoint_runner, torch_available
from keyedge.errors import KeyedgeError, OutputError
from keyedge.exporters import ExportBackend, ExportOptions, get_backend
from keyedge.fileio import staged_directory
from keyedge.host import computes_bf16
from keyedge.keys.keyfile import Key
from keyedge.keys.seal import CIPHER
from keyedge.keys.signing import sign_manifest
from keyedge.postures import Posture, PostureError

__all__ = [
    "DEFAULT_RUNS",
    "FP16_RTOL",
    "FP32_ATOL",
    "FUSE_MODES",
    "MAX_ACCURACY_DROP",
    "MIN_AGREEMENT",
    "ExportRequest",
    "ExportSettings",
    "Parity",
    "TorchRunner",
    "VerificationError",
    "agreement_inputs",
    "artifact_directory",
    "calibration_images",
    "check_agreement",
    "check_parity",
    "check_posture",
    "check_sealable",
    "checkpoints_for_keys",
    "deployable",
    "export_many",
    "export_one",
    "labelled_test_images",
    "load_checkpoint_runner",
    "plan_requests",
    "real_inputs",
    "torch_available",
]


#: what a bf16 export says on a host whose CPU has no BF16 (its runtime then computes in f32)
BF16_HERE_IS_F32 = (
    "f32: this host's CPU has no BF16 (keyedge doctor), so the agreement was measured in f32; "
    "run `keyedge verify` on the device to measure it in bf16"
)


def deployable(model: nn.Module, key: Key | None, fuse: str = "gather") -> Deployable:
    """The module to export for ``model``: its defense's deployable form (``keyedge.defenses``)."""
    return defense_of(model).deployable(model, key, fuse)


def check_posture(posture: Posture, num_classes: int | None, backends: Sequence[ExportBackend]) -> None:
    """Refuse (one line, before any work) a posture the model (``num_classes``; None: not known yet) or a target
    cannot hold."""
    if posture.topk is not None and num_classes is not None and posture.topk > num_classes:
        raise PostureError(
            f"--posture {posture} answers the top {posture.topk} classes of a model with {num_classes}",
            f"use topk:K with K < {num_classes}, or label",
        )
    if posture.randomized:
        for backend in backends:
            if not backend.random_ops:
                raise PostureError(
                    f"the {backend.name} target cannot hold --posture {posture}'s in-graph noise: "
                    f"{backend.random_refusal}",
                    "export the noise posture to onnx, openvino or coreml, or drop noise:SIGMA for this target",
                )


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
    check_posture(settings.posture, model.spec.num_classes, backends)
    deploy = defense.deployable(model, request.key, settings.fuse)
    calibration, calibration_source, validation = None, None, None
    if settings.precision == "int8":
        held = VALIDATION_IMAGES if settings.accuracy_control else 0
        calibration, validation, calibration_source = int8_images(
            manifest,
            model.spec.image_size,
            settings.calibration_data,
            settings.calibration_size,
            settings.calibration_seed,
            held,
        )
        settings.log(f"  int8: calibrating on {calibration_source}")
        for backend in backends:
            if validation is not None and not backend.accuracy_control:
                settings.log(f"  {backend.name}: its quantizer has no accuracy control; plain post-training int8")
    if settings.precision == "bf16" and not computes_bf16():
        settings.log(f"  bf16: computed in {BF16_HERE_IS_F32}")
    options = ExportOptions(
        batch=settings.batch,
        precision=settings.precision,
        image_size=model.spec.image_size,
        calibration=calibration,
        validation=validation,
        max_agreement_loss=round(1.0 - settings.min_agreement, 6),
    )
    with staged_directory(final, overwrite=settings.overwrite, log=settings.log) as staging:  # 0700: keyed files
        use_templates = settings.template and options.precision == "fp32" and settings.seal is None
        fleet = templates if use_templates else None
        plaintexts: dict[str, dict[str, bytes]] = {}
        record = export_targets(
            model, deploy, backends, options, staging, manifest, request, settings, note, fleet, plaintexts
        )
        if calibration_source is not None:
            record.verification["calibration"] = {
                "source": calibration_source,
                "images": len(calibration),
                "seed": settings.calibration_seed,
                "data": settings.calibration_data or "the checkpoint's training data",
            }
            if validation is not None:
                record.verification["calibration"]["accuracy_control"] = {
                    "targets": [b.name for b in backends if b.accuracy_control],
                    "held_out_images": len(validation),
                    "max_agreement_loss": options.max_agreement_loss,
                }
        if settings.precision == "bf16":  # what the agreement above measured: bf16 only where this CPU has it
            record.verification["computed_in"] = "bf16" if computes_bf16() else BF16_HERE_IS_F32
        if settings.seal is not None:
            seal_targets(record, plaintexts, settings.seal, staging)
            settings.log(f"  sealed with sealing key {settings.seal.fingerprint} ({CIPHER})")
        record.write(staging)
        if settings.sign is not None:
            sign_manifest(staging, settings.sign)
            settings.log(f"  signed the manifest with signing key {settings.sign.fingerprint}")
    return final
