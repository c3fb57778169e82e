"""torch.export / AOTInductor target: a ``.pt2`` package that runs with libtorch alone, compiled ahead of time.

The module is captured with ``torch.export`` (the ExportedProgram: an ATen graph with its weights),
compiled by AOTInductor for this host's CPU (C++ kernels in a shared library; needs a C++ compiler
at export time, none at run time) and both are written into one PT2 archive
(``torch.export.pt2_archive``):

- the ExportedProgram, so the graph can be read back -- the op list, where the shuffle lives, the
  key's indices (the gather's constant) -- with ``torch.export.load``;
- the compiled library *without* its weights (``package_constants_in_so=False``): the runner loads
  them from the ExportedProgram's state, so the file holds every weight once and the index map that
  runs is the one read back.

Inductor compiles the key's gather as an indexed load fused into the kernels that follow it; the
conv form is an ordinary convolution, fold has no gather.  Batch is fixed (what the package was
compiled for); precision fp32 (the kernels compute what the graph computes).  The library is built
for the exporting host's CPU (its ISA: AVX-512 here): export on, or for, the device's architecture.

Fleets (:class:`AotiTemplate`): the library holds no weights and keyed models of one architecture differ only
in them (the key's indices, the fine-tuned weights), so the library is compiled once per architecture and
each key's package is its own ExportedProgram beside that library -- seconds per key instead of a compilation
(the program's structure is checked equal first, and each package is verified like a full export).

Running here and on a device: ``torch.export.pt2_archive._package.load_pt2`` (what
``torch._inductor.aoti_load_package`` wraps), threads set with ``torch.set_num_threads`` (OpenMP).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
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
from keyedge.exporters.capture import Quiet
from keyedge.exporters.checks import check_reproduces
from keyedge.exporters.graph import CONV_OPS, GATHER_OPS, GraphReport, Node, analyze, constant_signature
from keyedge.exporters.graph import shuffle_prefix as _shuffle_prefix

#: the package's model name (what ``aoti_load_package`` loads by default)
MODEL = "model"
#: keyedge's record in the archive's extra files: precision, I/O names and shapes
RECORD = "keyedge.json"
#: ATen ops that only re-type or copy a tensor (a buffer cast to the weight's dtype before a conv)
CASTS = frozenset({"to", "_to_copy", "clone", "contiguous", "detach"})
#: ATen ops that check, and compute nothing (left out of the read-back graph)
CHECKS = frozenset({"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size"})


class PT2Runner(Runner):
    """An AOTInductor-compiled model, its weights loaded from the package's ExportedProgram."""

    backend = "pt2"

    def __init__(self, path: Path, model: Any, shape: list[int], settings: dict[str, Any]):
        self.model = model
        super().__init__(path, shape, {**settings, "device": "CPU"})

    def infer(self, x: np.ndarray) -> Any:
        return self.model(torch.from_numpy(x))

    def logits(self, result: Any) -> np.ndarray:
        out = result[0] if isinstance(result, (tuple, list)) else result
        return out.detach().numpy()

    def close(self) -> None:
        self.model = None


@register_backend
class PT2Backend(ExportBackend):
    """Export to an AOTInductor package (``model.pt2``) with its ExportedProgram, run it with torch."""

    name = "pt2"
    extra = "pt2"
    suffix = ".pt2"
    runtime = "aoti"
    supports_template = True  # AotiTemplate: compile once per architecture, a program per key
    export_modules = ("torch._inductor",)
    runtime_modules = ("torch",)
    # keyed/plain, EfficientNet-Lite0 224 (keyed_latency --targets onnx,pt2): see docs/export.md
    auto_form = "gather"
    profile_options: ClassVar[dict[str, tuple[Any, Any]]] = {"device": (("CPU",), "CPU")}
    device_option = "device"
    precisions = ("fp32",)
    precision_refusal = (
        "AOTInductor compiles the ExportedProgram's float32 graph as it is",
        "export fp32 for pt2, or fp16/int8 with onnx, openvino, litert or executorch",
    )
    random_ops = True  # aten's randn compiles to Inductor's philox kernels

    def available(self) -> tuple[bool, str]:
        ok, reason = super().available()
        if ok and compiler() is None:
            return False, "AOTInductor needs a C++ compiler to build the package (install g++, or set CXX)"
        return ok, reason

    # ---- export ---------------------------------------------------------------------------
    def _export(self, module: nn.Module, path: Path, options: ExportOptions) -> list[Path]:
        if options.dynamic:
            raise ExportError("pt2 packages are compiled for one batch size here", "export with --batch 1 (or N)")
        program = capture(module, options)
        _package(path, program, compile_library(program, options), options)
        with self._load(path) as runner:
            check_reproduces(module, runner, options, "the AOTInductor package")
        return [path]

    # ---- fleet templates --------------------------------------------------------------------
    def template_for(self, cache: dict, ident: tuple, module: nn.Module, options: ExportOptions) -> Any:
        key = ("pt2", *ident)
        if key not in cache:
            cache[key] = None if options.dynamic else AotiTemplate.build(module, options)
        template = cache[key]
        return template if template is not None and template.fits(module) else None

    def export_from_template(self, template: Any, module: nn.Module, path: Path, options: ExportOptions) -> list[Path]:
        program = capture(module, options)
        if structure(program) != template.structure:  # another graph (a LoRA left unmerged...): compile it
            return self.export(module, path, options)
        _package(path, program, template.files, options)
        with self._load(path) as runner:
            check_reproduces(module, runner, options, "the AOTInductor package (fleet template)")
        return [path]

    # ---- inference ------------------------------------------------------------------------
    def devices(self) -> list[str]:
        return ["CPU"] if self.can_run()[0] else []

    def _load(self, path: Path, **settings: Any) -> Runner:
        from torch.export.pt2_archive._package import load_pt2

        program, _, record = _read(path)  # the graph first: a broken archive fails in one line
        survives_in_child(path, "AOTInductor package", self.name)  # a damaged library can kill the process
        threads = settings.get("threads")
        if threads:
            torch.set_num_threads(int(threads))
        contents = load_pt2(str(path))
        model = contents.aoti_runners.get(MODEL)
        if model is None:
            raise ExportError(f"{path} holds no compiled model named {MODEL!r}", "export it with keyedge")
        weights = {**program.state_dict, **program.constants}
        missing = [name for name in model.get_constant_fqns() if name not in weights]
        if missing:
            raise ExportError(
                f"{path}'s compiled model needs weights its program lacks ({missing[0]})", "export it again"
            )
        model.load_constants({name: weights[name] for name in model.get_constant_fqns()}, check_full_update=True)
        return PT2Runner(path, model, record["input"]["shape"], settings)

    # ---- reading back ---------------------------------------------------------------------
    def _inspect(self, path: Path) -> GraphReport:
        _, nodes, record = _read(path)
        notes = [f"AOTInductor package ({torch.__version__}), {record['precision']}, ExportedProgram read back"]
        indices = shuffle_indices(path)
        if indices is not None:
            notes.append(f"shuffle gather indices {indices.size} entries")
        return analyze(
            nodes, [record["input"]["name"]], [record["output"]], count=lambda n: n.type != "Const", notes=notes
        )

    def _describe_io(self, path: Path) -> dict[str, Any]:
        program, _, record = _read(path)
        out = next(n for n in program.graph.nodes if n.op == "output").args[0]
        out = out[0] if isinstance(out, (tuple, list)) else out
        return {
            "format": "pt2",
            "inputs": [{**record["input"], "dtype": "float32"}],
            "outputs": [{"name": record["output"], "shape": list(out.meta["val"].shape), "dtype": "float32"}],
            "precision": record["precision"],
        }


def compiler() -> str | None:
    """The C++ compiler AOTInductor would build with (``$CXX``, else g++/clang++ on PATH), or None."""
    chosen = os.environ.get("CXX")
    candidates = [chosen] if chosen else ["g++", "c++", "clang++"]
    return next((found for c in candidates if (found := shutil.which(c))), None)


def capture(module: nn.Module, options: ExportOptions) -> Any:
    """``module`` as an ExportedProgram for the export's fixed input."""
    return torch.export.export(module, (options.example_input(),), strict=False)


def compile_library(program: Any, options: ExportOptions) -> list[str]:
    """AOTInductor's files for ``program``, compiled for this CPU without the weights (they stay in the program)."""
    settings = {"aot_inductor.package": True, "aot_inductor.package_constants_in_so": False}
    return torch._inductor.aot_compile(program.module(), (options.example_input(),), options=settings)


def _package(path: Path, program: Any, files: list[str], options: ExportOptions) -> None:
    """Write the PT2 archive: the program, the library's files and keyedge's record."""
    from torch.export.pt2_archive._package import package_pt2

    record = {
        "precision": options.precision,
        "input": {"name": options.input_name, "shape": list(options.input_shape)},
        "output": options.output_name,
    }
    package_pt2(
        str(path),
        exported_programs={MODEL: program},
        aoti_files={MODEL: list(files)},
        extra_files={RECORD: json.dumps(record)},
    )


def structure(program: Any) -> str:
    """The program's weight-free structure (ops, wiring, constant shapes): equal for keys of one architecture."""
    nodes = _nodes(program, {"input": {"name": "image"}, "output": "logits"})
    return analyze(nodes, ["image"], ["logits"]).structure


@dataclass
class AotiTemplate:
    """One architecture's compiled library (no weights in it), kept for the process, and its program's structure."""

    files: list[str]
    structure: str
    signature: dict[str, tuple[tuple[int, ...], str]]  # the program's tensors by name -> (shape, dtype)
    directory: Any = field(repr=False)  # the TemporaryDirectory holding ``files``

    @classmethod
    def build(cls, module: nn.Module, options: ExportOptions) -> AotiTemplate:
        program = capture(module, options)
        directory = tempfile.TemporaryDirectory(prefix="keyedge-aoti-")
        files = []
        for source in compile_library(program, options):  # out of Inductor's cache, which another compile may prune
            target = Path(directory.name) / Path(source).name
            shutil.copy2(source, target)
            files.append(str(target))
        tensors = {**program.state_dict, **program.constants}
        signature = {k: (tuple(v.shape), str(v.dtype)) for k, v in tensors.items()}
        return cls(files, structure(program), signature, directory)

    def fits(self, module: nn.Module) -> bool:
        """True when ``module``'s tensors have the template's names, shapes and dtypes (the constants a graph makes
        itself come with each key's program; :meth:`PT2Backend.export_from_template` compares whole structures)."""
        tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        own = {name: meta for name, meta in self.signature.items() if name in tensors}
        return bool(own) and all((tuple(tensors[n].shape), str(tensors[n].dtype)) == m for n, m in own.items())


def shuffle_indices(path: Path) -> np.ndarray | None:
    """The index map of the input's gather (its constant, read from the package's ExportedProgram), or None."""
    program, nodes, record = _read(path)
    weights = _constants(program)
    for node in _shuffle_prefix(nodes, [record["input"]["name"]], lambda n: None):
        if node.type.lower() in GATHER_OPS and len(node.inputs) > 1:
            index = next((weights[t] for t in node.inputs[1:] if t in weights), None)
            if index is not None:
                return index.reshape(-1).astype(np.int64)
    return None


def conv_weight(path: Path, node: Node) -> np.ndarray | None:
    """A convolution node's weight (from the package's ExportedProgram, through dtype casts), or None."""
    program, nodes, _ = _read(path)
    if node.type.lower() not in CONV_OPS or len(node.inputs) < 2:
        return None
    producer = {n.outputs[0]: n for n in nodes if n.outputs}
    name = node.inputs[1]
    while name in producer and producer[name].type in CASTS and producer[name].inputs:
        name = producer[name].inputs[0]
    return _constants(program).get(name)


def shuffle_prefix(path: Path) -> list[Node]:
    """The package's ops that only move the input's pixels (:func:`keyedge.exporters.graph.shuffle_prefix`)."""
    _, nodes, record = _read(path)
    return _shuffle_prefix(nodes, [record["input"]["name"]], functools.partial(conv_weight, path))


def _constants(program: Any) -> dict[str, np.ndarray]:
    """The program's lifted weights, buffers and constants by their placeholder's name, as numpy."""
    signature = program.graph_signature
    by_target = {**program.state_dict, **program.constants}
    named = {
        **signature.inputs_to_parameters,
        **signature.inputs_to_buffers,
        **signature.inputs_to_lifted_tensor_constants,
    }
    return {name: by_target[target].detach().numpy() for name, target in named.items() if target in by_target}


def _read(path: Path) -> tuple[Any, list[Node], dict[str, Any]]:
    """The package's ExportedProgram, its ops as nodes (weights as ``Const``), and keyedge's record; per file state."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} not found", "give the .pt2 of an exported AOTInductor package")
    st = path.stat()
    return _read_cached(str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _read_cached(path: str, *state: int) -> tuple[Any, list[Node], dict[str, Any]]:
    """:func:`_read`'s work: the archive's program and record only (no compiled library is opened to read it)."""
    from torch.export.pt2_archive import _package as archive

    with Quiet(), archive.PT2ArchiveReader(path) as reader:
        files = reader.get_file_names()
        program = archive._load_exported_programs(reader, files, None).get(MODEL)
        extra = archive._load_extra_files(reader, files).get(RECORD)
    if program is None or extra is None:
        raise ExportError(f"{path} is not a keyedge pt2 package (no program or no {RECORD})", "export it with keyedge")
    record = json.loads(extra)
    return program, _nodes(program, record, path), record


def _nodes(program: Any, record: dict[str, Any], path: str = "the program") -> list[Node]:
    """The program's ops as nodes in graph order, its weights as ``Const`` nodes, the input named as recorded."""
    user = set(program.graph_signature.user_inputs)
    names = {}
    nodes: list[Node] = []
    weights = _constants(program)
    for node in program.graph.nodes:
        if node.op == "placeholder":
            if node.name in user:
                names[node.name] = record["input"]["name"]
                continue
            value = weights.get(node.name)
            shape = list(node.meta["val"].shape) if "val" in node.meta else []
            small = value if value is not None and value.size <= 16 else None
            dtype = str(value.dtype) if value is not None else "?"
            nodes.append(Node("Const", [], [node.name], constant_signature(small, shape, dtype), name=node.name))
            names[node.name] = node.name
        elif node.op == "call_function":
            names[node.name] = node.name
            args = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: n)
            inputs, literals = [], []
            for arg in torch.utils._pytree.tree_leaves(args):
                if isinstance(arg, torch.fx.Node):
                    inputs.append(names.get(arg.name, arg.name))
                else:
                    literals.append(repr(arg))
            kind = getattr(node.target, "__name__", str(node.target)).split(".")[0]
            if kind in CHECKS:
                continue
            nodes.append(Node(kind, inputs, [node.name], ",".join(literals), name=node.name))
        elif node.op == "output":
            results = torch.utils._pytree.tree_leaves(node.args)
            if len(results) != 1:
                raise ExportError(f"{path} has {len(results)} outputs, not one logits tensor", "export it with keyedge")
            final = results[0].name
            nodes.append(Node("Identity", [final], [record["output"]], name="output"))
    return nodes
