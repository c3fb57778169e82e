"""ExecuTorch target (PyTorch's on-device runtime, Android and iOS): ``.pte`` programs, XNNPACK-delegated.

``torch.export`` -> :func:`constant_prop_pass` (folds parameter-only work such as a ViT's
position-embedding resampling, which ExecuTorch has no kernel for) ->
``to_edge_transform_and_lower`` with the XNNPACK partitioner -> ``to_executorch``.
XNNPACK takes every op it supports; the rest run on ExecuTorch's portable kernels.  The
key's shuffle is ``aten::index_select`` with int64 indices on a portable kernel (XNNPACK has
no gather: a delegate that rejects it is not the issue, there is none that takes it), fed
by an XNNPACK reshape; the conv form and fold delegate entirely.

Precisions, the key's shuffle modules always excluded from quantization so their pixels move exactly:

- ``int8``: PT2E static quantization with ExecuTorch's ``XNNPACKQuantizer`` (symmetric, per-channel
  int8 weights, int8 activations), calibrated on ``ExportOptions.calibration``;
- ``dynamic-int8``: the same quantizer's dynamic config (per-channel int8 weights, activations
  quantized per token at run time: XNNPACK's ``qdint8`` convolutions and fully connected layers), no
  calibration; the graph is not constant-propagated (that would fold the int8 weights back to float),
  parameter-only work is computed once by :func:`~keyedge.exporters.graph.static_graph` instead;
- ``fp16``: the module in half behind float32 I/O (the casts are in the program: XNNPACK's fp16
  kernels, the gather on half pixels -- a permutation of them, exact).

Reading back (:func:`program_nodes`) parses the ``.pte`` flatbuffer and each XNNPACK
delegate's own flatbuffer (with the ``flatc`` ExecuTorch ships), so the graph report lists
portable and delegated ops alike (``XNN*`` names) and the shuffle's indices come from the
file's constant buffer.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import re
import tempfile
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
from keyedge.exporters.onnx import HalfPrecision
from keyedge.keys.transform import BlockShuffle, BlockShuffleConv

#: what a program's report says first, per precision (:meth:`ExecuTorchBackend.describe_io` reads it back)
PRECISION_NOTES = {
    "dynamic-int8": "int8 weights, dynamic activations",
    "int8": "int8 quantized",
    "fp16": "float16",
    "fp32": "float32",
}
#: ExecuTorch ScalarType codes -> numpy dtypes (executorch/runtime/core/portable_type/scalar_type.h)
SCALAR_TYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16", 6: "float32", 7: "float64"}
SHUFFLE_KERNELS = ("index_select", "gather")


class ExecuTorchRunner(Runner):
    """A ``.pte`` program's ``forward`` method loaded in ExecuTorch's runtime (XNNPACK + portable kernels)."""

    backend = "executorch"

    def __init__(self, path: Path, program: Any, shape: list[int], settings: dict[str, Any]):
        self.method = program.load_method("forward")
        self._program = program
        super().__init__(path, shape, {**settings, "device": "CPU"})

    def infer(self, x: np.ndarray) -> Any:
        return self.method.execute([torch.from_numpy(x)])

    def logits(self, result: Any) -> np.ndarray:
        return result[0].numpy()

    def close(self) -> None:
        self.method = self._program = None


@register_backend
class ExecuTorchBackend(ExportBackend):
    """Export to an ExecuTorch program (``model.pte``, XNNPACK delegate) and run it in ExecuTorch's runtime."""

    name = "executorch"
    extra = "executorch"
    suffix = ".pte"
    # keyed/plain, EfficientNet-Lite0 224, 14 interleaved rounds (keyed_latency --variants ...): planes 1.019
    # [1.004-1.068], conv 1.054, gather 1.075, elements 1.147 (either gather runs on a portable kernel, element by
    # element; the planes form's runs on 48 contiguous planes, its transposes on XNNPACK)
    auto_form = "planes"
    runtime = "executorch"
    random_refusal = "randn_like is not in ExecuTorch's Core ATen opset, and XNNPACK has no random op"
    export_modules = ("executorch.exir",)
    runtime_modules = ("executorch.runtime",)
    profile_options: ClassVar[dict[str, tuple[Any, Any]]] = {"device": (("CPU",), "CPU")}
    device_option = "device"
    precisions = ("fp32", "fp16", "int8", "dynamic-int8")

    # ---- export ---------------------------------------------------------------------------
    def _export(self, module: nn.Module, path: Path, options: ExportOptions) -> list[Path]:
        if options.dynamic:
            raise ExportError(
                "ExecuTorch artifacts have a fixed batch here", "export with --batch 1 (what a phone runs)"
            )
        exir = self.require("executorch.exir")
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir.passes.constant_prop_pass import constant_prop_pass

        example = options.example_input()
        partitioners = [XnnpackPartitioner()]
        if options.precision == "dynamic-int8":
            from executorch.backends.xnnpack.partition.config.xnnpack_config import ConfigPrecisionType

            self.require("executorch.kernels.quantized")  # the quantize ops' out variants
            source = self._quantize(static_graph(module, example), options)
            program = torch.export.export(source, (example,), strict=False)
            dynamic = XnnpackPartitioner(config_precisions=ConfigPrecisionType.DYNAMIC_QUANT, per_op_mode=True)
            partitioners.insert(0, dynamic)
        else:
            source = module
            if options.precision == "int8":
                source = self._quantize(module, options)
            elif options.precision == "fp16":
                source = HalfPrecision(module)
            program = constant_prop_pass(torch.export.export(source, (example,), strict=False))
        edge = exir.to_edge_transform_and_lower(program, partitioner=partitioners)
        buffer = edge.to_executorch().buffer
        if options.precision == "fp32":
            check_reproduces(
                module, _bytes_runner(self, buffer, list(options.input_shape)), options, "the .pte program"
            )
        path.write_bytes(buffer)
        return [path]

    def _quantize(self, module: nn.Module, options: ExportOptions) -> nn.Module:
        """PT2E int8 (static, calibrated; or dynamic) with XNNPACKQuantizer; the shuffle modules left unquantized."""
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        dynamic = options.precision == "dynamic-int8"
        config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic)
        quantizer = XNNPACKQuantizer().set_global(config)
        for kind in (BlockShuffle, BlockShuffleConv):
            quantizer.set_module_type(kind, None)
        captured = torch.export.export(module, (options.example_input(),), strict=False).module()
        prepared = prepare_pt2e(captured, quantizer)
        for batch in [options.example_input().numpy()] if dynamic else calibration_batches(options):
            prepared(torch.from_numpy(batch))
        return convert_pt2e(prepared)

    # ---- inference ------------------------------------------------------------------------
    def devices(self) -> list[str]:
        return ["CPU"] if self.can_run()[0] else []

    def _load(self, path: Path, **settings: Any) -> Runner:
        shape = _io(self, path)[0][0]["shape"]  # read in Python first: the C++ runtime aborts on a broken file
        # and what Python reads but the runtime aborts on (a damaged extended header)
        survives_in_child(path, "ExecuTorch program", self.name)
        program = _runtime(self, settings.get("threads")).load_program(Path(path))
        return ExecuTorchRunner(path, program, shape, settings)

    # ---- reading back ---------------------------------------------------------------------
    def _inspect(self, path: Path) -> GraphReport:
        nodes, inputs, outputs, notes = program_nodes(self, path)
        return analyze(nodes, inputs, outputs, notes=notes)

    def _describe_io(self, path: Path) -> dict[str, Any]:
        inputs, outputs = _io(self, path)
        note = program_nodes(self, path)[3][0]
        return {
            "format": "executorch",
            "inputs": inputs,
            "outputs": outputs,
            "precision": next(p for p, said in PRECISION_NOTES.items() if note.startswith(said)),
        }


def shuffle_indices(path: Path) -> np.ndarray | None:
    """The index map of the program's input gather (``index_select`` on the flattened image), or None."""
    backend = ExecuTorchBackend()
    nodes, inputs, _, _ = program_nodes(backend, path)
    plan, program = _plan(backend, path)
    for node in shuffle_prefix(nodes, inputs, lambda n: None):
        if node.type in SHUFFLE_KERNELS:
            return _constant(program, plan.values[int(node.inputs[2][1:])].val)
    return None


# ---- the .pte file ---------------------------------------------------------------------------


def _runtime(backend: ExecuTorchBackend, threads: int | None = None) -> Any:
    runtime = backend.require("executorch.runtime").Runtime.get()
    if threads:
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(int(threads))
    return runtime


def _bytes_runner(backend: ExecuTorchBackend, buffer: bytes, shape: list[int]) -> ExecuTorchRunner:
    program = _runtime(backend).load_program(buffer)
    return ExecuTorchRunner(Path("<converted>"), program, shape, {})


def _plan(backend: ExecuTorchBackend, path: Path) -> tuple[Any, Any]:
    from executorch.exir._serialize._program import deserialize_pte_binary

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} not found", "give the .pte of an exported ExecuTorch program")
    backend.require("executorch.exir")
    try:
        program = deserialize_pte_binary(path.read_bytes()).program
        plan = next(p for p in program.execution_plan if p.name == "forward")
    except Exception as exc:
        raise ExportError(f"cannot read {path} as an ExecuTorch program: {one_line(exc)}") from None
    return plan, program


def _tensor_port(value: Any, name: str) -> dict[str, Any]:
    return {"name": name, "shape": list(value.sizes), "dtype": SCALAR_TYPES.get(int(value.scalar_type), "unknown")}


def _io(backend: ExecuTorchBackend, path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    plan, _ = _plan(backend, path)
    inputs = [_tensor_port(plan.values[i].val, "image" if n == 0 else f"input{n}") for n, i in enumerate(plan.inputs)]
    outputs = [
        _tensor_port(plan.values[i].val, "logits" if n == 0 else f"output{n}") for n, i in enumerate(plan.outputs)
    ]
    return inputs, outputs


def _constant(program: Any, tensor: Any) -> np.ndarray | None:
    """A constant tensor's values from the program's constant buffer (None when it is not stored there)."""
    if not getattr(tensor, "data_buffer_idx", 0):
        return None
    storage = program.constant_buffer[tensor.data_buffer_idx].storage
    dtype = np.dtype(SCALAR_TYPES[int(tensor.scalar_type)])
    return np.frombuffer(bytes(storage), dtype=dtype).reshape(list(tensor.sizes)).copy()


def _xnn_graph(program: Any, delegate: Any) -> dict[str, Any]:
    """An XNNPACK delegate's payload as JSON (its flatbuffer decoded with ExecuTorch's flatc)."""
    from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import XNNHeader
    from executorch.exir._serialize._flatbuffer import _flatc_decompile

    blob = program.backend_delegate_data[delegate.processed.index].data
    header = XNNHeader.from_bytes(blob[: XNNHeader.EXPECTED_LENGTH])
    flatbuffer = blob[header.flatbuffer_offset : header.flatbuffer_offset + header.flatbuffer_size]
    schema = importlib.resources.files("executorch.backends.xnnpack.serialization").joinpath("schema.fbs")
    with tempfile.TemporaryDirectory(prefix="keyedge-pte-") as tmp, importlib.resources.as_file(schema) as fbs:
        (Path(tmp) / "graph.bin").write_bytes(flatbuffer)
        _flatc_decompile(tmp, str(fbs), str(Path(tmp) / "graph.bin"))
        return flatc_json((Path(tmp) / "graph.json").read_text())


#: flatc writes non-finite floats bare (``output_min: -inf`` of a plain ReLU's clamp), which JSON has no word for
_NON_FINITE = re.compile(r"(?<=[:\[,\s])(-?)(inf|nan)(?=\s*[,\]}])")


def flatc_json(text: str) -> dict[str, Any]:
    """flatc's JSON output as a dict: bare ``inf`` / ``-inf`` / ``nan`` read as floats; anything else malformed refused.

    A ResNet's ReLU is an XNNPACK clamp to ``[0, inf]``: read strictly, its delegate made
    ``export -t executorch`` end in a traceback after the program was built.
    """
    words = {"inf": "Infinity", "nan": "NaN"}
    fixed = _NON_FINITE.sub(lambda m: m[1] + words[m[2]], text)
    try:
        data = json.loads(fixed)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ExportError(f"cannot read an XNNPACK delegate of the program: {one_line(exc)}") from None
    if not isinstance(data, dict):
        raise ExportError("cannot read an XNNPACK delegate of the program: not a JSON object")
    return data


def program_nodes(backend: ExecuTorchBackend, path: Path) -> tuple[list[Node], list[str], list[str], list[str]]:
    """The program's ops in execution order -- portable kernels and every XNNPACK delegate's ops -- as nodes.

    Values are named ``v<id>`` (the program's value table); a delegate's internal values ``d<k>.<id>``,
    its external ones mapped to the call's arguments.  A kernel's arguments not yet written by an
    earlier instruction (nor graph inputs, nor constants) are its outputs: ExecuTorch's out variants.
    Decoding runs flatc once per delegate, so the result is kept per file state (export verification
    reads a file's graph, interface and indices in turn).
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} not found", "give the .pte of an exported ExecuTorch program")
    backend.require("executorch.exir")
    stat = path.stat()
    nodes, inputs, outputs, notes = _decoded(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    return list(nodes), list(inputs), list(outputs), list(notes)


@functools.lru_cache(maxsize=16)
def _decoded(path: str, _mtime_ns: int, _size: int) -> tuple[tuple[Node, ...], tuple, tuple, tuple]:
    backend = ExecuTorchBackend()
    plan, program = _plan(backend, Path(path))
    written = {f"v{i}" for i in plan.inputs}
    nodes: list[Node] = []
    delegated = portable = quantized = dynamic = half = 0

    def describe(value_id: int) -> str:
        val = plan.values[value_id].val
        if type(val).__name__ == "Tensor":
            data = _constant(program, val)
            return constant_signature(data, list(val.sizes), SCALAR_TYPES.get(int(val.scalar_type), "?"))
        return type(val).__name__

    for instruction in plan.chains[0].instructions:
        args = instruction.instr_args
        kind = type(args).__name__
        if kind == "KernelCall":
            operator = plan.operators[args.op_index]
            names = [f"v{a}" for a in args.args]
            ins = [n for n in names if n in written or not _is_buffer(plan, int(n[1:]))]
            outs = [n for n in names if n not in ins]
            written.update(outs)
            attrs = ";".join(describe(int(n[1:])) for n in ins if n not in written)
            nodes.append(
                Node(operator.name.split("::")[-1], ins, outs, f"{operator.overload}|{attrs}", name=operator.name)
            )
            portable += 1
        elif kind == "DelegateCall":
            delegate = plan.delegates[args.delegate_index]
            if delegate.id != "XnnpackBackend":
                names = [f"v{a}" for a in args.args]
                ins = [n for n in names if n in written]
                outs = [n for n in names if n not in ins]
                written.update(outs)
                nodes.append(Node(f"delegate:{delegate.id}", ins, outs, name=delegate.id))
                continue
            graph = _xnn_graph(program, delegate)
            external = {}
            for value in graph.get("xvalues", []):
                inner = value.get("xvalue_union", {})
                quantized += "Quantized" in value.get("xvalue_union_type", "")
                dynamic += "Dynamic" in str(inner.get("quant_params_type", ""))
                inner = inner.get("tensor_value", inner)
                half += inner.get("datatype") == "xnn_datatype_fp16"
                if inner.get("flags", 0) & 3:  # XNN_VALUE_FLAG_EXTERNAL_INPUT | _OUTPUT
                    external[inner["id_out"]] = f"v{args.args[inner['external_id']]}"
            prefix = f"d{args.delegate_index}."
            for xnode in graph.get("xnodes", []):
                fields = xnode.get("xnode_union", {})
                ids = {k: v for k, v in fields.items() if k.endswith("_id") and isinstance(v, int)}
                outs = [external.get(v, f"{prefix}{v}") for k, v in ids.items() if k.startswith("output")]
                ins = [external.get(v, f"{prefix}{v}") for k, v in ids.items() if not k.startswith("output")]
                written.update(outs)
                attrs = ",".join(f"{k}:{v}" for k, v in sorted(fields.items()) if not k.endswith("_id"))
                nodes.append(Node(xnode["xnode_union_type"], ins, outs, attrs, name=f"{prefix}{len(nodes)}"))
                delegated += 1
    quantized += sum(o.name.startswith("quantized_decomposed") for o in plan.operators)
    precision = "dynamic-int8" if dynamic else "int8" if quantized else "fp16" if half else "fp32"
    notes = [
        f"{PRECISION_NOTES[precision]}; "
        + f"{len(plan.delegates)} XNNPACK delegate call(s) holding {delegated} op(s); "
        f"{portable} portable kernel call(s): {', '.join(sorted({o.name for o in plan.operators})) or 'none'}"
    ]
    return tuple(nodes), tuple(f"v{i}" for i in plan.inputs), tuple(f"v{i}" for i in plan.outputs), tuple(notes)


def _is_buffer(plan: Any, value_id: int) -> bool:
    """Whether a value is a memory-planned tensor (an activation, not a constant or a scalar argument)."""
    val = plan.values[value_id].val
    return type(val).__name__ == "Tensor" and not getattr(val, "data_buffer_idx", 0)
