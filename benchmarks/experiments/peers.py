"""Can the harness be trusted?  Its p50 against OpenVINO's ``benchmark_app`` and a minimal onnxruntime loop.

One plain model (default EfficientNet-Lite0, 224x224, batch 1) is exported to ONNX
and OpenVINO IR, then timed in alternating rounds (order rotated each round) by

* ``keyedge/openvino`` -- :func:`keyedge.benchmarks.latency.run_latency` on the IR alone,
* ``benchmark_app``    -- OpenVINO's own tool (shipped in the openvino wheel) on the same IR, same
  threads, batch, precision, one stream (the latency hint's setting), run as a subprocess; its reported median,
* ``keyedge/onnxruntime`` -- the harness on the ONNX file alone,
* ``ort-loop``         -- the loop a user would write: one ``InferenceSession`` with the same thread
  count, a few warm-up calls, then ``perf_counter`` around each ``session.run`` for the same time; its median.

The per-round ratio of each pair's p50 (ours / theirs) is reported as median and 10th-90th percentile;
within 5% means the harness adds no overhead of its own and measures what the runtime's tools measure.

Run: ``python -m keyedge.benchmarks.experiments.peers``
``[--model tf_efficientnet_lite0] [--rounds 5] [--seconds 5] [--threads 2]``
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from keyedge.benchmarks.latency import BenchSettings, run_latency
from keyedge.benchmarks.profiles import parse_profile
from keyedge.exporters import ExportOptions, get_backend
from keyedge.models.backbones import build_model
from keyedge.stats import ratio_spread
from keyedge.timing import Timing, interleave

MEDIAN = re.compile(r"Median:\s+([0-9.]+)\s*(ms|us)")


def harness_p50(path: Path, runtime: dict, threads: int, seconds: float) -> float:
    profile = parse_profile({"name": "peers", "threads": threads, "batch_sizes": [1], "runtime": [runtime]})
    report = run_latency([path], profile, BenchSettings(min_seconds=seconds, min_iterations=50, warmup=10, rounds=5))
    return report.measurements[0].steady.p50


def benchmark_app_p50(xml: Path, threads: int, seconds: float) -> float:
    """OpenVINO's benchmark_app on the IR: synchronous latency mode, same threads/precision; its median (ms)."""
    tool = shutil.which("benchmark_app") or str(Path(sys.executable).with_name("benchmark_app"))
    cmd = [
        tool,
        "-m",
        str(xml),
        "-d",
        "CPU",
        "-hint",
        "none",
        "-nstreams",
        "1",
        "-api",
        "sync",
        "-nthreads",
        str(threads),
        "-infer_precision",
        "f32",
        "-b",
        "1",
        "-t",
        str(max(1, round(seconds))),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    match = MEDIAN.search(out)
    if not match:
        raise RuntimeError(f"no median in benchmark_app's output:\n{out[-2000:]}")
    return float(match.group(1)) / (1000.0 if match.group(2) == "us" else 1.0)


def ort_loop_p50(onnx_path: Path, threads: int, seconds: float) -> float:
    """The minimal hand-written loop: the ONNX backend's session (default options but the thread count), timed bare."""
    runner = get_backend("onnx").load(onnx_path, threads=threads)
    x = np.random.default_rng(0).random((1, *runner.input_shape[1:]), dtype=np.float32)
    for _ in range(10):
        runner.infer(x)
    times: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 50:
        start = time.perf_counter()
        runner.infer(x)
        times.append(time.perf_counter() - start)
    runner.close()
    return statistics.median(times) * 1e3


def _print_round(timing: Timing) -> None:
    print(
        f"  round {timing.rounds}: " + ", ".join(f"{n} {r.returned[-1]:.3f} ms" for n, r in timing.candidates.items())
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per tool per round")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = build_model(args.model, 1000, weights="none", image_size=args.image_size).eval()
    options = ExportOptions(batch=1, image_size=args.image_size)
    print(
        f"{args.model} {args.image_size}x{args.image_size}, batch 1, fp32, CPU, {args.threads} threads, "
        f"{args.rounds} rounds x {args.seconds:g} s per tool, order rotated each round"
    )
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, xml_path = Path(tmp) / "model.onnx", Path(tmp) / "model.xml"
        get_backend("onnx").export(model, onnx_path, options)
        get_backend("openvino").export(model, xml_path, options)
        tools = {
            "keyedge/openvino": lambda: harness_p50(
                xml_path, {"name": "openvino", "device": "CPU"}, args.threads, args.seconds
            ),
            "benchmark_app": lambda: benchmark_app_p50(xml_path, args.threads, args.seconds),
            "keyedge/onnxruntime": lambda: harness_p50(onnx_path, {"name": "onnxruntime"}, args.threads, args.seconds),
            "ort-loop": lambda: ort_loop_p50(onnx_path, args.threads, args.seconds),
        }
        # each tool times itself for --seconds and returns its p50: what the rounds keep
        timing = interleave(tools, rounds=args.rounds, calls=1, warmup=0, keep=True, progress=_print_round)
        p50 = {name: timing[name].returned for name in tools}
    results: dict = {
        "model": args.model,
        "image_size": args.image_size,
        "threads": args.threads,
        "p50_ms": {n: statistics.median(v) for n, v in p50.items()},
        "ratios": {},
    }
    for ours, theirs in (("keyedge/openvino", "benchmark_app"), ("keyedge/onnxruntime", "ort-loop")):
        results["ratios"][f"{ours} / {theirs}"] = ratio_spread(p50[ours], p50[theirs]).to_dict()
    print("p50 (median over rounds): " + ", ".join(f"{n} {v:.3f} ms" for n, v in results["p50_ms"].items()))
    for name, r in results["ratios"].items():
        verdict = "within 5%" if abs(r["median"] - 1) <= 0.05 else "NOT within 5%"
        print(f"  {name}: {r['median']:.3f} [{r['p10']:.3f}-{r['p90']:.3f}]  {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
