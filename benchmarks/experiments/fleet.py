"""Fleet benchmark: ``keyedge fleet`` train + export of N tiny keys, local engine vs a local Ray instance, one run.

Two fleets with the same recipe (a tiny timm model on Fashion-MNIST at 32x32, N keys) are
trained and exported to ONNX through the ``keyedge`` command, as a user runs it: one fleet on
``--engine local`` (one job at a time, all threads), one on ``--engine ray`` (a local Ray instance,
one CPU per job); with ``--repeats`` > 1 the order alternates.  On a
machine with C cores, Ray runs C jobs at once with one thread each, the local engine one job
with C threads: the ratio says which wins for this job size.

Run: ``python -m keyedge.benchmarks.experiments.fleet``
``[--keys 4] [--model test_efficientnet] [--train-limit 512] [--repeats 1]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

KEYEDGE = [sys.executable, "-m", "keyedge"]


def _run(*args: str) -> float:
    start = time.perf_counter()
    proc = subprocess.run([*KEYEDGE, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"keyedge {' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - start


def _fleet_run(directory: Path, engine: str, args) -> dict[str, float]:
    recipe = ["-m", args.model, "-d", args.data, "--weights", "none", "--image-size", "32", "--batch-size", "32"]
    recipe += ["--epochs", str(args.epochs), "--train-limit", str(args.train_limit), "--test-limit", "64"]
    _run("fleet", "init", str(directory), "-n", str(args.keys), *recipe)
    flags = ["--engine", engine, "--retries", "0"] + (["--cpus-per-job", "1"] if engine == "ray" else [])
    times = {"train": _run("fleet", "train", str(directory), *flags)}
    times["export"] = _run("fleet", "export", str(directory), "-t", "onnx", *flags)
    times["total"] = times["train"] + times["export"]
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=4)
    parser.add_argument("--model", default="test_efficientnet")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--train-limit", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    cpus = os.cpu_count() or 1
    print(
        f"fleet benchmark: {args.keys} keys of {args.model} (32x32, {args.train_limit} training images, "
        f"{args.epochs} epoch), `keyedge fleet train` + `fleet export -t onnx` (verified); "
        f"torch {torch.__version__}, {cpus} CPUs; Ray's start-up (once per command) is included"
    )
    runs: dict[str, list[dict[str, float]]] = {"local": [], "ray": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name in ("local", "ray") if repeat % 2 == 0 else ("ray", "local"):
                times = _fleet_run(Path(tmp) / f"{name}-{repeat}", name, args)
                runs[name].append(times)
                print(
                    f"  round {repeat + 1} {name:>5}: train {times['train']:6.1f} s, export {times['export']:6.1f} s, "
                    f"total {times['total']:6.1f} s ({times['total'] / args.keys:.1f} s/key)"
                )
    mean = {n: sum(r["total"] for r in rs) / len(rs) for n, rs in runs.items()}
    print(f"  wall time ray/local: {mean['ray'] / mean['local']:.2f} (mean over {args.repeats} round(s))")
    result = {"keys": args.keys, "model": args.model, "cpus": cpus, "runs": runs}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
