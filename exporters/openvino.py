"""OpenVINO target: ``ov.convert_model`` on the module (or on its ``torch.export`` program), IR v11 ``.xml`` + ``.bin``.

The input shape is pinned with ``input=[ov.PartialShape([B or -1, 3, S, S])]``
(otherwise OpenVINO leaves every dimension dynamic), the I/O tensors get the
requested names, and ``save_model`` writes fp32 weights unless ``fp16`` asks for
``compress_to_fp16`` (docs/design.md §6: the default compression costs up to ~6e-4).
Converting the module traces it (``torch.jit.trace``), which freezes input-dependent
branches: the converted model is checked against the module on probe inputs, and
should that check or the conversion fail, the module's ``torch.export`` program
(which refuses such branches instead of freezing them) is converted.

``int8`` quantizes the converted fp32 model with NNCF (``nncf.quantize``: FakeQuantize
ops, per-channel int8 weights, calibrated on ``ExportOptions.calibration``; the transformer
model type where the graph has a Softmax).  The ops that only move the input's pixels
(:func:`~keyedge.exporters.graph.shuffle_prefix`: the key's gather, or the conv form's
permutation conv) are in NNCF's ignored scope, so the shuffle stays exact and the first
FakeQuantize follows it; so are the first and last weighted layers
(:func:`~keyedge.exporters.graph.float_ends`), with NNCF's mixed preset: measured, both buy agreement.

Running: OpenVINO's CPU plugin computes in bf16 by default on CPUs with AMX or
AVX512-BF16, which moves outputs by ~1e-3.  its runner (:class:`OpenVinoRunner`) therefore
pins the inference precision to the artifact's: f32 for fp32 artifacts, f16 for
fp16 artifacts where the CPU supports it (else f32).  The precision is recorded
in the IR's ``rt_info`` (``keyedge/precision``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from keyedge.deps import require
from keyedge.exporters.base import ExportBackend, ExportError, ExportOptions, Runner, register_backend
from keyedge.exporters.capture import Quiet, one_line
from keyedge.exporters.checks import calibration_batches, check_reproduces, first_that_works
from keyedge.exporters.graph import GraphReport, Node, analyze, constant_signature, float_ends, shuffle_prefix
from keyedge.exporters.template import OnnxTemplate, openvino_from_template

SOURCES = ("module", "torch.export")
#: at most this many groups of layers go back to float under ``--int8-accuracy-control``
ACCURACY_CONTROL_ITERATIONS = 16


class OpenVinoRunner(Runner):
    """An OpenVINO model compiled for a device, with one infer request.

    The CPU plugin computes in bf16 by default on CPUs with AMX or AVX512-BF16, which moves
    outputs by ~1e-3: the inference precision is pinned to the artifact's (f32 for fp32
    artifacts, f16 for fp16 ones where the CPU supports it) unless ``precision`` says otherwise:
    ``host`` leaves the plugin its own default on this host (what a deployment that sets nothing gets),
    and the runner's settings then record the precision the plugin chose.
    """

    backend = "openvino"

    def __init__(self, path: Path, core: Any, model: Any, settings: dict[str, Any]):
        device = settings.get("device") or "CPU"
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        wanted = settings.get("precision")
        if device.startswith("CPU"):
            if wanted != "host":
                pinned = wanted if wanted not in (None, "artifact") else inference_precision(model, core)
                config["INFERENCE_PRECISION_HINT"] = pinned
            if settings.get("threads"):
                config["INFERENCE_NUM_THREADS"] = settings["threads"]
        self.compiled = core.compile_model(model, device, config)  # the one place an OpenVINO model is compiled
        self.request = self.compiled.create_infer_request()
        self._output = self.compiled.output(0)
        shape = self.compiled.input(0).get_partial_shape()
        precision = config.get("INFERENCE_PRECISION_HINT")
        if wanted == "host":
            precision = f"host:{_compiled_precision(self.compiled)}"
        super().__init__(
            path,
            [d.get_length() if d.is_static else None for d in shape],
            {**settings, "device": device, "precision": precision},
        )

    def infer(self, x: np.ndarray) -> Any:
        # no copies in or out (as benchmark_app): the call times the inference, not the Python wrapping
        return self.request.infer({0: x}, share_inputs=True, share_outputs=True)

    def logits(self, result: Any) -> np.ndarray:
        return result[self._output]

    def close(self) -> None:
        self.request = self.compiled = None


def _compiled_precision(compiled: Any) -> str:
    """The precision the plugin chose for a compiled model (``bf16``, ``f32``...), or ``default`` if it says none."""
    try:
        return str(compiled.get_property("INFERENCE_PRECISION_HINT").to_string())
    except Exception:
        return "default"


def inference_precision(model: Any, core: Any) -> str:
    """The CPU plugin precision matching the artifact: f32, or f16 / bf16 for fp16 / bf16 artifacts where the CPU
    computes in it (elsewhere f32: what the plugin itself falls back to)."""
    wanted = {"fp16": "FP16", "bf16": "BF16"}.get(_rt(model, "precision"))
    if wanted is not None and wanted in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        return wanted.lower()
    return "f32"


@register_backend
class OpenVinoBackend(ExportBackend):
    """Export to OpenVINO IR (``model.xml`` + ``model.bin``) and run it on the CPU plugin.

    ``sources`` gives what to convert, in order: the module itself, then its ``torch.export`` program.
    """

    name = "openvino"
    extra = "openvino"
    suffix = ".xml"
    # keyed/plain as for ONNX (pinned f32): gather 1.015 [0.993-1.036], elements 1.009, conv 1.026 -- a tie
    # within the spread; gather, which was also best (1.015) on an AMX Xeon and costs least alone
    auto_form = "gather"
    # bf16: the fp32 IR, computed in bf16 by the CPU plugin where the CPU has BF16 (AMX, AVX512-BF16) -- what the
    # plugin does there by default; verified by the agreement rule, like int8
    precisions = ("fp32", "fp16", "bf16", "int8")
    accuracy_control = True  # NNCF's quantize_with_accuracy_control
    runtime = "openvino"
    supports_template = True
    profile_options: ClassVar[dict[str, tuple[Any, Any]]] = {
        "device": (("CPU", "GPU", "NPU", "AUTO"), "CPU"),
        # artifact: pinned to the artifact's precision (parity); host: the plugin's default here (bf16 on AMX)
        "precision": (("artifact", "host"), "artifact"),
    }
    device_option = "device"
    sealable = True
    random_ops = True  # RandomUniform (the normal draw by Box-Muller)
    export_modules = ("openvino",)
    runtime_modules = ("openvino",)

    def __init__(self, *, sources: Sequence[str] = SOURCES):
        if not sources or set(sources) - set(SOURCES):
            raise ValueError(f"sources must be taken from {SOURCES}, got {tuple(sources)}")
        self.sources = tuple(sources)

    def planned_outputs(self, path: Path) -> list[Path]:
        return [path, path.with_suffix(".bin")]

    # ---- export ---------------------------------------------------------------------------
    def _export(self, module: nn.Module, path: Path, options: ExportOptions) -> list[Path]:
        ov = self.require("openvino")
        example = options.example_input()
        shape = ov.PartialShape(list(options.input_shape))

        def convert(source: str) -> Any:
            if source == "module":
                candidate = ov.convert_model(module, example_input=example, input=[shape])
                runner = OpenVinoRunner(Path("<converted>"), ov.Core(), candidate, {"precision": "f32"})
                check_reproduces(module, runner, options, "the traced OpenVINO model")
                return candidate
            dynamic = ({0: torch.export.Dim("batch")},) if options.dynamic else None
            program = torch.export.export(module, (example,), dynamic_shapes=dynamic)
            return ov.convert_model(program, input=[shape])

        model, used, errors = first_that_works("openvino", self.sources, convert)
        simplify(model)
        if options.precision == "int8":
            model = self._quantize(model, options)
        if len(model.inputs) != 1 or len(model.outputs) != 1:
            raise ExportError(
                f"the converted model has {len(model.inputs)} inputs and {len(model.outputs)} outputs",
                "export a module taking one image tensor and returning one logits tensor",
            )
        model.inputs[0].get_tensor().set_names({options.input_name})
        model.get_parameters()[0].set_friendly_name(options.input_name)
        model.outputs[0].get_tensor().set_names({options.output_name})
        model.set_rt_info(options.precision, ["keyedge", "precision"])
        model.set_rt_info(used, ["keyedge", "source"])
        model.set_rt_info("dynamic" if options.dynamic else str(options.batch), ["keyedge", "batch"])
        if errors:
            model.set_rt_info(f"converted from {used}; " + "; ".join(errors), ["keyedge", "notes"])
        ov.save_model(model, str(path), compress_to_fp16=options.precision == "fp16")
        return self.planned_outputs(path)

    def _quantize(self, model: Any, options: ExportOptions) -> Any:
        """NNCF post-training quantization of the fp32 model, the key's shuffle in the ignored scope."""
        with Quiet():
            nncf = require("nncf", extra="int8")
        nodes = [_node(op) for op in model.get_ordered_ops()]
        constants = {n.outputs[0]: op for n, op in zip(nodes, model.get_ordered_ops()) if n.type == "Constant"}

        def weight_of(node: Node) -> np.ndarray | None:
            op = constants.get(node.inputs[1]) if len(node.inputs) > 1 else None
            return None if op is None else np.array(op.get_data())

        inputs = [f"{p.get_name()}:0" for p in model.get_parameters()]
        prefix = shuffle_prefix(nodes, inputs, weight_of)
        shuffle, ends = [n.name for n in prefix], float_ends(nodes, prefix)
        transformer = any(n.type == "Softmax" for n in nodes)
        ignored = [*shuffle, *(n.name for n in ends)]
        common = dict(
            subset_size=len(options.calibration),
            fast_bias_correction=False,  # measured: top-1 agreement with fp32 94% vs 91% (Lite0, 32 px)
            model_type=nncf.ModelType.TRANSFORMER if transformer else None,
            # measured (experiments.int8, quickstart k1): with the ends float, the mixed preset (asymmetric
            # activations) agrees on 91.6% vs 90.8% with the performance preset
            preset=nncf.QuantizationPreset.MIXED,
            ignored_scope=nncf.IgnoredScope(names=ignored) if ignored else None,
        )
        calibration = nncf.Dataset(calibration_batches(options))
        if options.validation is None:
            quantized, how = nncf.quantize(model, calibration, **common), ""
        else:
            quantized = _quantize_with_accuracy_control(nncf, model, calibration, options, common)
            how = (
                f"; accuracy control: up to {ACCURACY_CONTROL_ITERATIONS} groups of layers returned to float, "
                f"aiming at agreement with fp32 within {options.max_agreement_loss:.1%} on "
                f"{len(options.validation)} held-out images"
            )
        quantized.set_rt_info(
            f"nncf {nncf.__version__} post-training quantization ({'transformer' if transformer else 'default'} "
            f"model type, mixed preset), {len(options.calibration)} calibration images; {len(shuffle)} shuffle "
            f"op(s) and {len(ends)} end layer(s) ({', '.join(n.type for n in ends)}) kept in float32{how}",
            ["keyedge", "quantization"],
        )
        return quantized

    def template_for(self, cache: dict, ident: tuple, module: nn.Module, options: ExportOptions) -> Any:
        return OnnxTemplate.for_module(cache, ("onnx", *ident), module, options)  # one for ONNX and OpenVINO

    def export_from_template(self, template: Any, module: nn.Module, path: Path, options: ExportOptions) -> list[Path]:
        return openvino_from_template(template, module, path, options)

    # ---- inference ------------------------------------------------------------------------
    def can_run(
        self, *, device: str | None = None, providers: Sequence[str] | None = None, compute_units: str | None = None
    ) -> tuple[bool, str]:
        ok, reason = super().can_run()
        if not ok or device in (None, "AUTO"):
            return ok, reason
        try:
            devices = self.require("openvino").Core().available_devices
        except Exception as exc:
            return False, f"openvino fails to initialise ({one_line(exc)})"
        if not any(d == device or d.split(".")[0] == device for d in devices):
            return False, f"OpenVINO device {device} is not available (has {', '.join(devices) or 'none'})"
        return True, reason

    def devices(self) -> list[str]:
        return list(self.require("openvino").Core().available_devices) if self.can_run()[0] else []

    def _load(self, path: Path, *, files: dict[str, bytes] | None = None, **settings: Any) -> Runner:
        core = self.require("openvino").Core()
        if files is None:
            return OpenVinoRunner(path, core, self._read(path, core), settings)
        # a sealed artifact, decrypted in memory: the IR text and the weights as a tensor over the bytes
        ov = self.require("openvino")
        xml, weights = files[path.name], files[path.with_suffix(".bin").name]
        model = core.read_model(xml, ov.Tensor(np.frombuffer(weights, dtype=np.uint8)))
        runner = OpenVinoRunner(path, core, model, settings)
        runner._buffers = (xml, weights)  # the weights tensor views these bytes: keep them alive with the model
        return runner

    # ---- reading back ---------------------------------------------------------------------
    def _read(self, path: Path, core: Any = None) -> Any:
        ov = self.require("openvino")
        path = Path(path)
        if not path.is_file() or not path.with_suffix(".bin").is_file():
            raise ExportError(
                f"{path} (with {path.with_suffix('.bin').name} beside it) not found",
                "give the .xml of an exported OpenVINO model",
            )
        try:
            return (core or ov.Core()).read_model(str(path))
        except Exception as exc:
            raise ExportError(f"cannot read {path} as OpenVINO IR: {one_line(exc)}") from None

    def _inspect(self, path: Path) -> GraphReport:
        model = self._read(path)
        ops = list(model.get_ordered_ops())
        nodes = [_node(op) for op in ops]
        inputs = [f"{p.get_name()}:0" for p in model.get_parameters()]
        outputs = [n.inputs[0] for n in nodes if n.type == "Result"]
        notes = [
            f"precision {_rt(model, 'precision') or 'unknown'}, converted from {_rt(model, 'source') or 'unknown'}"
        ]
        for extra in ("quantization", "notes"):
            if _rt(model, extra):
                notes.append(_rt(model, extra))
        return analyze(nodes, inputs, outputs, notes=notes)

    def _describe_io(self, path: Path) -> dict[str, Any]:
        model = self._read(path)

        def port(p: Any) -> dict[str, Any]:
            dtype = np.dtype(p.get_element_type().to_dtype()).name
            return {"name": p.get_any_name(), "shape": _shape(p), "dtype": dtype}

        return {
            "format": "openvino",
            "inputs": [port(p) for p in model.inputs],
            "outputs": [port(p) for p in model.outputs],
            "precision": _rt(model, "precision"),
            "source": _rt(model, "source"),
        }


def simplify(model: Any) -> None:
    """Fold the shape arithmetic the PyTorch frontend leaves behind (ShapeOf -> Gather -> Concat -> Reshape).

    Tracing ``pixel_unshuffle`` or ``flatten`` records shapes as computations; with a static
    image size they are constants.  OpenVINO's offline MOC pipeline (what ``ovc`` runs) folds
    them, even with a dynamic batch, so the IR holds only the data ops -- the conv shuffle
    then has no Gather at all.  Public constant folding is the fallback if the private
    module moves in a future OpenVINO.
    """
    try:
        from openvino._offline_transformations import apply_moc_transformations

        apply_moc_transformations(model, cf=True)
    except ImportError:  # pragma: no cover - depends on the OpenVINO release
        from openvino.passes import ConstantFolding, Manager

        manager = Manager()
        manager.register_pass(ConstantFolding())
        manager.run_passes(model)


def _shape(port: Any) -> list[int]:
    shape = port.get_partial_shape()
    if shape.rank.is_dynamic:
        raise ExportError("the model's input rank is dynamic", "export with a fixed input shape")
    return [d.get_length() if d.is_static else -1 for d in shape]


def _rt(model: Any, key: str) -> str | None:
    if not model.has_rt_info(["keyedge", key]):
        return None
    return str(model.get_rt_info(["keyedge", key]).astype(str))


def _quantize_with_accuracy_control(nncf: Any, model: Any, calibration: Any, options: ExportOptions, common: dict):
    """NNCF's accuracy-aware quantization, its metric top-1 agreement with the fp32 model on held-out images.

    Measured (experiments.int8, quickstart k1, 300 held-out training images, 0.5% allowed): test agreement
    93.6% and no accuracy drop, vs 87.6% / 2.2 points for plain quantization -- in ~190 s instead of ~5 s.
    """
    ov = require("openvino", extra="openvino")
    fp32 = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    images = calibration_batches(replace(options, calibration=options.validation))  # in the artifact's batch
    items = [(x, np.asarray(fp32(x)[0]).argmax(-1)) for x in images]

    def agreement(compiled: Any, items: Any) -> float:  # NNCF calls it on subsets too: each item has its answers
        return float(np.mean(np.concatenate([np.asarray(compiled(x)[0]).argmax(-1) == top for x, top in items])))

    return nncf.quantize_with_accuracy_control(
        model,
        calibration_dataset=calibration,
        validation_dataset=nncf.Dataset(items, lambda item: item[0]),
        validation_fn=agreement,
        max_drop=options.max_agreement_loss,
        drop_type=nncf.DropType.ABSOLUTE,
        # each iteration returns one group of layers to float and validates again: bounded, so a model int8 cannot
        # hold ends in minutes with the best it reached (and the agreement rule then judges it)
        advanced_accuracy_restorer_parameters=nncf.AdvancedAccuracyRestorerParameters(
            max_num_iterations=ACCURACY_CONTROL_ITERATIONS
        ),
        **common,
    )


def _node(op: Any) -> Node:
    kind = op.get_type_name()
    outputs = [f"{op.get_name()}:{i}" for i in range(op.get_output_size())]
    inputs = [f"{i.get_source_output().get_node().get_name()}:{i.get_source_output().get_index()}" for i in op.inputs()]
    if kind == "Constant":
        dtype = np.dtype(op.get_element_type().to_dtype())
        shape = list(op.get_output_shape(0))
        small_int = np.issubdtype(dtype, np.integer) and int(np.prod(shape)) <= 16
        attrs = constant_signature(np.array(op.get_data()) if small_int else None, shape, dtype.name)
    else:
        attrs = f"{op.get_type_info().version_id}|" + ",".join(
            f"{k}:{v!r}" for k, v in sorted(op.get_attributes().items())
        )
    return Node(kind, inputs, outputs, attrs, name=op.get_friendly_name())
