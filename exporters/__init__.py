"""Export targets (installed as ``keyedge.exporters``): one module per target behind one interface.

``get_backend("onnx" | "openvino" | "coreml" | "litert" | "executorch" | "mnn" | "ncnn" | "rknn" | "pt2")`` gives an
:class:`ExportBackend` that exports an eval-mode model taking [0, 1] float32 NCHW images, reads the
artifact back (:meth:`~ExportBackend.inspect`, :meth:`~ExportBackend.describe_io`)
and runs it where the runtime exists.  Each target's converter comes with a
``keyedge`` extra (see :mod:`keyedge.deps`); importing this package imports none
of them.
"""

from __future__ import annotations

from keyedge.exporters.base import (
    BACKENDS,
    ExportBackend,
    ExportError,
    ExportOptions,
    get_backend,
    is_backend,
    list_backends,
    register_backend,
    target_of,
)
from keyedge.exporters.graph import GraphReport

# isort: off
# importing a backend module registers it; the import order is the order `list_backends()` lists them in
from keyedge.exporters import onnx as _onnx  # noqa: F401
from keyedge.exporters import openvino as _openvino  # noqa: F401
from keyedge.exporters import coreml as _coreml  # noqa: F401
from keyedge.exporters import litert as _litert  # noqa: F401
from keyedge.exporters import executorch as _executorch  # noqa: F401
from keyedge.exporters import mnn as _mnn  # noqa: F401
from keyedge.exporters import ncnn as _ncnn  # noqa: F401
from keyedge.exporters import rknn as _rknn  # noqa: F401
from keyedge.exporters import pt2 as _pt2  # noqa: F401
# isort: on

__all__ = [
    "BACKENDS",
    "ExportBackend",
    "ExportError",
    "ExportOptions",
    "GraphReport",
    "get_backend",
    "is_backend",
    "list_backends",
    "register_backend",
    "target_of",
]
