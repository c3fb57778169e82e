"""Throwaway checkpoints and exports for benchmarks: the checkpoint -> export glue written once.

Latency benchmarks time untrained models (weights do not change latency); they still go
through a real checkpoint and a real, verified ``keyedge export``, so what is timed is what a
user deploys.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from keyedge.deploy.export import ExportRequest, ExportSettings, export_one
from keyedge.keys.keyfile import Key
from keyedge.models.checkpoint import save_checkpoint


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
