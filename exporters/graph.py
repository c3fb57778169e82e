"""Reading an exported graph back: format-neutral ops, the checks on the key's shuffle, a weight-free digest.

:meth:`~keyedge.exporters.base.ExportBackend.inspect` turns its format's graph (ONNX nodes,
OpenVINO ops, MIL ops, LiteRT and ExecuTorch operators) into a list of :class:`Node` and calls
:func:`analyze`, which reports the operators, the Gather-like ops fed (through reshapes) by the
graph input -- a keyed model's shuffle is exactly one; a plain or folded model has none -- the ops
met walking from the input, and a digest of the weight-free graph structure, so that two models
differing only in weights (e.g. folded with different keys) can be shown to have the same graph.
:func:`shuffle_prefix` finds the ops that only move the input's pixels (what a quantizer must leave
alone), and :func:`static_graph` computes a graph's parameter-only work once for a fixed input size.

Kept apart from the backend interface (:mod:`keyedge.exporters.base`) because it is pure graph
bookkeeping, shared by every backend, with no converter and nothing of keyedge behind it.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

#: Ops that only re-lay out or re-type the data (followed when tracing from the graph input), lower case.
LAYOUT_OPS = frozenset(
    {"reshape", "flatten", "squeeze", "unsqueeze", "expand_dims", "identity", "cast", "convert"}
    | {"view_copy", "squeeze_copy", "unsqueeze_copy", "xnnstaticreshape"}  # ExecuTorch: portable and XNNPACK
    | {"_to_dim_order_copy"}  # ExecuTorch's cast (an fp16 program's input to half)
    | {"converttensor"}  # MNN: NCHW <-> its packed NC4HW4 layout
    | {"view", "_unsafe_view"}  # ATen (a torch.export program)
)
#: Gather-like ops (ONNX, OpenVINO, MIL, LiteRT, ExecuTorch and MNN spellings), lower case.
GATHER_OPS = frozenset(
    {"gather", "gathernd", "gatherelements", "gather_nd", "gather_along_axis", "index_select", "gatherv2"}
)
#: Ops that only move pixels: the shuffle's gather and its conv form's space-to-depth / depth-to-space, lower case.
SHUFFLE_OPS = (
    LAYOUT_OPS
    | GATHER_OPS
    | {
        "transpose",
        "spacetodepth",
        "depthtospace",
        "space_to_depth",
        "depth_to_space",
        "pixel_shuffle",
        "pixel_unshuffle",
        "permute_copy",
        "xnnstatictranspose",
        "xnnspacetodepth",
        "xnndepthtospace",
        "permute",  # MNN's transpose
    }
)
#: Ops that carry their first input's values on, only rearranged: the walk from the input passes them (the planes
#: form's gather sits between space-to-depth and depth-to-space transposes)
PIXEL_MOVES = SHUFFLE_OPS - GATHER_OPS
#: Ops that draw random numbers (ONNX, OpenVINO, MIL spellings), lower case: a posture's in-graph noise
RANDOM_OPS = frozenset(
    {"randomnormal", "randomnormallike", "randomuniform", "randomuniformlike", "random_normal", "random_uniform"}
)
#: Convolution spellings (ONNX, OpenVINO, MIL, XNNPACK, ATen), lower case: the conv form's 1x1 permutation
CONV_OPS = frozenset({"conv", "convolution", "conv_2d", "xnnconv2d", "conv2d"})


@dataclass
class GraphReport:
    """What an exported graph contains, read back from the artifact.

    ``ops``: operator type -> count (ONNX ``op_type``, OpenVINO ``type_name``, MIL op type).
    ``gathers_on_input``: Gather-like ops whose data input is the graph input, possibly
    through reshapes/flattens/casts and a posture's noise (an add of random numbers), 1 for a keyed model
    with the gather, 0 when plain or folded.  ``random_ops``: ops that draw random numbers (the noise).
    ``input_path``: op types met walking forward from the input through layout-only ops and
    gathers, up to and including the first other op on each branch (e.g. ``Reshape, Gather,
    Reshape, Sub``), in graph order.
    ``structure``: SHA-256 of the graph with weights left out (op types, attributes, wiring,
    constant shapes and dtypes, values of small integer constants only): equal for models
    that differ only in weights.
    """

    ops: dict[str, int]
    gathers_on_input: int
    notes: list[str] = field(default_factory=list)
    input_path: list[str] = field(default_factory=list)
    structure: str = ""
    random_ops: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- generic graph analysis (each backend turns its format into a list of Node) ------------


@dataclass
class Node:
    """One op of an exported graph, format-neutral: data input first in ``inputs``."""

    type: str
    inputs: list[str]
    outputs: list[str]
    attrs: str = ""  # a value-free description of attributes (and, for constants, shape/dtype)
    name: str = ""  # the op's name in its format (what a quantizer's exclusion list takes)


def is_permutation_matrix(weight: np.ndarray | None) -> bool:
    """Whether a conv weight is a 0/1 permutation of its inputs: the conv form's shuffle, exactly.

    (n, n, 1, 1) -- a 1x1 permutation after space-to-depth -- or (n, C, P, P) with n = C*P*P: a stride-P
    convolution picking each element of every PxP block once (space-to-depth and the permutation in one op).
    """
    if weight is None or weight.ndim != 4 or weight.shape[2] != weight.shape[3]:
        return False
    if weight.shape[0] != weight.shape[1] * weight.shape[2] * weight.shape[3]:
        return False
    w = weight.reshape(weight.shape[0], -1)
    return bool(np.isin(w, (0.0, 1.0)).all() and (w.sum(0) == 1).all() and (w.sum(1) == 1).all())


def shuffle_prefix(
    nodes: Sequence[Node], graph_inputs: Sequence[str], weight_of: Callable[[Node], np.ndarray | None]
) -> list[Node]:
    """The ops that only move the input's pixels, up to the first op that computes: the key's shuffle.

    Walking forward from the graph input through :data:`SHUFFLE_OPS` and, once, a conv whose weight
    (``weight_of``) is a 0/1 permutation (the conv form).  A quantizer must leave these ops alone, so
    that an int8 artifact permutes exactly the pixels the fp32 one does (issue 15).
    """
    reached, prefix, conv_seen = set(graph_inputs), [], False
    for node in nodes:
        if not node.inputs or node.inputs[0] not in reached:
            continue
        kind = node.type.lower()
        is_perm = kind in CONV_OPS and not conv_seen and is_permutation_matrix(weight_of(node))
        if kind in SHUFFLE_OPS or is_perm:
            conv_seen |= is_perm
            prefix.append(node)
            reached.update(node.outputs)
    return prefix


#: Ops with weights that int8 quantizes (ONNX, OpenVINO spellings), lower case: where :func:`float_ends` looks
WEIGHTED_OPS = frozenset({"conv", "convolution", "groupconvolution", "convtranspose", "gemm", "matmul"})


def float_ends(nodes: Sequence[Node], shuffle: Sequence[Node]) -> list[Node]:
    """The first weighted op after the key's shuffle and the last weighted op (the classifier): int8's mixed
    precision keeps them float.

    Measured (``keyedge.benchmarks.experiments.int8``, the quickstart's k1): a 2-epoch 32 px keyed model is
    most sensitive to its earliest layers -- int8 weights in the stem alone flip 3% of answers -- and keeping
    the two ends float raised top-1 agreement with fp32 from 81.8% to 87.0% (ONNX Runtime) and from 87.6% to
    91.6% (NNCF), on 500 test images.
    """
    skip = {n.name for n in shuffle}
    weighted = [n for n in nodes if n.type.lower() in WEIGHTED_OPS and n.name not in skip]
    return [] if not weighted else list({n.name: n for n in (weighted[0], weighted[-1])}.values())


def constant_signature(values: np.ndarray | None, shape: Sequence[int], dtype: str) -> str:
    """Describe a constant without its weights: shape and dtype, plus the values of small integer tensors."""
    text = f"{dtype}{list(shape)}"
    if values is not None and np.issubdtype(values.dtype, np.integer) and values.size <= 16:
        text += f"={values.reshape(-1).tolist()}"
    return text


def analyze(
    nodes: Sequence[Node],
    graph_inputs: Sequence[str],
    graph_outputs: Sequence[str],
    *,
    count: Callable[[Node], bool] = lambda n: True,
    notes: list[str] | None = None,
) -> GraphReport:
    """Op counts, input gathers, the input path and the structure digest of a topologically ordered graph."""
    ops = Counter(n.type for n in nodes if count(n))
    producer = {out: n for n in nodes for out in n.outputs}
    inputs = set(graph_inputs)
    random: dict[str, bool] = {}

    def is_random(tensor: str) -> bool:
        """Whether a random op is among ``tensor``'s producers (memoized; the graph is acyclic)."""
        if tensor not in random:
            node = producer.get(tensor)
            random[tensor] = False  # a guard against a malformed, cyclic graph
            random[tensor] = node is not None and (
                node.type.lower() in RANDOM_OPS or any(is_random(t) for t in node.inputs)
            )
        return random[tensor]

    def data_of(node: Node) -> str | None:
        """The data operand a pass-through op carries on: a layout op's first input, a noise add's other one."""
        kind = node.type.lower()
        if kind in PIXEL_MOVES and node.inputs:
            return node.inputs[0]
        if kind == "add" and len(node.inputs) == 2:
            noisy = [is_random(t) for t in node.inputs]
            if noisy.count(True) == 1:
                return node.inputs[noisy.index(False)]
        return None

    def from_input(tensor: str) -> bool:
        seen = 0
        while tensor not in inputs:
            node = producer.get(tensor)
            data = None if node is None else data_of(node)
            if data is None or seen > 64:
                return False
            tensor, seen = data, seen + 1
        return True

    gathers = sum(1 for n in nodes if n.type.lower() in GATHER_OPS and n.inputs and from_input(n.inputs[0]))

    reached, path = set(inputs), []
    for node in nodes:
        if any(t in reached for t in node.inputs):
            path.append(node.type)
            data = node.inputs[0] if node.type.lower() in GATHER_OPS else data_of(node)
            if data is not None and data in reached:
                reached.update(node.outputs)

    names: dict[str, str] = {name: f"in{i}" for i, name in enumerate(graph_inputs)}
    lines = []
    for i, node in enumerate(nodes):
        for j, out in enumerate(node.outputs):
            names.setdefault(out, f"{i}.{j}")
        lines.append([node.type, node.attrs, [names.get(t, "?") for t in node.inputs]])
    lines.append(["outputs", "", [names.get(t, "?") for t in graph_outputs]])
    digest = hashlib.sha256(json.dumps(lines, sort_keys=True).encode()).hexdigest()

    report_notes = list(notes or [])
    meaning = {0: " (plain or folded model)", 1: " (the key's shuffle)"}.get(gathers, "")
    report_notes.append(f"{gathers} gather-like op(s) on the input{meaning}")
    randoms = sum(1 for n in nodes if n.type.lower() in RANDOM_OPS)
    if randoms:
        report_notes.append(f"{randoms} random op(s): the posture's noise")
    return GraphReport(dict(ops), gathers, report_notes, path, digest, randoms)


# ---- a graph for one input size (LiteRT, ExecuTorch) ---------------------------------------


def static_graph(module: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module:
    """``module`` as a ``torch.export`` graph with its parameter-only work computed once (for one input size).

    A ViT built for any image size (timm's ``dynamic_img_size``) resamples its position embedding
    on every call (bicubic, antialiased), which neither LiteRT nor ExecuTorch has a kernel for;
    with the input size fixed, that result is a constant.  ``torch.fx``'s constant folding
    (``split_const_subgraphs``) computes such subgraphs and stores their results as weights.
    """
    from torch.fx.experimental.const_fold import split_const_subgraphs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = torch.export.export(module, (example,), strict=False).module()
        folded = split_const_subgraphs(graph)
        folded.run_folding()
    return Unpacked(folded).eval()


class Unpacked(torch.nn.Module):
    """A graph module returning a one-tensor tuple, returning the tensor (what the exporters' wrappers expect)."""

    def __init__(self, graph_module: torch.fx.GraphModule):
        super().__init__()
        self.graph_module = graph_module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.graph_module(x)
        return out[0] if isinstance(out, (tuple, list)) else out
