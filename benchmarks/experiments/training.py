"""Training benchmark: images/s of full vs LoRA fine-tuning, and keyed vs plain training steps.

Four variants of one model and batch -- plain/full, keyed/full, plain/LoRA,
keyed/LoRA -- each a real optimizer step (forward, cross-entropy, backward,
AdamW), interleaved round by round so drift hits all alike.  Ratios are taken
within a round; the median and 10th-90th percentile over rounds are reported.
Speed does not depend on the weights' values, so random initialization is used.

Run: ``python -m keyedge.benchmarks.experiments.training``
``[--model tf_efficientnet_lite0] [--image-size 64] [--batch 32]``
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics

import torch
from torch import nn

from keyedge.keys.keyfile import Key
from keyedge.models.backbones import build_model
from keyedge.models.lora import apply_lora, lora_settings
from keyedge.stats import ratio_spread
from keyedge.timing import interleave

VARIANTS = ("plain-full", "keyed-full", "plain-lora", "keyed-lora")
RATIOS = {
    "keyed/plain (full)": ("keyed-full", "plain-full"),
    "keyed/plain (lora)": ("keyed-lora", "plain-lora"),
    "lora/full (keyed)": ("keyed-lora", "keyed-full"),
}


def _variant(name: str, model_name: str, size: int, key: Key):
    torch.manual_seed(0)
    model = build_model(model_name, 10, key=key if name.startswith("keyed") else None, weights="none", image_size=size)
    if name.endswith("lora"):
        apply_lora(model, lora_settings(model.spec.family))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model.train(), optimizer


def interleaved_rates(
    runs: dict[str, tuple[nn.Module, torch.optim.Optimizer]],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    rounds: int,
    steps: int,
) -> dict[str, list[float]]:
    """Training images/s of each (model, optimizer), per round: ``steps`` real optimizer steps each, the order rotated
    every round so drift hits all alike.  One warm-up step each first."""

    def step(name: str) -> None:
        model, optimizer = runs[name]
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    # one warm-up step each, then ``steps`` steps per round timed as one block
    calls = {name: functools.partial(step, name) for name in runs}
    timing = interleave(calls, rounds=rounds, calls=steps, warmup=1, each=False)
    return {name: [len(x) / t for t in timing[name].means] for name in runs}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per variant per round")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    key = Key.from_secret(bytes(range(32)), args.block_size)
    x = torch.rand(args.batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (args.batch,), generator=torch.Generator().manual_seed(1))
    runs = {name: _variant(name, args.model, args.image_size, key) for name in VARIANTS}

    rates = interleaved_rates(runs, x, y, rounds=args.rounds, steps=args.steps)
    result = {
        "model": args.model,
        "image_size": args.image_size,
        "batch": args.batch,
        "threads": args.threads,
        "block_size": args.block_size,
        "rounds": args.rounds,
        "steps": args.steps,
        "images_per_s": {n: statistics.median(v) for n, v in rates.items()},
        "ratios": {},
    }
    print(
        f"training benchmark: {args.model} at {args.image_size}x{args.image_size}, batch {args.batch}, "
        f"{args.threads} threads, torch {torch.__version__}, {args.rounds} interleaved rounds x {args.steps} steps"
    )
    for name in VARIANTS:
        print(f"  {name:>11}: {result['images_per_s'][name]:8.1f} images/s")
    for label, (a, b) in RATIOS.items():
        ratios = ratio_spread(rates[a], rates[b])  # throughput ratio
        result["ratios"][label] = ratios.to_dict()
        print(f"  throughput {label:>19}: {ratios}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
