"""`keyedge export`: per-key artifacts, gather vs fold, merged LoRA, verification, refusals, atomic output."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from keyedge.checkpoints import save_checkpoint
from keyedge.cli import app
from keyedge.defenses.keyed import SHUFFLE_FORMS
from keyedge.deploy.export import ExportRequest, ExportSettings, VerificationError, export_one
from keyedge.errors import FoldError
from keyedge.exporters.graph import SHUFFLE_OPS
from keyedge.models.backbones import build_model
from keyedge.models.lora import apply_lora, lora_settings

runner = CliRunner()


def make_checkpoint(
    directory: Path, model_name: str, key=None, *, finetune: str = "full", weights: str = "none", seed: int = 0
):
    torch.manual_seed(seed)  # the random weights: another seed, other "fine-tuned" weights
    model = build_model(model_name, 10, key=key, weights=weights, image_size=32)
    lora = None
    if finetune == "lora":
        settings = lora_settings(model.spec.family)
        apply_lora(model, settings)
        lora = settings.to_dict()
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.05)  # trained adapters: merging must matter
    save_checkpoint(
        directory,
        model.eval(),
        epoch=1,
        finetune={"mode": finetune, "lora": lora},
        data={"name": "unavailable"},
        training={"config": {}},
        metrics={"test_accuracy": None},
    )
    return directory


def base_weights(tmp_path: Path, model_name: str) -> str:
    from safetensors.torch import save_file

    from keyedge.models.backbones import create_backbone

    torch.manual_seed(42)
    backbone, _ = create_backbone(model_name, 10, weights="none", image_size=32)
    path = tmp_path / f"{model_name}-base.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, path)
    return str(path)


def export(tmp_path, ckpt, key, targets=("onnx",), **kw) -> dict:
    settings = ExportSettings(targets=list(targets), out=tmp_path / "out", **kw)
    directory = export_one(ExportRequest(ckpt, key), settings)
    return json.loads((directory / "manifest.json").read_text())


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def clean_error(result, *fragments):
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert line.startswith("error: ") and len(line.splitlines()) == 1 and "Traceback" not in result.output, line
    for fragment in fragments:
        assert fragment in line, line


def test_vit_gather_and_fold_are_verified_and_fold_has_the_plain_graph(tmp_path, key4):
    ckpt = make_checkpoint(tmp_path / "vit", "test_vit", key4)
    gather = export(tmp_path, ckpt, key4, ["onnx", "openvino"], fuse="gather")
    assert gather["fuse"] == "gather" and gather["fingerprint"] == key4.fingerprint
    for target in ("onnx", "openvino"):
        entry = gather["targets"][target]
        assert entry["graph"]["gathers_on_input"] == 1
        assert entry["parity"]["passed"] and entry["parity"]["random"]["top1_agreement"] == 1.0
        assert entry["parity"]["random"]["max_abs_diff"] <= 1e-4
        assert entry["parity"]["real"]["images"] > 0
    folded = export(tmp_path, ckpt, key4, ["onnx", "openvino"], fuse="fold", overwrite=True)
    plain_ckpt = make_checkpoint(tmp_path / "vit-plain", "test_vit", None)
    plain = export(tmp_path, plain_ckpt, None, ["onnx", "openvino"], fuse="fold")
    for target in ("onnx", "openvino"):
        f, p = folded["targets"][target]["graph"], plain["targets"][target]["graph"]
        assert f["gathers_on_input"] == 0 and folded["targets"][target]["parity"]["passed"]
        assert f["ops"] == p["ops"], "a folded keyed model must export to the plain model's graph"
        assert f["structure"] == p["structure"]


def test_convnext_fold_and_auto(tmp_path, key4):
    ckpt = make_checkpoint(tmp_path / "cnx", "test_convnext", key4)
    manifest = export(tmp_path, ckpt, key4, ["onnx", "openvino"], fuse="auto")
    assert manifest["fuse"] == "fold"
    for entry in manifest["targets"].values():
        assert entry["graph"]["gathers_on_input"] == 0 and entry["parity"]["passed"]
    assert manifest["normalization"]["where"] == "folded into the first layer"


def test_efficientnet_fold_refused_auto_keeps_shuffle_in_graph(tmp_path, key4):
    ckpt = make_checkpoint(tmp_path / "eff", "test_efficientnet", key4)
    with pytest.raises(FoldError, match="not a patchify convolution"):
        export(tmp_path, ckpt, key4, fuse="fold")
    assert not (tmp_path / "out" / f"test_efficientnet-{key4.fingerprint}").exists()
    manifest = export(tmp_path, ckpt, key4, ["onnx", "openvino", "coreml"], fuse="auto")
    assert "not folded" in manifest["fuse_note"] and "per target: onnx elements" in manifest["fuse_note"]
    for target, form in (("onnx", "elements"), ("openvino", "gather")):  # each runtime's measured fastest
        assert manifest["targets"][target]["fuse"] == form
        assert manifest["targets"][target]["graph"]["gathers_on_input"] == 1
    coreml = manifest["targets"]["coreml"]
    assert coreml["fuse"] == "conv" and coreml["graph"]["gathers_on_input"] == 0  # no gather for the Neural Engine
    if sys.platform != "darwin":
        assert coreml["parity"]["ran"] is False and "macOS" in coreml["parity"]["reason"]
        assert coreml["parity"]["structural"]["inputs"][0]["dtype"] == "float32"
    else:
        assert coreml["parity"]["ran"] and coreml["parity"]["passed"]


def test_lora_checkpoint_is_merged(tmp_path, key4):
    ckpt = make_checkpoint(
        tmp_path / "lora", "test_vit", key4, finetune="lora", weights=base_weights(tmp_path, "test_vit")
    )
    manifest = export(tmp_path, ckpt, key4, ["onnx", "openvino"])
    assert manifest["lora_merged"]
    assert all(entry["parity"]["passed"] for entry in manifest["targets"].values())
    text = (tmp_path / "out" / f"test_vit-{key4.fingerprint}" / "model.onnx").read_bytes()
    assert b"lora_A" not in text and b"lora_B" not in text


def test_manifest_has_checksums_and_no_key(tmp_path, key4):
    import hashlib

    ckpt = make_checkpoint(tmp_path / "eff", "test_efficientnet", key4)
    manifest = export(tmp_path, ckpt, key4, ["onnx", "openvino"], batch=None)
    directory = tmp_path / "out" / f"test_efficientnet-{key4.fingerprint}"
    assert oct(directory.stat().st_mode & 0o777) == "0o700", "artifacts embed the key: private directory"
    for target in manifest["targets"].values():
        for item in target["files"]:
            assert hashlib.sha256((directory / item["path"]).read_bytes()).hexdigest() == item["sha256"]
    text = (directory / "manifest.json").read_text()
    assert "permutation" not in text and json.dumps(key4.permutation.tolist())[1:40] not in text
    assert manifest["input"]["shape"] == [-1, 3, 32, 32] and manifest["normalization"]["where"] == "inside the graph"


def test_failed_verification_leaves_nothing(tmp_path, key4, monkeypatch):
    from keyedge.exporters.onnx import OnnxRunner

    ckpt = make_checkpoint(tmp_path / "eff", "test_efficientnet", key4)
    real_logits = OnnxRunner.logits
    monkeypatch.setattr(OnnxRunner, "logits", lambda self, result: real_logits(self, result) + 1e-2)
    with pytest.raises(VerificationError, match="does not reproduce"):
        export(tmp_path, ckpt, key4, ["onnx"])
    assert not (tmp_path / "out").exists(), "nothing is left, not even the --out directory the export made"


def test_cli_refusals(tmp_path, key4, make_key):
    ckpt = make_checkpoint(tmp_path / "eff", "test_efficientnet", key4)
    key_path = key4.save(tmp_path / "k.bin")
    wrong = make_key(4).save(tmp_path / "wrong.bin")
    out = tmp_path / "out"
    clean_error(cli("export", "-c", ckpt, "-k", wrong, "-o", out), "differs from the key", "lose most")
    clean_error(cli("export", "-c", ckpt, "-k", key_path, "-t", "tflite", "-o", out), "unknown export target")
    clean_error(cli("export", "-c", ckpt, "-k", key_path, "--fuse", "fold", "-o", out), "not a patchify")
    clean_error(cli("export", "-c", ckpt, "-o", out), "no key with fingerprint", "--key-file")
    assert not out.exists() or list(out.iterdir()) == []
    ok = cli("export", "-c", ckpt, "-k", key_path, "-o", out)
    assert ok.exit_code == 0, ok.output
    clean_error(cli("export", "-c", ckpt, "-k", key_path, "-o", out), "already exists", "--overwrite")
    old_spelling = cli("export", "-c", ckpt, "-k", wrong, "-o", out, "--force")
    clean_error(old_spelling, "--force no longer", "--allow-key-mismatch")
    forced = cli("export", "-c", ckpt, "-k", wrong, "-o", out, "--allow-key-mismatch")
    assert forced.exit_code == 0, forced.output
    (wrong_dir,) = out.glob(f"*-{load_fp(wrong)}")
    assert "differs" in json.loads((wrong_dir / "manifest.json").read_text())["key_note"]


def load_fp(path):
    from keyedge.keys.keyfile import load_key

    return load_key(path).fingerprint


def test_many_keys_matched_by_fingerprint(tmp_path, make_key):
    keys = tmp_path / "keys"
    keys.mkdir()
    runs = tmp_path / "runs"
    fingerprints = []
    for tag in (1, 2):
        key = make_key(4, tag=tag)
        key.save(keys / f"k{tag}.bin")
        make_checkpoint(runs / f"k{tag}", "test_efficientnet", key)
        fingerprints.append(key.fingerprint)
    (keys / "README.txt").write_text("not a key")
    result = cli("export", "--runs", runs, "--keys", keys, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"test_efficientnet-{fp}" for fp in fingerprints
    )
    (keys / "k2.bin").unlink()
    clean_error(cli("export", "--runs", runs, "--keys", keys, "-o", tmp_path / "out2"), "no key with fingerprint")


@pytest.mark.slow
def test_killed_export_leaves_no_artifact(tmp_path, key4):
    ckpt = make_checkpoint(tmp_path / "vit", "test_vit", key4)
    key_path = key4.save(tmp_path / "k.bin")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "keyedge",
        "export",
        "-c",
        str(ckpt),
        "-k",
        str(key_path),
        "-o",
        str(out),
        "-t",
        "onnx",
        "-t",
        "openvino",
        "-t",
        "coreml",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob(".*.tmp-*/model.onnx")):
        time.sleep(0.05)
    assert list(out.glob(".*.tmp-*/model.onnx")), "the export never started writing"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    final = out / f"test_vit-{key4.fingerprint}"
    assert not final.exists(), "a killed export must not leave an artifact set"
    (staging,) = list(out.glob(".*.tmp-*"))  # holds the keyed model.onnx until someone cleans it
    result = cli("export", "-c", ckpt, "-k", key_path, "-o", out, "-t", "onnx")
    assert result.exit_code == 0, result.output
    assert [p.name for p in out.iterdir()] == [final.name], "the next export cleans up the killed one's leftovers"
    assert f"removed {staging}" in result.output and f"killed keyedge process (pid {proc.pid})" in result.output


def test_fleet_template_matches_full_export(tmp_path, make_key):
    """Keys of one architecture: ONNX/OpenVINO from the template, verified, one shared graph."""
    from keyedge.deploy.export import export_many

    requests = []
    for tag in (1, 2, 3):
        key = make_key(4, tag=tag)
        checkpoint = make_checkpoint(tmp_path / f"k{tag}", "test_efficientnet", key, seed=tag)  # own weights per key
        requests.append(ExportRequest(checkpoint, key))
    fleet = export_many(requests, ExportSettings(targets=["openvino", "onnx"], out=tmp_path / "fleet"))
    full = export_one(requests[2], ExportSettings(targets=["onnx", "openvino"], out=tmp_path / "full"))
    manifests = [json.loads((d / "manifest.json").read_text()) for d in fleet]
    reference = json.loads((full / "manifest.json").read_text())
    for manifest in manifests:
        for target in ("onnx", "openvino"):
            entry = manifest["targets"][target]
            assert entry["source"] == "fleet-template" and entry["parity"]["passed"]
            assert entry["graph"]["gathers_on_input"] == 1
    for target in ("onnx", "openvino"):
        structures = {m["targets"][target]["graph"]["structure"] for m in manifests}
        assert len(structures) == 1, "every key's artifact is the same graph with other constants"
    assert reference["targets"]["onnx"]["source"] == "full-export"
    assert reference["targets"]["onnx"]["parity"]["passed"]
    hashes = {m["targets"]["onnx"]["files"][0]["sha256"] for m in manifests}
    assert len(hashes) == 3, "each key's artifact holds its own constants"
    # the ONNX template artifact of key 3 is the graph its full export writes: optimized alike (issue 14)
    # (OpenVINO's comes through OpenVINO's ONNX frontend, the full export through its torch frontend)
    template_graph, full_graph = manifests[2]["targets"]["onnx"]["graph"], reference["targets"]["onnx"]["graph"]
    assert template_graph["ops"] == full_graph["ops"] and template_graph["structure"] == full_graph["structure"]
    import onnx

    def graph(directory):
        model = onnx.load(str(directory / "model.onnx"))
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
        return [n.op_type for n in model.graph.node], inits

    (ops_t, inits_t), (ops_f, inits_f) = graph(fleet[2]), graph(full)
    assert ops_t == ops_f and "BatchNormalization" not in ops_t
    assert sorted(v.shape for v in inits_t.values()) == sorted(v.shape for v in inits_f.values())
    # OpenVINO: the template's IR is OpenVINO's ONNX frontend on that same graph, op for op
    import collections

    import openvino as ov

    from keyedge.exporters import ExportOptions
    from keyedge.exporters.template import openvino_from_onnx

    reference_xml = openvino_from_onnx(
        full / "model.onnx", tmp_path / "ref.xml", ExportOptions(batch=1, image_size=32)
    )[0]

    def ov_ops(path):
        return collections.Counter(n.get_type_name() for n in ov.Core().read_model(str(path)).get_ordered_ops())

    assert ov_ops(fleet[2] / "model.xml") == ov_ops(reference_xml)


@pytest.mark.slow
def test_fleet_templates_optimize_the_structure_once_and_each_key_runs_only_what_acts_on_its_values(make_key):
    """The per-key step is small (issue 34): the rules/passes that changed the template, a strict subset."""
    from onnxscript import rewriter

    from keyedge.deploy.export import deployable
    from keyedge.exporters import ExportOptions
    from keyedge.exporters.template import OnnxTemplate, module_tensors

    torch.manual_seed(0)
    key = make_key(4)
    module = deployable(build_model("test_efficientnet", 10, key=key, weights="none", image_size=32).eval(), key).module
    options = ExportOptions(batch=1, image_size=32)
    template = OnnxTemplate.build(module, options)
    names = [rule.name for rule in template.rules]
    assert "FuseBatchNormIntoConv" in names and len(names) < len(rewriter._DEFAULT_REWRITE_RULES) // 4
    import onnx

    structure = onnx.ModelProto.FromString(template.proto_bytes)
    lifted = {i.name for i in structure.graph.input}
    assert set(module_tensors(module)) & lifted, "the module's tensors are inputs of the structure, not constants"
    assert not {i.name for i in structure.graph.initializer} & set(module_tensors(module))
    if importlib.util.find_spec("coremltools") is None:
        return
    import coremltools as ct

    from keyedge.exporters import get_backend
    from keyedge.exporters.coreml import MilTemplate

    passes = [name for name, _ in MilTemplate.build(get_backend("coreml"), module, options).passes]
    assert "common::fuse_conv_batchnorm" in passes and len(passes) < len(ct.PassPipeline.DEFAULT.passes) // 4


def test_coreml_fleet_template_writes_the_full_conversions_weights(tmp_path, make_key):
    """CoreML keys from the MIL template: the weight blob a full conversion writes, byte for byte, the same program."""
    pytest.importorskip("coremltools")
    from coremltools.proto import Model_pb2

    from keyedge.deploy.export import export_many

    requests = []
    for tag in (1, 2):
        key = make_key(4, tag=tag)
        checkpoint = make_checkpoint(tmp_path / f"k{tag}", "test_efficientnet", key, seed=tag)
        requests.append(ExportRequest(checkpoint, key))
    fleet = export_many(requests, ExportSettings(targets=["coreml"], out=tmp_path / "fleet"))
    full = export_one(requests[1], ExportSettings(targets=["coreml"], out=tmp_path / "full"))
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (*fleet, full)]
    assert [m["targets"]["coreml"]["source"] for m in manifests] == ["fleet-template", "fleet-template", "full-export"]
    assert all(m["targets"]["coreml"]["graph"]["gathers_on_input"] == 1 for m in manifests)

    def package(directory):
        data = directory / "model.mlpackage" / "Data" / "com.apple.CoreML"
        spec = Model_pb2.Model()
        spec.ParseFromString((data / "model.mlmodel").read_bytes())
        main = spec.mlProgram.functions["main"]
        ops = [op.type for op in main.block_specializations[main.opset].operations]
        return ops, (data / "weights" / "weight.bin").read_bytes()

    (ops_t, blob_t), (ops_f, blob_f), (_, blob_other) = package(fleet[1]), package(full), package(fleet[0])
    assert ops_t == ops_f and len(ops_t) > 50
    assert blob_t == blob_f, "the template writes the weights a full conversion of the same key writes"
    assert blob_other != blob_t, "each key's package holds its own weights"


def test_conv_formulation_has_no_gather_on_any_target(tmp_path, key4):
    ckpt = make_checkpoint(tmp_path / "eff", "test_efficientnet", key4)
    manifest = export(tmp_path, ckpt, key4, ["onnx", "openvino", "coreml"], fuse="conv")
    plain = export(
        tmp_path, make_checkpoint(tmp_path / "plain", "test_efficientnet"), None, ["onnx", "openvino", "coreml"]
    )
    for target, entry in manifest["targets"].items():
        assert entry["fuse"] == "conv" and entry["graph"]["gathers_on_input"] == 0, target
        assert not any(op.lower().startswith("gather") for op in entry["graph"]["input_path"]), target
        # no Gather anywhere: not even shape arithmetic (OpenVINO's is folded at export)
        assert not [op for op in entry["graph"]["ops"] if "gather" in op.lower()], (target, entry["graph"]["ops"])
        extra = Counter(entry["graph"]["ops"]) - Counter(plain["targets"][target]["graph"]["ops"])
        assert extra[{"onnx": "Conv", "openvino": "Convolution", "coreml": "conv"}[target]] == 1, (target, extra)
        assert entry["parity"]["passed"]
    conv_ops = manifest["targets"]["onnx"]["graph"]["ops"]
    assert conv_ops["Conv"] == plain["targets"]["onnx"]["graph"]["ops"]["Conv"] + 1
    assert manifest["targets"]["onnx"]["parity"]["random"]["max_abs_diff"] <= 1e-4


def test_planes_form_is_one_gather_of_planes_between_pixel_moves_on_every_target(tmp_path, key4):
    """--fuse planes: space-to-depth, one gather of the C*P*P channel planes, depth-to-space; exact everywhere."""
    ckpt = make_checkpoint(tmp_path / "eff", "test_efficientnet", key4)
    manifest = export(tmp_path, ckpt, key4, ["onnx", "openvino", "coreml"], fuse="planes")
    for target, entry in manifest["targets"].items():
        graph = entry["graph"]
        assert entry["fuse"] == "planes" and graph["gathers_on_input"] == 1, (target, graph["input_path"])
        before = graph["input_path"][: [op.lower() for op in graph["input_path"]].index("gather")]
        assert before and all(op.lower() in SHUFFLE_OPS for op in before), (target, before)  # pixels moved first
        assert entry["parity"]["passed"], target
    import onnx

    model = onnx.load(str(next((tmp_path / "out").glob("*/model.onnx"))))
    gather = next(n for n in model.graph.node if n.op_type == "Gather" and n.attribute and n.attribute[0].i == 1)
    index = next(i for i in model.graph.initializer if i.name == gather.input[1])
    plane_order = onnx.numpy_helper.to_array(index)
    assert sorted(plane_order.tolist()) == list(range(48)) and not np.array_equal(plane_order, np.arange(48))


def test_coreml_compute_plan(tmp_path, key4):
    """On macOS: which device runs each op; the conv shuffle has no gather to push onto the CPU.

    Elsewhere: a one-line refusal naming macOS, exit 2.
    """
    ckpt = make_checkpoint(tmp_path / "eff", "test_efficientnet", key4)
    directory = export_one(
        ExportRequest(ckpt, key4),
        ExportSettings(targets=["coreml"], out=tmp_path / "conv", fuse="conv", real_inputs=0, random_inputs=2),
    )
    path = directory / "model.mlpackage"
    result = cli("bench", "compute-plan", path, "--compute-units", "CPU_AND_NE", "--json")
    if sys.platform != "darwin":
        clean_error(result, "needs macOS")
        return
    assert result.exit_code == 0, result.output
    ops = json.loads(result.stdout)["operations"]
    assert not [r for r in ops if r["op"].startswith("gather")]
    assert {r["op"] for r in ops} >= {"conv"} and all(r["preferred"] for r in ops if r["op"] != "const")


def test_auto_gives_each_target_its_runtimes_measured_form(tmp_path, key4):
    from keyedge.exporters import get_backend

    ckpt = make_checkpoint(tmp_path / "eff", "test_efficientnet", key4)
    targets = ["onnx", "openvino", "coreml"]
    manifest = export(tmp_path, ckpt, key4, targets, fuse="auto")
    for target in targets:
        entry = manifest["targets"][target]
        form = get_backend(target).auto_form
        assert entry["fuse"] == form and entry["form_choice"] == {"rule": "auto", "form": form, "measured": False}
        assert entry["graph"]["gathers_on_input"] == (form != "conv") and entry["parity"]["passed"]
    assert get_backend("litert").auto_form == get_backend("executorch").auto_form == "planes"  # measured fastest
    assert manifest["targets"]["coreml"]["fuse"] == "conv"  # the Neural Engine runs no gather
    forms = {manifest["targets"][t]["fuse"] for t in targets}
    if len(forms) > 1:  # the set's form is given per target
        assert manifest["fuse_note"].startswith("auto: not folded") and "per target: onnx " in manifest["fuse_note"]


def test_elements_form_is_one_gather_elements_holding_the_keys_index(tmp_path, key4):
    import onnx
    from onnx import numpy_helper

    from keyedge.keys.transform import BlockShuffle

    ckpt = make_checkpoint(tmp_path / "eff", "test_efficientnet", key4)
    manifest = export(tmp_path, ckpt, key4, ["onnx", "openvino", "coreml"], fuse="elements")
    spelled = {"onnx": "GatherElements", "openvino": "GatherElements", "coreml": "gather_along_axis"}
    for target, entry in manifest["targets"].items():
        assert entry["fuse"] == "elements" and entry["graph"]["gathers_on_input"] == 1, target
        assert spelled[target] in entry["graph"]["input_path"], entry["graph"]["input_path"]
        assert entry["parity"]["passed"]
        if entry["parity"]["ran"]:  # (CoreML runs only on macOS: checked structurally elsewhere)
            assert entry["parity"]["random"]["max_abs_diff"] <= 1e-4
    model = onnx.load(next((tmp_path / "out").rglob("model.onnx")))
    constants = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    (node,) = [n for n in model.graph.node if n.op_type == "GatherElements"]
    index = constants[node.input[1]]
    expected = BlockShuffle.from_key(key4, 32).index.numpy()
    assert index.shape == (1, expected.size) and np.array_equal(index[0], expected)  # batch 1: a constant


def test_fastest_times_every_form_here_and_keeps_the_fastest(tmp_path, key4):
    from keyedge.deploy.artifacts import ArtifactManifest
    from keyedge.host import cpu_model

    ckpt = make_checkpoint(tmp_path / "eff", "test_efficientnet", key4)
    logged: list[str] = []
    manifest = export(tmp_path, ckpt, key4, ["onnx", "coreml"], fuse="fastest", log=logged.append)
    onnx_entry = manifest["targets"]["onnx"]
    choice = onnx_entry["form_choice"]
    assert choice["rule"] == "fastest" and choice["measured"] and choice["host"]["cpu"] == cpu_model()
    assert set(choice["timed"]) == set(SHUFFLE_FORMS) and choice["failed"] == {}
    assert set(SHUFFLE_FORMS) == {"gather", "elements", "conv", "planes"}
    assert choice["form"] == min(choice["timed"], key=lambda f: choice["timed"][f]["ms"]) == onnx_entry["fuse"]
    assert choice["timed"][choice["form"]]["ratio_to_chosen"]["median"] == 1.0
    assert onnx_entry["parity"]["passed"] and set(choice["host"]["features"]) >= {"vnni", "bf16", "amx", "fp16"}
    assert any(line.strip().startswith("onnx: fastest form") for line in logged), logged
    coreml = manifest["targets"]["coreml"]
    if sys.platform != "darwin":  # CoreML does not run here: auto's form, and why
        assert coreml["form_choice"]["measured"] is False and "macOS" in coreml["form_choice"]["reason"]
        assert coreml["fuse"] == "conv"
    out = next(p.parent for p in (tmp_path / "out").rglob("manifest.json"))
    assert ArtifactManifest.read(out).targets["onnx"].form_choice == choice  # the reader takes it back
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["model.mlpackage"]  # trial exports are gone


def test_design_card_line_finds_the_keys_checkpoint_under_runs(tmp_path, key4, make_key, monkeypatch):
    """`keyedge export --key-file k1.bin --target coreml`, verbatim, where the key's model was trained."""
    monkeypatch.chdir(tmp_path)
    make_checkpoint(tmp_path / "runs" / "k1", "test_vit", key4)
    make_checkpoint(tmp_path / "runs" / "plain", "test_vit")
    key4.save(tmp_path / "k1.bin")
    result = cli("export", "--key-file", "k1.bin", "--target", "coreml")
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "artifacts" / f"test_vit-{key4.fingerprint}" / "manifest.json").read_text())
    assert manifest["checkpoint"]["path"] == str((tmp_path / "runs" / "k1").resolve())
    other = make_key(4, tag=9)
    other.save(tmp_path / "k2.bin")
    clean_error(cli("export", "--key-file", "k2.bin"), f"trained with key {other.fingerprint}", "runs/k1 (key")
    make_checkpoint(tmp_path / "runs" / "k1-again", "test_vit", key4)
    clean_error(cli("export", "--key-file", "k1.bin"), "2 checkpoints under runs were trained with key", "--checkpoint")
    monkeypatch.chdir(tmp_path / "runs")
    clean_error(cli("export", "--key-file", "../k1.bin"), "no runs/ directory here")
