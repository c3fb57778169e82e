"""Fuzzing the manifest readers: any JSON edit of a valid manifest reads, or fails as one ManifestError.

(The report readers are fuzzed the same way beside their reports, in test_latency.py and
test_robustness.py; the edit strategy is the ``fuzz_document`` fixture of conftest.py.)

Hypothesis replaces a field anywhere in a real checkpoint or export manifest (or drops it) with
arbitrary JSON; :class:`CheckpointManifest` and :class:`ArtifactManifest` must never raise anything
else (no TypeError, KeyError, RecursionError...), whatever the value.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyedge.checkpoints import CheckpointManifest
from keyedge.deploy.artifacts import ArtifactManifest
from keyedge.validate import Fields, ManifestError


@pytest.fixture(scope="module")
def checkpoint_document(tmp_path_factory):
    from keyedge.benchmarks.workbench import untrained_checkpoint
    from keyedge.keys.keyfile import Key
    from keyedge.models.backbones import build_model

    root = tmp_path_factory.mktemp("fuzz")
    key = Key.from_secret(bytes(range(32)), 4)
    model = build_model("test_efficientnet", 10, key=key, weights="none", image_size=32).eval()
    ckpt = untrained_checkpoint(root / "ckpt", model)
    return json.loads((ckpt / "keyedge.json").read_text()), ckpt, key


@pytest.fixture(scope="module")
def artifact_document(checkpoint_document, tmp_path_factory):
    from keyedge.benchmarks.workbench import export_for_timing

    _, ckpt, key = checkpoint_document
    directory = export_for_timing(ckpt, key, tmp_path_factory.mktemp("fuzz-out"), ["onnx"])
    return json.loads((directory / "manifest.json").read_text())


def _read_checkpoint(doc) -> None:
    if not isinstance(doc, dict):
        raise ManifestError("not an object")
    CheckpointManifest.from_fields(Fields(doc, "keyedge.json", "hint"))


def _read_artifact(doc) -> None:
    if not isinstance(doc, dict):
        raise ManifestError("not an object")
    ArtifactManifest.from_fields(Fields(doc, "manifest.json", "hint"), Path("."))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_checkpoint_manifest_reader_never_crashes(checkpoint_document, data, fuzz_document):
    fuzz_document(_read_checkpoint, checkpoint_document[0], data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_artifact_manifest_reader_never_crashes(artifact_document, data, fuzz_document):
    fuzz_document(_read_artifact, artifact_document, data)
