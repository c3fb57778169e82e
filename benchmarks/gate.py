"""The CI latency gate: does the key still cost (almost) nothing?  Export, benchmark, gate, in one command.

A plain and a keyed checkpoint of one architecture (default EfficientNet-Lite0 at
224x224, random weights: latency does not depend on them) are exported through
``keyedge export`` (shuffle as one Gather), timed side by side by the latency
harness on the profile's runtimes, and gated by ``keyedge bench regress``'s
rules: the keyed/plain median ratio must stay under the profile's
``thresholds.ratio``; with ``--baseline`` (a report from the *same* machine) the
p50s are gated too.

Flakiness is handled the way perf gates must handle it: ratios (not absolute
times) from interleaved rounds, a generous threshold (``devices/ci-cpu.toml``),
and a failing measurement is repeated (``--attempts``): a real regression fails
every attempt, a noisy neighbour rarely twice.

Run: ``python -m keyedge.benchmarks.gate [--profile devices/ci-cpu.toml] [--out build/gate] [--baseline B.json]``
(``make gate``; exit 1 on a regression).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from keyedge.benchmarks.latency import run_latency
from keyedge.benchmarks.profiles import DEVICES_DIR, load_profile
from keyedge.benchmarks.regress import GATED, RegressionResult, compare
from keyedge.benchmarks.report import LatencyReport
from keyedge.benchmarks.workbench import BENCH_KEY, export_variants


def gate(
    directories: list[Path],
    profile_path: Path,
    *,
    baseline: Path | None = None,
    attempts: int = 3,
    out: Path | None = None,
    console: Console | None = None,
) -> tuple[LatencyReport, RegressionResult]:
    """Benchmark ``directories`` and gate them; re-measure up to ``attempts`` times while the gate fails."""
    console = console or Console()
    profile = load_profile(profile_path)
    base = LatencyReport.load(baseline) if baseline is not None else None
    for attempt in range(1, attempts + 1):
        report = run_latency(directories, profile, keys=[BENCH_KEY])  # the key serves the torch runtime, if any
        result = compare(base, report, profile.thresholds, checks=GATED)
        console.print(f"gate attempt {attempt}/{attempts}:", markup=False)
        report.print_rich(console)
        result.print_rich(console)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            report.to_json(out / f"latency-attempt{attempt}.json")
        if result.passed and result.checks:
            break
        if not result.checks:
            console.print("gate: nothing to check (no keyed/plain pair was measured)", markup=False)
    return report, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--profile", type=Path, default=DEVICES_DIR / "ci-cpu.toml", help="profile with thresholds")
    parser.add_argument("--device", help=argparse.SUPPRESS)  # the old spelling of --profile: refused below
    parser.add_argument("--baseline", type=Path, help="a report from this machine: gate p50s too")
    parser.add_argument("--attempts", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the reports here")
    args = parser.parse_args(argv)
    if args.device is not None:
        print("error: --device no longer names the device profile; use --profile PROFILE.toml", file=sys.stderr)
        return 2
    profile = load_profile(args.profile)
    targets = sorted({r.target for r in profile.runtimes if r.target not in (None, "torch")})
    with tempfile.TemporaryDirectory() as tmp:
        directories = export_variants(args.model, args.image_size, Path(tmp), targets, variants=("plain", "gather"))
        _, result = gate(directories, args.profile, baseline=args.baseline, attempts=args.attempts, out=args.out)
    ok = result.passed and bool(result.checks)
    print(
        f"latency gate: {'passed' if ok else 'FAILED'} ({args.model} {args.image_size}x{args.image_size}, "
        f"profile {args.profile.name})"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
