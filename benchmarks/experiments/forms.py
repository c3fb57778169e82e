"""Where does the key's time go?  Each exact form of the shuffle alone, and each runtime's own per-op profile.

Two measurements, on this host's CPU:

1. **The shuffle alone** -- ``normalize(shuffle(x))`` at 224x224 in every form (``gather``, ``elements``,
   ``conv``) against ``normalize(x)``, exported by keyedge's own backends and timed through their runners
   in one interleaved run per runtime (ONNX Runtime, OpenVINO pinned f32, and LiteRT / ExecuTorch with
   ``--targets``): what each form costs each runtime, apart from any backbone.
2. **Per-op profiles** (``--profile DIR ...``: export directories, e.g. ``keyed_latency.py --out``'s): ONNX
   Runtime's own profiler (``SessionOptions.enable_profiling``: per-node kernel time), OpenVINO's
   performance counters (``PERF_COUNT``: per-node real time) and ExecuTorch's ETDump (its event tracer: XNNPACK
   operators and portable kernels), summed per op type, with the shuffle's op and its share of the whole
   inference named -- the profile that explains a keyed/plain gap.  LiteRT's op profiler is in its C++
   ``benchmark_model`` only (``--enable_op_profiling``); the Python wheel has none, so LiteRT's forms are
   explained by the shuffle alone (1.).

Run: ``python -m keyedge.benchmarks.experiments.forms [--size 224] [--rounds 12] [--targets onnx,openvino]
[--profile artifacts/*/]``
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from keyedge.benchmarks.workbench import BENCH_KEY
from keyedge.defenses.keyed import SHUFFLE_FORMS
from keyedge.exporters import ExportOptions, get_backend
from keyedge.host import describe
from keyedge.models.backbones import Normalize
from keyedge.timing import interleave

#: the ops that are the shuffle in each form, per runtime's spelling (for naming its share in a profile)
SHUFFLE_OPS = {"Gather", "GatherElements", "DepthToSpace", "SpaceToDepth", "Conv", "Convolution", "Transpose"} | {
    "index_select",  # ExecuTorch's portable kernel (its XNNPACK ops carry no form of their own: see the top ops)
    "gather",
}


class Shuffled(nn.Module):
    """``normalize(shuffle(x))``: the keyed model's input path without the backbone (no shuffle: plain)."""

    def __init__(self, form: str | None, size: int):
        super().__init__()
        self.shuffle = SHUFFLE_FORMS[form].from_key(BENCH_KEY, size) if form else nn.Identity()
        self.norm = Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.shuffle(x))


def shuffle_alone(targets: list[str], size: int, rounds: int, threads: int) -> dict[str, dict[str, Any]]:
    """Per target: each form's ms per call (normalize included) and its per-round ratio to plain normalize."""
    options = ExportOptions(batch=1, image_size=size)
    x = np.random.default_rng(0).random((1, 3, size, size), dtype=np.float32)
    out: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for target in targets:
            backend = get_backend(target)
            runners, calls = [], {}
            for form in (None, *SHUFFLE_FORMS):
                path = Path(tmp) / f"{target}-{form or 'plain'}{backend.suffix}"
                backend.export(Shuffled(form, size).eval(), path, options)
                runner = backend.load(path, threads=threads)
                runners.append(runner)
                calls[form or "plain"] = lambda runner=runner: runner.predict(x)
            timing = interleave(calls, rounds=rounds, warmup=5, round_seconds=0.2)
            plain_ms = float(np.median(timing["plain"].means)) * 1e3
            out[target] = {
                name: {
                    "ms": round(float(np.median(timing[name].means)) * 1e3, 4),
                    "extra_ms": round(float(np.median(timing[name].means)) * 1e3 - plain_ms, 4),
                    "ratio_to_plain": str(timing.ratio(name, "plain")),
                }
                for name in calls
            }
            for runner in runners:
                runner.close()
    return out


def onnxruntime_profile(path: Path, threads: int, calls: int = 200) -> dict[str, Any]:
    """ONNX Runtime's per-node kernel times over ``calls`` inferences, summed per op type."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.intra_op_num_threads = threads
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        x = np.random.default_rng(0).random([d if isinstance(d, int) else 1 for d in session.get_inputs()[0].shape])
        for _ in range(calls):
            session.run(None, {name: x.astype(np.float32)})
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: Counter[str] = Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"]
    return _summary(per_op, calls)


def openvino_profile(path: Path, threads: int, calls: int = 200) -> dict[str, Any]:
    """OpenVINO's performance counters (real time per executed node) over ``calls`` inferences, per op type."""
    import openvino as ov

    core = ov.Core()
    config = {"PERF_COUNT": True, "INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    request = compiled.create_infer_request()
    shape = [d.get_length() if d.is_static else 1 for d in compiled.input(0).get_partial_shape()]
    x = np.random.default_rng(0).random(shape).astype(np.float32)
    per_op: Counter[str] = Counter()
    for _ in range(calls):
        request.infer({0: x})
        for info in request.profiling_info:
            if info.status == info.Status.EXECUTED:
                per_op[info.node_type] += info.real_time.total_seconds() * 1e6
    return _summary(per_op, calls)


def executorch_profile(path: Path, threads: int, calls: int = 100) -> dict[str, Any]:
    """ExecuTorch's ETDump (the runtime's event tracer): time per executed op over ``calls`` inferences, per op type.

    XNNPACK's delegated ops come as their XNNPACK operator names (``Convolution (NHWC, F32) IGEMM``, numbered per
    instance: the number is dropped here), portable kernels as ``native_call_<op>.out``; the delegate call itself
    and the method's own events, which contain the others, are left out of the sum.
    """
    from executorch.devtools import Inspector
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(threads)
    module = portable_lib._load_for_executorch(str(path), enable_etdump=True, debug_buffer_size=0)
    shape = module.method_meta("forward").input_tensor_meta(0).sizes()
    x = torch.from_numpy(np.random.default_rng(0).random(tuple(shape), dtype=np.float32))
    for _ in range(calls):
        module.forward([x])
    per_op: Counter[str] = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        module.write_etdump_result_to_file(f"{tmp}/run.etdp", f"{tmp}/debug.bin")
        for block in Inspector(etdump_path=f"{tmp}/run.etdp").event_blocks:
            for event in block.events:
                if event.perf_data is None or event.name in ETDUMP_CONTAINERS:
                    continue
                name = re.sub(r" #\d+$", "", event.name).removeprefix("native_call_").removesuffix(".out")
                per_op[name] += sum(event.perf_data.raw) * 1e3  # ms -> us, over every call
    return _summary(per_op, calls)


#: ETDump events that contain others (a method's execution, a delegate's call): not summed
ETDUMP_CONTAINERS = frozenset(
    {"Method::execute", "DELEGATE_CALL", "OPERATOR_CALL", "Program::load_method", "Method::init"}
)


def _summary(per_op: Counter[str], calls: int) -> dict[str, Any]:
    total = sum(per_op.values()) or 1.0
    top = [(op, round(us / calls, 1), round(us / total, 4)) for op, us in per_op.most_common(8)]
    shuffle = {op: round(per_op[op] / calls, 1) for op in per_op if op in SHUFFLE_OPS}
    return {"us_per_call": round(total / calls, 1), "top_ops": top, "shuffle_like_ops_us": shuffle}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--targets", default="onnx,openvino", help="onnx, openvino, litert, executorch")
    parser.add_argument("--profile", nargs="*", default=[], help="export directories to profile per op")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    print(f"host: {describe()}; {args.threads} threads, batch 1, {args.size}x{args.size}")
    result: dict[str, Any] = {"host": describe(), "shuffle_alone": {}, "profiles": {}}
    if args.targets:
        result["shuffle_alone"] = shuffle_alone(args.targets.split(","), args.size, args.rounds, args.threads)
        for target, forms in result["shuffle_alone"].items():
            print(f"\nthe shuffle alone, {target} (normalize included):")
            for form, t in forms.items():
                print(f"  {form:9s} {t['ms']:8.3f} ms  (+{t['extra_ms']:.3f} ms; x plain {t['ratio_to_plain']})")
    for directory in map(Path, args.profile):
        entry = {}
        if (directory / "model.onnx").is_file():
            entry["onnxruntime"] = onnxruntime_profile(directory / "model.onnx", args.threads)
        if (directory / "model.xml").is_file():
            entry["openvino"] = openvino_profile(directory / "model.xml", args.threads)
        if (directory / "model.pte").is_file():
            entry["executorch"] = executorch_profile(directory / "model.pte", args.threads)
        result["profiles"][str(directory)] = entry
        for runtime, p in entry.items():
            print(f"\n{directory.parent.name}/{directory.name} on {runtime}: {p['us_per_call']} us of kernels per call")
            print("  top ops (us per call, share): " + ", ".join(f"{o} {u} ({s:.1%})" for o, u, s in p["top_ops"]))
            print(f"  shuffle-like ops (us per call): {p['shuffle_like_ops_us']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
