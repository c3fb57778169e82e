"""What sealing costs: load time sealed/plain (read + decrypt + load from memory) and steady-state latency.

One keyed checkpoint (default EfficientNet-Lite0 at 224x224, random weights: neither cost depends on
them) is exported twice -- plain and ``--seal``-ed -- to ONNX and OpenVINO.  Then, per target:

* **load**: ``rounds`` interleaved rounds, each opening (and closing) the plain artifact and the sealed
  one through :func:`keyedge.runtime.open_artifact`, the order rotated each round
  (:func:`keyedge.timing.interleave`); the sealed/plain ratio of each round, as median [p10-p90].
  The decryption alone (:func:`keyedge.runtime.unseal_target`) is timed in the same rounds, to say where
  the overhead goes.
* **steady state**: both artifacts timed side by side by the latency harness
  (:func:`keyedge.benchmarks.latency.run_latency`, interleaved rounds, batch 1): the sealed/plain p50
  ratio.  It should be 1: once loaded, a sealed model is the same model.

Run: ``python -m keyedge.benchmarks.experiments.seal [--model tf_efficientnet_lite0] [--rounds 15] [--threads 2]``
"""

from __future__ import annotations

import argparse
import functools
import tempfile
from pathlib import Path

import torch

from keyedge.benchmarks.latency import BenchSettings, run_latency
from keyedge.benchmarks.profiles import DeviceProfile, RuntimeSpec
from keyedge.benchmarks.workbench import BENCH_KEY, untrained_checkpoint
from keyedge.deploy.artifacts import ArtifactManifest
from keyedge.deploy.export import ExportRequest, ExportSettings, export_one
from keyedge.deploy.runtime import open_artifact, unseal_target
from keyedge.keys.seal import SealKey
from keyedge.models.backbones import build_model
from keyedge.stats import ratio_spread, spread
from keyedge.timing import interleave

TARGETS = ("onnx", "openvino")


def export_pair(model_name: str, size: int, work: Path, sealkey: SealKey) -> tuple[Path, Path]:
    """The plain and the sealed export of one keyed checkpoint (verified on two random inputs)."""
    torch.manual_seed(0)
    model = build_model(model_name, 1000, key=BENCH_KEY, weights="none", image_size=size).eval()
    checkpoint = untrained_checkpoint(work / "ckpt", model)
    request = ExportRequest(checkpoint, BENCH_KEY)
    common = {"targets": list(TARGETS), "real_inputs": 0, "random_inputs": 2}
    plain = export_one(request, ExportSettings(out=work / "plain", **common))
    sealed = export_one(request, ExportSettings(out=work / "sealed", seal=sealkey, **common))
    return plain, sealed


def time_loads(plain: Path, sealed: Path, sealkey: SealKey, rounds: int, threads: int) -> dict:
    """Per target: load seconds of each form per round, and the decryption's share."""
    results = {}
    manifest = ArtifactManifest.read(sealed)
    for target in TARGETS:
        loads = {
            "sealed": functools.partial(open_artifact, sealed, target, sealkey=sealkey, threads=threads),
            "plain": functools.partial(open_artifact, plain, target, sealkey=sealkey, threads=threads),
            "decrypt": functools.partial(unseal_target, manifest, target, sealkey),
        }
        # one warm-up call each (the file cache, the runtime's libraries); a runner is closed untimed
        timing = interleave(loads, rounds=rounds, calls=1, warmup=1, release=_close)
        times = {form: timing[form].means for form in loads}
        results[target] = {
            "plain_ms": spread([t * 1e3 for t in times["plain"]]),
            "sealed_ms": spread([t * 1e3 for t in times["sealed"]]),
            "decrypt_ms": spread([t * 1e3 for t in times["decrypt"]]),
            "ratio": ratio_spread(times["sealed"], times["plain"]),
        }
    return results


def _close(opened: object) -> None:
    close = getattr(opened, "close", None)
    if close is not None:
        close()


def time_steady(plain: Path, sealed: Path, sealkey: SealKey, threads: int, min_seconds: float) -> dict:
    """Sealed/plain p50 per target, from one interleaved latency-harness run at batch 1."""
    profile = DeviceProfile(
        name="seal-bench",
        description="sealed vs plain, CPU",
        threads=threads,
        batch_sizes=[1],
        runtimes=[
            RuntimeSpec(name="onnxruntime", providers=["CPUExecutionProvider"]),
            RuntimeSpec(name="openvino", device="CPU"),
        ],
    )
    settings = BenchSettings(min_seconds=min_seconds, rounds=10)
    report = run_latency([plain, sealed], profile, settings, sealkeys=[sealkey])
    p50 = {(m.artifact.target, m.artifact.path.endswith(".sealed")): m.steady.p50 for m in report.measurements}
    return {t: {"plain_ms": p50[(t, False)], "sealed_ms": p50[(t, True)]} for t in TARGETS if (t, True) in p50}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=15, help="interleaved load rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-seconds", type=float, default=2.0, help="steady-state seconds per artifact")
    args = parser.parse_args(argv)
    sealkey = SealKey.generate()
    with tempfile.TemporaryDirectory() as tmp:
        plain, sealed = export_pair(args.model, args.image_size, Path(tmp), sealkey)
        size_mb = sum(p.stat().st_size for p in sealed.glob("*.sealed")) / 1e6
        loads = time_loads(plain, sealed, sealkey, args.rounds, args.threads)
        steady = time_steady(plain, sealed, sealkey, args.threads, args.min_seconds)
    print(
        f"{args.model} {args.image_size}x{args.image_size}, batch 1, {args.threads} threads, "
        f"{args.rounds} interleaved load rounds; sealed files {size_mb:.1f} MB in all"
    )
    columns = ("target", "load plain ms", "load sealed ms", "decrypt ms", "sealed/plain load")
    print(f"{columns[0]:9} " + " ".join(f"{c:20}" for c in columns[1:]) + " steady sealed/plain")
    for target, r in loads.items():
        s = steady.get(target)
        ratio = f"{s['sealed_ms'] / s['plain_ms']:.3f} ({s['sealed_ms']:.2f}/{s['plain_ms']:.2f} ms)" if s else "n/a"
        print(f"{target:9} {r['plain_ms']!s:20} {r['sealed_ms']!s:20} {r['decrypt_ms']!s:20} {r['ratio']!s:20} {ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
