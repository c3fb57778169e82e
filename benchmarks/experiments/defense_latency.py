"""What does volumization cost at inference?  A volumized model against the plain 2D model, in one harness run.

For each model (default EfficientNet-Lite0 and ResNet-18) a plain checkpoint and a
volumized one (``--defense volumize``: patches of ``--patch`` pixels, 3D backbone with
1-deep kernels, mean of the per-patch logits) sharing the 2D weights are exported
through ``keyedge export`` (parity verified; the volumized graph holds no ranking, see
:class:`keyedge.defenses.volumetric.RasterVolumizedModel`) to ONNX and OpenVINO IR and timed
interleaved by the latency harness; the ``volumize/plain`` ratio is the overhead.
Weights are random: latency does not depend on them.

Run: ``python -m keyedge.benchmarks.experiments.defense_latency``
``[--models ...] [--image-size 32] [--patch 16] [--json r.json]``
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from keyedge.benchmarks.latency import BenchSettings, run_latency
from keyedge.benchmarks.profiles import RuntimeSpec, parse_profile
from keyedge.benchmarks.workbench import export_for_timing, untrained_checkpoint
from keyedge.defenses.volumetric import volumize_model
from keyedge.defenses.volumizer import VolumizeConfig
from keyedge.models.backbones import build_model


def export_pair(model_name: str, size: int, patch: int, work: Path, targets: list[str]) -> list[Path]:
    """Export the plain model and its volumized counterpart (same 2D weights); return both directories."""
    torch.manual_seed(0)
    plain = build_model(model_name, 10, weights="none", image_size=size).eval()
    twin = build_model(model_name, 10, weights="none", image_size=size)
    twin.backbone.load_state_dict(plain.backbone.state_dict())
    volumized = volumize_model(twin.backbone, twin.spec, VolumizeConfig((patch, patch))).eval()
    directories = []
    for role, model in (("plain", plain), ("volumized", volumized)):
        ckpt = untrained_checkpoint(work / f"{model_name}-ckpt-{role}", model)
        directories.append(export_for_timing(ckpt, None, work / role, targets))
    return directories


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tf_efficientnet_lite0,resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--json", help="write the keyedge-latency/1 report here")
    args = parser.parse_args(argv)
    targets = ["onnx", "openvino"]
    profile = parse_profile(
        {
            "name": "defense-latency",
            "threads": args.threads,
            "batch_sizes": [1],
            "runtime": [
                RuntimeSpec("onnxruntime", providers=["CPUExecutionProvider"]).to_dict(),
                RuntimeSpec("openvino", device="CPU").to_dict(),
            ],
        }
    )
    settings = BenchSettings(min_seconds=args.min_seconds, min_iterations=50, warmup=10, rounds=args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        directories = [
            d for m in args.models.split(",") for d in export_pair(m, args.image_size, args.patch, Path(tmp), targets)
        ]
        report = run_latency(directories, profile, settings)
    from rich.console import Console

    report.print_rich(Console())
    if args.json:
        report.to_json(args.json)
    return report


if __name__ == "__main__":
    main()
