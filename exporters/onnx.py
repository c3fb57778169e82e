"""ONNX target: torch's dynamo exporter (opset 18, weights inside the one ``.onnx`` file), run with onnxruntime.

``torch.onnx.export(..., dynamo=True, external_data=False)`` writes a single
self-contained file; a dynamic batch is declared with ``torch.export.Dim``.
Should the dynamo exporter fail on a model, the (deprecated) TorchScript exporter
is tried next and the artifact's metadata says so; as it traces, its artifact is
checked with onnxruntime against the module on probe inputs (a frozen branch is refused).  The keyed model's
``index_select`` shuffle exports as Reshape -> Gather -> Reshape (docs/design.md §6).

``fp16`` exports a half-precision copy of the model behind in-graph casts
(``x.half()`` in, ``.float()`` out): fp16 weights and compute, float32 I/O.
onnxruntime's CPU provider runs it, inserting fp32 casts around ops it has no
fp16 kernel for.

``int8`` exports the fp32 graph, then quantizes it statically with
``onnxruntime.quantization`` (QDQ, per-channel int8 weights, uint8 activations, min-max
calibration on ``ExportOptions.calibration``).  The ops that only move the input's pixels --
the key's Reshape -> Gather -> Reshape, or the conv form's permutation conv -- are excluded
(:func:`~keyedge.exporters.graph.shuffle_prefix`): the shuffle runs in float32 exactly as in
the fp32 artifact, and the first QuantizeLinear comes after it.  Mixed precision keeps the first
and last weighted layers float too (:func:`~keyedge.exporters.graph.float_ends`: measured, it buys
agreement).

The artifact's ``metadata_props`` record ``keyedge.precision``, ``keyedge.exporter``
and notes; :meth:`OnnxBackend.inspect` reports them.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from keyedge.exporters.base import ExportBackend, ExportError, ExportOptions, Runner, _remove, register_backend
from keyedge.exporters.capture import environment_error, one_line
from keyedge.exporters.checks import calibration_batches, check_reproduces
from keyedge.exporters.graph import GraphReport, Node, analyze, constant_signature, float_ends, shuffle_prefix
from keyedge.exporters.template import OPSET, OnnxTemplate

#: ONNX Runtime execution providers a device profile may name
ORT_PROVIDERS = (
    "CPUExecutionProvider",
    "CUDAExecutionProvider",
    "TensorrtExecutionProvider",
    "CoreMLExecutionProvider",
    "OpenVINOExecutionProvider",
    "DmlExecutionProvider",
    "ROCMExecutionProvider",
    "QNNExecutionProvider",
    "XnnpackExecutionProvider",
)
EXPORTERS = ("dynamo", "torchscript")


class HalfPrecision(nn.Module):
    """``module`` in half precision behind float32 I/O: the casts are part of the exported graph."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(module).half().eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.half()).float()


class OnnxRunner(Runner):
    """An ONNX Runtime session (the file, or model bytes) with the requested providers and threads."""

    backend = "onnx"

    def __init__(self, path: Path, settings: dict[str, Any], ort: Any, model: bytes | None = None):
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if settings.get("threads"):
            opts.intra_op_num_threads = settings["threads"]
            opts.inter_op_num_threads = 1
        # ORT's idle intra-op threads spin-wait by default: that is what deployments run with and it is
        # ~35% faster at batch 1 on 2 cores; latency benchmarks let the spin die down between runs instead
        if settings.get("spinning") is False:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        wanted = settings.get("providers") or ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(model if model is not None else str(path), opts, providers=wanted)
        self.providers = self.session.get_providers()
        if wanted[0] not in self.providers:
            raise ExportError(
                f"the ONNX Runtime session fell back to {', '.join(self.providers)}",
                f"install an onnxruntime build with {wanted[0]}",
            )
        inp = self.session.get_inputs()[0]
        self._name = inp.name
        super().__init__(path, [d if isinstance(d, int) and d > 0 else None for d in inp.shape], settings)

    def infer(self, x: np.ndarray) -> Any:
        return self.session.run(None, {self._name: x})

    def logits(self, result: Any) -> np.ndarray:
        return result[0]

    def close(self) -> None:
        self.session = None


@register_backend
class OnnxBackend(ExportBackend):
    """Export to one ONNX file (opset 18) and run it with onnxruntime's CPU provider.

    ``exporters`` gives the torch exporters to try, in order (default: dynamo, then TorchScript).
    """

    name = "onnx"
    extra = "onnx"
    suffix = ".onnx"
    runtime = "onnxruntime"
    supports_template = True
    # keyed/plain, EfficientNet-Lite0 224, batch 1, 2 threads, AMD EPYC (AVX2), 34 interleaved rounds: elements 1.011
    # [0.979-1.027], conv 1.030, gather 1.047 (ORT copies a Gather's single elements one memcpy each)
    auto_form = "elements"
    profile_options: ClassVar[dict[str, tuple[Any, Any]]] = {
        "providers": ([ORT_PROVIDERS], ["CPUExecutionProvider"]),
        "spinning": (bool, None),
    }
    device_option = "providers"
    sealable = True
    random_ops = True  # RandomNormalLike
    export_modules = ("onnx", "onnxscript")
    runtime_modules = ("onnxruntime",)

    def __init__(self, *, exporters: Sequence[str] = EXPORTERS):
        unknown = set(exporters) - set(EXPORTERS)
        if unknown or not exporters:
            raise ValueError(f"exporters must be taken from {EXPORTERS}, got {tuple(exporters)}")
        self.exporters = tuple(exporters)

    def planned_outputs(self, path: Path) -> list[Path]:
        return [path, path.with_name(path.name + ".data")]  # the latter only if an exporter ignores external_data

    # ---- export ---------------------------------------------------------------------------
    def _export(self, module: nn.Module, path: Path, options: ExportOptions) -> list[Path]:
        if options.precision == "int8":
            return self._export_int8(module, path, options)
        onnx = self.require("onnx")
        self.require("onnxscript")
        target = HalfPrecision(module) if options.precision == "fp16" else module
        example = options.example_input()
        notes, errors, used = [], [], None
        for exporter in self.exporters:
            try:
                _torch_export(target, example, path, options, exporter)
                if exporter == "torchscript":
                    self._check_trace(module, path, options)
            except Exception as exc:
                if environment_error(exc) is not None:  # a full or read-only disk: another exporter cannot help
                    raise
                errors.append(f"{exporter}: {one_line(exc)}")
                for item in self.planned_outputs(path):
                    _remove(item)
                continue
            used = exporter
            break
        if used is None:
            raise ExportError(
                f"onnx export failed ({'; '.join(errors)})", "fix the first reason given, or export to another target"
            )
        if errors:
            notes.append(f"exported with the {used} exporter; {'; '.join(errors)}")

        model = onnx.load(str(path))
        inputs = _graph_inputs(model)
        if len(inputs) != 1 or len(model.graph.output) != 1:
            raise ExportError(
                f"the exported graph has {len(inputs)} inputs and {len(model.graph.output)} outputs",
                "export a module taking one image tensor and returning one logits tensor",
            )
        props = {p.key: p.value for p in model.metadata_props}
        props.update(
            {
                "keyedge.precision": options.precision,
                "keyedge.exporter": used,
                "keyedge.batch": "dynamic" if options.dynamic else str(options.batch),
            }
        )
        if notes:
            props["keyedge.notes"] = " | ".join(notes)
        onnx.helper.set_model_props(model, props)
        onnx.save(model, str(path))
        onnx.checker.check_model(str(path), full_check=True)
        return [p for p in self.planned_outputs(path) if p.exists()]

    def _export_int8(self, module: nn.Module, path: Path, options: ExportOptions) -> list[Path]:
        """The fp32 export, quantized statically (QDQ) with the key's shuffle left in float32."""
        onnx = self.require("onnx")
        quantization = self.require("onnxruntime.quantization")
        fp32 = path.with_name(path.stem + ".fp32" + path.suffix)  # removed below; 0700 staging dir, like the rest
        try:
            self._export(module, fp32, options.as_fp32())
            model = onnx.load(str(fp32))
            props = {p.key: p.value for p in model.metadata_props}
            shuffle, ends = quantization_exclusions(onnx, model)
            excluded = [n.name for n in (*shuffle, *ends)]
            onnx.save(model, str(fp32))  # with the names given to unnamed nodes
            quantization.quantize_static(
                str(fp32),
                str(path),
                _CalibrationReader(quantization, options),
                quant_format=quantization.QuantFormat.QDQ,
                per_channel=True,
                activation_type=quantization.QuantType.QUInt8,
                weight_type=quantization.QuantType.QInt8,
                # measured (experiments.int8, quickstart k1, first and last layers float): min-max 87.0% agreement
                # and a 1.4-point accuracy drop, percentile 87.0% and 2.2 points; min-max is also the faster
                calibrate_method=quantization.CalibrationMethod.MinMax,
                nodes_to_exclude=excluded,
            )
        finally:
            for item in self.planned_outputs(fp32):
                _remove(item)
        model = onnx.load(str(path))
        ort_version = self.require("onnxruntime").__version__
        props.update(
            {
                "keyedge.precision": "int8",
                "keyedge.quantization": f"onnxruntime {ort_version} static QDQ, per-channel int8 "
                f"weights, uint8 activations, min-max calibration on {len(options.calibration)} images; "
                f"{len(shuffle)} shuffle op(s) and {len(ends)} end layer(s) ({', '.join(n.type for n in ends)}) "
                "kept in float32",
            }
        )
        onnx.helper.set_model_props(model, props)
        onnx.save(model, str(path))
        onnx.checker.check_model(str(path), full_check=True)
        return [p for p in self.planned_outputs(path) if p.exists()]

    def template_for(self, cache: dict, ident: tuple, module: nn.Module, options: ExportOptions) -> Any:
        return OnnxTemplate.for_module(cache, ("onnx", *ident), module, options)  # one for ONNX and OpenVINO

    def export_from_template(self, template: Any, module: nn.Module, path: Path, options: ExportOptions) -> list[Path]:
        return template.instantiate(module, path, options)

    def _check_trace(self, module: nn.Module, path: Path, options: ExportOptions) -> None:
        if not self.can_run()[0]:
            return  # onnxruntime ships with the onnx extra; without it the traced artifact stays unchecked
        rtol = 1e-3 if options.precision == "fp32" else 5e-2
        with self.load(path) as runner:
            check_reproduces(module, runner, options, "the TorchScript export", rtol=rtol)

    # ---- inference ------------------------------------------------------------------------
    def can_run(
        self, *, device: str | None = None, providers: Sequence[str] | None = None, compute_units: str | None = None
    ) -> tuple[bool, str]:
        ok, reason = super().can_run()
        if not ok or not providers:
            return ok, reason
        try:
            ort = self.require("onnxruntime")
            have = ort.get_available_providers()
        except Exception as exc:
            return False, f"onnxruntime fails to initialise ({one_line(exc)})"
        missing = [p for p in providers if p not in have]
        if missing:
            return False, f"onnxruntime {ort.__version__} lacks {', '.join(missing)} (has {', '.join(have)})"
        return True, reason

    def devices(self) -> list[str]:
        return list(self.require("onnxruntime").get_available_providers()) if self.can_run()[0] else []

    def _load(self, path: Path, *, files: dict[str, bytes] | None = None, **settings: Any) -> Runner:
        model = files[path.name] if files is not None else None  # a sealed artifact: the session reads bytes
        return OnnxRunner(path, settings, self.require("onnxruntime"), model)

    # ---- reading back ---------------------------------------------------------------------
    def _read_proto(self, path: Path) -> Any:
        onnx = self.require("onnx")
        if not Path(path).is_file():
            raise ExportError(f"{path} is not a file", "give the path of an exported .onnx model")
        try:
            return onnx.load(str(path), load_external_data=False)
        except Exception as exc:
            raise ExportError(f"cannot read {path} as ONNX: {one_line(exc)}") from None

    def _inspect(self, path: Path) -> GraphReport:
        onnx = self.require("onnx")
        model = self._read_proto(path)
        functions = {(f.domain, f.name): f for f in model.functions}
        # by name: the order of ONNX initializers means nothing, and the two steps of a fleet template make them in
        # another order than a full export (keyedge.exporters.template)
        initializers = sorted(model.graph.initializer, key=lambda init: init.name)
        nodes = [Node("Initializer", [], [init.name], _initializer_signature(onnx, init)) for init in initializers]
        nodes += _flatten(onnx, model.graph.node, functions)
        props = {p.key: p.value for p in model.metadata_props}
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        notes = [
            f"opset {opset}, precision {props.get('keyedge.precision', 'unknown')}, "
            f"{props.get('keyedge.exporter', 'unknown')} exporter"
        ]
        notes += [props[k] for k in ("keyedge.quantization", "keyedge.notes") if k in props]
        return analyze(
            nodes,
            _graph_inputs(model),
            [o.name for o in model.graph.output],
            count=lambda n: n.type != "Initializer",
            notes=notes,
        )

    def _describe_io(self, path: Path) -> dict[str, Any]:
        onnx = self.require("onnx")
        model = self._read_proto(path)
        init = {i.name for i in model.graph.initializer}
        props = {p.key: p.value for p in model.metadata_props}

        def port(value: Any) -> dict[str, Any]:
            tensor = value.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name
            return {"name": value.name, "shape": shape, "dtype": dtype}

        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        return {
            "format": "onnx",
            "inputs": [port(v) for v in model.graph.input if v.name not in init],
            "outputs": [port(v) for v in model.graph.output],
            "precision": props.get("keyedge.precision"),
            "opset": opset,
            "exporter": props.get("keyedge.exporter"),
        }


class _CalibrationReader:
    """``onnxruntime.quantization``'s calibration data reader over the export's calibration images."""

    def __init__(self, quantization: Any, options: ExportOptions):
        self._batches = iter(calibration_batches(options))
        self._name = options.input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._name: batch}


def quantization_exclusions(onnx: Any, model: Any, *, ends: bool = True) -> tuple[list[Node], list[Node]]:
    """The nodes int8 leaves float: the graph's shuffle ops, and (``ends``) the first and last weighted ops
    (:func:`~keyedge.exporters.graph.float_ends`).  Unnamed nodes get a name first, so a quantizer can exclude them."""
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"keyedge_{node.op_type}_{i}"
    initializers = {init.name: init for init in model.graph.initializer}

    def weight_of(node: Node) -> np.ndarray | None:
        init = initializers.get(node.inputs[1]) if len(node.inputs) > 1 else None
        return None if init is None else onnx.numpy_helper.to_array(init)

    nodes = [Node(n.op_type, list(n.input), list(n.output), name=n.name) for n in model.graph.node]
    shuffle = shuffle_prefix(nodes, _graph_inputs(model), weight_of)
    return shuffle, (float_ends(nodes, shuffle) if ends else [])


def _torch_export(module: nn.Module, example: torch.Tensor, path: Path, options: ExportOptions, exporter: str) -> None:
    names = {"input_names": [options.input_name], "output_names": [options.output_name]}
    if exporter == "dynamo":
        dynamic = ({0: torch.export.Dim("batch")},) if options.dynamic else None
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=True,
            external_data=False,
            opset_version=OPSET,
            dynamic_shapes=dynamic,
            optimize=True,
            verbose=False,
            **names,
        )
    else:
        axes = {options.input_name: {0: "batch"}, options.output_name: {0: "batch"}} if options.dynamic else None
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            dynamic_axes=axes,
            do_constant_folding=True,
            **names,
        )


def _graph_inputs(model: Any) -> list[str]:
    init = {i.name for i in model.graph.initializer}
    return [v.name for v in model.graph.input if v.name not in init]


def _initializer_signature(onnx: Any, init: Any) -> str:
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type))
    size = int(np.prod(init.dims)) if len(init.dims) else 1
    values = onnx.numpy_helper.to_array(init) if np.issubdtype(dtype, np.integer) and size <= 16 else None
    return constant_signature(values, list(init.dims), dtype.name)


def _attr_signature(onnx: Any, node: Any) -> str:
    parts = []
    for attr in sorted(node.attribute, key=lambda a: a.name):
        if attr.type == onnx.AttributeProto.TENSOR:
            array = onnx.numpy_helper.to_array(attr.t)
            parts.append(f"{attr.name}:{constant_signature(array, array.shape, array.dtype.name)}")
        elif attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            parts.append(f"{attr.name}:graph")
        else:
            value = onnx.helper.get_attribute_value(attr)
            parts.append(f"{attr.name}:{value!r}")
    return f"{node.domain}|" + ",".join(parts)


def _flatten(onnx: Any, graph_nodes: Any, functions: dict) -> list[Node]:
    """Nodes in order, with calls of local functions expanded in place and If/Loop bodies appended."""
    nodes: list[Node] = []
    for node in graph_nodes:
        function = functions.get((node.domain, node.op_type))
        if function is not None:  # inline the body, its internal names made unique per call
            rename = dict(zip(function.input, node.input)) | dict(zip(function.output, node.output))
            inner = f"{node.name or node.op_type}/{len(nodes)}/"
            for sub in _flatten(onnx, function.node, functions):
                sub.inputs = [rename.get(t, inner + t) if t else t for t in sub.inputs]
                sub.outputs = [rename.get(t, inner + t) for t in sub.outputs]
                nodes.append(sub)
            continue
        nodes.append(Node(node.op_type, list(node.input), list(node.output), _attr_signature(onnx, node)))
        for attr in node.attribute:  # subgraph names are unique model-wide in ONNX: no renaming needed
            graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for graph in graphs:
                nodes += _flatten(onnx, graph.node, functions)
    return nodes
