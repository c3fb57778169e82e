"""What does the key cost at inference?  Latency of exported artifacts, keyed vs plain, side by side.

For each model (default ViT-Ti, EfficientNet-Lite0 and ResNet-18 at 224x224, batch 1),
the plain model, the keyed model with the shuffle as one gather, as space-to-depth +
1x1 permutation conv, and -- where the stem is patchify -- folded into it (with the
plain model with its normalization folded, its exact twin) are exported to ONNX
and OpenVINO IR and timed on this host's CPU.  Variants are interleaved round by
round (order rotated) so drift cancels; each round's ratio to the plain model is
taken, then the median and 10th-90th percentile over rounds are reported.

Run: ``python -m keyedge.benchmarks.keyed_latency [--rounds 30] [--iters 20] [--threads 2]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from keyedge.export import deployable
from keyedge.exporters import ExportOptions, get_backend
from keyedge.keys import Key
from keyedge.models import build_model

COMPARISONS = (("gather", "plain"), ("conv", "plain"), ("conv", "gather"), ("fold", "plain-fold"), ("fold", "plain"))


def runner(target: str, path: Path, threads: int) -> Callable[[np.ndarray], object]:
    """A callable running one inference on the CPU with ``threads`` threads."""
    if target == "onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                          "INFERENCE_PRECISION_HINT": "f32",
                                                          "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x})


def export_variants(model_name: str, size: int, work: Path) -> dict[str, dict[str, Path]]:
    key = Key.from_secret(bytes(range(32)), 4)
    torch.manual_seed(0)
    keyed = build_model(model_name, 1000, key=key, weights="none", image_size=size).eval()
    plain = build_model(model_name, 1000, weights="none", image_size=size).eval()
    plain.backbone.load_state_dict(keyed.backbone.state_dict())
    modules = {"plain": deployable(plain, None, "gather"), "gather": deployable(keyed, key, "gather"),
               "conv": deployable(keyed, key, "conv")}
    folded, plain_folded = deployable(keyed, key, "auto"), deployable(plain, None, "auto")
    if folded.fuse == "fold":
        modules |= {"fold": folded, "plain-fold": plain_folded}
    options = ExportOptions(batch=1, image_size=size)
    paths: dict[str, dict[str, Path]] = {}
    for variant, deploy in modules.items():
        for target, suffix in (("onnx", ".onnx"), ("openvino", ".xml")):
            path = work / f"{model_name}-{variant}{suffix}"
            get_backend(target).export(deploy.module, path, options)
            paths.setdefault(variant, {})[target] = path
    return paths


def interleaved(runners: dict[str, Callable], x: np.ndarray, rounds: int, iters: int) -> dict[str, list[float]]:
    """Per-round mean latency (s) of each runner, runners interleaved with rotating order."""
    names = list(runners)
    for name in names:  # warm-up
        for _ in range(5):
            runners[name](x)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            for _ in range(iters):
                runners[name](x)
            samples[name].append((time.perf_counter() - start) / iters)
    return samples


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_tiny_patch16_224,tf_efficientnet_lite0,resnet18")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    x = np.random.default_rng(0).random((1, 3, args.image_size, args.image_size), dtype=np.float32)
    print(f"keyed vs plain artifact latency: batch 1, {args.image_size}x{args.image_size}, fp32, CPU, "
          f"{args.threads} threads, {args.rounds} interleaved rounds x {args.iters} inferences")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in args.models.split(","):
            paths = export_variants(model_name, args.image_size, Path(tmp))
            for target in ("onnx", "openvino"):
                runners = {v: runner(target, p[target], args.threads) for v, p in paths.items()}
                samples = interleaved(runners, x, args.rounds, args.iters)
                res = {"model": model_name, "target": target,
                       "p50_ms": {v: statistics.median(s) * 1e3 for v, s in samples.items()}, "ratios": {}}
                for a, b in COMPARISONS:
                    if a in samples and b in samples:
                        per_round = [sa / sb for sa, sb in zip(samples[a], samples[b])]
                        lo, hi = np.percentile(per_round, [10, 90])
                        res["ratios"][f"{a}/{b}"] = {"median": statistics.median(per_round), "p10": float(lo),
                                                     "p90": float(hi)}
                results.append(res)
                times = ", ".join(f"{v} {ms:.2f} ms" for v, ms in res["p50_ms"].items())
                ratios = ", ".join(f"{k} {r['median']:.3f} [{r['p10']:.3f}-{r['p90']:.3f}]"
                                   for k, r in res["ratios"].items())
                print(f"  {model_name:>24} {target:>8}: {times}\n  {'':>24} {'':>8}  ratios: {ratios}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
