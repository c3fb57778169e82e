"""Attack speed: PGD-20 Linf throughput of keyedge's :class:`~keyedge.attacks.PGD` vs ``torchattacks.PGD``.

Both attack the same model (a keyed timm model from :func:`keyedge.models.backbones.build_model`:
block shuffle + normalization + backbone, random weights) on the same inputs with the
same eps, step size, steps and random start.  Rounds are interleaved (order alternated
each round) so machine drift hits both alike; the ratio ours/theirs is taken within a
round, then its median and 10th-90th percentile spread over rounds are reported.
``torchattacks`` is optional (`pip install --no-deps torchattacks`: its requests pin would downgrade requests);
without it only ours is measured.

Run: ``python -m keyedge.benchmarks.experiments.attack_speed [--rounds 10] [--batch-size 32] [--image-size 32]
[--model resnet18] [--threads 2] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from keyedge.attacks import PGD, parse_eps
from keyedge.keys.keyfile import Key
from keyedge.models.backbones import build_model
from keyedge.stats import ratio_spread
from keyedge.timing import interleave


@dataclass
class SpeedResult:
    model: str
    image_size: int
    batch_size: int
    steps: int
    eps: float
    alpha: float
    threads: int
    rounds: int
    images_per_s: dict[str, float] = field(default_factory=dict)  # median over rounds
    ratio: float | None = None  # median over rounds of ours/theirs images/s (> 1: ours is faster)
    ratio_spread: tuple[float, float] | None = None  # p10, p90 of the per-round ratios
    torchattacks: str | None = None  # its version, None when not installed


def _theirs(model: torch.nn.Module, eps: float, alpha: float, steps: int):
    try:
        import torchattacks
    except ImportError:
        return None, None
    return torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True), torchattacks.__version__


def bench(
    model_name: str,
    image_size: int,
    batch_size: int,
    steps: int,
    eps: float,
    rounds: int,
    threads: int,
    block_size: int = 4,
) -> SpeedResult:
    key = Key.from_secret(bytes(range(32)), block_size)
    model = build_model(model_name, 10, key=key, weights="none", image_size=image_size).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, 3, image_size, image_size, generator=gen)
    y = torch.randint(0, 10, (batch_size,), generator=gen)
    alpha = 2.5 * eps / steps
    ours = PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True, seed=0)
    theirs, version = _theirs(model, eps, alpha, steps)
    methods: dict[str, Callable[[], torch.Tensor]] = {"ours": lambda: ours(x, y)}
    if theirs is not None:
        methods["torchattacks"] = lambda: theirs(x, y)
    for name, fn in methods.items():  # warm up, and check both stay in the budget
        adv = fn()
        assert (adv - x).abs().max() <= eps + 1e-6, f"{name} left the eps-ball"
    timing = interleave(methods, rounds=rounds, calls=1, warmup=0)
    samples = {name: [batch_size / t for t in timing[name].means] for name in methods}
    result = SpeedResult(
        model_name,
        image_size,
        batch_size,
        steps,
        eps,
        alpha,
        threads,
        rounds,
        {name: statistics.median(v) for name, v in samples.items()},
        torchattacks=version,
    )
    if theirs is not None:
        ratios = ratio_spread(samples["ours"], samples["torchattacks"])
        result.ratio = ratios.median
        result.ratio_spread = (ratios.p10, ratios.p90)
    return result


def main(argv: list[str] | None = None) -> SpeedResult:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--model", default="resnet18", help="timm model name (random weights, 10 classes)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eps", default="8/255")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.batch_size < 1 or args.steps < 1:
        parser.error("--rounds, --batch-size and --steps must be positive")
    torch.set_num_threads(args.threads)
    eps = parse_eps(args.eps)
    print(
        f"attack speed: PGD-{args.steps} Linf eps={args.eps} on keyed {args.model} {args.image_size}x"
        f"{args.image_size}, batch {args.batch_size}, float32, torch {torch.__version__} ({args.threads} threads), "
        f"{platform.processor() or platform.machine()}, {args.rounds} interleaved rounds"
    )
    res = bench(args.model, args.image_size, args.batch_size, args.steps, eps, args.rounds, args.threads)
    if res.torchattacks is None:
        print("torchattacks is not installed (pip install --no-deps torchattacks): measuring keyedge's PGD only")
    for name, ips in res.images_per_s.items():
        label = name if name == "ours" else f"{name} {res.torchattacks}"
        print(f"{label:>22}: {ips:9.1f} images/s (median)")
    if res.ratio is not None:
        lo, hi = res.ratio_spread
        print(f"{'ours / torchattacks':>22}: {res.ratio:9.3f}x  [p10-p90 {lo:.3f}-{hi:.3f}]")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(asdict(res), fh, indent=2)
    return res


if __name__ == "__main__":
    main()
