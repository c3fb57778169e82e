"""MNN target (Alibaba's mobile runtime, Android/iOS/embedded Linux): ``.mnn`` via MNN's converter from the ONNX export.

The module is exported to ONNX first (keyedge's ONNX target, the same graph and checks), then
converted by MNN's converter with ``--optimizeLevel 2`` (shape-specific optimization for the fixed
input: without it MNN spells the gather's index normalization as Shape/Rank/BinaryOp ops run on
every call).  The key's shuffle is one ``GatherV2`` (``GatherElements`` for the elements form) on
the reshaped input, the planes form ``Permute`` + ``GatherV2`` + ``DepthToSpace``, the conv form a
strided ``Convolution`` + ``DepthToSpace``, fold no gather at all.  ``fp16`` stores the weights in
half (``--fp16``: half the file; MNN computes in float32, or fp16 on ARMv8.2 at ``precision=low``).
Batch is fixed (what a device runs, and what level-2 optimization assumes).

The converter is called through MNN's C extension (``_tools.mnnconvert``), never through the
``MNN.tools.mnnconvert`` module: that wrapper uploads a conversion log to a remote server and,
where its logging package is missing, runs ``pip install`` at import.

Running here: MNN's Module API on its CPU backend, ``precision=high`` (float32 kernels, what parity
needs) unless asked otherwise.  Reading back: ``MNN.expr.load_as_list`` gives the ops in order with
their inputs, so the graph report and the key's indices (the gather's constant) come from the file.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch import nn

from keyedge.exporters.base import (
    ExportBackend,
    ExportError,
    ExportOptions,
    Runner,
    get_backend,
    register_backend,
    survives_in_child,
)
from keyedge.exporters.capture import Quiet
from keyedge.exporters.checks import check_reproduces
from keyedge.exporters.graph import GraphReport, Node, analyze, constant_signature, shuffle_prefix

#: the MNN op types that carry the key's shuffle (the data input first)
GATHERS = ("GatherV2", "GatherElements", "Gather")
#: what ``bizCode`` (the model's free-text tag) starts with; the precision follows it
BIZ_CODE = "keyedge/"
#: MNN CPU precision modes, by what keyedge asks of a runner: ``high`` keeps float32 kernels everywhere
RUN_PRECISIONS = {None: "high", "fp32": "high", "f32": "high", "fp16": "low", "f16": "low"}
#: MNN's dtype names (``MNN.expr.dtype``) -> numpy's
DTYPES = {"float": "float32", "double": "float64", "int": "int32", "int64": "int64", "uint8": "uint8", "int8": "int8"}


class MNNRunner(Runner):
    """A ``.mnn`` model in MNN's Module API on the CPU backend."""

    backend = "mnn"

    def __init__(self, path: Path, module: Any, expr: Any, shape: list[int], settings: dict[str, Any]):
        self.module, self._expr = module, expr
        super().__init__(path, shape, {**settings, "device": "CPU"})

    def infer(self, x: np.ndarray) -> Any:
        return self.module.forward(self._expr.const(x, list(x.shape), self._expr.NCHW))

    def logits(self, result: Any) -> np.ndarray:
        return np.array(result.read(), dtype=np.float32)

    def close(self) -> None:
        self.module = None


@register_backend
class MNNBackend(ExportBackend):
    """Export to an MNN model (``model.mnn``) through ONNX and run it with MNN's CPU backend."""

    name = "mnn"
    extra = "mnn"
    suffix = ".mnn"
    # keyed/plain, EfficientNet-Lite0 224, 10 interleaved rounds (keyed_latency --targets onnx,openvino,mnn,ncnn):
    # planes 1.001 [0.91-1.20], conv 1.057, gather 1.167 (ViT-Ti: gather 1.046, conv 1.051, planes 1.076)
    auto_form = "planes"
    runtime = "mnn"
    export_modules = ("onnx", "onnxscript", "MNN", "_tools")
    runtime_modules = ("MNN",)
    profile_options: ClassVar[dict[str, tuple[Any, Any]]] = {"device": (("CPU",), "CPU")}
    device_option = "device"
    precisions = ("fp32", "fp16")
    precision_refusal = (
        "keyedge does not quantize MNN models (MNN's quantizer reads an image folder and a JSON recipe)",
        "export fp32 or fp16 for MNN, or int8 for onnx/openvino/litert/executorch",
    )
    random_refusal = "MNN's converter has no RandomNormalLike"

    # ---- export ---------------------------------------------------------------------------
    def _export(self, module: nn.Module, path: Path, options: ExportOptions) -> list[Path]:
        if options.dynamic:
            raise ExportError("MNN artifacts have a fixed batch", "export with --batch 1 (what a device runs)")
        self.require("MNN")
        tools = self.require("_tools")
        with tempfile.TemporaryDirectory(prefix="keyedge-mnn-") as tmp:
            source = Path(tmp) / "model.onnx"
            get_backend("onnx").export(module, source, options.as_fp32())
            args = ["mnnconvert", "-f", "ONNX", "--modelFile", str(source), "--MNNModel", str(path)]
            args += ["--bizCode", BIZ_CODE + options.precision, "--optimizeLevel", "2"]
            if options.precision == "fp16":
                args.append("--fp16")
            if not tools.mnnconvert(args) or not path.is_file():
                raise ExportError("MNN's converter could not convert the ONNX export", "see ExportError.details")
        if options.precision == "fp32":
            with self._load(path) as runner:
                check_reproduces(module, runner, options, "the MNN model")
        return [path]

    # ---- inference ------------------------------------------------------------------------
    def devices(self) -> list[str]:
        return ["CPU"] if self.can_run()[0] else []

    def _load(self, path: Path, **settings: Any) -> Runner:
        mnn = self.require("MNN")
        _, inputs, outputs, _ = _read(self, path)  # read (in a probe child first): a broken file fails in one line
        threads = settings.get("threads")
        config = {"backend": "CPU", "precision": RUN_PRECISIONS.get(settings.get("precision"), "high")}
        if threads:
            config["numThread"] = int(threads)
        manager = mnn.nn.create_runtime_manager((config,))
        module = mnn.nn.load_module_from_file(
            str(path), [inputs[0]["name"]], [outputs[0]["name"]], runtime_manager=manager
        )
        return MNNRunner(path, module, mnn.expr, inputs[0]["shape"], settings)

    # ---- reading back ---------------------------------------------------------------------
    def _inspect(self, path: Path) -> GraphReport:
        nodes, inputs, outputs, precision = _read(self, path)
        notes = [f"MNN model, weights {precision}"]
        indices = shuffle_indices(path)
        if indices is not None:
            notes.append(f"shuffle gather indices int32, {indices.size} entries")
        return analyze(
            nodes,
            [i["name"] for i in inputs],
            [o["name"] for o in outputs],
            count=lambda n: n.type != "Const",
            notes=notes,
        )

    def _describe_io(self, path: Path) -> dict[str, Any]:
        _, inputs, outputs, precision = _read(self, path)
        return {"format": "mnn", "inputs": inputs, "outputs": outputs, "precision": precision}


def shuffle_indices(path: Path) -> np.ndarray | None:
    """The index map of the input's gather (its constant indices, read from the file), or None."""
    backend = get_backend("mnn")
    nodes, inputs, _, _ = _read(backend, path)
    for node in shuffle_prefix(nodes, [i["name"] for i in inputs], lambda n: None):
        if node.type in GATHERS and len(node.inputs) > 1:
            index = _variables(backend, path).get(node.inputs[1])
            if index is not None and index.op_type == "Const":
                return np.asarray(index.read()).reshape(-1).astype(np.int64)
    return None


def _variables(backend: MNNBackend, path: Path) -> dict[str, Any]:
    """The model's variables by name, in the file's op order (``MNN.expr.load_as_list``)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} not found", "give the .mnn of an exported MNN model")
    mnn = backend.require("MNN")
    survives_in_child(path, "MNN model", backend.name)  # MNN reads a damaged flatbuffer out of bounds
    with Quiet():
        variables = mnn.expr.load_as_list(str(path))
    if not variables:
        raise ExportError(f"cannot read {path} as an MNN model: it holds no ops", "export it again")
    return {v.name: v for v in variables}


def _read(backend: MNNBackend, path: Path) -> tuple[list[Node], list[dict], list[dict], str]:
    """The model as nodes in op order, its input and outputs (name, shape, dtype) and its weights' precision.

    Kept per file state: export verification reads a file's graph, interface and indices in turn.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} not found", "give the .mnn of an exported MNN model")
    st = path.stat()
    return _read_cached(str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _read_cached(path: str, *state: int) -> tuple[list[Node], list[dict], list[dict], str]:
    """:func:`_read`'s work, per file state (not per backend object: every caller shares it)."""
    backend = get_backend("mnn")
    values = _variables(backend, Path(path))
    nodes, consumed = [], set()
    for name, var in values.items():
        kind = var.op_type
        sources = [v.name for v in var.inputs] if kind not in ("Input", "Const") else []
        consumed.update(sources)
        attrs = ""
        if kind == "Const":
            shape = [int(d) for d in var.shape]
            dtype = str(var.dtype).rsplit(".", 1)[-1]
            small = np.asarray(var.read()) if int(np.prod(shape or [1])) <= 16 else None
            attrs = constant_signature(small, shape, DTYPES.get(dtype, dtype))
        nodes.append(Node(kind, sources, [name], attrs, name=name))

    def port(name: str) -> dict[str, Any]:
        return {"name": name, "shape": [int(d) for d in values[name].shape], "dtype": "float32"}

    inputs = [port(n.outputs[0]) for n in nodes if n.type == "Input"]
    outputs = [port(n.outputs[0]) for n in nodes if n.type not in ("Input", "Const") and n.outputs[0] not in consumed]
    if len(inputs) != 1 or len(outputs) != 1:
        raise ExportError(
            f"{path} has {len(inputs)} inputs and {len(outputs)} outputs, not one image and one logits tensor",
            "export it with keyedge",
        )
    with Quiet():
        code = str(backend.require("MNN").nn.load_module_from_file(path, [], []).get_info().get("bizCode", ""))
    precision = code[len(BIZ_CODE) :] if code.startswith(BIZ_CODE) else "fp32"  # a model keyedge did not write
    return nodes, inputs, outputs, precision
