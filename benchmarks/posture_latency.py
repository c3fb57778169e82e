"""What a posture costs in latency: each posture's exported artifact, guard included, against ``scores``.

For one checkpoint and its key, every posture is exported (``keyedge export --posture``, unverified: the graph
is what matters here) to each target, opened as a device opens it (:func:`keyedge.runtime.open_artifact`, its
guard and rate limit in memory) and timed interleaved with the ``scores`` artifact
(:func:`keyedge.timing.interleave`, the order rotated each round), one image per call.  Every call
gets an image of its own -- random pixels the guard has not seen -- so the guard fingerprints and compares
each query as on a device and never refuses one (a refused query would be faster, not slower).  A rate limit
is left out of the timing (it only refuses).  Reported per posture and target: the median of per-round
ratios of mean seconds per call, posture / scores, with its 10th-90th percentiles.

    python -m keyedge.benchmarks.posture_latency runs/k1 -k keys/k1.bin --postures scores,label+guard
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from keyedge.deploy.export import ExportRequest, ExportSettings, export_one
from keyedge.exporters import get_backend
from keyedge.keys.keyfile import Key, load_key
from keyedge.postures import SCORES, Posture, parse_posture
from keyedge.runtime import IN_MEMORY, open_artifact
from keyedge.stats import Spread
from keyedge.timing import interleave

__all__ = ["PostureLatency", "latency_overheads", "measure_postures"]

DEFAULT_TARGETS = ("onnx", "openvino")


@dataclasses.dataclass
class PostureLatency:
    """One posture on one target: its latency per call against ``scores`` (a spread of per-round ratios)."""

    posture: str
    target: str
    ratio: Spread
    ms_per_call: float
    scores_ms_per_call: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"ratio": self.ratio.to_dict()}


def _runtime_only(posture: Posture) -> Posture:
    """The posture without its rate limit (timed without refusals)."""
    return dataclasses.replace(posture, rate=None)


def measure_postures(
    checkpoint: Path,
    key: Key | None,
    postures: Sequence[Posture | str],
    *,
    targets: Sequence[str] = DEFAULT_TARGETS,
    rounds: int = 12,
    calls: int = 25,
    threads: int | None = None,
    log=lambda _line: None,
) -> list[PostureLatency]:
    """Each posture (other than ``scores``) on each target whose runtime runs here, against ``scores``."""
    wanted = [_runtime_only(parse_posture(p)) for p in postures]
    wanted = [p for p in dict.fromkeys(wanted) if p != SCORES]
    targets = [t for t in targets if get_backend(t).available()[0] and get_backend(t).can_run()[0]]
    results: list[PostureLatency] = []
    with tempfile.TemporaryDirectory(prefix="keyedge-posture-latency-") as tmp:
        sets = {}
        for i, posture in enumerate([SCORES, *wanted]):
            usable = [t for t in targets if get_backend(t).random_ops or not posture.randomized]
            settings = ExportSettings(targets=usable, out=Path(tmp) / str(i), posture=posture, verify=False)
            log(f"exporting {posture} to {', '.join(usable)}")
            sets[posture] = (export_one(ExportRequest(Path(checkpoint), key), settings), usable)
        for target in targets:
            settings = {"threads": threads}
            runners = {
                posture: open_artifact(directory, target, guard_state=IN_MEMORY, **settings)
                for posture, (directory, usable) in sets.items()
                if target in usable
            }
            try:
                shape = list(runners[SCORES].input_shape)
                shape[0] = shape[0] or 1
                pool = rounds * calls + 8  # warm-up calls and a margin
                rng = np.random.default_rng(0)
                candidates = {}
                for posture, runner in runners.items():
                    images = rng.random((pool, *shape), dtype=np.float32)
                    counter = iter(range(pool))
                    candidates[posture] = lambda r=runner, im=images, c=counter: r(im[next(c)])
                log(f"timing {len(runners)} postures on {target}: {rounds} rounds x {calls} calls")
                timing = interleave(candidates, rounds=rounds, calls=calls, warmup=3)
            finally:
                for runner in runners.values():
                    runner.close()
            base = float(np.median(timing[SCORES].means))
            for posture in runners:
                if posture == SCORES:
                    continue
                results.append(
                    PostureLatency(
                        str(posture),
                        target,
                        timing.ratio(posture, SCORES),
                        1e3 * float(np.median(timing[posture].means)),
                        1e3 * base,
                    )
                )
    return results


def latency_overheads(
    postures: Sequence[Posture | str], *, target: str = "onnx", log=lambda _line: None, **timing: Any
) -> Callable[[Posture, Any], float | None]:
    """For the robustness harness's postures table (``run_robustness(latency=...)``): ``latency(posture, member)``,
    the posture's latency on ``target`` against ``scores`` (the median per-round ratio), measured once per model
    for every posture together; None where it could not be measured here."""
    measured: dict[str, dict[str, float]] = {}

    def latency(posture: Posture, member: Any) -> float | None:
        posture = _runtime_only(parse_posture(posture))
        if posture == SCORES:
            return 1.0
        if member.name not in measured:
            results = measure_postures(Path(member.path), member.key, postures, targets=[target], log=log, **timing)
            measured[member.name] = {r.posture: r.ratio.median for r in results}
        return measured[member.name].get(str(posture))

    return latency


def main(argv: Sequence[str] | None = None) -> list[PostureLatency]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("-k", "--key-file", type=Path, help="the checkpoint's key (none for a plain model)")
    parser.add_argument("--postures", default="label,label+guard,label+noise:0.02+guard")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS))
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--calls", type=int, default=25)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    key = load_key(args.key_file) if args.key_file else None
    postures = [parse_posture(p) for p in args.postures.split(",")]
    results = measure_postures(
        args.checkpoint,
        key,
        postures,
        targets=args.targets.split(","),
        rounds=args.rounds,
        calls=args.calls,
        threads=args.threads,
        log=lambda line: print(line, file=sys.stderr),
    )
    print(f"{'posture':40s} {'target':9s} {'posture/scores [p10-p90]':28s} ms/call (scores)")
    for r in results:
        print(f"{r.posture:40s} {r.target:9s} {r.ratio!s:28s} {r.ms_per_call:.3f} ({r.scores_ms_per_call:.3f})")
    if args.json is not None:
        args.json.write_text(json.dumps([r.to_dict() for r in results], indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
