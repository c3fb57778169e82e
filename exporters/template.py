"""Fleet templates: trace and convert once per architecture, then write each key's artifact from the template.

A backend that can write from a template says so (``ExportBackend.supports_template``) and
implements ``export_from_template``; :func:`keyedge.deploy.export.export_many` builds one
:class:`OnnxTemplate` per architecture and asks each backend.

One-key-one-model means exporting the same architecture for many keys.  A full
export traces the module and runs the converter every time; but keyed models of
one architecture differ only in constants -- the gather's index vector and the
(fine-tuned, LoRA-merged) weights.  So:

* **ONNX**: the first key is traced once *without* the exporter's graph optimization
  (same opset and input/output names as a full export), where every initializer keeps
  the name of the module parameter or buffer it holds (``shuffle.index``,
  ``backbone.blocks.0.attn.qkv.weight``...).  A key's artifact must be optimized by the
  onnxscript passes ``torch.onnx.export(optimize=True)`` runs (constant folding, BatchNorm
  folding, shape arithmetic, fusions): left unoptimized it had 558 nodes instead of 100 on
  EfficientNet-Lite0 and ran ~3x slower in onnxruntime, which does not fold them at load.
  Optimizing every key's whole graph cost 1.0-1.4 s per key there and 2.8-3.0 s on ViT-Ti,
  so it is done in two steps.  *Once per architecture* the graph is optimized with the module's
  tensors lifted to graph inputs: everything that does not depend on their values (shape
  arithmetic, fusions, the ``Flatten``/``Reshape`` rules...) is done, and the rewrite rules
  that still fire once the tensors are constants are noted (on EfficientNet-Lite0
  BatchNorm-into-Conv and the zero-bias removals).  *Per key* the tensors go back in as
  initializers and only constant folding (no shape inference: the shapes are known) and
  those rules run: 0.14 s instead of 1.39 s on EfficientNet-Lite0, 0.18 s instead of 3.0 s
  on ViT-Ti, measured side by side on one key (the whole export per key: ``export --end-to-end``'s
  ``template_steady``, ``benchmarks/experiments/export.py``).  The artifact is the graph a full export
  of that key writes -- same op multiset, same initializers (a test checks it) -- and so
  has its latency.
* **OpenVINO**: read from the key's ONNX artifact (``Core.read_model``: OpenVINO's ONNX
  frontend, without ``convert_model``'s offline passes, which the CPU plugin applies
  when compiling) and saved as IR; not traced from torch again.
* **CoreML**: :class:`keyedge.exporters.coreml.MilTemplate`: the torch frontend's MIL program
  (before any pass; its consts are named after the module's tensors) is made once, and each key's
  package is a copy with the key's tensors, run through the default pass pipeline -- the weight
  blob is byte-for-byte a full conversion's (tested).

A template is used only when the module's named tensors match the template's
initializers exactly (same names, shapes and dtypes); anything else falls back to a
full export.  Every artifact is verified like any other (``keyedge.deploy.export``).

This module imports no backend; the backends import it (the ONNX opset, :data:`OPSET`, is defined
here for both the ONNX backend's full exports and the templates).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from keyedge.deps import require
from keyedge.exporters.capture import Quiet

#: The ONNX opset of every ONNX graph keyedge writes: full exports (keyedge.exporters.onnx) and fleet templates
OPSET = 18


def module_tensors(module: nn.Module) -> dict[str, np.ndarray]:
    """Every parameter and buffer (persistent or not) by its dotted name, as numpy arrays."""
    tensors = {name: t for name, t in module.state_dict(keep_vars=False).items()}
    tensors.update({name: t for name, t in module.named_buffers()})
    return {name: t.detach().cpu().numpy() for name, t in tensors.items()}


@dataclass
class OnnxTemplate:
    """An unoptimized ONNX graph of one architecture with initializers named after the module's tensors."""

    proto_bytes: bytes
    signature: dict[str, tuple[tuple[int, ...], str]]  # initializer name -> (shape, dtype)
    input_name: str
    output_name: str
    #: the rewrite rules that fire once the module's tensors are constants (None: every default rule)
    rules: list | None = field(default=None, repr=False, compare=False)
    #: the last module instantiated and its optimized model (bytes): a key's OpenVINO IR reads the same ONNX
    _last: tuple[Any, bytes] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def build(cls, module: nn.Module, options) -> OnnxTemplate:
        onnx_ir = require("onnx_ir", extra="onnx")
        onnx = require("onnx", extra="onnx")
        dynamic = ({0: torch.export.Dim("batch")},) if options.dynamic else None
        with Quiet():
            program = torch.onnx.export(
                module,
                (options.example_input(),),
                dynamo=True,
                optimize=False,  # after the substitution, per key (instantiate)
                opset_version=OPSET,
                verbose=False,
                dynamic_shapes=dynamic,
                input_names=[options.input_name],
                output_names=[options.output_name],
            )
        proto = onnx_ir.serde.serialize_model(program.model)
        signature = {}
        for init in proto.graph.initializer:
            array = onnx.numpy_helper.to_array(init)
            signature[init.name] = (tuple(array.shape), str(array.dtype))
        # step 1: optimize the structure once, the module's tensors lifted to graph inputs
        model = onnx_ir.serde.deserialize_model(proto)
        tensors = module_tensors(module)
        graph = model.graph
        for name in [n for n in graph.initializers if n in tensors]:
            value = graph.initializers.pop(name)
            value.const_value = None
            graph.inputs.append(value)
        with Quiet():
            optimize_like_torch_export(model)
        structure = onnx_ir.serde.serialize_model(model).SerializeToString()
        template = cls(structure, signature, options.input_name, options.output_name)
        template.rules = template._value_rules(tensors)
        return template

    def fits(self, tensors: dict[str, np.ndarray]) -> bool:
        """True when every tensor the module computes with is a template initializer of the same shape and dtype.

        (A tensor the exporter had folded into an unnamed constant would otherwise keep the
        template's value: it is refused here, and verification would catch it too.)
        """
        named = {k: v for k, v in self.signature.items() if k in tensors}
        used = {k for k in tensors if not k.endswith("num_batches_tracked")}  # a counter no graph reads
        if not named or used - set(self.signature):
            return False
        return all(
            tuple(tensors[k].shape) == shape and str(tensors[k].dtype) == dtype for k, (shape, dtype) in named.items()
        )

    @classmethod
    def for_module(
        cls, cache: dict[tuple, OnnxTemplate], ident: tuple, module: nn.Module, options
    ) -> OnnxTemplate | None:
        """The cached template of ``ident`` (built from ``module`` the first time), if ``module`` fits it."""
        if ident not in cache:
            cache[ident] = cls.build(module, options)
        template = cache[ident]
        return template if template.fits(module_tensors(module)) else None

    def instantiate(self, module: nn.Module, path: Path, options) -> list[Path]:
        """Write ``module``'s artifact at ``path``: the template, its tensors, a full export's optimization; checked."""
        onnx = require("onnx", extra="onnx")
        onnx_ir = require("onnx_ir", extra="onnx")
        model = self._bind(module_tensors(module))
        with Quiet():
            fold_key(model, self.rules)
        proto = onnx_ir.serde.serialize_model(model)
        props = {p.key: p.value for p in proto.metadata_props}
        props.update(
            {
                "keyedge.precision": options.precision,
                "keyedge.exporter": "fleet-template",
                "keyedge.batch": "dynamic" if options.dynamic else str(options.batch),
            }
        )
        onnx.helper.set_model_props(proto, props)
        onnx.save(proto, str(path))
        onnx.checker.check_model(str(path))
        self._last = (weakref.ref(module), proto.SerializeToString())
        return [path]

    def _bind(self, tensors: dict[str, np.ndarray]):
        """The structure (step 1) as an ONNX IR model with ``tensors`` back in as its initializers."""
        onnx = require("onnx", extra="onnx")
        onnx_ir = require("onnx_ir", extra="onnx")
        model = onnx_ir.serde.deserialize_model(onnx.ModelProto.FromString(self.proto_bytes))
        graph = model.graph
        bound = [v for v in graph.inputs if v.name in tensors]
        kept = [v for v in graph.inputs if v.name not in tensors]
        graph.inputs.clear()
        graph.inputs.extend(kept)
        for value in bound:
            value.const_value = onnx_ir.tensor(np.ascontiguousarray(tensors[value.name]), name=value.name)
            graph.register_initializer(value)
        return model

    def _value_rules(self, tensors: dict[str, np.ndarray]) -> list | None:
        """The default rewrite rules that fire on the structure once ``tensors`` are constants, in their order.

        A rule that fires for one key's values and not for the template's (an all-zero bias
        only one key has) is not run for that key: its graph then keeps an operation the
        full export would drop, computing the same outputs.
        """
        rewriter = require("onnxscript.rewriter", extra="onnx")
        optimizer = require("onnxscript.optimizer", extra="onnx")
        rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
        if rules is None:  # an onnxscript without the list: every key runs every rule
            return None
        model = self._bind(tensors)
        fired = set()
        with Quiet():
            for _ in range(FOLD_ITERATIONS):
                optimizer.fold_constants(model, onnx_shape_inference=False)
                for i, rule in enumerate(rules):
                    if rewriter.RewriteRuleSet([rule]).apply_to_model(model):
                        fired.add(i)
                optimizer.remove_unused_nodes(model)
        return [rule for i, rule in enumerate(rules) if i in fired]

    def optimized_for(self, module: nn.Module, path: Path, options) -> None:
        """Write ``module``'s optimized ONNX model at ``path``: the one just instantiated for it, else a new one."""
        if self._last is not None and self._last[0]() is module:
            path.write_bytes(self._last[1])
            self._last = None  # used once: do not hold a second copy of the model between keys
        else:
            self.instantiate(module, path, options)


def optimize_like_torch_export(model) -> None:
    """The passes ``torch.onnx.export(..., optimize=True)`` applies to its ONNX IR model, in place.

    (torch calls ``onnxscript._framework_apis.torch_2_x.optimize``: ``optimize_ir`` then the ONNX
    fusions.)  Should a torch release change them, the template test -- a template artifact must
    have its full export's op multiset -- fails rather than fleets silently getting slower graphs.
    """
    optimizer = require("onnxscript.optimizer", extra="onnx")
    fusions = require("onnxscript.rewriter.onnx_fusions", extra="onnx")
    optimizer.optimize_ir(model)
    fusions.fuse(model)


#: optimize_ir's default number of fold-and-rewrite rounds
FOLD_ITERATIONS = 2


def fold_key(model, rules: list | None) -> None:
    """A key's step of the template's optimization, in place: ``optimize_ir``'s passes over its constants only.

    The same sequence as ``onnxscript.optimizer.optimize_ir`` -- fold and rewrite twice, then
    the clean-up passes -- with the rewrite rules the structure showed it needs (``rules``; None:
    all) and without ONNX shape inference, which step 1 already ran.
    """
    rewriter = require("onnxscript.rewriter", extra="onnx")
    optimizer = require("onnxscript.optimizer", extra="onnx")
    if rules is None:
        optimizer.optimize_ir(model, onnx_shape_inference=False)
        return
    common = require("onnx_ir.passes.common", extra="onnx")
    ir = require("onnx_ir", extra="onnx")
    rewrite = rewriter.RewritePass(rewriter.RewriteRuleSet(rules)) if rules else None
    for _ in range(FOLD_ITERATIONS):
        changed = optimizer.fold_constants(model, onnx_shape_inference=False).modified
        if rewrite is not None:
            changed = rewrite(model).modified or changed
        optimizer.remove_unused_nodes(model)
        if not changed:
            break
    ir.passes.Sequential(
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)


def openvino_from_template(template: OnnxTemplate, module: nn.Module, xml_path: Path, options) -> list[Path]:
    """A key's OpenVINO IR from the template, through a scratch ONNX file beside it (removed after).

    When the key's ONNX artifact was just written from the template, that optimized graph is reused
    rather than optimized a second time (0.85 s per key on EfficientNet-Lite0 at 224).
    """
    scratch = xml_path.with_name(f".{xml_path.stem}.template.onnx")
    try:
        template.optimized_for(module, scratch, options)
        return openvino_from_onnx(scratch, xml_path, options)
    finally:
        scratch.unlink(missing_ok=True)


def openvino_from_onnx(onnx_path: Path, xml_path: Path, options) -> list[Path]:
    """Write a key's ONNX artifact as OpenVINO IR (no torch tracing, no offline passes)."""
    ov = require("openvino", extra="openvino")
    model = ov.Core().read_model(str(onnx_path))
    model.inputs[0].get_tensor().set_names({options.input_name})
    model.outputs[0].get_tensor().set_names({options.output_name})
    model.set_rt_info(options.precision, ["keyedge", "precision"])
    model.set_rt_info("onnx-template", ["keyedge", "source"])
    model.set_rt_info("dynamic" if options.dynamic else str(options.batch), ["keyedge", "batch"])
    ov.save_model(model, str(xml_path), compress_to_fp16=options.precision == "fp16")
    return [xml_path, xml_path.with_suffix(".bin")]
