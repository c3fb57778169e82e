"""Checking what converters wrote: trying converter paths in turn, and probing artifacts against the module.

Tracing (``torch.jit.trace``: CoreML's converter input, OpenVINO's module path, the
TorchScript ONNX exporter) freezes input-dependent control flow into the branch the
example input took, silently.  Artifacts made through a trace are therefore
checked against the PyTorch module on probe inputs (:func:`check_reproduces`) and
refused -- or the next converter path tried (:func:`first_that_works`) -- when they differ.
:func:`calibration_batches` feeds an int8 quantizer the calibration images in the artifact's batch.

Backends call these from their ``_export``; they sit above :mod:`keyedge.exporters.base` (they
raise its :class:`~keyedge.exporters.base.ExportError` and read its
:class:`~keyedge.exporters.base.ExportOptions`), so the interface module stays free of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from keyedge.exporters.base import ExportError, ExportOptions
from keyedge.exporters.capture import one_line


def first_that_works(target: str, sources: Sequence[str], attempt: Callable[[str], Any]) -> tuple[Any, str, list[str]]:
    """Try ``attempt(source)`` for each converter source in order; return (result, source, errors of earlier ones).

    Raises :class:`ExportError` listing every source's failure when none works.
    """
    errors = []
    for source in sources:
        try:
            return attempt(source), source, errors
        except Exception as exc:
            errors.append(f"{source}: {one_line(exc)}")
    raise ExportError(
        f"{target} export failed ({'; '.join(errors)})", "fix the first reason given, or export to another target"
    )


def calibration_batches(options: ExportOptions) -> list[np.ndarray]:
    """The calibration images in the artifact's batch size (a fixed batch is filled by repeating images)."""
    images = np.ascontiguousarray(options.calibration, dtype=np.float32)
    size = options.batch or min(16, len(images))
    if len(images) < size:
        images = np.concatenate([images] * -(-size // len(images)))
    return [images[i : i + size] for i in range(0, len(images) - size + 1, size)]


def probe_inputs(options: ExportOptions) -> list[tuple[str, np.ndarray]]:
    """Inputs a traced graph must reproduce: the trace example, all zeros, all ones and a fresh random batch."""
    example = options.example_input().numpy()
    rng = np.random.default_rng(1)
    return [
        ("example", example),
        ("all-zeros", np.zeros_like(example)),
        ("all-ones", np.ones_like(example)),
        ("random", rng.random(example.shape, dtype=np.float32)),
    ]


def check_reproduces(
    module: torch.nn.Module,
    candidate: Callable[[np.ndarray], np.ndarray],
    options: ExportOptions,
    what: str,
    *,
    rtol: float = 1e-3,
) -> None:
    """Raise :class:`ExportError` unless ``candidate`` matches ``module`` on :func:`probe_inputs`.

    The tolerance is ``rtol`` times the output scale (at least 1): loose enough for converter
    rounding, far below what a frozen branch or a mis-translated op gives.  A randomized module (a posture's
    in-graph noise, ``module.randomized``) cannot be compared call by call: export checks its deterministic
    twin instead and the noise statistically (:mod:`keyedge.deploy.verification`).
    """
    if getattr(module, "randomized", False):
        return
    for kind, x in probe_inputs(options):
        with torch.no_grad():
            expected = module(torch.from_numpy(x)).float().numpy()
        got = np.asarray(candidate(x), dtype=np.float32)
        diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
        if not diff <= rtol * max(1.0, float(np.abs(expected).max())):
            raise ExportError(
                f"{what} does not reproduce the model on the {kind} probe input "
                f"(max abs diff {diff:.2e}): input-dependent control flow was frozen by tracing, "
                f"or an op was mistranslated",
                "remove the data-dependent branch, or export through torch.export",
            )
