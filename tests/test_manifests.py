"""Tampered manifests: every hand-edited, truncated or hostile checkpoint / export manifest is one clear error.

A corpus of edits (wrong types, missing fields, huge sizes, path-like file names, junk) is applied
to a real checkpoint's ``keyedge.json`` and a real export's ``manifest.json``; each must end in
``error: <file>: ...`` on one line, exit code 2, no traceback -- through the commands that read them.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from keyedge.checkpoints import CheckpointManifest, save_checkpoint
from keyedge.cli import app
from keyedge.deploy.artifacts import ArtifactManifest
from keyedge.deploy.export import ExportRequest, ExportSettings, export_one
from keyedge.deploy.parity import Parity
from keyedge.deploy.torch_runner import TorchRunner
from keyedge.exporters.base import Runner
from keyedge.models.backbones import build_model
from keyedge.validate import Fields, ManifestError

runner = CliRunner()


def _delete(path: str):
    def edit(data):
        *parents, last = path.split(".")
        node = data
        for name in parents:
            node = node[name]
        del node[last]

    return edit


def _set(path: str, value):
    def edit(data):
        *parents, last = path.split(".")
        node = data
        for name in parents:
            node = node[name]
        node[last] = value

    return edit


#: (case id, edit of the parsed manifest, fragment the message must name)
CHECKPOINT_CORPUS = [
    ("no-model", _delete("model"), "'model'"),
    ("no-image-size", _delete("model.image_size"), "model.image_size"),
    ("negative-image-size", _set("model.image_size", -3), "model.image_size"),
    ("huge-image-size", _set("model.image_size", 10**9), "model.image_size"),
    ("string-image-size", _set("model.image_size", "32"), "model.image_size"),
    ("bool-classes", _set("model.num_classes", True), "model.num_classes"),
    ("zero-classes", _set("model.num_classes", 0), "model.num_classes"),
    ("huge-classes", _set("model.num_classes", 10**12), "model.num_classes"),
    ("short-mean", _set("model.mean", [0.5]), "model.mean"),
    ("zero-std", _set("model.std", [0.5, 0.0, 0.5]), "model.std"),
    ("nan-std", _set("model.std", "NaN"), "model.std"),
    ("model-name-number", _set("model.name", 7), "model.name"),
    ("traversal-weights", _set("files.weights.file", "../../etc/passwd"), "files.weights.file"),
    ("absolute-weights", _set("files.weights.file", "/etc/passwd"), "files.weights.file"),
    ("nested-weights", _set("files.weights.file", "sub/w.safetensors"), "files.weights.file"),
    ("control-char-weights", _set("files.weights.file", "w\n.safetensors"), "files.weights.file"),
    ("no-weights", _delete("files.weights"), "files.weights"),
    ("bad-sha", _set("files.weights.sha256", "abc"), "files.weights.sha256"),
    ("files-list", _set("files", ["weights"]), "'files'"),
    ("no-fingerprint", _delete("key.fingerprint"), "key.fingerprint"),
    ("bad-fingerprint", _set("key.fingerprint", "../../x"), "key.fingerprint"),
    ("huge-block", _set("key.block_size", 10**6), "key.block_size"),
    ("key-string", _set("key", "a3aacf2910fa98b9"), "'key'"),
    ("bad-mode", _set("finetune.mode", "magic"), "finetune.mode"),
    ("lora-without-settings", _set("finetune", {"mode": "lora", "lora": None}), "finetune.lora"),
    ("unknown-defense", _set("defense", {"name": "telepathy"}), "telepathy"),
    ("newer-schema", _set("schema", "keyedge-checkpoint/99"), "newer"),
    ("legacy-newer-version", lambda d: d.pop("schema") and d.update(version=99), "newer"),
    ("legacy-foreign-format", lambda d: d.pop("schema") and d.update(format="other"), "not a keyedge checkpoint"),
    ("bad-schema", _set("schema", "keyedge-checkpoint/x"), "schema"),
    ("negative-epoch", _set("epoch", -1), "epoch"),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, request):
    from keyedge.keys.keyfile import Key

    root = tmp_path_factory.mktemp("manifests")
    key = Key.from_secret(bytes(range(32)), 4)
    model = build_model("test_efficientnet", 10, key=key, weights="none", image_size=32).eval()
    save_checkpoint(
        root / "ckpt",
        model,
        epoch=1,
        finetune={"mode": "full", "lora": None},
        data={"name": "unavailable"},
        training={"config": {}},
        metrics={"test_accuracy": 0.5},
    )
    return root / "ckpt", key.save(root / "k.bin"), key


def _one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert line.startswith("error: ") and len(line.splitlines()) == 1, line
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in line, line
    return line


def _tampered(source: Path, tmp_path: Path, edit) -> Path:
    directory = tmp_path / source.name
    shutil.copytree(source, directory)
    manifest = directory / "keyedge.json"
    data = json.loads(manifest.read_text())
    edit(data)
    manifest.write_text(json.dumps(data))
    return directory


@pytest.mark.parametrize("case, edit, fragment", CHECKPOINT_CORPUS, ids=[c[0] for c in CHECKPOINT_CORPUS])
def test_tampered_checkpoint_manifest_is_one_clear_error(tmp_path, checkpoint, case, edit, fragment):
    source, key_file, _ = checkpoint
    directory = _tampered(source, tmp_path, edit)
    result = runner.invoke(app, ["export", "-c", str(directory), "-k", str(key_file), "-o", str(tmp_path / "out")])
    _one_line_error(result, fragment)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir()), "nothing may be written"


@pytest.mark.parametrize(
    "content", [b"", b"{", b'{"format": "keyedge-checkpoint"', b"\xff\xfe\x00junk", b"[1, 2]", b"null", b"[" * 100000]
)
def test_junk_checkpoint_manifest_is_one_clear_error(tmp_path, checkpoint, content):
    source, key_file, _ = checkpoint
    directory = tmp_path / "ckpt"
    shutil.copytree(source, directory)
    (directory / "keyedge.json").write_bytes(content)
    result = runner.invoke(app, ["eval", "-c", str(directory), "-k", str(key_file), "-d", "foolbox-imagenet"])
    _one_line_error(result, "keyedge.json")


def test_manifest_round_trips(checkpoint):
    source, _, key = checkpoint
    manifest = CheckpointManifest.read(source)
    assert manifest.fingerprint == key.fingerprint and manifest.model.image_size == 32
    assert CheckpointManifest.from_fields(Fields(manifest.to_dict(), "x", "h")) == manifest
    assert json.dumps(key.permutation.tolist()) not in json.dumps(manifest.to_dict())  # the fingerprint only


# ---- export manifests ---------------------------------------------------------------------------------------------

ARTIFACT_CORPUS = [
    ("no-input", _delete("input"), "'input'"),
    ("bad-shape", _set("input.shape", [1, 3, 32]), "input.shape"),
    ("huge-shape", _set("input.shape", [1, 3, 10**7, 10**7]), "input.shape"),
    ("string-batch", _set("input.shape", ["1", 3, 32, 32]), "input.shape"),
    ("unknown-target", lambda d: d["targets"].update({"tensorrt": d["targets"]["onnx"]}), "targets.tensorrt"),
    ("no-targets", _set("targets", {}), "targets"),
    ("traversal-file", lambda d: d["targets"]["onnx"]["files"][0].update(path="../../../etc/passwd"), "files[0].path"),
    ("absolute-file", lambda d: d["targets"]["onnx"]["files"][0].update(path="/etc/passwd"), "files[0].path"),
    ("no-files", lambda d: d["targets"]["onnx"].update(files=[]), "targets.onnx.files"),
    ("bad-fingerprint", _set("fingerprint", 12345), "fingerprint"),
    ("bad-precision", _set("precision", "int3"), "precision"),
    ("bad-fuse", _set("fuse", "magic"), "fuse"),
    ("bad-accuracy", _set("checkpoint.test_accuracy", "high"), "checkpoint.test_accuracy"),
    ("no-model-name", _delete("model.name"), "model.name"),
    ("unknown-defense", _set("defense", {"name": "telepathy"}), "telepathy"),
    ("newer-schema", _set("schema", "keyedge-artifact/7"), "newer"),
    ("not-a-manifest", lambda d: d.clear() or d.update(targets=[1]), "not a keyedge export manifest"),
]


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    source, _, key = checkpoint
    out = tmp_path_factory.mktemp("exported")
    return export_one(
        ExportRequest(source, key), ExportSettings(targets=["onnx"], out=out, real_inputs=0, random_inputs=2)
    )


@pytest.mark.parametrize("case, edit, fragment", ARTIFACT_CORPUS, ids=[c[0] for c in ARTIFACT_CORPUS])
def test_tampered_export_manifest_is_one_clear_error(tmp_path, exported, case, edit, fragment):
    directory = tmp_path / exported.name
    shutil.copytree(exported, directory)
    data = json.loads((directory / "manifest.json").read_text())
    edit(data)
    (directory / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"manifest\.json"):
        ArtifactManifest.read(directory)
    result = runner.invoke(
        app,
        [
            "bench",
            "latency",
            str(directory),
            "--no-progress",
            "--min-seconds",
            "0",
            "--min-iterations",
            "1",
            "--rounds",
            "1",
            "--warmup",
            "0",
        ],
    )
    _one_line_error(result, fragment)


def test_untampered_export_manifest_reads(exported):
    manifest = ArtifactManifest.read(exported)
    assert manifest.batch == 1 and manifest.image_size == 32 and manifest.role == "keyed"
    assert manifest.artifact("onnx") == exported / "model.onnx"
    assert (
        ArtifactManifest.from_fields(
            Fields(copy.deepcopy(manifest.to_dict()), "x", "h"),
            exported,
        )
        == manifest
    )


def test_written_manifest_reads_back_byte_for_byte(exported):
    """The typed parity (and everything else) writes the JSON it was read from: old manifests read the same."""
    text = (exported / "manifest.json").read_text()
    manifest = ArtifactManifest.read(exported)
    assert isinstance(manifest.targets["onnx"].parity, Parity) and manifest.targets["onnx"].parity.ran
    assert json.dumps(manifest.to_dict(), indent=2) + "\n" == text


CHECK = {"max_abs_diff": 1e-6, "tolerance": 1e-4, "top1_agreement": 1.0, "passed": True, "images": 8}
AGREEMENT = {"images": 5, "top1_agreement": 1.0, "min_agreement": 0.98, "max_abs_diff": 0.1}
PARITY_JSON = [
    {},
    {"skipped": "--no-verify"},
    {"ran": False, "reason": "CoreML runs on macOS only", "structural": {"inputs": [], "outputs": []}, "passed": True},
    {"ran": True, "random": CHECK, "real": CHECK | {"images": 3}, "passed": True},
    {"ran": True, "kind": "agreement", "real": AGREEMENT | {"accuracy": None, "passed": True}, "passed": True},
    {
        "ran": True,
        "kind": "agreement",
        "real": AGREEMENT
        | {"accuracy_fp32": 0.5, "accuracy": 0.49, "accuracy_drop_points": 1.0, "max_drop_points": 1.0, "passed": True},
        "passed": True,
    },
]


@pytest.mark.parametrize("data", PARITY_JSON, ids=["empty", "skipped", "structural", "fp32", "int8", "int8-labelled"])
def test_parity_json_round_trips(data):
    parity = Parity.from_dict(copy.deepcopy(data))
    assert json.dumps(parity.to_dict()) == json.dumps(data)  # same keys, same order
    assert parity.reason == data.get("reason") and parity.skipped == data.get("skipped")
    if data.get("ran"):
        assert parity.passed and parity.max_abs_diff is not None
        assert parity.kind == ("agreement" if data.get("kind") else "tolerance")
    else:
        assert parity.max_abs_diff is None and parity.note == (data.get("reason") or data.get("skipped"))


def test_the_torch_reference_runner_is_a_runner():
    assert issubclass(TorchRunner, Runner)
    runner = TorchRunner(Path("ckpt"), torch.nn.Flatten(), torch.device("cpu"), 2, {"device": "cpu", "threads": None})
    x = np.zeros((3, 3, 2, 2), np.float32)
    assert runner.predict(x, chunk=2).shape == (3, 12) and runner.batch is None
    assert runner.describe() == {"backend": "torch", "path": "ckpt", "input_shape": [None, 3, 2, 2], "device": "cpu"}


DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_written_manifests_follow_their_json_schemas(checkpoint, exported):
    import jsonschema

    for schema_file, document in (
        ("checkpoint.schema.json", checkpoint[0] / "keyedge.json"),
        ("artifact.schema.json", exported / "manifest.json"),
    ):
        schema = json.loads((DOCS / schema_file).read_text())
        jsonschema.validate(json.loads(document.read_text()), schema)
    bad = json.loads((exported / "manifest.json").read_text())
    bad["targets"]["onnx"]["files"][0]["path"] = "../../etc/passwd"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, json.loads((DOCS / "artifact.schema.json").read_text()))


def test_a_field_name_with_a_newline_is_named_on_one_line():
    """A hand-edited key (found by the fleet-manifest fuzzer: a stage named '\\n') keeps the error one line."""
    from keyedge.validate import Fields

    error = Fields({}, "fleet.json", "recreate it").fail("devices[0].failed.\n", "must be an object")
    assert "\n" not in str(error) and "failed.\\n" in str(error)
