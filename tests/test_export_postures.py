"""``keyedge export --posture``: the posture in the graph, verified, recorded; the runtime enforces its guard."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from keyedge.cli import app
from keyedge.deploy.artifacts import ArtifactManifest
from keyedge.deploy.parity import VerificationError
from keyedge.errors import KeyedgeError
from keyedge.runtime import IN_MEMORY, open_artifact

pytest.importorskip("onnxruntime")
runner = CliRunner()
NAME = "test_efficientnet-a3aacf2910fa98b9"  # the small keyed checkpoint's set (conftest: key of bytes 0..31)


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert line.startswith("error: ") and len(line.splitlines()) == 1 and "Traceback" not in result.output, line
    for fragment in fragments:
        assert fragment in line, line


@pytest.fixture(scope="module")
def noisy_set(small_keyed_checkpoint, tmp_path_factory):
    """The small keyed checkpoint exported to ONNX as label+noise:0.05+guard:lock+rate:600."""
    checkpoint, key = small_keyed_checkpoint
    out = tmp_path_factory.mktemp("posture")
    posture = "label+noise:0.05+guard:lock+rate:600"
    result = cli("export", "-c", checkpoint, "--key-file", key, "-t", "onnx", "--posture", posture, "-o", out)
    assert result.exit_code == 0, result.output
    assert "sigma-0 twin" in result.output and "noise: spread" in result.output
    return out / NAME


def test_the_posture_is_in_the_graph_verified_and_recorded(noisy_set):
    manifest = json.loads((noisy_set / "manifest.json").read_text())
    assert manifest["schema"] == "keyedge-artifact/2"
    assert manifest["posture"]["spec"] == "label+noise:0.05+guard:lock+rate:600"
    assert manifest["output"]["meaning"] == "one-hot top-1 label"
    onnx = manifest["targets"]["onnx"]
    # the key's shuffle is still one gather on the input, seen through the noise's add; the noise is a live op
    assert onnx["graph"]["gathers_on_input"] == 1 and onnx["graph"]["random_ops"] == 1
    assert onnx["graph"]["input_path"][:4] == ["RandomNormalLike", "Add", "Reshape", "Gather"]
    assert {"ArgMax", "ScatterElements"} <= set(onnx["graph"]["ops"])
    parity = onnx["parity"]
    assert parity["passed"] and parity["random"]["max_abs_diff"] == 0.0  # the sigma-0 twin, exactly
    assert parity["noise"]["passed"] and parity["noise"]["draws"] == 32
    assert 0.5 <= parity["noise"]["spread_ratio"] <= 2.0
    assert sorted(p.name for p in noisy_set.iterdir()) == ["manifest.json", "model.onnx"]  # the twin is gone
    assert ArtifactManifest.read(noisy_set).deployed_posture.guard == "lock"


def test_the_device_answers_labels_only_and_the_guard_locks_across_a_restart(noisy_set, tmp_path):
    with pytest.raises(KeyedgeError, match="guard_state=PATH"):
        open_artifact(noisy_set, "onnx")
    state = tmp_path / "guard.npz"
    x = np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32)
    with open_artifact(noisy_set, "onnx", guard_state=state) as model:
        first = model(x)
        assert set(np.unique(first)) <= {0.0, 1.0} and first.sum() == 1  # one bit per class: a label
        assert not np.isnan(model(x + 1e-3)).any()  # a near-duplicate: flagged, the last query answered (lock)
        fresh = np.random.default_rng(1).random(x.shape, dtype=np.float32)
        assert np.isnan(model(fresh)).all() and "locked" in model.verdicts[0].reason  # locked from then on
    with open_artifact(noisy_set, "onnx", guard_state=state) as model:  # a restart remembers the lock
        assert np.isnan(model(x)).all() and "locked" in model.verdicts[0].reason
    shown = cli("guard", "show", state, "--set", noisy_set)
    assert shown.exit_code == 0 and "LOCKED" in shown.output and "flagged 1" in shown.output, shown.output
    assert cli("guard", "unlock", state, "--set", noisy_set).exit_code == 0  # an operator's decision
    with open_artifact(noisy_set, "onnx", guard_state=state) as model:
        assert not np.isnan(model(np.random.default_rng(5).random(x.shape, dtype=np.float32))).any()
    one_line_error(cli("guard", "show", tmp_path / "missing.npz", "--set", noisy_set), "not a guard state file")
    state.write_bytes(b"not a guard state")
    with pytest.raises(KeyedgeError, match="corrupt or not a guard state"):
        open_artifact(noisy_set, "onnx", guard_state=state)
    with open_artifact(noisy_set, "onnx", guard_state=IN_MEMORY) as model:
        assert not np.isnan(model(x)).any()
    with open_artifact(noisy_set, "onnx", posture=False) as bare:  # the graph's posture holds even so
        assert set(np.unique(bare(x))) <= {0.0, 1.0}


def test_another_sets_guard_state_is_refused(noisy_set, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(noisy_set, other)
    data = json.loads((other / "manifest.json").read_text())
    data["model"]["name"] = "another_model"
    (other / "manifest.json").write_text(json.dumps(data))
    state = tmp_path / "guard.npz"
    with open_artifact(noisy_set, "onnx", guard_state=state) as model:
        model(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(KeyedgeError, match="belongs to another device or artifact"):
        open_artifact(other, "onnx", guard_state=state)


def test_verify_reruns_the_noise_check(noisy_set, small_keyed_checkpoint):
    _, key = small_keyed_checkpoint
    result = cli("verify", noisy_set, "--key-file", key)
    assert result.exit_code == 0, result.output
    assert "onnx noise: spread" in result.output


def test_the_noise_check_catches_a_wrong_sigma(small_keyed_checkpoint):
    from keyedge.checkpoints import load_checkpoint
    from keyedge.deploy.verification import noise_check
    from keyedge.keys.keyfile import load_key
    from keyedge.postures import parse_posture
    from keyedge.postures.graph import PostureModule

    checkpoint, key_file = small_keyed_checkpoint
    model, _ = load_checkpoint(checkpoint, load_key(key_file))
    right = PostureModule(model, parse_posture("scores+noise:0.05")).eval()
    wrong = PostureModule(model, parse_posture("scores+noise:0.2")).eval()
    x = np.random.default_rng(0).random((4, 3, 32, 32), dtype=np.float32)

    def answer(module):
        return lambda images: module(torch.from_numpy(images)).detach().numpy()

    assert noise_check(answer(right), right, x, "the same module")["passed"]
    with pytest.raises(VerificationError, match="noise does not behave like the posture's"):
        noise_check(answer(wrong), right, x, "a sigma-0.2 artifact")
    with pytest.raises(VerificationError, match="noise does not behave"):  # noise baked into one draw
        frozen = answer(right)(x)
        noise_check(lambda _images: frozen, right, x, "a frozen artifact")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["-t", "litert", "--posture", "label+noise:0.02"], "litert target cannot hold"),
        (["-t", "executorch", "--posture", "scores+noise:0.02"], "executorch target cannot hold"),
        (["-t", "onnx", "--posture", "topk:12"], "top 12 classes of a model with 10"),
        (["-t", "onnx", "--posture", "label+noise:0.9"], "noise sigma must be in [0, 0.5]"),
        (["-t", "onnx", "--posture", "label+shield"], "unknown posture part 'shield'"),
        (["-t", "onnx", "--posture", "noise:0.02", "--precision", "int8"], "graph with in-graph noise at int8"),
        (["-t", "openvino", "--posture", "noise:0.02", "--precision", "bf16"], "graph with in-graph noise at bf16"),
    ],
)
def test_a_posture_that_cannot_be_held_is_refused_before_any_work(small_keyed_checkpoint, tmp_path, args, fragment):
    checkpoint, key = small_keyed_checkpoint
    result = cli("export", "-c", checkpoint, "--key-file", key, "-o", tmp_path / "out", *args)
    one_line_error(result, fragment)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_target_all_leaves_out_targets_without_a_random_op():
    from keyedge.cli._flags import expand_targets

    randomized = expand_targets(["all"], randomized=True)
    assert "onnx" in randomized and not {"litert", "executorch"} & set(randomized)


def test_a_version_1_manifest_reads_as_scores_and_a_bad_posture_record_is_one_line(noisy_set, tmp_path):
    from keyedge.validate import ManifestError

    data = json.loads((noisy_set / "manifest.json").read_text())
    old = tmp_path / "old"
    old.mkdir()
    v1 = {k: v for k, v in data.items() if k != "posture"} | {"schema": "keyedge-artifact/1"}
    (old / "manifest.json").write_text(json.dumps(v1))
    assert str(ArtifactManifest.read(old).deployed_posture) == "scores"
    for record in ({"spec": "label+warp"}, {"spec": "label", "outputs": "scores"}, {"spec": "topk:11"}):
        (old / "manifest.json").write_text(json.dumps(data | {"posture": record}))
        with pytest.raises(ManifestError, match="field 'posture'") as caught:
            ArtifactManifest.read(old)
        assert "\n" not in str(caught.value)


def test_graph_analysis_sees_through_the_noise_add_only():
    from keyedge.exporters.graph import Node, analyze

    def graph(noise_op):
        return [
            Node(noise_op, ["x"], ["n"]),
            Node("Mul", ["n", "sigma"], ["ns"]),
            Node("Add", ["x", "ns"], ["xn"]),
            Node("Reshape", ["xn", "shape"], ["flat"]),
            Node("Gather", ["flat", "perm"], ["g"]),
            Node("Sub", ["g", "mean"], ["y"]),
        ]

    noisy = analyze(graph("RandomNormalLike"), ["x"], ["y"])
    assert noisy.gathers_on_input == 1 and noisy.random_ops == 1
    # an add of something computed from the input (not random) is not seen through: the gather is not the key's
    assert analyze(graph("Relu"), ["x"], ["y"]).gathers_on_input == 0


def test_the_quickstart_summary_lists_each_postures_worst_case():
    from types import SimpleNamespace

    from keyedge.app.quickstart_report import _robustness_rows, robustness_summary

    row = {
        "posture": "label+guard:lock",
        "target": "k1",
        "clean_accuracy": 0.8,
        "latency_overhead": 1.02,
        "images": 100,
        "worst": [{"budget": 1000, "robust_accuracy": 0.5, "robust_se": 0.05, "attack": "rays blinded 0.05"}],
    }
    robustness = SimpleNamespace(
        outcomes=[], artifacts=[], sanity={"passed": True}, headline=[], checks=[], data={"images": 300}, postures=[row]
    )
    config = SimpleNamespace(seed=0, eps="16/255", attack_steps=10)
    rows = dict(_robustness_rows(robustness_summary(robustness, config)))
    what = "posture label+guard:lock on k1: worst case without the key at 1,000 queries (100 images; clean 80.0%, "
    assert rows[what + "latency 1.02x scores)"] == "50.0% ± 5.0% (rays blinded 0.05)"
