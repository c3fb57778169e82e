"""ncnn target (Tencent's mobile runtime, Android/iOS/ARM boards): ``model.param`` + ``model.ncnn.bin`` via pnnx.

The module is traced (``torch.jit.trace``, one image) and converted by the ``pnnx`` binary that the
``pnnx`` wheel ships (called directly: the wheel's ``pnnx.export`` also imports the Python code it
generates), then checked against the module on probe inputs (a trace freezes branches).  timm's ViT
attention (``qkv`` reshaped to 5-D and unbound) has no ncnn spelling; :func:`ncnn_friendly` swaps each
such block for ``nn.MultiheadAttention`` with the same weights (the same function), which pnnx writes as
ncnn's ``MultiHeadAttention`` layer.  ncnn has no
gather op -- pnnx leaves ``torch.index_select`` unconverted -- so the key's shuffle is written in its
conv form, a stride-P ``Convolution`` with a 0/1 weight followed by ``PixelShuffle`` (``--fuse auto``
and ``fastest`` pick it; ``gather``, ``elements`` and ``planes`` are refused in one line), or folded
into a ViT's patch embedding where that is exact.  ncnn's Mat holds one image: batch is 1.

``fp32`` writes float32 weights (pnnx's default is fp16) and runs with fp16 storage and arithmetic off;
``fp16`` writes half weights and runs with them on (ARMv8.2 and x86 F16C).  The blobs are renamed from
pnnx's ``in0``/``out0`` to the requested input and output names.  Reading back parses the ``.param``
text (layers in order) and the precision tag of the first weight in the ``.bin``; :func:`shuffled`
runs the file up to its ``PixelShuffle`` so that tests compare the key's permutation bit for bit.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import tempfile
import warnings
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
from keyedge.exporters.checks import check_reproduces
from keyedge.exporters.graph import GraphReport, Node, analyze

MAGIC = "7767517"
#: the tag before a layer's weight data in an ncnn ``.bin`` (ncnn's ModelBinFromDataReader), by precision
WEIGHT_TAGS = {0: "fp32", 0x01306B47: "fp16", 0x000D4B38: "int8"}
#: layers that start with a tagged weight blob (``MemoryData`` is raw float32, w*h*d*c values)
WEIGHTED = ("Convolution", "ConvolutionDepthWise", "InnerProduct", "Deconvolution", "DeconvolutionDepthWise")
#: pnnx's unconverted ops carry their PyTorch spelling (``torch.index_select``, ``F.grid_sample``...)
UNCONVERTED = ("torch.", "F.", "Tensor.", "nn.", "pnnx.", "aten::", "prim::")


class _MultiheadTwin(nn.Module):
    """timm's ``Attention`` as ``nn.MultiheadAttention`` (``qkv`` -> ``in_proj``, ``proj`` -> ``out_proj``)."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        qkv, proj = attention.qkv, attention.proj
        self.mha = nn.MultiheadAttention(
            qkv.in_features, attention.num_heads, bias=qkv.bias is not None, batch_first=True
        ).eval()
        self.mha.in_proj_weight.data.copy_(qkv.weight)
        self.mha.out_proj.weight.data.copy_(proj.weight)
        if qkv.bias is not None:
            self.mha.in_proj_bias.data.copy_(qkv.bias)
        if proj.bias is not None:
            self.mha.out_proj.bias.data.copy_(proj.bias)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


def ncnn_friendly(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with every plain timm ``Attention`` (no q/k norm, default scale, bias-free or biased
    projections) replaced by its ``nn.MultiheadAttention`` twin; ``module`` itself when there is none."""
    try:
        from timm.models.vision_transformer import Attention
    except ImportError:  # pragma: no cover - timm is a core dependency
        return module

    def plain(a: nn.Module) -> bool:
        norms = [getattr(a, n, None) for n in ("q_norm", "k_norm", "norm")]
        head_dim = a.qkv.in_features // a.num_heads
        default_scale = abs(float(getattr(a, "scale", head_dim**-0.5)) - head_dim**-0.5) < 1e-12
        return default_scale and all(n is None or isinstance(n, nn.Identity) for n in norms)

    if not any(isinstance(m, Attention) and plain(m) for m in module.modules()):
        return module
    module = copy.deepcopy(module)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Attention) and plain(child):
                setattr(parent, name, _MultiheadTwin(child))
    return module


class NcnnRunner(Runner):
    """An ncnn model in ncnn's ``Net`` on the CPU (Vulkan off), one image per call."""

    backend = "ncnn"

    def __init__(self, path: Path, net: Any, mat: Any, names: tuple[str, str], shape: list[int], settings: dict):
        self.net, self._mat = net, mat
        self._input, self._output = names
        super().__init__(path, shape, {**settings, "device": "CPU"})

    def infer(self, x: np.ndarray) -> Any:
        with self.net.create_extractor() as extractor:
            extractor.input(self._input, self._mat(x[0]))
            _, out = extractor.extract(self._output)
            return np.array(out, dtype=np.float32).reshape(1, -1)

    def logits(self, result: Any) -> np.ndarray:
        return result

    def close(self) -> None:
        if self.net is not None:
            self.net.clear()
        self.net = None


@register_backend
class NcnnBackend(ExportBackend):
    """Export to an ncnn model (``model.param`` + ``model.ncnn.bin``) through pnnx and run it with ncnn."""

    name = "ncnn"
    extra = "ncnn"
    suffix = ".param"
    runtime = "ncnn"
    export_modules = ("pnnx", "ncnn")
    runtime_modules = ("ncnn",)
    forms = ("conv",)
    # no gather op in ncnn: the conv form is the one exact form it runs
    auto_form = "conv"
    profile_options: ClassVar[dict[str, tuple[Any, Any]]] = {"device": (("CPU",), "CPU")}
    device_option = "device"
    precisions = ("fp32", "fp16")
    precision_refusal = (
        "keyedge does not quantize ncnn models (ncnn2int8 needs the calibration table tool, not in ncnn's wheel)",
        "export fp32 or fp16 for ncnn, or int8 for onnx/openvino/litert/executorch",
    )
    random_refusal = "ncnn has no random op"

    def planned_outputs(self, path: Path) -> list[Path]:
        return [path, weights_of(path)]

    # ---- export ---------------------------------------------------------------------------
    def _export(self, module: nn.Module, path: Path, options: ExportOptions) -> list[Path]:
        if options.batch != 1:
            raise ExportError("ncnn runs one image per call (its Mat has no batch axis)", "export with --batch 1")
        pnnx = self.require("pnnx")
        self.require("ncnn")
        example = options.example_input()
        with tempfile.TemporaryDirectory(prefix="keyedge-ncnn-") as tmp:
            work = Path(tmp)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(ncnn_friendly(module), (example,), check_trace=False)
            traced.save(str(work / "model.pt"))
            del traced
            out = {k: work / f"model.{k}" for k in ("pnnxparam", "pnnxbin", "pnnxpy", "pnnxonnx", "ncnnpy")}
            command = [pnnx.EXEC_PATH, str(work / "model.pt"), f"inputshape=[{','.join(map(str, example.shape))}]f32"]
            command += ["device=cpu", f"fp16={int(options.precision == 'fp16')}"]
            command += [f"{k}={v}" for k, v in out.items()]
            command += [f"ncnnparam={work / 'model.ncnn.param'}", f"ncnnbin={work / 'model.ncnn.bin'}"]
            done = subprocess.run(command, capture_output=True, text=True, cwd=tmp, check=False)
            param, weights = work / "model.ncnn.param", work / "model.ncnn.bin"
            if done.returncode != 0 or not param.is_file() or not weights.is_file():
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                raise ExportError(f"pnnx could not convert the model ({tail[0]})", "see ExportError.details")
            layers = parse_param(param.read_text())
            _refuse_unconverted(layers)
            names = {"in0": options.input_name, "out0": options.output_name}
            renamed = rename_blobs(layers, names, (3, options.image_size, options.image_size))
            path.write_text(renamed)
            shutil.move(str(weights), weights_of(path))
        if options.precision == "fp32":
            with self._load(path) as runner:
                check_reproduces(module, runner, options, "the ncnn model")
        return self.planned_outputs(path)

    # ---- inference ------------------------------------------------------------------------
    def devices(self) -> list[str]:
        return ["CPU"] if self.can_run()[0] else []

    def _load(self, path: Path, **settings: Any) -> Runner:
        ncnn = self.require("ncnn")
        _, inputs, outputs, precision = _read(path)
        survives_in_child(path, "ncnn model", self.name)  # a .param Python parses may still crash ncnn's loader
        half = (settings.get("precision") or precision) in ("fp16", "f16")
        net = _net(ncnn, path, half=half, threads=settings.get("threads"))
        return NcnnRunner(path, net, ncnn.Mat, (inputs[0]["name"], outputs[0]["name"]), inputs[0]["shape"], settings)

    # ---- reading back ---------------------------------------------------------------------
    def _inspect(self, path: Path) -> GraphReport:
        layers, inputs, outputs, precision = _read(path)
        nodes = [Node(kind, bottoms, tops, " ".join(params)) for kind, _, bottoms, tops, params in layers]
        notes = [f"ncnn model, weights {precision}"]
        return analyze(nodes, [i["name"] for i in inputs], [o["name"] for o in outputs], notes=notes)

    def _describe_io(self, path: Path) -> dict[str, Any]:
        _, inputs, outputs, precision = _read(path)
        return {"format": "ncnn", "inputs": inputs, "outputs": outputs, "precision": precision}


Layer = tuple[str, str, list[str], list[str], list[str]]  # type, name, bottoms, tops, params


def weights_of(path: Path) -> Path:
    """The ``.bin`` beside an ncnn ``.param`` (``model.param`` -> ``model.ncnn.bin``: not OpenVINO's ``model.bin``)."""
    return Path(path).with_suffix(".ncnn.bin")


def parse_param(text: str) -> list[Layer]:
    """An ncnn ``.param`` (text) as layers in order; a malformed file raises ValueError."""
    lines = [line.split() for line in text.splitlines() if line.strip()]
    if len(lines) < 2 or lines[0] != [MAGIC] or len(lines[1]) != 2:
        raise ValueError("not an ncnn param file (no 7767517 header)")
    count = int(lines[1][0])
    layers = []
    for fields in lines[2:]:
        kind, name, nb, nt = fields[0], fields[1], int(fields[2]), int(fields[3])
        if len(fields) < 4 + nb + nt:
            raise ValueError(f"layer {name} lists fewer blobs than it declares")
        layers.append((kind, name, fields[4 : 4 + nb], fields[4 + nb : 4 + nb + nt], fields[4 + nb + nt :]))
    if len(layers) != count:
        raise ValueError(f"{len(layers)} layers, the header says {count}")
    return layers


def rename_blobs(layers: list[Layer], names: dict[str, str], image: tuple[int, int, int] | None = None) -> str:
    """The ``.param`` text with blobs (and the layers named after them) renamed by ``names``; ``image``: (C, H, W)
    written into the ``Input`` layer (``0=W 1=H 2=C``, which pnnx leaves out), so the file says its shape."""
    blobs = {b for layer in layers for b in (*layer[2], *layer[3])}
    taken = (blobs - set(names)) & set(names.values())
    if taken:
        raise ExportError(f"the ncnn graph already has a blob named {sorted(taken)[0]!r}", "choose other I/O names")
    lines = [MAGIC, f"{len(layers)} {len(blobs)}"]
    for kind, name, bottoms, tops, params in layers:
        fields = [kind, names.get(name, name), str(len(bottoms)), str(len(tops))]
        if kind == "Input" and image is not None and not params:
            params = [f"0={image[2]}", f"1={image[1]}", f"2={image[0]}"]
        fields += [names.get(b, b) for b in (*bottoms, *tops)] + params
        lines.append(" ".join(fields))
    return "\n".join(lines) + "\n"


def _refuse_unconverted(layers: list[Layer]) -> None:
    unknown = sorted({kind for kind, *_ in layers if kind.startswith(UNCONVERTED)})
    if any("index_select" in k or "gather" in k for k in unknown):
        raise ExportError(
            "ncnn has no gather op, so the key's gather/elements/planes form cannot be written for it",
            "export ncnn with --fuse conv (or auto / fastest, which choose it; fold where exact)",
        )
    if unknown:
        raise ExportError(f"ncnn has no equivalent of {', '.join(unknown)}", "export this model to another target")


def _read(path: Path) -> tuple[list[Layer], list[dict], list[dict], str]:
    """Layers, input and outputs (name, shape, dtype) and the weights' precision of an ncnn model."""
    path = Path(path)
    weights = weights_of(path)
    if not path.is_file() or not weights.is_file():
        missing = path if not path.is_file() else weights
        raise ExportError(f"{missing} not found", "an ncnn model is model.param with model.ncnn.bin beside it")
    try:
        layers = parse_param(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ExportError(f"cannot read {path} as an ncnn model: {exc}", "export it again") from None
    inputs = [layer for layer in layers if layer[0] == "Input"]
    consumed = {b for layer in layers for b in layer[2]}
    outputs = [t for layer in layers for t in layer[3] if t not in consumed]
    if len(inputs) != 1 or len(inputs[0][3]) != 1 or len(outputs) != 1:
        raise ExportError(f"{path} has {len(inputs)} inputs and {len(outputs)} outputs", "export it with keyedge")
    params = dict(p.split("=", 1) for p in inputs[0][4] if "=" in p)
    shape = [1] + [int(params.get(k, 0)) for k in ("2", "1", "0")]  # Input: 0=w 1=h 2=c
    ports_in = [{"name": inputs[0][3][0], "shape": shape, "dtype": "float32"}]
    last = next(layer for layer in layers if outputs[0] in layer[3])
    classes = dict(p.split("=", 1) for p in last[4] if "=" in p).get("0") if last[0] == "InnerProduct" else None
    ports_out = [{"name": outputs[0], "shape": [1, int(classes) if classes else -1], "dtype": "float32"}]
    return layers, ports_in, ports_out, _precision(layers, weights)


def _precision(layers: list[Layer], weights: Path) -> str:
    """The tag of the first weighted layer's weights in the ``.bin`` (raw ``MemoryData`` before it skipped)."""
    offset = 0
    for kind, _, _, _, params in layers:
        values = dict(p.split("=", 1) for p in params if "=" in p and not p.startswith("-"))
        if kind == "MemoryData":
            dims = [max(1, int(values.get(k, 0))) for k in ("0", "1", "11", "2")]
            offset += 4 * int(np.prod(dims))
        elif kind in WEIGHTED:
            with weights.open("rb") as f:
                f.seek(offset)
                tag = f.read(4)
            if len(tag) != 4:
                raise ExportError(f"{weights} is shorter than its model.param says", "export it again")
            return WEIGHT_TAGS.get(int.from_bytes(tag, "little"), "unknown")
    return "fp32"


def _net(ncnn: Any, path: Path, *, half: bool, threads: int | None) -> Any:
    """An ncnn Net on the CPU: fp16 storage and arithmetic only for a half model (float32 kernels otherwise)."""
    net = ncnn.Net()
    opt = net.opt
    opt.use_vulkan_compute = False
    for flag in ("use_fp16_storage", "use_fp16_packed", "use_fp16_arithmetic"):
        setattr(opt, flag, half)
    opt.use_bf16_storage = False
    if threads:
        opt.num_threads = int(threads)
    if net.load_param(str(path)) != 0 or net.load_model(str(weights_of(path))) != 0:
        net.clear()
        raise ExportError(f"ncnn cannot load {path}", "export it again")
    return net


def shuffled(path: Path, image: np.ndarray) -> np.ndarray | None:
    """Run the model on one (3, S, S) image up to its first ``PixelShuffle`` (the conv form's output: the key's
    shuffled image, float32 as ncnn computed it), or None when there is none (fold)."""
    backend = NcnnBackend()
    ncnn = backend.require("ncnn")
    layers, inputs, _, precision = _read(path)
    shuffle = next((layer[3][0] for layer in layers if layer[0] == "PixelShuffle"), None)
    if shuffle is None:
        return None
    net = _net(ncnn, path, half=precision == "fp16", threads=1)
    try:
        with net.create_extractor() as extractor:
            extractor.input(inputs[0]["name"], ncnn.Mat(np.ascontiguousarray(image, dtype=np.float32)))
            _, out = extractor.extract(shuffle)
            return np.array(out, dtype=np.float32)
    finally:
        net.clear()


__all__ = ["NcnnBackend", "NcnnRunner", "ncnn_friendly", "parse_param", "rename_blobs", "shuffled", "weights_of"]
