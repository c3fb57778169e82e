"""``keyedge doctor``: what is installed, which export targets and runtimes work on this host.

The report is data first (:func:`collect` returns a dict, serializable as JSON);
the CLI renders it as tables.  Every probe is guarded: a broken optional package
is reported with its error, it never crashes the doctor.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable
from typing import Any

from keyedge import __version__
from keyedge.deps import CORE, EXTRAS, version_of


def _probe(fn: Callable[[], Any]) -> tuple[bool, str]:
    try:
        return True, str(fn())
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}".splitlines()[0][:160]


def _onnxruntime_providers() -> str:
    import onnxruntime

    return ", ".join(onnxruntime.get_available_providers())


def _openvino_devices() -> str:
    import openvino

    return ", ".join(openvino.Core().available_devices)


def _coreml_convert() -> str:
    import numpy

    if tuple(int(part) for part in numpy.__version__.split(".")[:2]) >= (2, 4):
        raise RuntimeError(f"numpy {numpy.__version__} breaks coremltools' torch converter; pip install 'numpy<2.4'")
    import coremltools

    return f"coremltools {coremltools.__version__}"


def _coreml_predict() -> str:
    if sys.platform != "darwin":
        raise RuntimeError("CoreML prediction runs only on macOS; artifacts are checked structurally here")
    return _coreml_convert()


def _cuda() -> str:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device visible to torch")
    return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"


def _mps() -> str:
    import torch

    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeError("no Apple GPU (MPS) available")
    return "available"


def _torch_export() -> str:
    import torch

    return f"torch {torch.__version__}"


def _onnx_export() -> str:
    import onnx
    import onnxscript  # noqa: F401 - the dynamo exporter needs it

    return f"onnx {onnx.__version__}"


def _openvino_convert() -> str:
    import openvino

    return f"openvino {openvino.__version__}"


# (section, name, probe, extra that provides it)
CHECKS: list[tuple[str, str, Callable[[], Any], str | None]] = [
    ("export", "onnx", _onnx_export, "onnx"),
    ("export", "openvino", _openvino_convert, "openvino"),
    ("export", "coreml", _coreml_convert, "coreml"),
    ("runtime", "onnxruntime", _onnxruntime_providers, "onnx"),
    ("runtime", "openvino", _openvino_devices, "openvino"),
    ("runtime", "coreml-predict", _coreml_predict, "coreml"),
    ("runtime", "torch-cpu", _torch_export, None),
    ("runtime", "torch-cuda", _cuda, None),
    ("runtime", "torch-mps", _mps, None),
]


def collect() -> dict[str, Any]:
    """Probe this host; return the doctor report as plain data."""
    report: dict[str, Any] = {
        "keyedge": __version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "core": {name: version_of(name) for name in CORE},
        "extras": {},
        "checks": [],
    }
    for extra in EXTRAS.values():
        versions = {dist: version_of(dist) for dist in extra.distributions}
        report["extras"][extra.name] = {
            "installed": all(versions.values()),
            "packages": versions,
            "purpose": extra.purpose,
            "install": extra.install,
        }
    for section, name, probe, extra in CHECKS:
        ok, detail = _probe(probe)
        report["checks"].append(
            {
                "section": section,
                "name": name,
                "ok": ok,
                "detail": detail,
                "fix": EXTRAS[extra].install
                if (extra and not ok and not report["extras"][extra]["installed"])
                else None,
            }
        )
    return report
