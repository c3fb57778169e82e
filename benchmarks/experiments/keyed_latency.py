"""What does the key cost at inference?  Every shuffle formulation against the plain model, in one harness run.

For each model (default ViT-Ti, EfficientNet-Lite0 and ResNet-18 at 224x224) a plain
and a keyed checkpoint sharing one backbone are written, then exported through
``keyedge export`` (parity verified) as

* ``plain``      -- no key (fuse ``none``),
* ``gather``     -- the keyed model, the shuffle as one Gather,
* ``elements``   -- the keyed model, the shuffle as one GatherElements (the same indices, per element),
* ``conv``       -- the keyed model, one strided 0/1 selection conv + depth-to-space,
* ``planes``     -- the keyed model, space-to-depth + a gather of whole channel planes + depth-to-space,
* ``fold``       -- the keyed model, shuffle and normalization folded into a patchify stem (ViT only),
* ``plain-fold`` -- the plain model with its normalization folded, the exact twin of ``fold``,

to ONNX and OpenVINO IR.  All of them are timed by the latency harness
(:mod:`keyedge.benchmarks.latency`) in one interleaved run on this host's CPU, so
the ratios keyed/plain, gather/fold and gather/conv come with their round-to-round
spread.  Weights are random (``--weights none``): latency does not depend on them.

Run: ``python -m keyedge.benchmarks.experiments.keyed_latency``
``[--models ...] [--threads 2] [--min-seconds 4] [--json r.json]``
(``--targets coreml --out DIR`` on a Mac: CoreML with compute units ALL and CPU_ONLY, exports kept for
``keyedge bench compute-plan DIR/conv/*/model.mlpackage``)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from keyedge.benchmarks.latency import BenchSettings, run_latency
from keyedge.benchmarks.profiles import RuntimeSpec, parse_profile, with_host_precision
from keyedge.benchmarks.workbench import BENCH_KEY, VARIANTS, export_variants


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit_tiny_patch16_224,tf_efficientnet_lite0,resnet18")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--min-seconds", type=float, default=4.0, help="timed seconds per artifact and runtime")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument(
        "--targets",
        default="onnx,openvino",
        help="onnx, openvino, litert, executorch, mnn, ncnn, pt2, coreml (macOS to time)",
    )
    parser.add_argument(
        "--int8", default="", help="variants also exported at int8, e.g. plain,gather: int8/fp32 ratios (issue 15)"
    )
    parser.add_argument(
        "--precisions",
        default="int8",
        help="what --int8's variants are exported at, e.g. fp16,dynamic-int8 (to the targets that export each)",
    )
    parser.add_argument(
        "--host-precision",
        action="store_true",
        help="also time OpenVINO at its own default precision here (bf16 on AMX hosts): host/pinned ratios",
    )
    parser.add_argument("--variants", default="", help="only these variants, e.g. plain,conv,planes (default: all)")
    parser.add_argument("--out", help="keep the export directories here (default: a temporary directory)")
    parser.add_argument("--json", help="write the keyedge-latency/1 report here")
    parser.add_argument("--markdown", help="write the markdown report here")
    args = parser.parse_args(argv)
    targets = args.targets.split(",")
    runtimes = [RuntimeSpec("onnxruntime", providers=["CPUExecutionProvider"])] if "onnx" in targets else []
    runtimes += [RuntimeSpec("openvino", device="CPU")] if "openvino" in targets else []
    runtimes += [RuntimeSpec("coreml", compute_units=u) for u in ("ALL", "CPU_ONLY")] if "coreml" in targets else []
    runtimes += [RuntimeSpec(t, device="CPU") for t in ("litert", "executorch", "mnn", "ncnn") if t in targets]
    runtimes += [RuntimeSpec("aoti", device="CPU")] if "pt2" in targets else []
    profile = parse_profile(
        {
            "name": "keyed-latency",
            "threads": args.threads,
            "batch_sizes": [args.batch],
            "runtime": [r.to_dict() for r in runtimes],
        }
    )
    if args.host_precision:
        profile = with_host_precision(profile)
    settings = BenchSettings(min_seconds=args.min_seconds, min_iterations=50, warmup=10, rounds=args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out) if args.out else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        int8 = tuple(v for v in args.int8.split(",") if v)
        precisions = tuple(p for p in args.precisions.split(",") if p)
        variants = tuple(v for v in args.variants.split(",") if v) or tuple(VARIANTS)
        directories = [
            d
            for m in args.models.split(",")
            for d in export_variants(
                m, args.image_size, work, targets, args.batch, variants=variants, int8=int8, precisions=precisions
            )
        ]
        report = run_latency(directories, profile, settings, keys=[BENCH_KEY])
    from rich.console import Console

    report.print_rich(Console())
    if args.json:
        report.to_json(args.json)
    if args.markdown:
        Path(args.markdown).write_text(report.to_markdown())
    return report


if __name__ == "__main__":
    main()
