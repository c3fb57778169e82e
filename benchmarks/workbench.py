"""Throwaway checkpoints and exports for benchmarks: the checkpoint -> export glue written once.

Latency benchmarks time untrained models (weights do not change latency); they still go
through a real checkpoint and a real, verified ``keyedge export``, so what is timed is what a
user deploys.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from keyedge.checkpoints import save_checkpoint
from keyedge.deploy.export import ExportRequest, ExportSettings, export_one
from keyedge.exporters import get_backend
from keyedge.keys.fold import FoldError
from keyedge.keys.keyfile import Key
from keyedge.models.backbones import build_model


def untrained_checkpoint(directory: Path, model: nn.Module) -> Path:
    """Save ``model`` as a (fully fine-tuned, untrained) checkpoint in ``directory``; return the directory."""
    save_checkpoint(
        directory,
        model,
        epoch=0,
        finetune={"mode": "full", "lora": None},
        data={"name": "none"},
        training={"config": {}},
        metrics={"test_accuracy": None},
    )
    return directory


#: int8 timing exports calibrate on these (a benchmark checkpoint has no data of its own; latency does not
#: depend on the images, only on there being calibrated ranges)
TIMING_CALIBRATION = "fashion-mnist"


def export_for_timing(
    checkpoint: Path,
    key: Key | None,
    out: Path,
    targets: list[str],
    *,
    fuse: str = "gather",
    batch: int | None = 1,
    precision: str = "fp32",
) -> Path:
    """Export a benchmark checkpoint (verified on two random inputs, no real images); return its directory.

    ``int8``: calibrated on 32 :data:`TIMING_CALIBRATION` images; agreement is measured on sample photos and
    recorded, not enforced (random weights have no margins to keep).
    """
    settings = ExportSettings(
        targets=targets,
        out=out,
        fuse=fuse,
        batch=batch,
        real_inputs=0,
        random_inputs=2,
        precision=precision,
        calibration_data=TIMING_CALIBRATION,
        calibration_size=32,
        min_agreement=0.0,
        max_accuracy_drop=100.0,
        agreement_images=8,
    )
    return export_one(ExportRequest(checkpoint, key), settings)


#: the benchmarks' key: fixed, so that runs are comparable (never a key to deploy with)
BENCH_KEY = Key.from_secret(bytes(range(32)), 4)
#: variant -> (checkpoint role, fuse mode)
VARIANTS = {
    "plain": ("plain", "gather"),
    "gather": ("keyed", "gather"),
    "elements": ("keyed", "elements"),
    "conv": ("keyed", "conv"),
    "planes": ("keyed", "planes"),
    "fold": ("keyed", "fold"),
    "plain-fold": ("plain", "fold"),
}


def export_variants(
    model_name: str,
    size: int,
    work: Path,
    targets: list[str],
    batch: int = 1,
    variants: tuple[str, ...] = tuple(VARIANTS),
    *,
    key: Key = BENCH_KEY,
    num_classes: int = 1000,
    int8: tuple[str, ...] = (),
    precisions: tuple[str, ...] = ("int8",),
) -> list[Path]:
    """Export formulations of one architecture, random weights shared by all; return the export directories.

    (fold is skipped where inexact.)  ``key`` serves the keyed variants: the quickstart times its own.
    ``int8``: the variants also exported at each of ``precisions`` (int8 by default: ``bench latency`` then reports
    int8/fp32 per variant), to the targets that export it.
    """
    torch.manual_seed(0)
    keyed = build_model(model_name, num_classes, key=key, weights="none", image_size=size).eval()
    plain = build_model(model_name, num_classes, weights="none", image_size=size).eval()
    plain.backbone.load_state_dict(keyed.backbone.state_dict())
    checkpoints = {}
    for role, model in (("plain", plain), ("keyed", keyed)):
        checkpoints[role] = untrained_checkpoint(work / f"{model_name}-ckpt-{role}", model)
    directories = []
    jobs = [(v, "fp32") for v in variants] + [(v, p) for p in precisions for v in int8]
    for variant, precision in jobs:
        role, fuse = VARIANTS[variant]
        chosen = [t for t in targets if precision in get_backend(t).precisions]
        if not chosen:
            continue
        try:
            directories.append(
                export_for_timing(
                    checkpoints[role],
                    key if role == "keyed" else None,
                    work / (variant if precision in ("fp32", "int8") else f"{variant}-{precision}"),
                    chosen,
                    fuse=fuse,
                    batch=batch,
                    precision=precision,
                )
            )
        except FoldError as exc:
            print(f"  {model_name}: no {variant} variant ({exc.message})")
    return directories
