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
embeds its key, so it is a secret at rest (DESIGN §3).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from keyedge import __version__
from keyedge.checkpoint import MANIFEST as CHECKPOINT_MANIFEST
from keyedge.checkpoint import check_key, load_checkpoint, read_manifest
from keyedge.deps import version_of
from keyedge.errors import FoldError, KeyedgeError, OutputError
from keyedge.fold import fold_model
from keyedge.keys import Key, load_key
from keyedge.models import KeyedModel

FUSE_MODES = ("gather", "fold", "conv", "auto")
#: Targets whose accelerators run no gather (CoreML's Neural Engine): ``auto`` uses ``conv`` there when not folding.
GATHERLESS_TARGETS = ("coreml",)
ARTIFACT_MANIFEST = "manifest.json"
FORMAT = "keyedge-artifacts"
VERSION = 1
FP32_ATOL = 1e-4  # times max(1, largest reference logit)
FP16_RTOL = 2e-2  # likewise


class VerificationError(KeyedgeError):
    """An exported artifact does not reproduce the PyTorch keyed model."""


class RawInputModel(nn.Module):
    """A folded backbone: it takes raw [0, 1] input, the shuffle and normalization live in its first layer."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


@dataclass
class Deployable:
    module: nn.Module
    fuse: str  # gather | fold | none (plain model)
    note: str | None = None


def deployable(model: KeyedModel, key: Key | None, fuse: str = "gather") -> Deployable:
    """The module to export: LoRA merged (and verified), the shuffle as a gather or folded."""
    from keyedge.lora import merge_lora

    if fuse not in FUSE_MODES:
        raise KeyedgeError(f"unknown fuse mode {fuse!r}", f"use {', '.join(FUSE_MODES)}")
    from keyedge.volumetric import RasterVolumizedModel, VolumizedModel

    if isinstance(model, VolumizedModel):  # no key to fuse; the patch ranking cannot change its output
        return Deployable(RasterVolumizedModel(model.eval()).eval(), "none",
                          "volumized: patches in raster order (with 1-deep kernels the ranking cannot change the "
                          "output, so it is not in the graph)")
    merged = merge_lora(model).eval()
    if fuse == "gather" or (fuse == "conv" and not merged.keyed):
        return Deployable(merged, "gather" if merged.keyed else "none")
    if fuse == "conv":
        return conv_variant(merged, key)
    # A plain model folds its normalization alone (the identity permutation), so that a folded keyed
    # model and the plain model export to the very same graph.
    fold_key = key if merged.keyed else Key.from_permutation(range(3), 1)
    assert fold_key is not None
    try:
        folded = fold_model(merged.backbone, fold_key, merged.spec.image_size, mean=merged.spec.mean,
                            std=merged.spec.std)
    except FoldError as exc:
        if fuse == "fold":
            raise
        return Deployable(merged, "gather" if merged.keyed else "none", f"auto: not folded ({exc.message})")
    return Deployable(RawInputModel(folded).eval(), "fold")


def conv_variant(merged: KeyedModel, key: Key | None) -> Deployable:
    """The keyed model with its shuffle as space-to-depth + 1x1 permutation conv + depth-to-space."""
    from keyedge.transform import BlockShuffleConv

    assert key is not None and merged.keyed
    variant = KeyedModel(merged.backbone, merged.spec, key)  # shares the backbone; only the shuffle differs
    variant.shuffle = BlockShuffleConv.from_key(key, merged.spec.image_size)
    return Deployable(variant.eval(), "conv")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(paths: Sequence[Path], root: Path) -> list[dict[str, str]]:
    """Every file of the artifacts (walking .mlpackage directories), with its SHA-256."""
    out = []
    for path in paths:
        members = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        out += [{"path": str(p.relative_to(root)), "sha256": _sha256(p)} for p in members]
    return out


def real_inputs(manifest: dict[str, Any], image_size: int, count: int = 8) -> tuple[np.ndarray | None, str]:
    """Real images for parity checks: the checkpoint's test data, else scikit-image's photos."""
    from keyedge.data import load_dataset

    data = manifest.get("data") or {}
    name, source = data.get("name"), data.get("source")
    candidates = [c for c in (name, f"{name}:{source}" if name and source else None, source) if c]
    for spec in candidates:
        try:
            dataset, info = load_dataset(str(spec), "test", image_size, limit=count, seed=0)
            return np.stack([dataset[i][0].numpy() for i in range(len(dataset))]), f"{info.name} test images"
        except KeyedgeError:
            continue
    try:
        from keyedge.data import to_model_input
        from keyedge.samples import PHOTOS, sample_photo

        photos = [to_model_input(sample_photo(name), image_size).numpy() for name in PHOTOS]
        return np.stack(photos), "scikit-image photos"
    except KeyedgeError:
        return None, "no real images available (install keyedge[samples])"


def _batches(x: np.ndarray, batch: int | None) -> list[np.ndarray]:
    if batch is None:
        return [x]
    chunks = []
    for start in range(0, len(x), batch):
        chunk = x[start:start + batch]
        if len(chunk) < batch:  # a fixed-batch artifact: pad with repeats
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
        chunks.append(chunk)
    return chunks


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
    return {"max_abs_diff": diff, "tolerance": tol, "top1_agreement": float((ref_top == got_top).mean()),
            "passed": bool(diff <= tol and not mismatched.any()), "images": int(len(reference))}


@dataclass
class ExportRequest:
    """One checkpoint (and its key) to export."""

    checkpoint: Path
    key: Key | None
    force: bool = False  # allow a key whose fingerprint differs from the checkpoint's

    def __post_init__(self) -> None:
        self.checkpoint = Path(self.checkpoint)


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
    template: bool = True  # fleet export: trace once per architecture (keyedge.fleet)
    log: Callable[[str], None] = field(default=lambda _line: None)

    def __post_init__(self) -> None:
        self.out = Path(self.out)  # a str from library callers


def artifact_name(model_name: str, fingerprint: str | None) -> str:
    return f"{model_name}-{fingerprint or 'plain'}"


def export_many(requests: Sequence[ExportRequest], settings: ExportSettings) -> list[Path]:
    """Export several checkpoints; keys sharing an architecture share one ONNX template (``keyedge.fleet``)."""
    counts: dict[str, int] = {}
    for request in requests:
        name = read_manifest(request.checkpoint)["model"]["name"]
        counts[name] = counts.get(name, 0) + 1
    templates: dict[tuple, Any] = {}
    directories = []
    for request in requests:
        name = read_manifest(request.checkpoint)["model"]["name"]
        settings.log(f"exporting {request.checkpoint} to {', '.join(settings.targets)}")
        directories.append(export_one(request, settings, templates=templates if counts[name] > 1 else None))
        settings.log(f"wrote {directories[-1]}")
    return directories


def export_one(request: ExportRequest, settings: ExportSettings, *, templates: dict[tuple, Any] | None = None) -> Path:
    """Export one checkpoint to every target; return the artifact directory.

    With a ``templates`` cache (fleet export) ONNX and OpenVINO artifacts come from
    the architecture's template when it fits (:mod:`keyedge.fleet`).
    """
    from keyedge.exporters import ExportOptions, get_backend

    manifest = read_manifest(request.checkpoint)
    note = check_key(manifest, request.key, allow_mismatch=request.force)
    model, manifest = load_checkpoint(request.checkpoint, request.key, allow_key_mismatch=request.force)
    name = (f"{model.spec.name}-volumized" if manifest.get("defense") else
            artifact_name(model.spec.name, model.key_fingerprint))
    final = settings.out / name
    if final.exists() and not settings.overwrite:
        raise OutputError(f"{final} already exists", "pass --overwrite to replace it, or choose another --out")
    backends = sorted((get_backend(t) for t in settings.targets), key=lambda b: b.name != "onnx")  # onnx first
    for backend in backends:
        ok, reason = backend.available()
        if not ok:
            raise KeyedgeError(f"cannot export to {backend.name}: {reason}")
    deploy = deployable(model, request.key, settings.fuse)
    options = ExportOptions(batch=settings.batch, precision=settings.precision, image_size=model.spec.image_size)
    settings.out.mkdir(parents=True, exist_ok=True)
    for stale in settings.out.glob(f".{name}.tmp-*"):  # left by a killed export
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=settings.out))  # 0700
    try:
        template = None
        if templates is not None and settings.template and options.precision == "fp32":
            template = _template_for(templates, model, deploy, options)
        record = _export_targets(model, deploy, backends, options, staging, manifest, request, settings, note,
                                 template)
        (staging / ARTIFACT_MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
        _commit(staging, final, settings.overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _template_for(templates: dict[tuple, Any], model: KeyedModel, deploy: Deployable, options) -> Any:
    from keyedge.fleet import OnnxTemplate, module_tensors

    spec = model.spec
    ident = (spec.name, spec.image_size, spec.num_classes, deploy.fuse, options.batch, options.precision)
    if ident not in templates:
        templates[ident] = OnnxTemplate.build(deploy.module, options)
    template = templates[ident]
    return template if template.fits(module_tensors(deploy.module)) else None


def _write_artifact(backend, deploy: Deployable, path: Path, options, template: Any, staging: Path) -> list[Path]:
    """Export one target: from the fleet template where there is one, else in full."""
    from keyedge.fleet import openvino_from_onnx

    if template is None or backend.name not in ("onnx", "openvino"):
        return backend.export(deploy.module, path, options)
    if backend.name == "onnx":
        return template.instantiate(deploy.module, path, options)
    onnx_path = staging / "model.onnx"
    if onnx_path.exists():
        return openvino_from_onnx(onnx_path, path, options)
    scratch = staging / ".template.onnx"
    try:
        template.instantiate(deploy.module, scratch, options)
        return openvino_from_onnx(scratch, path, options)
    finally:
        scratch.unlink(missing_ok=True)


def _export_targets(model: KeyedModel, deploy: Deployable, backends: list, options, staging: Path,
                    manifest: dict[str, Any], request: ExportRequest, settings: ExportSettings,
                    key_note: str | None, template: Any = None) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    size = model.spec.image_size
    random_x = torch.rand(settings.random_inputs, 3, size, size, generator=generator).numpy()
    real_x, real_source = real_inputs(manifest, size, settings.real_inputs)
    inputs = {"random": random_x} | ({"real": real_x} if real_x is not None else {})
    with torch.no_grad():
        reference = {kind: model(torch.from_numpy(x)).numpy() for kind, x in inputs.items()}
    targets: dict[str, Any] = {}
    for backend in backends:
        target_deploy = deploy
        if settings.fuse == "auto" and deploy.fuse == "gather" and backend.name in GATHERLESS_TARGETS:
            target_deploy = conv_variant(deploy.module, request.key)  # no gather reaches the accelerator
        templated = template is not None and backend.name in ("onnx", "openvino")
        settings.log(f"  {backend.name}: exporting ({target_deploy.fuse}"
                     f"{', from the fleet template' if templated else ''})")
        path = staging / f"model{backend.suffix}"
        written = _write_artifact(backend, target_deploy, path, options, template, staging)
        graph = backend.inspect(path)
        io = backend.describe_io(path)
        _check_graph(backend.name, graph, target_deploy.fuse)
        entry: dict[str, Any] = {"fuse": target_deploy.fuse, "files": _files(written, staging),
                                 "graph": graph.to_dict(), "io": io,
                                 "source": "fleet-template" if templated else "full-export"}
        if settings.verify:
            entry["parity"] = _verify(backend, path, inputs, reference, options, io, model.spec.num_classes)
            settings.log(f"  {backend.name}: " + _parity_line(entry["parity"]))
        else:
            entry["parity"] = {"skipped": "--no-verify"}
        targets[backend.name] = entry
    spec = model.spec
    return {
        "format": FORMAT,
        "version": VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fingerprint": model.key_fingerprint,
        "block_size": model.block_size,
        "key_note": key_note,
        "defense": manifest.get("defense"),  # e.g. the volumization settings; None for keyed and plain models
        "model": {"name": spec.name, "family": spec.family, "num_classes": spec.num_classes,
                  "classes": (manifest.get("data") or {}).get("classes"), "weights": spec.weights.get("kind")},
        "finetune": manifest["finetune"]["mode"],
        "lora_merged": manifest["finetune"]["mode"] == "lora",
        "fuse": deploy.fuse,
        "fuse_requested": settings.fuse,
        "fuse_note": deploy.note,
        "precision": options.precision,
        "input": {"name": options.input_name, "shape": list(options.input_shape), "dtype": "float32",
                  "layout": "NCHW", "range": [0.0, 1.0], "channels": "RGB"},
        "output": {"name": options.output_name, "shape": [options.batch or -1, spec.num_classes],
                   "dtype": "float32", "meaning": "logits"},
        "normalization": {"mean": list(spec.mean), "std": list(spec.std),
                          "where": "folded into the first layer" if deploy.fuse == "fold" else "inside the graph"},
        "checkpoint": {"path": str(Path(request.checkpoint).resolve()),
                       "manifest_sha256": _sha256(Path(request.checkpoint) / CHECKPOINT_MANIFEST),
                       "epoch": manifest.get("epoch"),
                       "test_accuracy": (manifest.get("metrics") or {}).get("test_accuracy")},
        "verification": {"inputs": {k: int(len(v)) for k, v in inputs.items()}, "real_source": real_source,
                         "seed": 0, "fp32_atol": FP32_ATOL},
        "targets": targets,
        "versions": {"keyedge": __version__, "torch": torch.__version__, "timm": version_of("timm"),
                     "onnx": version_of("onnx"), "onnxruntime": version_of("onnxruntime"),
                     "openvino": version_of("openvino"), "coremltools": version_of("coremltools")},
    }


def _check_graph(target: str, graph, fuse: str) -> None:
    expected = 1 if fuse == "gather" else 0  # fold, conv and plain models hold no gather on the input
    if graph.gathers_on_input != expected:
        raise VerificationError(f"the {target} graph has {graph.gathers_on_input} gather ops on the input, "
                                f"expected {expected} ({fuse})", "report this as a bug")
    if fuse == "gather":
        layout = [op for op in graph.input_path if op.lower() in ("transpose", "permute", "reshape")]
        if any(op.lower() in ("transpose", "permute") for op in layout) or len(layout) > 2:
            raise VerificationError(f"the {target} graph's input path is {' -> '.join(graph.input_path)}: more "
                                    "than flatten -> gather -> unflatten", "report this as a bug")


def _verify(backend, path: Path, inputs: dict[str, np.ndarray], reference: dict[str, np.ndarray], options,
            io: dict[str, Any], num_classes: int) -> dict[str, Any]:
    can_run, why = backend.can_run()
    if not can_run:
        structural = _check_io(backend.name, io, options, num_classes)
        return {"ran": False, "reason": why, "structural": structural, "passed": True}
    results = {}
    for kind, x in inputs.items():
        outputs = [backend.run(path, chunk) for chunk in _batches(x, options.batch)]
        got = np.concatenate(outputs)[: len(x)]
        results[kind] = check_parity(reference[kind], got, options.precision)
    passed = all(r["passed"] for r in results.values())
    if not passed:
        bad = next(k for k, r in results.items() if not r["passed"])
        r = results[bad]
        raise VerificationError(f"{backend.name} artifact does not reproduce the PyTorch model on {bad} inputs "
                                f"(max abs diff {r['max_abs_diff']:.2e} > {r['tolerance']:.0e} or top-1 differs, "
                                f"agreement {r['top1_agreement']:.1%})", "nothing was written; report this as a bug")
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
        raise VerificationError(f"the {target} artifact's interface is wrong: {', '.join(problems)}",
                                "report this as a bug")
    return {"inputs": io["inputs"], "outputs": io["outputs"]}


def _parity_line(parity: dict[str, Any]) -> str:
    if not parity.get("ran"):
        return f"checked structurally ({parity['reason']})"
    parts = [f"{k}: max abs diff {v['max_abs_diff']:.1e}, top-1 {v['top1_agreement']:.0%}"
             for k, v in parity.items() if isinstance(v, dict)]
    return "verified (" + "; ".join(parts) + ")"


def _commit(staging: Path, final: Path, overwrite: bool) -> None:
    if final.exists():
        if not overwrite:
            raise OutputError(f"{final} appeared while exporting", "pass --overwrite to replace it")
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.rename(final, old)
        os.rename(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, final)


# ---- many keys -------------------------------------------------------------------------------------------------------

def find_checkpoints(runs: Path) -> list[Path]:
    """Checkpoint directories under ``runs`` (itself, or its immediate subdirectories)."""
    if (runs / CHECKPOINT_MANIFEST).is_file():
        return [runs]
    found = sorted(p for p in runs.iterdir() if (p / CHECKPOINT_MANIFEST).is_file()) if runs.is_dir() else []
    if not found:
        raise KeyedgeError(f"no checkpoints (directories with {CHECKPOINT_MANIFEST}) in {runs}",
                           "give a directory made by `keyedge train`, or one holding several")
    return found


def load_keys(paths: Sequence[Path]) -> dict[str, Key]:
    """Keys by fingerprint, from key files and directories of key files (other files there are ignored)."""
    from keyedge.errors import KeyFileError

    keys: dict[str, Key] = {}
    for path in paths:
        if path.is_dir():
            for candidate in sorted(p for p in path.iterdir() if p.is_file()):
                try:
                    key = load_key(candidate)
                except KeyFileError:
                    continue
                keys[key.fingerprint] = key
        else:
            key = load_key(path)
            keys[key.fingerprint] = key
    return keys


def plan_requests(checkpoints: Sequence[Path], key_paths: Sequence[Path], *, force: bool = False) -> list[ExportRequest]:
    """Pair each checkpoint with its key by fingerprint.

    With exactly one checkpoint and one key file whose fingerprints differ, the
    export is refused unless ``force`` (the artifact would lose most of its accuracy).
    """
    keys = load_keys(key_paths)
    requests = []
    for ckpt in checkpoints:
        manifest = read_manifest(ckpt)
        recorded = (manifest.get("key") or {}).get("fingerprint")
        if recorded is None:
            requests.append(ExportRequest(ckpt, None))
        elif recorded in keys:
            requests.append(ExportRequest(ckpt, keys[recorded]))
        elif len(checkpoints) == 1 and len(keys) == 1:
            requests.append(ExportRequest(ckpt, next(iter(keys.values())), force=force))
            check_key(manifest, requests[-1].key, allow_mismatch=force)
        else:
            raise KeyedgeError(f"no key with fingerprint {recorded} (the key of {ckpt}) among the given keys",
                               "add its key file with --key-file or --keys DIR")
    return requests
