"""Export verification: each artifact against the PyTorch keyed model, before anything is written.

The reference logits are computed once per checkpoint (:func:`references`) on random and real inputs (int8:
the real test images its agreement rule runs on); each target's artifact is then loaded through its backend
and compared (:func:`verify_target`, the rules of :mod:`keyedge.deploy.parity`), or, where its runtime does
not run here, checked structurally (:func:`check_io`).  :func:`check_graph` refuses a graph without exactly
one gather on the input (none when folded).  A failure is one :class:`VerificationError` and nothing is written.

Under a posture (:mod:`keyedge.postures`) the references are what the device answers (top-k probabilities,
one-hot labels); a posture with in-graph noise is verified twice: its deterministic twin (the same graph with
sigma 0) numerically as above, and the shipped, randomized artifact statistically (:func:`check_noise`: the
mean and spread of its answers over repeated draws against PyTorch's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from keyedge.checkpoints import CheckpointManifest
from keyedge.deploy.artifacts import AGREEMENT_PRECISIONS
from keyedge.deploy.inputs import agreement_inputs, real_inputs
from keyedge.deploy.parity import FP32_ATOL, Parity, VerificationError, check_agreement, check_parity
from keyedge.deploy.settings import ExportSettings
from keyedge.exporters import ExportBackend, ExportOptions
from keyedge.postures import Posture
from keyedge.postures.graph import posture_outputs

__all__ = [
    "NOISE_DRAWS",
    "References",
    "check_graph",
    "check_io",
    "check_noise",
    "noise_check",
    "references",
    "verify_target",
]

#: draws per image of the statistical check of in-graph noise, the images it runs on, and its bounds: every
#: output's mean within NOISE_Z standard errors of PyTorch's, the outputs' spread within a factor NOISE_SPREAD
NOISE_DRAWS = 32
NOISE_IMAGES = 8
NOISE_Z = 6.0
NOISE_SPREAD = 2.0


@dataclass
class References:
    """The inputs every artifact of one export is checked on, and the PyTorch model's logits for them."""

    inputs: dict[str, np.ndarray]  # kind (random, real) -> images
    logits: dict[str, np.ndarray]
    labels: np.ndarray | None  # int8 with labelled test data: the accuracy drop is checked too
    real_source: str

    def record(self, settings: ExportSettings, precision: str) -> dict[str, Any]:
        """The manifest's ``verification`` block: what the artifacts were checked on, and by which rule."""
        record = {
            "inputs": {k: len(v) for k, v in self.inputs.items()},
            "real_source": self.real_source,
            "seed": 0,
            "fp32_atol": FP32_ATOL,
        }
        if precision not in AGREEMENT_PRECISIONS:
            return record
        return record | {
            "rule": f"{precision}: top-1 agreement with the fp32 keyed model, and the test accuracy drop",
            "min_agreement": settings.min_agreement,
            "max_accuracy_drop_points": settings.max_accuracy_drop,
            "labelled": self.labels is not None,
        }


def references(model: nn.Module, manifest: CheckpointManifest, settings: ExportSettings, precision: str) -> References:
    """Random and real inputs (int8: the real test images only) with the keyed model's outputs for them.

    The outputs are what the posture answers (``settings.posture``: logits, top-k probabilities or one-hot labels)
    without its noise: the deterministic twin's answers.
    """
    size = model.spec.image_size
    random_x = torch.rand(settings.random_inputs, 3, size, size, generator=torch.Generator().manual_seed(0)).numpy()
    labels = None
    if precision in AGREEMENT_PRECISIONS:  # agreement on the real test images (labelled where the data is here)
        real_x, labels, real_source = agreement_inputs(manifest, size, settings.agreement_images)
        if real_x is None:
            raise VerificationError(
                f"an {precision} artifact is verified on real images, and none are here (no test data, no photos)",
                "install keyedge[samples], make the checkpoint's data available, or pass --no-verify",
            )
        inputs = {"real": real_x}
    else:
        real_x, real_source = real_inputs(manifest, size, settings.real_inputs)
        inputs = {"random": random_x} | ({"real": real_x} if real_x is not None else {})
    posture = settings.posture if isinstance(settings.posture, Posture) else None
    with torch.no_grad():
        logits = {kind: reference_logits(model, x) for kind, x in inputs.items()}
        if posture is not None and posture.outputs != "scores":
            logits = {kind: posture_outputs(torch.from_numpy(v), posture).numpy() for kind, v in logits.items()}
    return References(inputs, logits, labels, real_source)


def reference_logits(model: nn.Module, x: np.ndarray, chunk: int = 64) -> np.ndarray:
    """The PyTorch model's logits for ``x``, in chunks."""
    return np.concatenate([model(torch.from_numpy(x[i : i + chunk])).numpy() for i in range(0, len(x), chunk)])


def verify_target(
    backend: ExportBackend,
    path: Path,
    refs: References,
    options: ExportOptions,
    io: dict[str, Any],
    num_classes: int,
    settings: ExportSettings | None = None,
) -> Parity:
    """Load ``path`` and compare it with the references; structurally only where its runtime does not run here."""
    can_run, why = backend.can_run()
    if not can_run:
        interface = check_io(backend.name, io, options, num_classes)
        simulated = getattr(backend, "report", None)  # a converter's own simulator, run at export (rknn)
        if simulated:
            interface = interface | {"simulator": simulated}
            why += "; its converter's simulator checked it at export (structural.simulator)"
        return Parity.structural_only(why, interface)
    with backend.load(path) as runner:
        got = {kind: runner.predict(x) for kind, x in refs.inputs.items()}
    if options.precision in AGREEMENT_PRECISIONS:
        rule = {"min_agreement": settings.min_agreement, "max_drop": settings.max_accuracy_drop} if settings else {}
        result = check_agreement(refs.logits["real"], got["real"], refs.labels, **rule)
        if not result.passed:
            raise _disagrees(backend.name, options.precision, result)
        return Parity.numerical({"real": result})
    checks = {kind: check_parity(refs.logits[kind], got[kind], options.precision) for kind in refs.inputs}
    bad = next((kind for kind, check in checks.items() if not check.passed), None)
    if bad is not None:
        r = checks[bad]
        raise VerificationError(
            f"{backend.name} artifact does not reproduce the PyTorch model on {bad} inputs "
            f"(max abs diff {r.max_abs_diff:.2e} > {r.tolerance:.0e} or top-1 differs, "
            f"agreement {r.top1_agreement:.1%})",
            "nothing was written; report this as a bug",
        )
    return Parity.numerical(checks)


def check_noise(backend: ExportBackend, path: Path, module: nn.Module, refs: References) -> dict[str, Any]:
    """The shipped randomized artifact against the randomized PyTorch module, statistically (:func:`noise_check`)."""
    x = refs.inputs.get("real", refs.inputs["random"])[:NOISE_IMAGES]
    with backend.load(path) as runner:
        return noise_check(runner.predict, module, x, f"the {backend.name} artifact")


def noise_check(answer: Callable[[np.ndarray], np.ndarray], module: nn.Module, x: np.ndarray, what: str) -> dict:
    """A randomized artifact (``answer``) against the randomized PyTorch ``module``, statistically.

    Each image of ``x`` is answered :data:`NOISE_DRAWS` times by both;
    every output's mean must agree within :data:`NOISE_Z` standard errors (plus the fp32 tolerance), and the
    outputs' spread (RMS of the per-output standard deviations) within a factor :data:`NOISE_SPREAD`: the noise
    is there, fresh on every call, and of the posture's sigma.  Returns the manifest's ``parity.noise`` record.
    """
    got = np.stack([np.asarray(answer(x)) for _ in range(NOISE_DRAWS)]).astype(np.float64)
    with torch.no_grad():
        want = np.stack([reference_logits(module, x) for _ in range(NOISE_DRAWS)]).astype(np.float64)
    se = np.sqrt((got.var(0, ddof=1) + want.var(0, ddof=1)) / NOISE_DRAWS)
    tolerance = FP32_ATOL * max(1.0, float(np.abs(want).max()))
    z = float(((np.abs(got.mean(0) - want.mean(0)) - tolerance).clip(0) / np.maximum(se, 1e-12)).max())
    spread_got, spread_want = (float(np.sqrt(v.var(0).mean())) for v in (got, want))
    ratio = spread_got / spread_want if spread_want > 0 else (1.0 if spread_got == 0 else float("inf"))
    record = {
        "draws": NOISE_DRAWS,
        "images": len(x),
        "max_mean_z": round(z, 3),
        "max_z": NOISE_Z,
        "spread": spread_got,
        "spread_pytorch": spread_want,
        "spread_ratio": round(ratio, 4),
        "max_spread_ratio": NOISE_SPREAD,
    }
    record["passed"] = bool(z <= NOISE_Z and 1 / NOISE_SPREAD <= ratio <= NOISE_SPREAD)
    if not record["passed"]:
        raise VerificationError(
            f"{what}'s noise does not behave like the posture's: its answers' mean is "
            f"{z:.1f} standard errors from PyTorch's (at most {NOISE_Z:g}) and their spread {ratio:.2f}x PyTorch's "
            f"over {NOISE_DRAWS} draws",
            "nothing was written; report this as a bug",
        )
    return record


def _disagrees(target: str, precision: str, result) -> VerificationError:
    drop = result.accuracy_drop_points
    return VerificationError(
        f"the {precision} {target} artifact agrees with the fp32 model on {result.top1_agreement:.1%} "
        f"of {result.images} real images (needs {result.min_agreement:.0%})"
        + (f", accuracy drop {drop:.1f} points (at most {result.max_drop_points:g})" if drop is not None else ""),
        "nothing was written; "
        + (
            "calibrate on more images (--calibration-size) or try --int8-accuracy-control (OpenVINO)"
            if precision == "int8"
            else f"this model's answers move in {precision}: deploy the fp32 set"
        )
        + ", or loosen --min-agreement / --max-accuracy-drop knowingly",
    )


def check_io(target: str, io: dict[str, Any], options: ExportOptions, num_classes: int) -> dict[str, Any]:
    """The artifact's interface (names, dtypes, shapes) where its runtime does not run here; one line if wrong."""
    (inp,), (out,) = io["inputs"], io["outputs"]
    expected_in = list(options.input_shape)
    problems = []
    if inp["name"] != options.input_name or out["name"] != options.output_name:
        problems.append(f"names {inp['name']}/{out['name']}")
    if inp.get("dtype") != "float32" or out.get("dtype") != "float32":
        problems.append(f"dtypes {inp.get('dtype')}/{out.get('dtype')}")
    if options.batch is not None and list(inp["shape"]) != expected_in:
        problems.append(f"input shape {inp['shape']}")
    if list(out["shape"])[-1:] != [num_classes]:
        problems.append(f"output shape {out['shape']}")
    if problems:
        raise VerificationError(
            f"the {target} artifact's interface is wrong: {', '.join(problems)}", "report this as a bug"
        )
    return {"inputs": io["inputs"], "outputs": io["outputs"]}


def check_graph(target: str, graph, fuse: str, *, randomized: bool = False) -> None:
    """Exactly one gather on the input (gather, elements, planes; none for fold, conv and plain models), and for
    gather and elements no transposes around it; a ``randomized`` graph (a posture's noise) must hold its random
    op -- a converter must not bake it in."""
    if randomized and not graph.random_ops:
        raise VerificationError(
            f"the {target} graph has no random op: its converter froze the posture's noise into a constant",
            f"export the noise posture to another target (onnx, openvino), or drop noise:SIGMA for {target}",
        )
    expected = 1 if fuse in ("gather", "elements", "planes") else 0
    if graph.gathers_on_input != expected:
        raise VerificationError(
            f"the {target} graph has {graph.gathers_on_input} gather ops on the input, expected {expected} ({fuse})",
            "report this as a bug",
        )
    if fuse in ("gather", "elements"):  # planes moves pixels around its gather by design
        layout = [op for op in graph.input_path if op.lower() in ("transpose", "permute", "reshape")]
        if any(op.lower() in ("transpose", "permute") for op in layout) or len(layout) > 2:
            raise VerificationError(
                f"the {target} graph's input path is {' -> '.join(graph.input_path)}: more "
                "than flatten -> gather -> unflatten",
                "report this as a bug",
            )
