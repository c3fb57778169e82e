"""The docs' Python API example (docs/python-api.md) runs as written (real training, export, attack, small sizes)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from keyedge.data.datasets import FASHION_MNIST_DEBIAN

PAGE = Path(__file__).resolve().parent.parent / "docs" / "python-api.md"


def python_block(section: str) -> str:
    text = PAGE.read_text()
    return text[text.index(section) :].split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.skipif(not FASHION_MNIST_DEBIAN.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_python_api_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(python_block("# Python API"), "docs/python-api.md", "exec"), namespace)
    assert namespace["adversarial"].shape == (16, 3, 32, 32)
    assert (namespace["adversarial"] - namespace["images"]).abs().max() <= 16 / 255 + 1e-6
    assert (Path(namespace["artifact_dir"]) / "model.onnx").is_file() and os.stat("k1.bin").st_mode & 0o077 == 0
    assert namespace["folded"] is not None
