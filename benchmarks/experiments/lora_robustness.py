"""The seed paper's open problem, measured: do LoRA keyed models fall to adaptive attacks, and what helps?

The paper reports ViT-B/16 on ImageNet at 51.56% adaptive robust accuracy with LoRA against 81.45%
with full fine-tuning.  Here every model is a real ``keyedge train`` run (as in
:mod:`keyedge.benchmarks.experiments.lora`: same data, budget and pretrained base per family), and every arm
is a fine-tune recipe the defender could deploy:

* ``full``       full fine-tuning (the paper's robust reference);
* ``lora``       the family's LoRA recipe (first layer trained fully, docs/lora.md);
* ``lora-adapters``  the recipe's learning rate, but the first layer adapted (rank r) instead of trained
  fully: a rank-r update cannot undo the key's permutation, so each key's model must learn it deeper;
* ``lora-wide``  adapters on every layer, twice the rank (does adapting more of the shared base help?);
* ``lora-guard`` / ``full-guard``  the recipe trained with the transfer guard (:mod:`keyedge.training.guard`):
  PGD examples crafted on two models of the unguarded recipe fine-tuned with the *defender's* own
  other keys (``D1, D2``);
* ``full-p8`` / ``lora-p8``  both at block size 8 (a larger block scrambles more of the image).

Kerckhoffs: the attacker knows the recipe, the base and the data, but not the key.  For each arm it
trains three surrogates with keys of its own (``A1..A3``; never the target's ``T`` nor the guard's
``D1, D2``) at the arm's block size (guarded ones with guard models of its own keys, ``E1, E2``),
and attacks the target with PGD (Linf, eps, steps, random start) crafted on: the plain model
(non-adaptive), each surrogate alone (adaptive) and the sum of the three surrogates' losses
(multi-key EoT) -- using the surrogates of *every* recipe at that block size, since the attacker
picks what transfers best.  Reported per target: clean accuracy, white-box (sanity: ~0),
non-adaptive, adaptive and EoT from its own recipe's surrogates, the worst single surrogate and the
worst EoT over all recipes, and the worst case of everything keyless, each with its binomial
standard error over ``n`` test images; plus trainable parameters and training images/s (the loop's
own figure, runs one after another on one machine: a ratio, roughly).

Run: ``python -m keyedge.benchmarks.experiments.lora_robustness --family resnet [--json reports/lora-robustness.json]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keyedge.attacks import parse_eps
from keyedge.benchmarks.experiments.lora import FAMILIES, VARIANTS, Budget, _base_weights, run_variant
from keyedge.benchmarks.robustness import Evaluation, RobustnessConfig, load_members
from keyedge.checkpoints import read_manifest
from keyedge.data.datasets import load_dataset
from keyedge.keys.keyfile import Key, load_key
from keyedge.models.recipes import LORA_DEFAULTS
from keyedge.stats import binomial_se

#: per family, the adapted layers of ``lora-wide`` (every Linear/Conv2d the family's blocks have)
WIDE_TARGETS = {
    "vit": ["qkv", "proj", "fc1", "fc2"],
    "convnext": ["mlp.fc1", "mlp.fc2", "downsample"],
    "resnet": ["conv1", "conv2", "downsample"],
    "efficientnet": ["conv_pw", "conv_pwl", "conv_head"],
}
ATTACKER_KEYS = ("A1", "A2", "A3")
GUARD_KEYS = {"T": ("D1", "D2"), "A": ("E1", "E2")}  # the defender's guard keys; the attacker's own


@dataclass(frozen=True)
class Arm:
    """One recipe the defender could deploy; the attacker trains its surrogates with it too."""

    name: str
    variant: str  # a keyedge.benchmarks.experiments.lora variant
    block_size: int = 4
    wide: bool = False  # adapters on WIDE_TARGETS at twice the rank
    guard: str | None = None  # trained with the transfer guard, on two models of this arm's recipe

    def extra(self, family: str) -> dict[str, Any]:
        if not self.wide:
            return {}

        return {"lora_targets": WIDE_TARGETS[family], "lora_r": 2 * LORA_DEFAULTS[family].r}


ARMS = {
    a.name: a
    for a in (
        Arm("full", "full"),
        Arm("lora", "lora-default"),
        Arm("lora-adapters", "lora-adapters-default"),
        Arm("lora-wide", "lora-default", wide=True),
        Arm("lora-guard", "lora-default", guard="lora"),
        Arm("full-guard", "full", guard="full"),
        Arm("full-p8", "full", block_size=8),
        Arm("lora-p8", "lora-default", block_size=8),
    )
}


@dataclass
class Result:
    """One target (the defender's model) under every attack."""

    family: str
    arm: str
    block_size: int
    recipe: str
    trainable: int
    images_per_s: float
    images: int
    figures: dict[str, float] = field(default_factory=dict)  # scenario -> accuracy
    sources: dict[str, list[str]] = field(default_factory=dict)  # scenario -> the surrogate(s) that scored it

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__) | {"se": {k: binomial_se(v, self.images) for k, v in self.figures.items()}}


def key_file(work: Path, name: str, block_size: int) -> Path:
    """A fixed key per role and block size (the benchmark is reproducible; the keys are nobody's secret)."""

    path = work / "keys" / f"{name}-p{block_size}.bin"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        secret = hashlib.sha256(f"keyedge lora-robustness {name}".encode()).digest()
        Key.from_secret(secret, block_size).save(path)
    return path


def train_arms(family: str, arms: list[Arm], budget: Budget, work: Path, weights: str, log) -> dict[str, Any]:
    """Every model: the plain one, and per arm its target (key T) and surrogates (A1..A3), with their guards."""
    plain = run_variant(family, VARIANTS["full"], False, budget, work, weights, key_file(work, "T", 4))
    runs: dict[str, Any] = {"plain": (plain, work / "runs" / family / "full-plain")}

    def one(arm: Arm, role: str, extra: dict[str, Any] | None = None):
        tag = f"-{arm.name}-{role}"
        row = run_variant(
            family,
            VARIANTS[arm.variant],
            True,
            budget,
            work,
            weights,
            key_file(work, role, arm.block_size),
            tag=tag,
            extra=arm.extra(family) | (extra or {}),
        )
        log(f"{family} {arm.name:11s} {role}: {row.test_accuracy:.1%} ({row.seconds:.0f} s)")
        return row, work / "runs" / family / f"{arm.variant}{tag}-keyed"

    def guarded(arm: Arm, side: str) -> dict[str, Any]:
        """The transfer-guard options of a guarded arm's model on ``side`` (T: defender, A: attacker)."""
        if not arm.guard:
            return {}
        roles = GUARD_KEYS[side]
        models = [one(ARMS[arm.guard], role)[1] for role in roles]  # (guard arms share the guard's block size)
        return {
            "guard_models": [str(path) for path in models],
            "guard_keys": [str(key_file(work, role, arm.block_size)) for role in roles],
        }

    for arm in arms:
        runs[(arm.name, "T")] = one(arm, "T", guarded(arm, "T"))
        attacker_guard = guarded(arm, "A")
        for role in ATTACKER_KEYS:
            runs[(arm.name, role)] = one(arm, role, attacker_guard)
    return runs


def evaluate(family: str, arms: list[Arm], runs: dict[str, Any], work: Path, n: int, eps: str, steps: int, seed: int):
    """Every target under every keyless attack at its block size; returns the per-target results."""

    config = RobustnessConfig(limit=n, seed=seed, attack="pgd", eps=eps, steps=steps)
    results: list[Result] = []
    for block in sorted({a.block_size for a in arms}):
        results += _evaluate_block(family, [a for a in arms if a.block_size == block], runs, work, config)
    return results


def _evaluate_block(family: str, here: list[Arm], runs: dict[str, Any], work: Path, config) -> list[Result]:
    import torch

    block, eps = here[0].block_size, parse_eps(config.eps)
    pools = here
    paths = {"plain": runs["plain"][1]}
    for arm in here:
        for role in ("T", *ATTACKER_KEYS):
            paths[f"{arm.name}/{role}"] = runs[(arm.name, role)][1]
    keys = {(k := load_key(key_file(work, r, block))).fingerprint: k for r in ("T", *ATTACKER_KEYS)}
    members = load_members(list(paths.values()), keys)
    names = dict(zip(paths, (m.name for m in members), strict=True))  # our label -> member name
    data, _ = load_dataset(config.data, "test", members[0].model.spec.image_size, limit=config.limit, seed=config.seed)
    images = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.as_tensor([int(data[i][1]) for i in range(len(data))])
    ev = Evaluation(members, images, labels, config)

    def accuracy(target: str, sources: list[str]) -> float:
        adv, _ = ev.adversarial([names[s] for s in sources], eps)
        return float((ev.predict(ev.members[names[target]].model, adv) == labels).float().mean())

    results = []
    for arm in here:
        target = f"{arm.name}/T"
        own = arm
        singles = {f"{p.name}/{r}": accuracy(target, [f"{p.name}/{r}"]) for p in pools for r in ATTACKER_KEYS}
        eots = {p.name: accuracy(target, [f"{p.name}/{r}" for r in ATTACKER_KEYS]) for p in pools}
        own_single = min((k for k in singles if k.startswith(own.name + "/")), key=singles.get)
        worst_single = min(singles, key=singles.get)
        worst_eot = min(eots, key=eots.get)
        figures = {
            "clean": float((ev.clean[names[target]] == labels).float().mean()),
            "white-box": accuracy(target, [target]),
            "non-adaptive": accuracy(target, ["plain"]),
            "adaptive": singles[own_single],
            "multi-key-eot": eots[own.name],
            "adaptive-worst": singles[worst_single],
            "eot-worst": eots[worst_eot],
        }
        figures["worst-case"] = min(v for k, v in figures.items() if k not in ("clean", "white-box"))
        manifest = read_manifest(runs[(arm.name, "T")][1])
        rates = [h["images_per_s"] for h in manifest.metrics.get("history", [])]
        results.append(
            Result(
                family=family,
                arm=arm.name,
                block_size=block,
                recipe=manifest.recipe,
                trainable=int(manifest.training.get("trainable_parameters", 0)),
                images_per_s=statistics.mean(rates) if rates else float("nan"),
                images=len(data),
                figures=figures,
                sources={
                    "adaptive": [own_single],
                    "adaptive-worst": [worst_single],
                    "eot-worst": [f"{worst_eot}/{r}" for r in ATTACKER_KEYS],
                },
            )
        )
    return results


COLUMNS = ("clean", "white-box", "non-adaptive", "adaptive", "multi-key-eot", "adaptive-worst", "eot-worst")


def table(results: list[Result]) -> str:
    """Markdown: per target, every figure with its SE, trainable parameters and training speed vs ``full``."""

    lines = [
        "| family | arm | P | " + " | ".join(COLUMNS) + " | worst case | trainable | train img/s (x full) |",
        "|---|---|---|" + "---|" * (len(COLUMNS) + 3),
    ]
    full = {r.family: r.images_per_s for r in results if r.arm == "full"}
    for r in results:
        cells = [f"{r.figures[c]:.1%} ± {binomial_se(r.figures[c], r.images):.1%}" for c in COLUMNS]
        speed = f"{r.images_per_s:.0f}" + (f" ({r.images_per_s / full[r.family]:.2f})" if r.family in full else "")
        worst = f"**{r.figures['worst-case']:.1%}**"
        lines.append(
            f"| {r.family} | {r.arm} | {r.block_size} | {' | '.join(cells)} | {worst} | {r.trainable:,} | {speed} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="resnet", choices=sorted(FAMILIES))
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated: " + ", ".join(ARMS))
    parser.add_argument("--n", type=int, default=500, help="test images attacked")
    parser.add_argument("--eps", default="16/255")
    parser.add_argument("--steps", type=int, default=10, help="PGD steps")
    parser.add_argument("--seed", type=int, default=0, help="test subset, attack start, training")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--train-limit", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--base", choices=("here", "hub"), default="here", help="as keyedge.benchmarks.experiments.lora"
    )
    parser.add_argument("--pretrain-images", type=int, default=10000)
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--work", default="build/lora-bench", help="cache of bases and runs (shared with lora)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    names = [a for a in args.arms.split(",") if a]
    unknown = [a for a in names if a not in ARMS]
    if unknown:
        parser.error(f"unknown arm {unknown[0]!r}")
    arms = [ARMS[a] for a in names]

    budget = Budget(
        args.data, args.train_limit, args.n, args.epochs, args.batch, 4, args.seed,
        args.pretrain_images, args.pretrain_epochs,
    )  # fmt: skip
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    weights = _base_weights(args.family, budget, work, args.base, print)
    runs = train_arms(args.family, arms, budget, work, weights, lambda line: print(line, flush=True))
    results = evaluate(args.family, arms, runs, work, args.n, args.eps, args.steps, args.seed)
    print()
    print(f"PGD Linf eps {args.eps}, {args.steps} steps, {args.n} {args.data} test images, seed {args.seed}")
    print(table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        payload = {"config": vars(args), "results": [r.to_dict() for r in results]}
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return results


if __name__ == "__main__":
    main()
