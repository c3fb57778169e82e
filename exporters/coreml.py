"""CoreML target: an ML program (``.mlpackage``, macOS 13 / iOS 16) from ``torch.jit.trace`` (or ``torch.export``).

``coremltools.convert(..., convert_to="mlprogram")`` with float32 input and output
types set explicitly (otherwise fp16 compute makes the traced I/O Float16,
docs/design.md §6); ``fp16`` sets ``compute_precision=FLOAT16`` (casts at the I/O),
``fp32`` keeps everything in float32.
A dynamic batch is a ``RangeDim(1, max_batch)``: ML programs need a finite
upper bound (default 64).  The keyed model's ``index_select`` shuffle converts to one MIL ``gather``; on
Apple devices the Neural Engine does not run it (it falls back to the CPU), which
is what folding avoids.

The TorchScript trace is checked against the module on probe inputs before
conversion (tracing freezes input-dependent branches); if that fails, the
``torch.export`` program is converted instead.

``int8`` converts with float16 compute and then quantizes the weights to int8 with
``coremltools.optimize.coreml.linear_quantize_weights`` (per-channel, symmetric): W8A16, what
the Neural Engine runs.  Activations stay float16 -- coremltools calibrates activations only by
running the model, which needs macOS.  The conv form's permutation weights are excluded (they
stay an exact 0/1 permutation); a gather's indices are integers, which no weight quantizer touches.
``int4`` palettizes the weights instead (``palettize_weights``: k-means, 16 values per group of 16
output channels, per-grouped-channel lookup tables; iOS 18 / macOS 15), the permutation excluded the same way.

Prediction needs Apple's CoreML framework, so :meth:`CoreMLBackend.run` works on
macOS only; elsewhere the package is checked structurally from its spec
(:meth:`~CoreMLBackend.inspect`, :meth:`~CoreMLBackend.describe_io`), nothing run.
coremltools 9.0's torch converter needs numpy < 2.4.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from keyedge.exporters.base import ExportBackend, ExportError, ExportOptions, Runner, register_backend
from keyedge.exporters.capture import one_line
from keyedge.exporters.checks import check_reproduces, first_that_works
from keyedge.exporters.graph import GraphReport, Node, analyze, constant_signature, is_permutation_matrix
from keyedge.exporters.template import module_tensors

SOURCES = ("jit.trace", "torch.export")
MAX_DYNAMIC_BATCH = 64
_DTYPES = {
    "FLOAT32": "float32",
    "FLOAT16": "float16",
    "DOUBLE": "float64",
    "INT32": "int32",
    "FLOAT64": "float64",
    "INT64": "int64",
    "INT16": "int16",
    "INT8": "int8",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "BOOL": "bool",
}


@register_backend
class CoreMLBackend(ExportBackend):
    """Export to a CoreML ML program (``model.mlpackage``); predict on macOS only.

    ``sources``: what to convert, in order (TorchScript trace, then ``torch.export``).
    ``max_batch``: the upper bound of a dynamic batch (ML programs need one).
    ``compute_units``: a ``coremltools.ComputeUnit`` name used by :meth:`run` (default CPU only, for parity checks).
    """

    name = "coreml"
    extra = "coreml"
    supports_template = True  # MilTemplate: trace and frontend once per architecture
    suffix = ".mlpackage"
    runtime = "coreml"
    auto_form = "conv"  # the Neural Engine runs no gather: it falls back to the CPU (not timed here: no macOS)
    random_ops = True  # MIL random_normal
    precisions = ("fp32", "fp16", "int8", "int4")
    profile_options: ClassVar[dict[str, tuple[Any, Any]]] = {
        "compute_units": (("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE", "ALL"), "ALL")
    }
    device_option = "compute_units"
    export_modules = ("coremltools",)
    runtime_modules = ("coremltools",)

    def __init__(
        self, *, sources: Sequence[str] = SOURCES, max_batch: int = MAX_DYNAMIC_BATCH, compute_units: str = "CPU_ONLY"
    ):
        if not sources or set(sources) - set(SOURCES):
            raise ValueError(f"sources must be taken from {SOURCES}, got {tuple(sources)}")
        if max_batch < 2:
            raise ValueError(f"max_batch must be at least 2, got {max_batch}")
        self.max_batch = int(max_batch)
        self.sources = tuple(sources)
        self.compute_units = compute_units

    def available(self) -> tuple[bool, str]:
        if tuple(int(part) for part in np.__version__.split(".")[:2]) >= (2, 4):
            return False, f"numpy {np.__version__} breaks coremltools' torch converter (pip install 'numpy<2.4')"
        return super().available()

    def can_run(
        self, *, device: str | None = None, providers: Sequence[str] | None = None, compute_units: str | None = None
    ) -> tuple[bool, str]:
        if sys.platform != "darwin":
            return (
                False,
                f"CoreML prediction runs only on macOS (this host: {sys.platform}); artifacts are "
                "checked structurally here",
            )
        return super().can_run()

    # ---- export ---------------------------------------------------------------------------
    def _convert_options(self, options: ExportOptions) -> dict[str, Any]:
        """``coremltools.convert``'s options of a keyedge export (one place: full exports and fleet templates)."""
        ct = self.require("coremltools")
        size = options.image_size
        batch = ct.RangeDim(lower_bound=1, upper_bound=self.max_batch, default=1) if options.dynamic else options.batch
        return {
            # int4's per-grouped-channel lookup tables need iOS 18 / macOS 15
            "minimum_deployment_target": ct.target.macOS15 if options.precision == "int4" else ct.target.macOS13,
            "inputs": [ct.TensorType(name=options.input_name, shape=(batch, 3, size, size), dtype=np.float32)],
            "outputs": [ct.TensorType(name=options.output_name, dtype=np.float32)],
            "compute_precision": ct.precision.FLOAT32 if options.precision == "fp32" else ct.precision.FLOAT16,
        }

    def _trace(self, module: nn.Module, options: ExportOptions) -> Any:
        """The TorchScript trace of ``module``, checked against it on probe inputs (tracing freezes branches)."""
        with torch.no_grad():
            program: Any = torch.jit.trace(module, options.example_input(), check_trace=False)
            check_reproduces(module, lambda x: program(torch.from_numpy(x)).numpy(), options, "the TorchScript trace")
        return program

    def _export(self, module: nn.Module, path: Path, options: ExportOptions) -> list[Path]:
        ct = self.require("coremltools")
        example = options.example_input()

        def convert(source: str) -> Any:
            if source == "jit.trace":
                program = self._trace(module, options)
            else:
                dynamic = ({0: torch.export.Dim("batch")},) if options.dynamic else None
                program = torch.export.export(module, (example,), dynamic_shapes=dynamic).run_decompositions({})
            return ct.convert(program, convert_to="mlprogram", skip_model_load=True, **self._convert_options(options))

        mlmodel, used, errors = first_that_works("coreml", self.sources, convert)
        if options.precision in ("int8", "int4"):
            mlmodel = self._quantize_weights(mlmodel, options.precision)
        return self._save(mlmodel, path, options, used, errors)

    def _quantize_weights(self, mlmodel: Any, precision: str) -> Any:
        """int8 per-channel weights, or int4 palettized ones (coremltools.optimize), the conv form's permutation
        left exact."""
        ct = self.require("coremltools")
        from coremltools.optimize import coreml as cto

        main = mlmodel._mil_program.functions["main"]
        keep = [
            op.name
            for op in main.operations
            if op.op_type == "conv" and op.weight.val is not None and is_permutation_matrix(np.asarray(op.weight.val))
        ]
        if precision == "int4":
            palette = cto.OpPalettizerConfig(
                mode="kmeans", nbits=4, granularity="per_grouped_channel", group_size=16, weight_threshold=2048
            )
            config = cto.OptimizationConfig(global_config=palette, op_name_configs=dict.fromkeys(keep))
            quantized = cto.palettize_weights(mlmodel, config)
            what = "int4 palettized weights (k-means, a 16-value table per 16 output channels)"
        else:
            linear = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel")
            config = cto.OptimizationConfig(global_config=linear, op_name_configs=dict.fromkeys(keep))
            quantized = cto.linear_quantize_weights(mlmodel, config)
            what = "int8 per-channel weights"
        quantized.user_defined_metadata["keyedge.quantization"] = (
            f"coremltools {ct.__version__} {what}, float16 activations (activation "
            f"calibration needs macOS); {len(keep)} permutation conv(s) kept exact"
        )
        return quantized

    def _save(
        self, mlmodel: Any, path: Path, options: ExportOptions, used: str, errors: Sequence[str] = ()
    ) -> list[Path]:
        meta = mlmodel.user_defined_metadata
        meta["keyedge.precision"] = options.precision
        meta["keyedge.source"] = used
        meta["keyedge.batch"] = "dynamic" if options.dynamic else str(options.batch)
        if errors:
            meta["keyedge.notes"] = f"converted from {used}; " + "; ".join(errors)
        mlmodel.save(str(path))
        return [path]

    # ---- fleet templates --------------------------------------------------------------------
    def template_for(self, cache: dict, ident: tuple, module: nn.Module, options: ExportOptions) -> Any:
        key = ("coreml", *ident)
        if key not in cache:
            try:
                cache[key] = MilTemplate.build(self, module, options)
            except ExportError:
                cache[key] = None  # the trace does not reproduce the module: each key in full (torch.export)
        template = cache[key]
        return template if template is not None and template.fits(module) else None

    def export_from_template(self, template: Any, module: nn.Module, path: Path, options: ExportOptions) -> list[Path]:
        return template.instantiate(self, module, path, options)

    # ---- inference (macOS) ----------------------------------------------------------------
    def devices(self) -> list[str]:
        return list(self.require("coremltools").ComputeUnit.__members__) if self.can_run()[0] else []

    def _load(self, path: Path, **settings: Any) -> Runner:
        io_spec = self.describe_io(path)
        units = settings.get("compute_units") or self.compute_units
        return CoreMLRunner(
            path, _mlmodel(self.require("coremltools"), path, units), io_spec, {**settings, "compute_units": units}
        )

    def compute_plan(self, path: Path, compute_units: str = "ALL") -> list[dict[str, Any]]:
        """Which device CoreML plans each operation on (macOS 14.4+): op, preferred device, supported, cost.

        This is the check that matters for the conv shuffle: with ``CPU_AND_NE`` or ``ALL``, a keyed
        model's ``gather`` is planned on the CPU, while space_to_depth / conv / depth_to_space are not.
        """
        ok, why = self.can_run()
        if not ok:
            raise ExportError(f"the CoreML compute plan needs macOS ({why})", "run this on a Mac (macOS 14.4 or later)")
        ct = self.require("coremltools")
        from coremltools.models.compute_plan import MLComputePlan

        mlmodel = _mlmodel(ct, path, compute_units)
        plan = MLComputePlan.load_from_path(mlmodel.get_compiled_model_path(), ct.ComputeUnit[compute_units])
        program = plan.model_structure.program
        if program is None:
            raise ExportError(f"{path} is not an ML program", "export it again with keyedge export --target coreml")
        rows = []
        for op in program.functions["main"].block.operations:
            usage = plan.get_compute_device_usage_for_mlprogram_operation(op)
            cost = plan.get_estimated_cost_for_mlprogram_operation(op)
            rows.append(
                {
                    "op": op.operator_name,
                    "output": op.outputs[0].name if op.outputs else "",
                    "preferred": _device_name(usage.preferred_compute_device) if usage else None,
                    "supported": [_device_name(d) for d in usage.supported_compute_devices] if usage else [],
                    "cost": cost.weight if cost else None,
                }
            )
        return rows

    # ---- reading back (any OS) ------------------------------------------------------------
    def _spec(self, path: Path) -> Any:
        ct = self.require("coremltools")
        path = Path(path)
        if not (path / "Manifest.json").is_file():
            raise ExportError(f"{path} is not a .mlpackage", "give the path of an exported CoreML package")
        try:
            spec = ct.utils.load_spec(str(path))
        except Exception as exc:
            raise ExportError(f"cannot read the CoreML spec in {path}: {one_line(exc)}") from None
        if spec.WhichOneof("Type") != "mlProgram" or "main" not in spec.mlProgram.functions:
            raise ExportError(f"{path} holds a {spec.WhichOneof('Type')} model, not an ML program with a main function")
        return spec

    def _inspect(self, path: Path) -> GraphReport:
        spec = self._spec(path)
        main = spec.mlProgram.functions["main"]
        block = main.block_specializations[main.opset]
        nodes = _block_nodes(block)
        meta = dict(spec.description.metadata.userDefined)
        notes = [
            f"ML program {main.opset}, spec version {spec.specificationVersion}, "
            f"precision {meta.get('keyedge.precision', 'unknown')}, "
            f"converted from {meta.get('keyedge.source', 'unknown')}"
        ]
        notes += [meta[k] for k in ("keyedge.quantization", "keyedge.notes") if k in meta]
        return analyze(nodes, [i.name for i in main.inputs], list(block.outputs), notes=notes)

    def _describe_io(self, path: Path) -> dict[str, Any]:
        spec = self._spec(path)
        ct = self.require("coremltools")
        array_types = ct.proto.FeatureTypes_pb2.ArrayFeatureType.ArrayDataType
        main = spec.mlProgram.functions["main"]
        var_types = {o.name: o.type for op in main.block_specializations[main.opset].operations for o in op.outputs}
        var_types.update({i.name: i.type for i in main.inputs})

        def port(feature: Any) -> dict[str, Any]:
            if feature.type.WhichOneof("Type") != "multiArrayType":
                raise ExportError(f"feature {feature.name!r} is a {feature.type.WhichOneof('Type')}, not a tensor")
            array = feature.type.multiArrayType
            raw = array_types.Name(array.dataType)
            tensor = var_types[feature.name].tensorType if feature.name in var_types else None
            if tensor is not None and tensor.dimensions:  # the program's own view: exact for outputs too
                shape = [d.constant.size if d.WhichOneof("dimension") == "constant" else -1 for d in tensor.dimensions]
            else:
                shape = list(array.shape)
            ranges = array.shapeRange.sizeRanges
            for i, r in enumerate(ranges):
                if i < len(shape) and (r.upperBound < 0 or r.lowerBound != r.upperBound):
                    shape[i] = -1
            return {"name": feature.name, "shape": shape, "dtype": _DTYPES.get(raw, raw.lower())}

        meta = dict(spec.description.metadata.userDefined)
        return {
            "format": "coreml",
            "inputs": [port(f) for f in spec.description.input],
            "outputs": [port(f) for f in spec.description.output],
            "precision": meta.get("keyedge.precision"),
            "source": meta.get("keyedge.source"),
            "specification_version": spec.specificationVersion,
            "ml_program_opset": main.opset,
        }


class CoreMLRunner(Runner):
    """A CoreML ML program loaded with the requested compute units (macOS only)."""

    backend = "coreml"

    def __init__(self, path: Path, mlmodel: Any, io_spec: dict[str, Any], settings: dict[str, Any]):
        self.mlmodel = mlmodel
        self._input = io_spec["inputs"][0]["name"]
        self._output = io_spec["outputs"][0]["name"]
        super().__init__(path, [d if d > 0 else None for d in io_spec["inputs"][0]["shape"]], settings)

    def infer(self, x: np.ndarray) -> Any:
        return self.mlmodel.predict({self._input: x})

    def logits(self, result: Any) -> np.ndarray:
        return result[self._output]

    def close(self) -> None:
        self.mlmodel = None


def _mlmodel(ct: Any, path: Path, compute_units: str) -> Any:
    """The one place a CoreML package is loaded for prediction."""
    if compute_units not in ct.ComputeUnit.__members__:
        raise ExportError(
            f"unknown compute units {compute_units!r}", f"use one of {', '.join(ct.ComputeUnit.__members__)}"
        )
    return ct.models.MLModel(str(path), compute_units=ct.ComputeUnit[compute_units])


def _device_name(device: Any) -> str:
    """MLCPUComputeDevice -> CPU, MLGPUComputeDevice -> GPU, MLNeuralEngineComputeDevice -> NE."""
    name = type(device).__name__
    return {"MLCPUComputeDevice": "CPU", "MLGPUComputeDevice": "GPU", "MLNeuralEngineComputeDevice": "NE"}.get(
        name, name
    )


def _dtype_name(value_type: Any) -> tuple[str, list[int]]:
    from coremltools.proto import MIL_pb2

    tensor = value_type.tensorType
    dims = [d.constant.size if d.WhichOneof("dimension") == "constant" else -1 for d in tensor.dimensions]
    raw = MIL_pb2.DataType.Name(tensor.dataType)
    return _DTYPES.get(raw, raw.lower()), dims


def _block_nodes(block: Any) -> list[Node]:
    """MIL ops in program order (nested blocks of control flow inlined after their op), data input first."""
    nodes: list[Node] = []
    for op in block.operations:
        keys = sorted(op.inputs, key=lambda k: (k != "x", k))
        inputs = [a.name for k in keys for a in op.inputs[k].arguments if a.name]
        outputs = [o.name for o in op.outputs]
        if op.type == "const" and op.outputs:
            dtype, dims = _dtype_name(op.outputs[0].type)
            value = op.attributes["val"]
            small = None
            if value.WhichOneof("value") == "immediateValue" and dtype.startswith(("int", "uint")):
                tensor = value.immediateValue.tensor
                kind = tensor.WhichOneof("value")
                if kind in ("ints", "longInts"):
                    small = np.asarray(list(getattr(tensor, kind).values), dtype=np.int64)
            attrs = constant_signature(small, dims, dtype)
        else:
            immediate = [
                f"{k}={a.value.SerializeToString().hex()}" for k in keys for a in op.inputs[k].arguments if not a.name
            ]
            named = [f"{k}:{len(op.inputs[k].arguments)}" for k in keys]
            extra = [f"{k}={v.SerializeToString().hex()}" for k, v in sorted(op.attributes.items()) if k != "name"]
            attrs = ";".join(named + immediate + extra)
        nodes.append(Node(op.type, inputs, outputs, attrs))
        for inner in op.blocks:
            nodes += _block_nodes(inner)
    return nodes


@dataclass
class MilTemplate:
    """One architecture's MIL program as coremltools' torch frontend writes it, before any optimization pass.

    Its ``const`` ops are named after the module's parameters and buffers (``shuffle.index``,
    ``backbone.conv_stem.weight``...).  A key's package is a copy of the program with its own tensors
    substituted by name, then ``coremltools.convert`` with the default pass pipeline -- the passes a
    full conversion runs after the same frontend.  Measured (EfficientNet-Lite0): ``weights/weight.bin``
    is byte-for-byte the full conversion's and the program differs only in the names coremltools
    generates for folded constants (``const_39`` / ``const_0_1``); the trace and the frontend, about
    40% of a full conversion, run once per architecture.

    Of the default pipeline's 93 fp32 passes, 7 change EfficientNet-Lite0's program; the rest found
    nothing to do, and validating the program after each of them was most of a key's time.  So the
    template runs the pipeline once, pass by pass, on its own program and keeps the passes that
    changed it (``passes``, in the pipeline's order); each key runs only those.  A pass that would act
    only on another key's values (a no-op add of an all-zero bias only that key has) then leaves that
    op in, computing the same outputs.
    """

    program: Any
    signature: dict[str, tuple[tuple[int, ...], str]]  # const name -> (shape, dtype)
    #: the default pipeline's passes (name, options) that changed the template's program, in order
    passes: list[tuple[str, dict[str, Any]]] | None = None

    @classmethod
    def build(cls, backend: CoreMLBackend, module: nn.Module, options: ExportOptions) -> MilTemplate:
        ct = backend.require("coremltools")
        program = ct.convert(
            backend._trace(module, options),
            convert_to="milinternal",
            pass_pipeline=ct.PassPipeline.EMPTY,
            **backend._convert_options(options),
        )
        signature = {
            op.name: (tuple(np.shape(op.outputs[0].val)), str(np.asarray(op.outputs[0].val).dtype))
            for op in _consts(program)
        }
        return cls(program, signature, _acting_passes(ct, _copy_program(program)))

    def fits(self, module: nn.Module) -> bool:
        """True when every tensor ``module`` computes with is a named const of the same shape and dtype."""
        tensors = {k: v for k, v in module_tensors(module).items() if not k.endswith("num_batches_tracked")}
        return bool(tensors) and all(k in self.signature and self._value(k, v) is not None for k, v in tensors.items())

    def _value(self, name: str, tensor: np.ndarray) -> np.ndarray | None:
        """``tensor`` as the template's const ``name`` holds it: same shape, in its dtype (the frontend stores
        int64 indices as int32) when that is exact; None otherwise."""
        shape, dtype = self.signature[name]
        if tuple(tensor.shape) != shape:
            return None
        value = np.ascontiguousarray(tensor).astype(dtype, copy=False)
        return value if value.dtype == tensor.dtype or np.array_equal(value, tensor) else None

    def instantiate(self, backend: CoreMLBackend, module: nn.Module, path: Path, options: ExportOptions) -> list[Path]:
        ct = backend.require("coremltools")
        tensors = module_tensors(module)
        program = _copy_program(self.program)
        for op in _consts(program):
            if op.name in tensors:
                value = self._value(op.name, tensors[op.name])
                op.val._sym_val.val = value  # the const's attribute and its output, as the frontend set them
                op.outputs[0]._sym_val.val = value
        options_ = {k: v for k, v in backend._convert_options(options).items() if k not in ("inputs", "outputs")}
        if self.passes is not None:
            pipeline = ct.PassPipeline(pass_names=[name for name, _ in self.passes], pipeline_name="keyedge-fleet")
            for name, settings in self.passes:
                if settings:  # options are set per pass name: a pass the pipeline runs twice gets one set
                    pipeline.set_options(name, settings)
            options_["pass_pipeline"] = pipeline
        mlmodel = ct.convert(program, convert_to="mlprogram", skip_model_load=True, **options_)
        meta = mlmodel.user_defined_metadata  # what a full conversion records
        meta["com.github.apple.coremltools.source"] = f"torch=={torch.__version__}"
        meta["com.github.apple.coremltools.source_dialect"] = "TorchScript"
        return backend._save(mlmodel, path, options, "jit.trace+fleet-template")


#: the passes ``coremltools.convert`` drops from the default pipeline at fp32 (the only precision fleets template)
FP32_DROPPED_PASSES = ("common::add_fp16_cast", "common::add_int16_cast")


def _acting_passes(ct: Any, program: Any) -> list[tuple[str, dict[str, Any]]]:
    """The fp32 default pipeline's passes that change ``program`` (run on it, in place), with their options."""
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY

    pipeline = ct.PassPipeline.DEFAULT
    acting = []
    before = _fingerprint(program)
    for name in pipeline.passes:
        if name in FP32_DROPPED_PASSES:
            continue
        options = {o.option_name: o.option_val for o in pipeline.get_options(name) or []}
        graph_pass = PASS_REGISTRY[name]
        graph_pass.set_options(pipeline.get_options(name))
        graph_pass(program)
        after = _fingerprint(program)
        if after != before:
            acting.append((name, options))
        before = after
    return acting


#: consts up to this many elements are fingerprinted by value (shapes, axes, scalars a pass may rewrite in place)
SMALL_CONST = 4096


def _fingerprint(program: Any) -> str:
    """A digest of a MIL program: every op's type, name, inputs and output types, and the small consts' values."""
    digest = hashlib.sha256()

    def walk(block: Any) -> None:
        for op in block.operations:
            inputs = [None if v is None else v.name for v in op.get_flattened_inputs()]
            digest.update(f"{op.op_type}|{op.name}|{inputs}|{[str(o.sym_type) for o in op.outputs]}".encode())
            value = op.outputs[0].val if op.op_type == "const" else None
            if value is not None and np.size(value) <= SMALL_CONST:  # a big one changes with its op's name
                digest.update(np.asarray(value).tobytes())
            for inner in op.blocks:
                walk(inner)
        digest.update(str([v.name for v in block.outputs]).encode())

    for function in program.functions.values():
        walk(function)
    return digest.hexdigest()


def _consts(program: Any) -> list[Any]:
    return [op for function in program.functions.values() for op in function.operations if op.op_type == "const"]


def _copy_program(program: Any) -> Any:
    """A deep copy of a MIL program: its op graph nests as deep as the network, so copy in a thread with a big stack."""
    import copy
    import threading

    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["program"] = copy.deepcopy(program)
        except BaseException as exc:  # re-raised in the caller's thread
            result["error"] = exc

    limit, size = sys.getrecursionlimit(), threading.stack_size()
    sys.setrecursionlimit(max(limit, 1_000_000))
    threading.stack_size(1 << 30)  # virtual: only the pages the copy touches are used
    try:
        thread = threading.Thread(target=work, name="keyedge-copy-mil")
        thread.start()
    finally:
        threading.stack_size(size)
    thread.join()
    sys.setrecursionlimit(limit)
    if "error" in result:
        raise ExportError(f"cannot copy the CoreML fleet template ({one_line(result['error'])})", "export in full")
    return result["program"]
