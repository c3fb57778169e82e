"""Key-recovery probe: how much of a device's key can an attacker estimate from queries alone?

The device computes ``f(x) = h(S_K(x))``: the key's block shuffle ``S_K`` moves the value at in-block
position ``p`` to position ``k(p)`` of the same block, then the fine-tuned network ``h`` runs.  From queries
alone, ``K`` is not identifiable without a prior on ``h`` -- ``h o S_K`` equals ``(h o S_K o S_s^-1) o S_s``
for every permutation ``s``.  The prior an attacker has is the public starting point: a plain model ``g``
fine-tuned from the same pretrained weights on the same (public) data, which it can train itself.

The probe (a "jigsaw" by response matching): for each in-block position ``p`` it queries the device with
``repeats`` gray images whose position ``p`` in every block is set to a random 0 or 1 (the same random
patterns for every position).  The device's network sees that pattern at ``k(p)``.  The attacker evaluates
its own reference ``g`` on the same patterns placed at every position ``j`` (free: its own model), and
assigns each ``p`` to the ``j`` whose responses are most alike (centred log-softmax, cosine; one-to-one by
the Hungarian algorithm).  If ``h`` kept ``g``'s response to in-block positions, the assignment is ``k``.
A second prior (``--surrogate``): the network of the attacker's own keyed model, trained with a key it knows
(the adaptive attack's surrogate) -- also adapted to shuffled input.

The true key is used only to score the estimate (share of the ``3 P^2`` positions right; chance is one
in ``3 P^2``); it is never printed.  With the device's own network without its key as the reference (an
attacker who somehow holds ``h``: the ``oracle``), the probe must recover the key exactly -- the check that
the probe itself works.

    python -m keyedge.benchmarks.experiments.key_recovery RUN_DIR --key-file k1.bin --reference runs/plain \\
        [--artifact artifacts/<model>-<fp>] [--repeats 1,4,16] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from keyedge.attacks import Queried
from keyedge.checkpoints import load_checkpoint
from keyedge.deploy.artifacts import ArtifactManifest
from keyedge.deploy.runtime import open_artifact
from keyedge.errors import KeyedgeError
from keyedge.keys.keyfile import load_key
from keyedge.models.backbones import KeyedModel

Forward = Callable[[torch.Tensor], torch.Tensor]


def probes(position: int, patterns: torch.Tensor, block_size: int, channels: int) -> torch.Tensor:
    """Gray images whose in-block ``position`` (index ``(h*P + w)*C + c``) holds ``patterns``, one per image.

    ``patterns``: ``(R, H/P, W/P)`` values in [0, 1], one per block; output ``(R, C, H, W)``.
    """
    r, gh, gw = patterns.shape
    h, rest = divmod(position, block_size * channels)
    w, c = divmod(rest, channels)
    x = torch.full((r, channels, gh * block_size, gw * block_size), 0.5)
    x[:, c, h::block_size, w::block_size] = patterns
    return x


def signatures(
    forward: Forward, patterns: torch.Tensor, block_size: int, channels: int, batch: int = 256
) -> torch.Tensor:
    """``(3P^2, R*K)``: per in-block position, the centred log-softmax responses to its probes, concatenated."""
    n = block_size * block_size * channels
    images = torch.cat([probes(p, patterns, block_size, channels) for p in range(n)])
    with torch.no_grad():
        out = torch.cat([forward(images[i : i + batch]) for i in range(0, images.shape[0], batch)])
    out = torch.log_softmax(out.float(), dim=1)
    out = out - out.mean(dim=1, keepdim=True)
    out = out.view(n, patterns.shape[0], -1)
    out = out - out.mean(dim=0, keepdim=True)  # what all positions share says nothing about where one went
    return out.flatten(1)


def assign(device: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """One-to-one assignment of device positions to reference positions maximizing the summed cosine."""
    from scipy.optimize import linear_sum_assignment

    a = torch.nn.functional.normalize(device, dim=1)
    b = torch.nn.functional.normalize(reference, dim=1)
    rows, cols = linear_sum_assignment(-(a @ b.T).numpy())
    estimate = np.empty(len(rows), dtype=np.int64)
    estimate[rows] = cols
    return estimate


def true_destinations(permutation: np.ndarray) -> np.ndarray:
    """``k(p)``: where the shuffle ``b'[k] = b[v[k]]`` puts in-block position ``p`` (the inverse permutation)."""
    destination = np.empty_like(permutation)
    destination[permutation] = np.arange(len(permutation))
    return destination


def probe(
    device: Forward,
    reference: Forward,
    permutation: np.ndarray,
    block_size: int,
    image_size: int,
    *,
    repeats: int,
    channels: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the probe with ``repeats`` patterns per position; score it against ``permutation`` (never returned)."""
    grid = image_size // block_size
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.randint(0, 2, (repeats, grid, grid), generator=gen).float()
    estimate = assign(
        signatures(device, patterns, block_size, channels), signatures(reference, patterns, block_size, channels)
    )
    n = len(permutation)
    right = int((estimate == true_destinations(np.asarray(permutation))).sum())
    return {
        "repeats": repeats,
        "queries": n * repeats,
        "positions": n,
        "recovered": right,
        "recovered_fraction": right / n,
        "chance_fraction": 1 / n,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="the keyed checkpoint (the device's model)")
    parser.add_argument("--key-file", "-k", type=Path, required=True, help="its key: loads it, scores the probe")
    parser.add_argument("--reference", type=Path, required=True, help="the attacker's plain checkpoint")
    parser.add_argument(
        "--surrogate",
        type=Path,
        help="the attacker's own keyed checkpoint (another key, which it knows): its network as a second reference",
    )
    parser.add_argument("--surrogate-key", type=Path, help="the surrogate's key file")
    parser.add_argument("--artifact", type=Path, help="query this export directory's ONNX model instead of PyTorch")
    parser.add_argument("--repeats", default="1,4,16", help="probe patterns per position (comma-separated)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    stack = contextlib.ExitStack()
    try:
        key = load_key(args.key_file)
        model, _ = load_checkpoint(args.run, key)
        plain, _ = load_checkpoint(args.reference, None)
        model, plain = model.eval(), plain.eval()
        references = {"plain reference": plain}
        if args.surrogate is not None:
            if args.surrogate_key is None:
                raise KeyedgeError("--surrogate needs --surrogate-key", "pass the key the surrogate was trained with")
            surrogate, _ = load_checkpoint(args.surrogate, load_key(args.surrogate_key))
            references["surrogate h (own key)"] = KeyedModel(surrogate.backbone, surrogate.spec, None).eval()
        references["oracle (h itself)"] = KeyedModel(model.backbone, model.spec, None).eval()  # no attacker has it
        device: nn.Module | Forward = model
        runtime = "torch"
        if args.artifact is not None:
            path = ArtifactManifest.read(args.artifact).artifact("onnx")
            runner = stack.enter_context(open_artifact(path, "onnx", posture=False))
            device, runtime = Queried(runner, str(path)), f"onnx:{path.name}"
        size = model.spec.image_size
        rows = []
        for repeats in [int(r) for r in args.repeats.split(",") if r.strip()]:
            for name, reference in references.items():
                result = probe(
                    device, reference, key.permutation, key.block_size, size, repeats=repeats, seed=args.seed
                )
                rows.append({"reference": name, "runtime": runtime, **result})
                print(
                    f"{name:22} {runtime:14} {result['queries']:6d} queries: {result['recovered']:2d}/"
                    f"{result['positions']} positions ({result['recovered_fraction']:.1%}; chance "
                    f"{result['chance_fraction']:.1%})"
                )
    except KeyedgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        stack.close()
    if args.json is not None:
        args.json.write_text(json.dumps({"model": str(args.run), "block_size": key.block_size, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
