"""Transform benchmark: per-image cost of the block-wise shuffle, three ways, measured side by side.

* ``gather``  -- :class:`keyedge.keys.transform.BlockShuffle`, one ``index_select`` (what exported models run);
* ``chain``   -- the reshape/permute chain of the definition (:func:`keyedge.keys.transform.blockwise_shuffle`);
* ``numpy``   -- :class:`keyedge.keys.transform.HostShuffle`, the same gather host-side with ``np.take``.

The implementations are interleaved round by round (order rotated each round) so
machine drift hits all of them alike; ratios are taken within a round, then the
median and the 10th-90th percentile spread over rounds are reported.

Run: ``python -m keyedge.benchmarks.experiments.transform [--rounds 30] [--threads 2] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from keyedge.keys.keyfile import Key
from keyedge.keys.transform import BlockShuffle, HostShuffle, blockwise_shuffle
from keyedge.timing import interleave

CONFIGS = [(224, 1), (224, 32), (32, 1), (32, 32)]  # (image side, batch)
METHODS = ("gather", "chain", "numpy")


@dataclass
class Result:
    size: int
    batch: int
    block_size: int
    us_per_image: dict[str, float] = field(default_factory=dict)  # median over rounds
    ratio_to_gather: dict[str, float] = field(default_factory=dict)  # median of per-round ratios
    ratio_spread: dict[str, tuple[float, float]] = field(default_factory=dict)  # p10, p90 of per-round ratios


def bench_config(key: Key, size: int, batch: int, rounds: int, min_round_s: float) -> Result:
    x = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    x_np = x.numpy()
    gather = BlockShuffle.from_key(key, size)
    host = HostShuffle.from_key(key, size)
    perm = key.permutation
    methods: dict[str, Callable[[], object]] = {
        "gather": lambda: gather(x),
        "chain": lambda: blockwise_shuffle(x, perm, key.block_size).contiguous(),
        "numpy": lambda: host(x_np),
    }
    reference = gather(x)  # all three must agree before any of them is timed
    assert torch.equal(methods["chain"](), reference) and np.array_equal(methods["numpy"](), reference.numpy())

    # warm up, size each round to ~min_round_s; a round's calls timed as one block (a call can be microseconds)
    timing = interleave(methods, rounds=rounds, warmup=3, round_seconds=min_round_s, each=False)
    result = Result(size, batch, key.block_size)
    for name in METHODS:
        per_image = [t / batch for t in timing[name].means]
        result.us_per_image[name] = statistics.median(per_image) * 1e6
        ratios = timing.ratio(name, "gather")
        result.ratio_to_gather[name] = ratios.median
        result.ratio_spread[name] = (ratios.p10, ratios.p90)
    return result


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--min-round-ms", type=float, default=20.0, help="time spent per method per round")
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    key = Key.from_secret(bytes(range(32)), args.block_size)
    print(
        f"transform benchmark: block size {args.block_size}, float32, torch {torch.__version__} "
        f"({args.threads} threads), numpy {np.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.rounds} interleaved rounds"
    )
    header = (
        f"{'input':>14} | "
        + " | ".join(f"{m + ' us/img':>14}" for m in METHODS)
        + " | "
        + " | ".join(f"{m + '/gather':>22}" for m in METHODS[1:])
    )
    print(header)
    print("-" * len(header))
    results = []
    for size, batch in CONFIGS:
        res = bench_config(key, size, batch, args.rounds, args.min_round_ms / 1000)
        results.append(res)
        times = " | ".join(f"{res.us_per_image[m]:14.2f}" for m in METHODS)
        ratios = " | ".join(
            f"{res.ratio_to_gather[m]:6.2f} [{res.ratio_spread[m][0]:5.2f}-{res.ratio_spread[m][1]:5.2f}]".rjust(22)
            for m in METHODS[1:]
        )
        print(f"{f'{size}x{size} b{batch}':>14} | {times} | {ratios}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"threads": args.threads, "results": [asdict(r) for r in results]}, fh, indent=2)
    return results


if __name__ == "__main__":
    main()
