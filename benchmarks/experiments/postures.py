"""Which deployment posture holds against query attackers who know it?  One checkpoint, several postures, side by side.

For each posture (``--postures``, e.g. ``scores,label,scores+noise:0.05,label+guard``) the attacks that know it
(:func:`keyedge.benchmarks.postures.strategies`) run on one common subset of test images from fresh devices, every
query counted; per posture it prints clean accuracy under the posture, robust accuracy per attack and the worst
case per image at each budget, with n and a binomial standard error, and what the guard refused and when it first
flagged.  It also measures the query guard's false positives on benign traffic: i.i.d. test images, and a
camera-like stream (sample photos with small shifts, brightness changes, JPEG re-encoding and sensor noise).

Run: ``python -m keyedge.benchmarks.experiments.postures runs/k1 -k keys/k1.bin``
``[--postures scores,label+guard] [--images 100] [--budgets 1000,10000] [--artifact export/k1] [--json postures.json]``
(``--artifact``: attack the checkpoint's ONNX export through ONNX Runtime, as a device runs it.)
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from keyedge.attacks import parse_eps
from keyedge.benchmarks.postures import (
    camera_stream,
    detection,
    false_positives,
    run_watched,
    strategies,
    worst_per_image,
)
from keyedge.checkpoints import load_checkpoint
from keyedge.data.datasets import load_dataset
from keyedge.errors import KeyedgeError
from keyedge.keys.keyfile import load_key
from keyedge.models.lora import merge_lora
from keyedge.postures import parse_posture
from keyedge.postures.guard import GuardConfig
from keyedge.postures.oracle import Device
from keyedge.stats import binomial_se


def clean_accuracy(model: torch.nn.Module, posture, x: torch.Tensor, y: torch.Tensor, seed: int) -> float:
    device = Device(model, parse_posture(posture), seed=seed)
    with torch.no_grad():
        return float((device(x).argmax(1) == y).float().mean())


def deployed(model: torch.nn.Module, artifact: str, x: torch.Tensor, threads: int) -> torch.nn.Module:
    """The export directory's runner as the model the attacks query, checked to answer as ``model`` does on ``x``."""
    from keyedge.attacks.query import Queried
    from keyedge.deploy.runtime import open_artifact

    try:
        runner = Queried(open_artifact(artifact, posture=False, threads=threads), label=artifact)
    except KeyedgeError as exc:
        raise SystemExit(f"error: --artifact {exc}") from None
    with torch.no_grad():
        same = (runner(x).argmax(1) == model(x).argmax(1)).float().mean().item()
    if same < 0.99:
        raise SystemExit(f"error: {artifact} answers {same:.0%} of the images as the checkpoint does: not its export")
    return runner


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("-k", "--key-file", help="the checkpoint's key (none for a plain model)")
    parser.add_argument(
        "--artifact",
        help="query this export directory of the checkpoint (exported with the scores posture) through its runner "
        "instead of the PyTorch model: what the device runs, and several times faster per query at batch 1",
    )
    parser.add_argument("--threads", type=int, default=1, help="runtime threads of --artifact")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--postures", default="scores,label,scores+noise:0.05,scores+guard,label+guard")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--budgets", default="1000", help="device queries per image, comma-separated")
    parser.add_argument("--eps", default="16/255")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stream-frames", type=int, default=250, help="camera frames per scene (false positives)")
    parser.add_argument(
        "--fp-images", type=int, help="i.i.d. test images for the guard's false positives (default: the attacked ones)"
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    key = load_key(args.key_file) if args.key_file else None
    model, _ = load_checkpoint(args.checkpoint, key)
    model = merge_lora(model).eval()
    size = model.spec.image_size
    test, _ = load_dataset(args.data, "test", size, limit=args.images, seed=args.seed)
    x = torch.stack([test[i][0] for i in range(len(test))])
    y = torch.as_tensor(test.labels)
    if args.artifact:
        try:
            model = deployed(model, args.artifact, x, args.threads)
        except SystemExit as exc:  # one line and exit 2, as argparse reports bad arguments
            parser.exit(2, f"{exc}\n")
    budgets = [int(b) for b in args.budgets.split(",")]
    eps = parse_eps(args.eps)
    results: dict = {
        "checkpoint": args.checkpoint,
        "artifact": args.artifact,
        "images": len(x),
        "eps": eps,
        "budgets": budgets,
        "postures": [],
    }
    print(f"{args.checkpoint}: {len(x)} {args.data} test images at {size}px, eps {args.eps}, budgets {budgets}")
    for spec in filter(None, args.postures.split(",")):  # --postures '': the false positives only
        posture = parse_posture(spec)
        clean = clean_accuracy(model, posture, x, y, args.seed)
        outcomes = []
        for strategy in strategies(posture):
            start = time.perf_counter()
            outcome = run_watched(model, x, y, posture, strategy, eps=eps, budget=max(budgets), seed=args.seed)
            outcomes.append(outcome)
            accs = ", ".join(f"{outcome.robust_accuracy(b):.1%} @{b}" for b in budgets)
            seen = detection(outcome)
            flag = (
                f", flagged the attacker of {seen['detected']}/{seen['attacked']} images"
                f" (median {seen['median_queries_to_flag']} of its queries)"
                if seen
                else ""
            )
            print(
                f"  {posture!s:28} {strategy.label:28} {accs}; refused {outcome.refused}/{outcome.device_queries}"
                f"{flag} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
        worst = {b: worst_per_image(outcomes, b)[0] for b in budgets}
        line = ", ".join(f"{w:.1%} ± {binomial_se(w, len(x)):.1%} @{b}" for b, w in worst.items())
        print(f"  {posture!s:28} clean {clean:.1%}; worst case per image: {line}")
        results["postures"].append(
            {
                "posture": str(posture),
                "clean_accuracy": clean,
                "worst": {str(b): w for b, w in worst.items()},
                "outcomes": [o.to_dict() for o in outcomes],
                "detection": [d for d in map(detection, outcomes) if d is not None],
            }
        )
    config = GuardConfig()
    if args.fp_images:
        benign, _ = load_dataset(args.data, "test", size, limit=args.fp_images, seed=args.seed)
        iid = [benign[i][0].numpy() for i in range(len(benign))]
    else:
        iid = [x[i].numpy() for i in range(len(x))]
    results["guard_false_positives"] = {
        "config": config.to_dict(),
        "iid": false_positives(iid, config),
        "camera": false_positives(camera_stream(size, args.stream_frames, args.seed), config),
    }
    for name, fp in results["guard_false_positives"].items():
        if name != "config":
            print(f"  guard false positives, {name}: {fp['flagged']}/{fp['queries']} ({fp['rate']:.2%})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


if __name__ == "__main__":
    main()
