"""Fuzzing the manifest readers: any JSON edit of a valid manifest reads, or fails as one ManifestError.

Hypothesis replaces a field anywhere in a real checkpoint or export manifest (or drops it) with
arbitrary JSON; :class:`CheckpointManifest` and :class:`ArtifactManifest` must never raise anything
else (no TypeError, KeyError, RecursionError...), whatever the value.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyedge.deploy.artifacts import ArtifactManifest
from keyedge.models.checkpoint import CheckpointManifest
from keyedge.validate import Fields, ManifestError

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**20), max_value=10**20) | st.floats() | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)


def _paths(node, prefix=()):
    """Every path (tuple of keys / indices) into a JSON document."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _edit(document, path, value, drop):
    doc = copy.deepcopy(document)
    if not path:
        return value
    node = doc
    for step in path[:-1]:
        node = node[step]
    if drop and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


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


def _fuzz(reader, document: dict, data) -> None:
    paths = list(_paths(document))
    path = data.draw(st.sampled_from(paths))
    doc = _edit(document, path, data.draw(json_values), data.draw(st.booleans()))
    try:
        reader(doc)
    except ManifestError as exc:
        assert "\n" not in str(exc)


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
def test_checkpoint_manifest_reader_never_crashes(checkpoint_document, data):
    _fuzz(_read_checkpoint, checkpoint_document[0], data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_artifact_manifest_reader_never_crashes(artifact_document, data):
    _fuzz(_read_artifact, artifact_document, data)
