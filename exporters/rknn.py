"""RKNN target (Rockchip NPUs: RK3588, RK3576, RK3568...): ``.rknn`` via rknn-toolkit2 2.5.0 from the ONNX export.

rknn-toolkit2 pins numpy<=1.26.4, onnx<=1.18, protobuf<=4.25 and torch<=2.4: it cannot live in keyedge's
environment.  It runs in its own virtualenv (``make rknn-env`` -> ``.venv-rknn``; the interpreter is
``$KEYEDGE_RKNN_PYTHON``, else ``.venv-rknn/bin/python`` in the keyedge checkout, else in the current directory)
as a converter process, ``exporters/rknn_worker.py``, which imports the standard library, numpy and
``rknn.api`` only.  The module is exported to ONNX first (keyedge's ONNX target, its graph and checks), then
the worker loads it, builds it for ``rk3588`` (``mean 0 / std 1``: the [0, 1] float image reaches the graph
unchanged), exports the ``.rknn`` and runs probe inputs through the toolkit's x86 simulator.

Forms: an NPU has no gather (the toolkit would put it on the board's CPU), so the key's shuffle is its conv
form, a stride-P 0/1 ``Conv`` + ``DepthToSpace`` (``--fuse auto`` and ``fastest`` pick it, an explicit
gather/elements/planes is refused in one line), or folded away where exact.  Batch is fixed.

Precisions: ``fp16`` (RKNN's float build: the NPU computes in float16) and ``int8`` (``w8a8`` post-training
quantization, calibrated on ``options.calibration``).  ``fp32`` is refused, not mapped: an artifact labelled
fp32 that computes in fp16 would carry the wrong tolerance into every parity check made of it.

What is checked here, at export time, in the simulator (it runs the model just built; it cannot load a
``.rknn`` file, which runs only on a board, with rknn-toolkit-lite2 or the C runtime): the logits against
the PyTorch module on probe inputs (the trace example, zeros, ones, a random batch; and up to four of
``options.calibration`` as real images): fp16 within keyedge's fp16 tolerance
(:func:`keyedge.deploy.parity.check_parity`, or the export is refused), int8 by top-1 agreement (recorded,
not refused: a handful of images is no accuracy test).  The key's permutation is checked bit for bit: the
graph up to the shuffle's ``DepthToSpace`` is built in float16 and run on images whose pixel values spell
their own index in base 64 (integers below 64, exact in float16); the decoded permutation must equal the
module's shuffle.  The figures are kept as :attr:`RKNNBackend.report`.

Reading back: the ``.rknn`` is Rockchip's compiled flatbuffer with no published schema; the op list inside
cannot be read without the toolkit (whose reader is compiled).  What the file gives, and what
:meth:`~RKNNBackend.inspect` / :meth:`~RKNNBackend.describe_io` return from it: its interface (the
toolkit's embedded table: input/output names, shapes, dtypes, mean/std, quantization) and keyedge's note
in the file's ``custom_string`` (precision, platform, and the *source ONNX graph's* op counts, input path and
structure digest, plus the verified permutation's SHA-256).  The graph report is therefore the ONNX
graph the ``.rknn`` was compiled from, and its notes say so.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from keyedge.errors import DependencyError
from keyedge.exporters.base import (
    ExportBackend,
    ExportError,
    ExportOptions,
    Runner,
    get_backend,
    register_backend,
)
from keyedge.exporters.checks import calibration_batches, probe_inputs
from keyedge.exporters.graph import GraphReport

#: the setting naming the rknn-toolkit2 environment's interpreter
ENV_VAR = "KEYEDGE_RKNN_PYTHON"
VENV = ".venv-rknn"
WORKER = Path(__file__).with_name("rknn_worker.py")
#: the keyedge checkout (``keyedge.exporters`` is this directory, installed editable): its ``.venv-rknn`` first
CHECKOUT = Path(__file__).resolve().parent.parent
PLATFORM = "rk3588"
#: what keyedge's note in the file's ``custom_string`` starts with (the toolkit caps the string below 1024 bytes)
NOTE = "keyedge:"
RUNS_ON = "runs on a Rockchip NPU board (rknn-toolkit-lite2); here only the simulator at export time"
#: base of the digit images that spell each pixel's index (values below 64: exact in float16)
DIGIT_BASE = 64
#: seconds a conversion may take (a 224 px EfficientNet-Lite0 int8 build takes well under a minute)
TIMEOUT_S = 900


def rknn_python() -> tuple[Path | None, str]:
    """The rknn-toolkit2 environment's interpreter, or None and why it was not found (one line)."""
    configured = os.environ.get(ENV_VAR)
    if configured:
        path = Path(configured).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return path, f"{ENV_VAR}={path}"
        return None, f"{ENV_VAR}={configured} is not an executable interpreter"
    places = [CHECKOUT / VENV / "bin" / "python", Path.cwd() / VENV / "bin" / "python"]
    for place in places:
        if place.is_file() and os.access(place, os.X_OK):
            return place, str(place)
    where = " or ".join(dict.fromkeys(str(p.parent.parent.parent) for p in places))
    return None, f"the rknn-toolkit2 environment is missing (no {VENV} in {where}, and {ENV_VAR} is not set)"


_CHECKED: dict[tuple[str, int], tuple[bool, str]] = {}


def _toolkit() -> tuple[bool, str]:
    """Whether the environment's toolkit imports (asked once per interpreter and its modification time)."""
    python, where = rknn_python()
    if python is None:
        return False, where
    key = (str(python), python.stat().st_mtime_ns)
    if key not in _CHECKED:
        try:
            result = _call(python, {"check": True}, timeout=120)
            _CHECKED[key] = (True, f"rknn-toolkit2 {result.get('toolkit')} in {python.parent.parent}")
        except ExportError as exc:
            _CHECKED[key] = (
                False,
                f"the rknn-toolkit2 environment {python.parent.parent} does not work ({exc.message})",
            )
    return _CHECKED[key]


def _call(python: Path, job: dict[str, Any], *, timeout: float = TIMEOUT_S) -> dict[str, Any]:
    """Run the worker on ``job``; its one-line JSON result, or a one-line :class:`ExportError`."""
    try:
        done = subprocess.run(
            [str(python), "-I", str(WORKER)],
            input=json.dumps(job),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ExportError(f"rknn-toolkit2 took over {timeout:.0f} s", "export a smaller model or at fp16") from None
    except OSError as exc:
        raise ExportError(f"cannot start {python}: {exc.strerror or exc}", "run `make rknn-env` again") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    try:
        result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise ExportError(f"the rknn worker gave no result ({tail[0]})", "run `make rknn-env` again") from None
    if not result.get("ok"):
        details = "\n".join(result.get("details") or [])
        raise ExportError(f"rknn-toolkit2 failed ({result.get('error')})", "see ExportError.details", details=details)
    return result


@register_backend
class RKNNBackend(ExportBackend):
    """Export to a Rockchip NPU model (``model.rknn``) through ONNX with rknn-toolkit2 in its own environment."""

    name = "rknn"
    extra = "rknn"
    suffix = ".rknn"
    runtime = "rknn"
    export_modules = ("onnx", "onnxscript")  # keyedge's ONNX export; the toolkit itself lives in .venv-rknn
    runtime_modules = ()
    forms = ("conv",)
    # no gather on an NPU: the conv form is the one exact form it runs (fold is taken first where exact)
    auto_form = "conv"
    precisions = ("fp16", "int8")
    precision_refusal = (
        "Rockchip NPUs compute in float16 or int8 (RKNN's float build is float16)",
        "export --precision fp16, or int8 with calibration images, for rknn",
    )
    random_refusal = "RKNN has no random op"

    def __init__(self) -> None:
        #: the last export's simulator figures: parity per probe set, the permutation check, seconds, versions
        self.report: dict[str, Any] = {}

    # ---- capability -----------------------------------------------------------------------
    def available(self) -> tuple[bool, str]:
        ok, reason = super().available()
        if not ok:
            return ok, reason
        return _toolkit()

    def can_run(
        self, *, device: str | None = None, providers: Any = None, compute_units: str | None = None
    ) -> tuple[bool, str]:
        return False, RUNS_ON

    # ---- export ---------------------------------------------------------------------------
    def _export(self, module: nn.Module, path: Path, options: ExportOptions) -> list[Path]:
        if options.dynamic:
            raise ExportError("RKNN models have a fixed input shape", "export with --batch 1 (what a board runs)")
        python, where = rknn_python()
        if python is None:
            raise DependencyError(f"cannot export to rknn: {where}", "make rknn-env")
        self.report = {}
        onnx = get_backend("onnx")
        with tempfile.TemporaryDirectory(prefix="keyedge-rknn-") as tmp:
            work = Path(tmp)
            source = work / "model.onnx"
            onnx.export(module, source, options.as_fp32())
            graph = onnx.inspect(source)
            if graph.gathers_on_input:
                raise ExportError(
                    "Rockchip NPUs have no gather op, so the key's gather/elements/planes form cannot be written",
                    "export rknn with --fuse conv (or auto / fastest, which choose it; fold where exact)",
                )
            shuffle_output = _shuffle_output(source)
            digits = _digit_images(options) if shuffle_output and hasattr(module, "shuffle") else []
            with torch.no_grad():
                expected = [module.shuffle(torch.from_numpy(d)).numpy() for d in digits]
            permutation = permutation_sha256(_decode(expected)) if digits else None
            probes = _probes(module, options)
            probe_files = _save(work, "probe", [x for _, x in probes])
            job: dict[str, Any] = {
                "onnx": str(source),
                "output": str(path),
                "log": str(work / "toolkit.log"),
                "target_platform": PLATFORM,
                "precision": options.precision,
                "probes": probe_files,
                "probe_dir": str(work),
                "custom_string": _note(options, graph, permutation),
            }
            if options.precision == "int8":
                job["dataset"] = _save(work, "calibration", calibration_batches(options))
            if digits:
                job["shuffle_output"] = shuffle_output
                job["shuffle_probes"] = _save(work, "digits", digits)
            try:
                result = _call(python, job)
            except ExportError as exc:
                log = work / "toolkit.log"
                exc.details = "\n".join(
                    filter(None, [exc.details, log.read_text(errors="replace") if log.is_file() else ""])
                )
                raise
            outputs = [np.load(p) for p in result["outputs"]]
            self.report = {
                "toolkit": result.get("toolkit"),
                "target_platform": PLATFORM,
                "precision": options.precision,
                "seconds": result.get("seconds"),
                "parity": _parity(module, probes, outputs, options.precision),
            }
            if digits:
                self.report["shuffle"] = _check_shuffle(expected, [np.load(p) for p in result["shuffled"]])
        return [path]

    # ---- inference ------------------------------------------------------------------------
    def _load(self, path: Path, **settings: Any) -> Runner:
        raise ExportError(f"cannot run {path.name} here: a .rknn file {RUNS_ON}", "run it on the board")

    # ---- reading back ---------------------------------------------------------------------
    def _inspect(self, path: Path) -> GraphReport:
        _, note, info = _read(path)
        source = note.get("source") or {}
        notes = [
            f"RKNN model for {info.get('platform', 'unknown')}, {note.get('precision', 'unknown')} "
            f"(rknn-toolkit2 {info.get('toolkit', 'unknown')}); the .rknn's compiled graph has no public schema: "
            "ops, input path and structure below are the source ONNX graph's, recorded by keyedge at export"
        ]
        if note.get("shuffle_sha256"):
            notes.append(f"key's permutation checked exact in the simulator at export, sha256 {note['shuffle_sha256']}")
        gathers = int(source.get("gathers_on_input", 0))
        notes.append(
            f"{gathers} gather-like op(s) on the input" + (" (plain, folded or conv form)" if not gathers else "")
        )
        return GraphReport(
            ops=dict(source.get("ops") or {}),
            gathers_on_input=gathers,
            notes=notes,
            input_path=list(source.get("input_path") or []),
            structure=str(source.get("structure") or ""),
        )

    def _describe_io(self, path: Path) -> dict[str, Any]:
        table, note, info = _read(path)
        attrs = table.get("attrs") or {}

        def ports(output: bool) -> list[dict[str, Any]]:
            found = sorted((a.get("idx", 0), n, a) for n, a in attrs.items() if bool(a.get("is_output")) == output)
            return [{"name": n, "shape": [int(d) for d in a.get("shape", [])], "dtype": "float32"} for _, n, a in found]

        inputs, outputs = ports(False), ports(True)
        if len(inputs) != 1 or len(outputs) != 1:
            raise ExportError(f"{path} has {len(inputs)} inputs and {len(outputs)} outputs", "export it with keyedge")
        precision = note.get("precision") or _precision_of(table)
        return {
            "format": "rknn",
            "inputs": inputs,
            "outputs": outputs,
            "precision": precision,
            "target_platform": info.get("platform"),
        }


# ---- export helpers -------------------------------------------------------------------------


def _shuffle_output(source: Path) -> str | None:
    """The conv form's shuffled image in the ONNX graph: the output of the DepthToSpace fed by a Conv on the input."""
    import onnx

    model = onnx.load(str(source), load_external_data=False)
    image = model.graph.input[0].name
    conv = next((n for n in model.graph.node if n.op_type == "Conv" and n.input and n.input[0] == image), None)
    if conv is None:
        return None
    d2s = next((n for n in model.graph.node if n.op_type == "DepthToSpace" and n.input[0] == conv.output[0]), None)
    return d2s.output[0] if d2s is not None else None


def _probes(module: nn.Module, options: ExportOptions) -> list[tuple[str, np.ndarray]]:
    """Random probes (the trace example, zeros, ones, random) and up to 4 real images (the calibration set)."""
    probes = probe_inputs(options)
    batch = options.batch or 1
    if options.calibration is not None:
        real = np.ascontiguousarray(options.calibration[:4], dtype=np.float32)
        probes += [(f"real-{i}", real[i : i + batch]) for i in range(0, len(real) - batch + 1, batch)]
    return probes


def _save(work: Path, stem: str, arrays: list[np.ndarray]) -> list[str]:
    paths = []
    for i, array in enumerate(arrays):
        path = work / f"{stem}-{i}.npy"
        np.save(path, np.ascontiguousarray(array, dtype=np.float32))
        paths.append(str(path))
    return paths


def _digit_images(options: ExportOptions) -> list[np.ndarray]:
    """Images whose pixels spell their flat index in base 64, one digit per image (all in float16 exactly)."""
    size = 3 * options.image_size * options.image_size
    count = max(1, math.ceil(math.log(size, DIGIT_BASE)))
    index = np.arange(size).reshape(1, 3, options.image_size, options.image_size)
    batch = options.batch or 1
    return [np.repeat((index // DIGIT_BASE**d) % DIGIT_BASE, batch, axis=0).astype(np.float32) for d in range(count)]


def _decode(images: list[np.ndarray]) -> np.ndarray:
    return sum(np.rint(img[0]).astype(np.int64) * DIGIT_BASE**d for d, img in enumerate(images)).reshape(-1)


def _check_shuffle(want: list[np.ndarray], got: list[np.ndarray]) -> dict[str, Any]:
    """The permutation the simulator's build applies vs the module's shuffle (``want``): equal, element for element."""
    shapes = len(got) == len(want) and all(g.shape == w.shape for g, w in zip(got, want))
    if not (shapes and all(np.array_equal(g, w) for g, w in zip(got, want))):
        raise ExportError(
            "the RKNN build does not move the input's pixels as the key does (simulator, float16 prefix)",
            "report this as a bug; export another target",
        )
    permutation = _decode(got)
    return {"exact": True, "pixels": int(permutation.size), "sha256": permutation_sha256(permutation)}


def permutation_sha256(permutation: np.ndarray) -> str:
    """SHA-256 of a flat permutation as little-endian int64 (how the file's note records the verified one)."""
    return hashlib.sha256(np.asarray(permutation, dtype="<i8").tobytes()).hexdigest()


def _parity(
    module: nn.Module, probes: list[tuple[str, np.ndarray]], outputs: list[np.ndarray], precision: str
) -> dict[str, Any]:
    """The simulator's logits vs the module's: fp16 by keyedge's tolerance (refused past it), int8 by top-1."""
    from keyedge.deploy.parity import check_parity

    with torch.no_grad():
        reference = [module(torch.from_numpy(x)).float().numpy() for _, x in probes]
    figures: dict[str, Any] = {}
    for kind in ("random", "real"):
        picked = [i for i, (name, _) in enumerate(probes) if name.startswith("real") == (kind == "real")]
        if not picked:
            continue
        ref = np.concatenate([reference[i] for i in picked])
        got = np.concatenate([outputs[i].reshape(reference[i].shape) for i in picked])
        if not np.isfinite(got).all():
            raise ExportError(f"the RKNN build gives non-finite logits on the {kind} probes", "export at fp16")
        if precision == "fp16":
            check = check_parity(ref, got, "fp16")
            figures[kind] = check.to_dict()
            if not check.passed:
                raise ExportError(
                    f"the RKNN fp16 build does not reproduce the model on {kind} probes "
                    f"(max abs diff {check.max_abs_diff:.2e} > {check.tolerance:.2e})",
                    "an op was mistranslated or overflows float16; export another target",
                )
        else:
            figures[kind] = {
                "images": len(ref),
                "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
                "max_abs_diff": float(np.abs(ref - got).max()),
            }
    return figures


def _note(options: ExportOptions, graph: GraphReport, permutation: str | None) -> str:
    """keyedge's note for the file's ``custom_string`` (under 1024 bytes): the source graph's summary."""
    source = {
        "ops": graph.ops,
        "gathers_on_input": graph.gathers_on_input,
        "input_path": graph.input_path[:8],
        "structure": graph.structure,
    }
    note: dict[str, Any] = {"precision": options.precision, "platform": PLATFORM, "source": source}
    if permutation:  # the export fails unless the simulator's build applies exactly this permutation
        note["shuffle_sha256"] = permutation
    text = NOTE + json.dumps(note, separators=(",", ":"))
    if len(text) >= 1000:  # a very varied graph: its op counts go first
        note["source"] = {k: v for k, v in source.items() if k != "ops"}
        text = NOTE + json.dumps(note, separators=(",", ":"))
    return text


# ---- reading the file ------------------------------------------------------------------------

_TABLE = re.compile(rb"\{'attrs': \{.*?'dynamic_shapes': \{.*?\}\}", re.S)
_NOTE = re.compile(re.escape(NOTE.encode()) + rb"(\{[\x20-\x7e]*\})")
_VERSION = re.compile(rb"(\d+\.\d+\.\d+)\(compiler version: ")
_PLATFORMS = ("rk3588", "rk3576", "rk3568", "rk3566", "rk3562", "rv1103", "rv1106", "rv1126b", "rk2118")


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """The toolkit's interface table, keyedge's note and the file's platform/toolkit version."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} not found", "give the .rknn of an exported RKNN model")
    data = path.read_bytes()
    if not data.startswith(b"RKNN"):
        raise ExportError(f"{path} is not an RKNN model (no RKNN header)", "export it again")
    match = _TABLE.search(data)
    if match is None:
        raise ExportError(f"{path} holds no interface table", "export it again with rknn-toolkit2 2.5")
    table = ast.literal_eval(match.group(0).decode("ascii", errors="strict"))
    found = _NOTE.search(data)
    note = json.loads(found.group(1)) if found else {}
    version = _VERSION.search(data)
    head = data[: match.start()]
    platform = next((p for p in _PLATFORMS if p.encode() in head), note.get("platform"))
    return table, note, {"toolkit": version.group(1).decode() if version else None, "platform": platform}


def _precision_of(table: dict[str, Any]) -> str:
    """A file keyedge did not write: int8 when its outputs carry asymmetric quantization, else fp16."""
    quant = table.get("quant_tab") or {}
    return "int8" if any(q.get("qtype") for q in quant.values()) else "fp16"


__all__ = ["ENV_VAR", "RKNNBackend", "permutation_sha256", "rknn_python"]
