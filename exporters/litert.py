"""LiteRT target (TensorFlow Lite's successor, Android's default runtime): ``.tflite`` via ``litert-torch``.

``litert_torch.convert`` exports the module with ``torch.export`` and lowers it to a
TFLite flatbuffer; the module is wrapped so that the signature's input and output carry
the requested names (``serving_default`` signature, ``image`` -> ``logits``), after
:func:`~keyedge.exporters.graph.static_graph` and :func:`index_gathers`.  The key's
shuffle becomes one ``GATHER_ND`` with int32 indices (TFLite kernels and the GPU delegate
take int32 indices; the XNNPACK CPU delegate takes no gather, so the shuffle runs on
LiteRT's builtin kernel and everything after it on XNNPACK), the conv form a 1x1
``CONV_2D`` between reshape/transpose pixel moves, fold no gather at all.  LiteRT's graph is
NHWC inside: the converter puts one ``TRANSPOSE`` after normalization, not on the shuffle.

Batch is fixed (the phone runs batch 1).  Precisions, each from the fp32 flatbuffer by ai-edge-quantizer,
the shuffle's ops always left in float32 so that the key's pixels move exactly:

- ``fp16``: float16 weights with ``DEQUANTIZE`` ops (TFLite's float16 quantization: half the file; the GPU
  delegate computes in half, the CPU in float32);
- ``int8``: full-integer static quantization (``static_wi8_ai8``: int8 weights and activations, float I/O),
  calibrated on ``ExportOptions.calibration``;
- ``dynamic-int8``: int8 weights, activations quantized per call (``dynamic_wi8_afp32``; no calibration,
  the mode LiteRT recommends for transformers).

Running here: ``ai_edge_litert.interpreter.Interpreter`` with its default XNNPACK delegate
(the CPU path of a phone); on-phone GPU/NPU delegates are not available on this host.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from keyedge.exporters.base import (
    ExportBackend,
    ExportError,
    ExportOptions,
    Runner,
    register_backend,
    survives_in_child,
)
from keyedge.exporters.capture import one_line
from keyedge.exporters.checks import calibration_batches, check_reproduces
from keyedge.exporters.graph import GraphReport, Node, analyze, constant_signature, shuffle_prefix, static_graph

SIGNATURE = "serving_default"
#: the ops that carry the key's shuffle in a .tflite graph (the data input first)
GATHERS = ("GATHER_ND", "GATHER")


class Named(nn.Module):
    """``module`` behind a keyword input and a dict output: LiteRT names the signature's tensors after them."""

    def __init__(self, module: nn.Module, input_name: str, output_name: str):
        super().__init__()
        self.module, self.input_name, self.output_name = module, input_name, output_name

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.output_name: self.module(inputs[self.input_name])}


class LiteRTRunner(Runner):
    """A ``.tflite`` model in LiteRT's interpreter, XNNPACK delegate on (as on a phone's CPU path)."""

    backend = "litert"

    def __init__(self, path: Path, interpreter: Any, settings: dict[str, Any]):
        self.interpreter = interpreter
        interpreter.allocate_tensors()
        (inp,), outputs = interpreter.get_input_details(), interpreter.get_output_details()
        self._input, self._output = inp["index"], outputs[0]["index"]
        super().__init__(path, [int(d) for d in inp["shape"]], {**settings, "device": "CPU", "delegate": "XNNPACK"})

    def infer(self, x: np.ndarray) -> Any:
        self.interpreter.set_tensor(self._input, x)
        self.interpreter.invoke()
        return None

    def logits(self, result: Any) -> np.ndarray:
        return self.interpreter.get_tensor(self._output)

    def close(self) -> None:
        self.interpreter = None


@register_backend
class LiteRTBackend(ExportBackend):
    """Export to a LiteRT flatbuffer (``model.tflite``) and run it with LiteRT's interpreter."""

    name = "litert"
    extra = "litert"
    suffix = ".tflite"
    # keyed/plain, EfficientNet-Lite0 224, 14 interleaved rounds (keyed_latency --variants ...): planes 1.017
    # [0.931-1.043], conv 1.023, gather 1.063, elements 1.120 (GATHER_ND copies element by element; XNNPACK runs
    # the planes form's transposes, its gather copies 48 planes)
    auto_form = "planes"
    runtime = "litert"
    random_refusal = "litert-torch has no lowering for randn_like (LiteRT's random ops are not in its builtin set)"
    export_modules = ("litert_torch",)
    runtime_modules = ("ai_edge_litert.interpreter",)
    profile_options: ClassVar[dict[str, tuple[Any, Any]]] = {"device": (("CPU", "GPU", "NPU"), "CPU")}
    device_option = "device"
    precisions = ("fp32", "fp16", "int8", "dynamic-int8")

    # ---- export ---------------------------------------------------------------------------
    def _export(self, module: nn.Module, path: Path, options: ExportOptions) -> list[Path]:
        if options.dynamic:
            raise ExportError("LiteRT artifacts have a fixed batch", "export with --batch 1 (what a phone runs)")
        litert_torch = self.require("litert_torch")
        example = options.example_input()
        graph = static_graph(module, example)
        index_gathers(graph.graph_module)
        named = Named(graph, options.input_name, options.output_name).eval()
        converted = litert_torch.convert(named, sample_kwargs={options.input_name: example})
        content = converted.model_content
        flatbuffer = bytes(content() if callable(content) else content)
        check_reproduces(module, _bytes_runner(self, flatbuffer), options, "the LiteRT model")
        if options.precision != "fp32":
            flatbuffer = self._quantize(flatbuffer, options)
        path.write_bytes(flatbuffer)
        return [path]

    def _quantize(self, flatbuffer: bytes, options: ExportOptions) -> bytes:
        """ai-edge-quantizer at ``options.precision`` (the module docstring says how), the shuffle left in float32."""
        from ai_edge_quantizer import qtyping, quantizer, recipe, recipe_manager

        with tempfile.TemporaryDirectory(prefix="keyedge-litert-") as tmp:
            source = Path(tmp) / "fp32.tflite"
            source.write_bytes(flatbuffer)
            nodes, interpreter = _read_nodes(self, source)
            shuffle = shuffle_prefix(nodes, _inputs(interpreter), lambda n: _weight(interpreter, n))
            q = quantizer.Quantizer(str(source))
            if options.precision == "fp16":
                manager = recipe_manager.RecipeManager()
                every = qtyping.TFLOperationName.ALL_SUPPORTED
                manager.add_weight_only_config(".*", every, 16, algorithm_key=recipe.AlgorithmName.FLOAT_CASTING)
                q.load_quantization_recipe(manager.get_quantization_recipe())
            else:
                static = options.precision == "int8"
                q.load_quantization_recipe(recipe.static_wi8_ai8() if static else recipe.dynamic_wi8_afp32())
            float32 = [(re.escape(node.name), qtyping.TFLOperationName.ALL_SUPPORTED) for node in shuffle]
            float32 += [(".*", qtyping.TFLOperationName.INPUT), (".*", qtyping.TFLOperationName.OUTPUT)]
            for regex, operation in float32:  # the shuffle's ops (by output tensor name) and the I/O stay float32
                q.update_quantization_recipe(regex=regex, operation_name=operation, algorithm_key="no_quantize")
            if options.precision != "int8":
                return bytes(q.quantize().quantized_model)
            data = [{options.input_name: batch} for batch in calibration_batches(options)]
            calibration = q.calibrate({SIGNATURE: data})
            return bytes(q.quantize(calibration).quantized_model)

    # ---- inference ------------------------------------------------------------------------
    def can_run(
        self, *, device: str | None = None, providers: Sequence[str] | None = None, compute_units: str | None = None
    ) -> tuple[bool, str]:
        ok, reason = super().can_run()
        if ok and device not in (None, "CPU"):
            return False, (
                f"LiteRT's {device} delegate runs on the phone only (time it there: benchmark_model "
                f"--graph=model.tflite {'--use_gpu=true' if device == 'GPU' else '--use_nnapi=true'})"
            )
        return ok, reason

    def devices(self) -> list[str]:
        return ["CPU"] if self.can_run()[0] else []

    def _load(self, path: Path, **settings: Any) -> Runner:
        interpreter = _interpreter(self, path, settings.get("threads"))
        return LiteRTRunner(path, interpreter, settings)

    # ---- reading back ---------------------------------------------------------------------
    def _inspect(self, path: Path) -> GraphReport:
        nodes, interpreter = _read_nodes(self, path)
        shuffle = _gather_indices(nodes, interpreter)
        notes = [f"signature {', '.join(interpreter.get_signature_list()) or 'none'}; {_quantized(interpreter)}"]
        if shuffle is not None:
            notes.append(f"shuffle gather indices int32, {shuffle.size} entries")
        outputs = [str(d["index"]) for d in interpreter.get_output_details()]
        return analyze(nodes, _inputs(interpreter), outputs, notes=notes)

    def _describe_io(self, path: Path) -> dict[str, Any]:
        interpreter = _interpreter(self, path)
        signature = interpreter.get_signature_list().get(SIGNATURE, {})

        def port(detail: dict[str, Any], name: str) -> dict[str, Any]:
            return {"name": name, "shape": [int(d) for d in detail["shape"]], "dtype": np.dtype(detail["dtype"]).name}

        (inp,), outputs = interpreter.get_input_details(), interpreter.get_output_details()
        return {
            "format": "litert",
            "inputs": [port(inp, (signature.get("inputs") or [inp["name"]])[0])],
            "outputs": [port(o, n) for o, n in zip(outputs, signature.get("outputs") or [o["name"] for o in outputs])],
            "precision": _precision(interpreter),
        }


def index_gathers(graph_module: torch.fx.GraphModule) -> int:
    """Rewrite ``aten.index_select`` as ``aten.index.Tensor`` (the same gather); return how many were rewritten.

    litert-torch lowers ``index_select`` with an in-bounds mask (``REDUCE_ALL`` + ``SELECT_V2`` over every
    output element) that its constant folding leaves in the graph past some size -- seen at 224x224, not at
    32x32; ``index.Tensor`` lowers to the bare ``GATHER_ND``, so the file holds exactly the one gather the
    graph check promises (measured: keyed/plain 1.18 with the mask, 1.16 without on EfficientNet-Lite0).
    """
    graph, count = graph_module.graph, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.index_select.default:
            continue
        data, dim, index = node.args
        rank = data.meta["val"].dim() if "val" in data.meta else 2
        with graph.inserting_after(node):
            gather = graph.call_function(torch.ops.aten.index.Tensor, (data, [None] * (dim % rank) + [index]))
        gather.meta = dict(node.meta)
        node.replace_all_uses_with(gather)
        graph.erase_node(node)
        count += 1
    graph_module.recompile()
    return count


def shuffle_indices(path: Path) -> np.ndarray | None:
    """The flat source index of every output element of the input's gather (the key's index map), or None."""
    return _gather_indices(*_read_nodes(LiteRTBackend(), path))


def _gather_indices(nodes: list[Node], interpreter: Any) -> np.ndarray | None:
    details = {str(t["index"]): t for t in interpreter.get_tensor_details()}
    for node in shuffle_prefix(nodes, _inputs(interpreter), lambda n: None):
        if node.type in GATHERS:
            index = np.asarray(interpreter.get_tensor(details[node.inputs[1]]["index"]))
            if node.type == "GATHER_ND" and index.ndim >= 2 and index.shape[-1] > 1:  # (batch, element) pairs
                index = index[..., -1]  # the elements form: the batch coordinate is each row's own
            return index.reshape(-1).astype(np.int64)
    return None


def _interpreter(backend: LiteRTBackend, path: Path, threads: int | None = None, *, delegate: bool = True) -> Any:
    """LiteRT's interpreter on ``path``: with its default XNNPACK delegate (to run), or without (to read its ops)."""
    interpreter_module = backend.require("ai_edge_litert.interpreter")
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} not found", "give the .tflite of an exported LiteRT model")
    resolver = interpreter_module.OpResolverType

    def open_it() -> Any:
        interpreter = interpreter_module.Interpreter(
            model_path=str(path),
            num_threads=threads,
            experimental_op_resolver_type=resolver.AUTO if delegate else resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
        interpreter.allocate_tensors()
        return interpreter

    survives_in_child(path, "LiteRT model", backend.name)  # refuse what would abort this process
    try:
        interpreter = open_it()
    except Exception as exc:
        raise ExportError(f"cannot read {path} as a LiteRT model: {one_line(exc)}") from None
    return interpreter


def _bytes_runner(backend: LiteRTBackend, flatbuffer: bytes):
    """Run a flatbuffer held in memory (the export's own parity probe, before anything is written)."""
    interpreter = backend.require("ai_edge_litert.interpreter").Interpreter(model_content=flatbuffer)
    runner = LiteRTRunner(Path("<converted>"), interpreter, {})
    return runner


def _inputs(interpreter: Any) -> list[str]:
    return [str(d["index"]) for d in interpreter.get_input_details()]


def _read_nodes(backend: LiteRTBackend, path: Path) -> tuple[list[Node], Any]:
    """The .tflite graph as format-neutral nodes, in execution order (constants described, not valued)."""
    interpreter = _interpreter(backend, path, delegate=False)
    details = {t["index"]: t for t in interpreter.get_tensor_details()}
    variable = {d["index"] for d in interpreter.get_input_details()}
    nodes = []
    for op in interpreter._get_ops_details():
        inputs = [int(i) for i in op["inputs"] if i >= 0]
        produced = {o for n in nodes for o in n.outputs}
        signature = []
        for i in inputs:
            t = details.get(i)
            if t is not None and str(i) not in produced and i not in variable:
                signature.append(constant_signature(None, [int(d) for d in t["shape"]], np.dtype(t["dtype"]).name))
        nodes.append(
            Node(
                op["op_name"],
                [str(i) for i in inputs],
                [str(int(o)) for o in op["outputs"]],
                ";".join(signature),
                name=details[int(op["outputs"][0])]["name"] if len(op["outputs"]) else "",
            )
        )
    return nodes, interpreter


def _weight(interpreter: Any, node: Node) -> np.ndarray | None:
    """A conv's weight in OIHW (LiteRT stores OHWI), for the permutation check; None when not constant."""
    if node.type != "CONV_2D" or len(node.inputs) < 2:
        return None
    try:
        weight = np.asarray(interpreter.get_tensor(int(node.inputs[1])))
    except Exception:
        return None
    return weight.transpose(0, 3, 1, 2) if weight.ndim == 4 else None


#: what the graph report says of each precision
PRECISION_NOTES = {
    "fp32": "float32",
    "fp16": "float16 weights",
    "int8": "int8 quantized",
    "dynamic-int8": "int8 weights, dynamic activations",
}


def _quantized(interpreter: Any) -> str:
    return PRECISION_NOTES[_precision(interpreter)]


def _precision(interpreter: Any) -> str:
    """What the file computes in: static int8 (``QUANTIZE`` ops), int8 weights alone (dynamic), half weights, fp32."""
    kinds = {np.dtype(t["dtype"]).name for t in interpreter.get_tensor_details()}
    ops = {op["op_name"] for op in interpreter._get_ops_details()}
    if "int8" in kinds:
        return "int8" if "QUANTIZE" in ops else "dynamic-int8"
    return "fp16" if "float16" in kinds else "fp32"
