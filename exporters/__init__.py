"""Export targets (installed as ``keyedge.exporters``): one module per target behind one interface.

The ONNX, OpenVINO and CoreML exporters arrive with ``keyedge export``; the
dependencies each needs are declared in :mod:`keyedge.deps` and checked by
``keyedge doctor``.
"""
