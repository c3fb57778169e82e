"""The per-target export loop: each backend writes, inspects and verifies its artifact into the staging directory.

:func:`export_targets` runs every target of one checkpoint and returns the set's :class:`ArtifactManifest`
(:func:`artifact_manifest`).  With a sealing key each target's files are written into memory only
(:class:`keyedge.fileio.MemoryFiles`), verified there, and :func:`seal_targets` writes their sealed form.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from keyedge import __version__
from keyedge.checkpoints import MANIFEST as CHECKPOINT_MANIFEST
from keyedge.checkpoints import CheckpointManifest
from keyedge.defenses import Deployable
from keyedge.deploy.artifacts import ArtifactManifest, TargetRecord
from keyedge.deploy.forms import choose_form
from keyedge.deploy.parity import Parity
from keyedge.deploy.settings import ExportRequest, ExportSettings
from keyedge.deploy.verification import References, check_graph, check_noise, references, verify_target
from keyedge.deps import version_of
from keyedge.errors import KeyedgeError
from keyedge.exporters import ExportOptions
from keyedge.exporters.base import ExportBackend
from keyedge.fileio import MemoryFiles, memory_files_supported, sha256_file, write_bytes_atomic
from keyedge.keys.seal import CIPHER, SEALED_FORMAT, SEALED_SUFFIX, SealKey, seal
from keyedge.postures.graph import PostureModule

__all__ = ["artifact_manifest", "check_sealable", "export_targets", "seal_targets"]

#: the runtimes whose versions a manifest records
VERSIONED = (
    *("timm", "onnx", "onnxruntime", "openvino", "coremltools"),
    *("litert-torch", "ai-edge-litert", "executorch", "MNN", "ncnn", "pnnx"),
)


@dataclass
class _Job:
    """What every target of one checkpoint's export shares."""

    model: nn.Module
    deploy: Deployable
    request: ExportRequest
    settings: ExportSettings
    options: ExportOptions
    staging: Path
    refs: References
    templates: dict[tuple, Any] | None
    plaintexts: dict[str, dict[str, bytes]] | None


def export_targets(
    model: nn.Module,
    deploy: Deployable,
    backends: list[ExportBackend],
    options: ExportOptions,
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
    refs = references(model, manifest, settings, options.precision)
    job = _Job(model, deploy, request, settings, options, staging, refs, templates, plaintexts)
    targets = {backend.name: _export_target(job, backend) for backend in backends}
    return artifact_manifest(job, manifest, targets, key_note)


def _export_target(job: _Job, backend: ExportBackend) -> TargetRecord:
    """One target: its module (its shuffle's form chosen under auto and fastest, :mod:`keyedge.deploy.forms`; the
    posture's in-graph part around it), exported, inspected, verified."""
    settings, options = job.settings, job.options
    deploy, form_choice = choose_form(
        job.deploy,
        backend,
        settings.fuse,
        job.request.key,
        options,
        in_memory=settings.seal is not None,
        staging=job.staging,
        log=settings.log,
    )
    posture = settings.posture
    module = PostureModule(deploy.module, posture).eval() if posture.in_graph else deploy.module
    template = None
    if job.templates is not None and backend.supports_template and not posture.in_graph:
        spec = job.model.spec
        ident = (spec.name, spec.image_size, spec.num_classes, deploy.fuse, options.batch, options.precision)
        template = backend.template_for(job.templates, ident, deploy.module, options)
    settings.log(
        f"  {backend.name}: exporting ({deploy.fuse}{', from the fleet template' if template is not None else ''}"
        f"{f', posture {posture}' if posture.in_graph else ''})"
    )
    path = job.staging / f"model{backend.suffix}"
    randomized = bool(getattr(module, "randomized", False))
    with contextlib.ExitStack() as stack:
        memory = None
        if settings.seal is not None:  # converters write through links into memory-only files
            names = [p.name for p in backend.planned_outputs(path)]
            if randomized:
                names += [p.name for p in backend.planned_outputs(path.with_name(f"twin{backend.suffix}"))]
            memory = stack.enter_context(MemoryFiles(names))
            path = memory.path(path.name)
        if template is not None:
            written = backend.export_from_template(template, deploy.module, path, options)
        else:
            written = backend.export(module, path, options, placeholders=memory is not None)
        graph, io = backend.inspect(path), backend.describe_io(path)
        check_graph(backend.name, graph, deploy.fuse, randomized=randomized)
        record = TargetRecord(
            fuse=deploy.fuse,
            files=_files(written, job.staging) if memory is None else [],
            graph=graph.to_dict(),
            io=io,
            source="fleet-template" if template is not None else "full-export",
            form_choice=form_choice,
        )
        if randomized:
            record.parity = _randomized_parity(job, backend, module, path, memory, stack)
        else:
            record.parity = _parity(job, backend, path, io)
        if memory is not None and job.plaintexts is not None:
            contents = {p.name: memory.read(p.name) for p in written}
            job.plaintexts[backend.name] = {n: d for n, d in contents.items() if d or n == path.name}
    return record


def _parity(job: _Job, backend: ExportBackend, path: Path, io: dict[str, Any]) -> Parity:
    if not job.settings.verify:
        return Parity.skip("--no-verify")
    # a sealed artifact is verified from memory, like any other
    parity = verify_target(backend, path, job.refs, job.options, io, job.model.spec.num_classes, job.settings)
    job.settings.log(f"  {backend.name}: " + parity.describe())
    return parity


def _randomized_parity(
    job: _Job,
    backend: ExportBackend,
    module: PostureModule,
    path: Path,
    memory: MemoryFiles | None,
    stack: contextlib.ExitStack,
) -> Parity:
    """A posture with in-graph noise: its sigma-0 twin exported and verified numerically (then discarded), and
    the shipped artifact's noise checked statistically (:func:`~keyedge.deploy.verification.check_noise`)."""
    if not job.settings.verify:
        return Parity.skip("--no-verify")
    twin = PostureModule(module.module, module.posture, noise=False).eval()
    if memory is not None:
        twin_path = memory.path(f"twin{backend.suffix}")
    else:  # inside the 0700 staging directory, removed before the set is renamed into place
        twin_path = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=job.staging))) / f"twin{backend.suffix}"
    backend.export(twin, twin_path, job.options, placeholders=memory is not None)
    parity = verify_target(
        backend, twin_path, job.refs, job.options, backend.describe_io(twin_path), job.model.spec.num_classes
    )
    can_run, why = backend.can_run()
    parity.noise = (
        check_noise(backend, path, module, job.refs) if can_run else {"ran": False, "reason": why, "passed": True}
    )
    job.settings.log(f"  {backend.name}: " + parity.describe())
    return parity


def _files(paths: Sequence[Path], root: Path) -> list[dict[str, str]]:
    """Every file of the artifacts (walking .mlpackage directories), with its SHA-256."""
    out = []
    for path in paths:
        members = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        out += [{"path": str(p.relative_to(root)), "sha256": sha256_file(p)} for p in members]
    return out


def artifact_manifest(
    job: _Job, manifest: CheckpointManifest, targets: dict[str, TargetRecord], key_note: str | None
) -> ArtifactManifest:
    """The set's manifest: the key's fingerprint (never the key), the model, its interface, how it was verified."""
    model, deploy, options, spec = job.model, job.deploy, job.options, job.model.spec
    checkpoint = Path(job.request.checkpoint)
    forms = {name: record.fuse for name, record in targets.items()}
    fuse, note = deploy.fuse, deploy.note
    if len(set(forms.values())) == 1:  # auto and fastest choose per target: the set's form when they agree
        fuse = next(iter(forms.values()))
    else:
        note = "; ".join(filter(None, [note, "per target: " + ", ".join(f"{t} {f}" for t, f in forms.items())]))
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
        fuse=fuse,
        fuse_requested=job.settings.fuse,
        fuse_note=note,
        precision=options.precision,
        **_interface(options, spec, fuse, job.settings.posture),
        posture=job.settings.posture.to_dict(),
        checkpoint={
            "path": str(checkpoint.resolve()),
            "manifest_sha256": sha256_file(checkpoint / CHECKPOINT_MANIFEST),
            "epoch": manifest.epoch,
            "test_accuracy": manifest.test_accuracy,
        },
        verification=job.refs.record(job.settings, options.precision),
        targets=targets,
        versions={"keyedge": __version__, "torch": torch.__version__} | {name: version_of(name) for name in VERSIONED},
    )


#: what a posture's outputs are, as the manifest's ``output.meaning`` says it
MEANINGS = {
    "scores": "logits",
    "topk": "top-k softmax probabilities, rounded; 0 elsewhere",
    "label": "one-hot top-1 label",
}


def _interface(options: ExportOptions, spec: Any, fuse: str, posture: Any) -> dict[str, dict[str, Any]]:
    """The manifest's ``input``, ``output`` and ``normalization``: what a device feeds the artifact and gets."""
    return {
        "input": {
            "name": options.input_name,
            "shape": list(options.input_shape),
            "dtype": "float32",
            "layout": "NCHW",
            "range": [0.0, 1.0],
            "channels": "RGB",
        },
        "output": {
            "name": options.output_name,
            "shape": [options.batch or -1, spec.num_classes],
            "dtype": "float32",
            "meaning": MEANINGS[posture.outputs],
        },
        "normalization": {
            "mean": list(spec.mean),
            "std": list(spec.std),
            "where": "folded into the first layer" if fuse == "fold" else "inside the graph",
        },
    }


# ---- sealing ---------------------------------------------------------------------------------------------------------


def check_sealable(backends: Sequence[ExportBackend]) -> None:
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


def seal_targets(
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
