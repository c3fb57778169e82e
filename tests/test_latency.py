"""`keyedge bench`: device profiles, the keyedge-latency/1 report, interleaved ratios, skips and the regression gate.

Timings are never asserted in absolute terms: only orderings, counts and a ~9x slowdown.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from keyedge.benchmarks.latency import BenchSettings, run_latency
from keyedge.benchmarks.profiles import DEVICES_DIR, load_profile, parse_profile
from keyedge.benchmarks.regress import compare
from keyedge.benchmarks.report import SCHEMA, LatencyReport
from keyedge.checkpoints import save_checkpoint
from keyedge.cli import app
from keyedge.deploy.export import ExportRequest, ExportSettings, export_one
from keyedge.errors import KeyedgeError
from keyedge.keys.keyfile import Key
from keyedge.models.backbones import build_model

runner = CliRunner()
FAST = BenchSettings(min_seconds=0.05, min_iterations=10, warmup=2, rounds=5, batch_sizes=[1, 2])
PROFILE = """
name = "test-cpu"
threads = 1
batch_sizes = [1]
warmup = 2
min_iterations = 10
min_seconds = 0.05
rounds = 5
[[runtime]]
name = "onnxruntime"
providers = ["CPUExecutionProvider"]
[[runtime]]
name = "openvino"
device = "CPU"
[[runtime]]
name = "coreml"
compute_units = "ALL"
[[runtime]]
name = "onnxruntime"
providers = ["CUDAExecutionProvider"]
[thresholds]
ratio = 100.0
p50 = 1.5
accuracy_drop = 0.01
"""


def export_model(root: Path, name: str, key: Key | None, size: int = 32, targets=("onnx", "openvino")) -> Path:
    torch.manual_seed(0)
    model = build_model("test_efficientnet", 10, key=key, weights="none", image_size=size)
    ckpt = root / f"ckpt-{name}"
    save_checkpoint(
        ckpt,
        model.eval(),
        epoch=1,
        finetune={"mode": "full", "lora": None},
        data={"name": "unavailable"},
        training={"config": {}},
        metrics={"test_accuracy": None},
    )
    return export_one(
        ExportRequest(ckpt, key),
        ExportSettings(targets=list(targets), out=root / name, batch=None, real_inputs=0, random_inputs=2),
    )


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    key = Key.from_secret(bytes(range(32)), 4)
    return {
        "keyed": export_model(root, "keyed", key),
        "plain": export_model(root, "plain", None),
        "slow": export_model(root, "slow", key, size=96, targets=("onnx",)),
        "root": root,
    }


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("profile") / "test-cpu.toml"
    path.write_text(PROFILE)
    return path


@pytest.fixture(scope="module")
def report(artifacts, profile_path):
    return run_latency([artifacts["keyed"], artifacts["plain"]], load_profile(profile_path), FAST)


# --------------------------------------------------------------------------- profiles


def test_shipped_profiles_load():
    names = {p.stem for p in DEVICES_DIR.glob("*.toml")}
    assert {"cpu-x86", "cpu-arm", "apple-silicon", "nvidia-gpu"} <= names
    for path in DEVICES_DIR.glob("*.toml"):
        profile = load_profile(path)
        assert profile.runtimes and profile.min_iterations >= 1 and profile.thresholds.p50 > 1


@pytest.mark.parametrize(
    "text, fragment",
    [
        ('name = "x"\nbogus = 1\n[[runtime]]\nname = "onnxruntime"', "'bogus' is unknown"),
        ('name = "x"\n[[runtime]]\nname = "tensorflow"', "'runtime[0].name' must be one of"),
        ('name = "x"\n[[runtime]]\nname = "openvino"\ndevice = "TPU"', "'runtime[0].device'"),
        (
            'name = "x"\n[[runtime]]\nname = "onnxruntime"\nproviders = ["FooExecutionProvider"]',
            "'runtime[0].providers'",
        ),
        ('name = "x"\n[[runtime]]\nname = "coreml"\ncompute_units = "GPU"', "'runtime[0].compute_units'"),
        (
            'name = "x"\n[[runtime]]\nname = "openvino"\nproviders = ["CPUExecutionProvider"]',
            "'runtime[0].providers' is unknown",
        ),
        (
            'name = "x"\nmin_iterations = "many"\n[[runtime]]\nname = "onnxruntime"',
            "'min_iterations' must be an integer",
        ),
        ('name = "x"\nthreads = true\n[[runtime]]\nname = "onnxruntime"', "'threads'"),
        ('name = "x"\nbatch_sizes = [1, 0]\n[[runtime]]\nname = "onnxruntime"', "'batch_sizes'"),
        ('name = "x"\n[[runtime]]\nname = "onnxruntime"\n[thresholds]\np50 = -1', "'thresholds.p50'"),
        ('name = "x"\n[[runtime]]\nname = "onnxruntime"\n[thresholds]\nlatency = 2', "'thresholds.latency' is unknown"),
        (
            'name = "x"\n[[runtime]]\nname = "onnxruntime"\nspinning = "yes"',
            "'runtime[0].spinning' must be true or false",
        ),
        ('name = "x"\n[[runtime]]\nname = "openvino"\nspinning = false', "'runtime[0].spinning' is unknown"),
        ('name = "x"', "'runtime' must list"),
        ('name = "x"\n[[runtime', "not valid TOML"),
    ],
)
def test_bad_profiles_are_one_line_errors_naming_field_and_file(tmp_path, text, fragment):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(KeyedgeError) as info:
        load_profile(path)
    message = str(info.value)
    assert fragment in message and str(path) in message and "\n" not in message, message


def test_bad_profile_through_the_cli_is_exit_2(tmp_path, artifacts):
    path = tmp_path / "bad.toml"
    path.write_text('name = "x"\nwarmpu = 3\n[[runtime]]\nname = "onnxruntime"')
    result = runner.invoke(app, ["bench", "latency", str(artifacts["plain"]), "--profile", str(path)])
    assert result.exit_code == 2 and "warmpu" in result.stderr and "Traceback" not in result.output


# --------------------------------------------------------------------------- report


def test_report_schema_stats_and_environment(report):
    data = json.loads(report.to_json())
    assert data["schema"] == SCHEMA == "keyedge-latency/1"
    for name in ("created", "environment", "profile", "settings", "measurements", "comparisons", "skipped"):
        assert name in data
    env = data["environment"]
    assert env["cpu"] and env["cores"] >= 1 and env["python"] and env["versions"]["onnxruntime"]
    # dynamic-batch artifacts: the requested batch sizes, on both runtimes, keyed and plain
    seen = {(m["artifact"]["role"], m["runtime"], m["batch"]) for m in data["measurements"]}
    assert seen == {(r, rt, b) for r in ("keyed", "plain") for rt in ("onnxruntime", "openvino") for b in (1, 2)}
    for m in data["measurements"]:
        s = m["steady"]
        assert s["iterations"] >= 10 and s["seconds"] >= 0.05
        assert s["min"] <= s["p50"] <= s["p90"] <= s["p95"] <= s["p99"] <= s["max"]
        assert m["load_s"] > 0 and m["first_ms"] > 0 and m["throughput"] > 0 and m["peak_rss_mb"] > 0
        assert m["threads"] == 1
    again = LatencyReport.from_dict(data)
    assert again.to_dict() == data
    md = report.to_markdown()
    assert "| artifact |" in md and "keyed/plain" in md and "Skipped" in md


def test_keyed_plain_and_runtime_ratios_with_spread(report):
    kinds = {(c.kind, c.batch) for c in report.comparisons}
    assert {("keyed/plain", 1), ("keyed/plain", 2), ("runtime", 1)} <= kinds
    for c in report.comparisons:
        assert c.p10 <= c.median <= c.p90 and c.median > 0 and c.rounds >= 5
    kp = [c for c in report.comparisons if c.kind == "keyed/plain"]
    assert {c.runtime.split(":")[0] for c in kp} == {"onnxruntime", "openvino"}
    assert all(c.numerator.endswith(Key.from_secret(bytes(range(32)), 4).fingerprint) for c in kp)
    assert all(c.denominator.endswith("-plain") for c in kp)


def test_absent_runtimes_are_skipped_with_a_reason(report):
    reasons = {(s.runtime, s.device): s.reason for s in report.skipped}
    assert "macOS" in reasons[("coreml", "ALL")]
    assert "CUDAExecutionProvider" in reasons[("onnxruntime", "CUDAExecutionProvider")]


def test_fixed_batch_artifact_is_timed_at_its_batch_only(tmp_path):
    key = Key.from_secret(bytes(range(32)), 4)
    torch.manual_seed(0)
    model = build_model("test_efficientnet", 10, key=key, weights="none", image_size=32)
    save_checkpoint(
        tmp_path / "c",
        model.eval(),
        epoch=1,
        finetune={"mode": "full", "lora": None},
        data={"name": "unavailable"},
        training={"config": {}},
        metrics={"test_accuracy": None},
    )
    directory = export_one(
        ExportRequest(tmp_path / "c", key),
        ExportSettings(targets=["onnx"], out=tmp_path / "o", batch=3, real_inputs=0, random_inputs=2),
    )
    rep = run_latency(
        [directory / "model.onnx"], parse_profile({"name": "x", "runtime": [{"name": "onnxruntime"}]}), FAST
    )
    assert [m.batch for m in rep.measurements] == [3] and rep.measurements[0].artifact.batch == 3


def test_torch_eager_reference_runs_the_source_checkpoint(artifacts):
    """The torch runtime times an export's checkpoint; a keyed one needs its key, else it is skipped, not a crash."""
    key = Key.from_secret(bytes(range(32)), 4)
    profile = parse_profile(
        {"name": "t", "threads": 1, "runtime": [{"name": "onnxruntime"}, {"name": "torch", "device": "cpu"}]}
    )
    rep = run_latency([artifacts["keyed"], artifacts["plain"]], profile, FAST, keys=[key])
    eager = [m for m in rep.measurements if m.runtime == "torch"]
    assert {(m.artifact.role, m.batch) for m in eager} == {(r, b) for r in ("keyed", "plain") for b in (1, 2)}
    assert all(m.steady.p50 > 0 and m.artifact.target == "torch" for m in eager)
    runtime = [c for c in rep.comparisons if c.kind == "runtime"]
    assert any(c.runtime == "onnxruntime:CPUExecutionProvider/torch:cpu" for c in runtime)
    assert bytes(range(32)).hex() not in json.dumps(rep.to_dict())  # the secret never reaches the report
    # without the key: the keyed checkpoint is skipped with the fix, the plain one is still timed
    rep = run_latency([artifacts["keyed"], root_checkpoint(artifacts, "plain")], profile, FAST)
    reasons = [s.reason for s in rep.skipped if s.runtime == "torch"]
    assert len(reasons) == 1 and "--key-file" in reasons[0]
    assert [m.artifact.role for m in rep.measurements if m.runtime == "torch"] == ["plain", "plain"]


def root_checkpoint(artifacts, name: str) -> Path:
    return artifacts["root"] / f"ckpt-{name}"


def test_volumized_artifact_is_its_own_role_with_a_cost_ratio(tmp_path, artifacts):
    """A volumized export is neither keyed nor plain: it gets role 'volumize' and a volumize/plain ratio."""
    from keyedge.defenses.volumetric import build_volumized_model
    from keyedge.defenses.volumizer import VolumizeConfig

    torch.manual_seed(0)
    model = build_volumized_model("test_efficientnet", 10, VolumizeConfig((16, 16)), weights="none", image_size=32)
    save_checkpoint(
        tmp_path / "ckpt",
        model.eval(),
        epoch=1,
        finetune={"mode": "full", "lora": None},
        data={"name": "unavailable"},
        training={"config": {}},
        metrics={"test_accuracy": None},
    )
    directory = export_one(
        ExportRequest(tmp_path / "ckpt", None),
        ExportSettings(targets=["onnx"], out=tmp_path / "o", batch=None, real_inputs=0, random_inputs=2),
    )
    profile = parse_profile(
        {"name": "v", "threads": 1, "runtime": [{"name": "onnxruntime"}, {"name": "torch", "device": "cpu"}]}
    )
    rep = run_latency([directory, artifacts["plain"]], profile, FAST)
    roles = {(m.artifact.role, m.runtime) for m in rep.measurements}
    assert {("volumize", "onnxruntime"), ("volumize", "torch"), ("plain", "onnxruntime")} <= roles
    kinds = {(c.kind, c.numerator, c.denominator) for c in rep.comparisons if c.runtime.startswith("onnxruntime:")}
    assert ("volumize/plain", "test_efficientnet-volumize", "test_efficientnet-plain") in kinds
    assert not any(c.kind == "keyed/plain" for c in rep.comparisons)


# --------------------------------------------------------------------------- CLI and regression gate


def test_cli_latency_writes_json_and_markdown(tmp_path, artifacts, profile_path):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    result = runner.invoke(
        app,
        [
            "bench",
            "latency",
            str(artifacts["keyed"]),
            str(artifacts["plain"]),
            "--profile",
            str(profile_path),
            "--threads",
            "2",
            "--min-seconds",
            "0.02",
            "--min-iterations",
            "5",
            "--json",
            str(out),
            "--markdown",
            str(md),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["schema"] == SCHEMA and data["settings"]["threads"] == 2 and data["measurements"]
    assert (
        "keyed/plain" in result.stdout and "skipped coreml" in result.stdout and md.read_text().startswith("# Latency")
    )


def test_gate_passes_on_identical_reports(tmp_path, report, profile_path):
    path = tmp_path / "r.json"
    report.to_json(path)
    result = runner.invoke(
        app, ["bench", "regress", "--baseline", str(path), "--current", str(path), "--profile", str(profile_path)]
    )
    assert result.exit_code == 0, result.output
    assert "no regression" in result.stdout and "0 failed" in result.stdout


def test_gate_fails_on_a_real_slowdown(tmp_path, artifacts, profile_path):
    profile = load_profile(profile_path)
    base = run_latency([artifacts["keyed"]], profile, FAST)  # 32x32
    slow = run_latency([artifacts["slow"]], profile, FAST)  # the same model and key at 96x96: ~9x the work
    base_path, slow_path = tmp_path / "base.json", tmp_path / "cur.json"
    base.to_json(base_path)
    slow.to_json(slow_path)
    result = runner.invoke(
        app,
        ["bench", "regress", "--baseline", str(base_path), "--current", str(slow_path), "--profile", str(profile_path)],
    )
    assert result.exit_code == 1, result.output
    assert "REGRESSIONS" in result.stdout and "FAIL" in result.stdout
    assert "test_efficientnet-" in result.stdout and "onnx onnxruntime:CPUExecutionProvider b1" in result.stdout
    # the 96x96 export has only onnx: its openvino entries are unmatched, not failures
    assert "baseline only" in result.stdout and "openvino" in result.stdout
    gate = compare(base, slow, profile.thresholds)
    assert not gate.passed and all(c.kind == "p50" for c in gate.offenders)


def test_gate_checks_keyed_plain_ratio_and_accuracy(report):
    data = report.to_dict()
    gate = compare(report, report, load_profile(DEVICES_DIR / "cpu-x86.toml").thresholds)
    assert any(c.kind == "ratio" for c in gate.checks)
    strict = parse_profile({"name": "x", "runtime": [{"name": "onnxruntime"}], "thresholds": {"ratio": 0.01}})
    assert {c.kind for c in compare(report, report, strict.thresholds).offenders} == {"ratio"}
    worse = json.loads(json.dumps(data))
    for m in data["measurements"]:
        m["artifact"]["accuracy"] = 0.90
    for m in worse["measurements"]:
        m["artifact"]["accuracy"] = 0.80
    gate = compare(LatencyReport.from_dict(data), LatencyReport.from_dict(worse))  # thresholds from the report
    assert {c.kind for c in gate.offenders} >= {"accuracy"}


def test_regress_rejects_a_foreign_report(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"schema": "other/1"}))
    result = runner.invoke(app, ["bench", "regress", "--baseline", str(path), "--current", str(path)])
    assert result.exit_code == 2 and "keyedge-latency/1" in result.stderr


def slowed_copy(export_dir: Path, dest: Path, pairs: int = 150) -> Path:
    """A deliberately slower keyed artifact: ``pairs`` reverse+reverse Gathers (an identity) before the graph."""
    import shutil

    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    shutil.copytree(export_dir, dest)
    model = onnx.load(dest / "model.onnx")
    graph = model.graph
    source = graph.input[0].name
    width = graph.input[0].type.tensor_type.shape.dim[3].dim_value
    graph.initializer.append(numpy_helper.from_array(np.arange(width - 1, -1, -1, dtype=np.int64), "slow_rev"))
    nodes, current = [], source
    for i in range(2 * pairs):
        nodes.append(helper.make_node("Gather", [current, "slow_rev"], [f"slow_{i}"], axis=3))
        current = f"slow_{i}"
    for node in graph.node:
        node.input[:] = [current if name == source else name for name in node.input]
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)
    onnx.save(model, dest / "model.onnx")
    return dest


def test_ratio_gate_fails_when_the_keyed_artifact_gets_slower(tmp_path, artifacts):
    """`make gate`'s rule: no baseline, only keyed/plain ratios from one interleaved run, a generous threshold."""
    from keyedge.benchmarks.gate import gate

    profile = tmp_path / "gate.toml"
    profile.write_text(
        'name = "g"\nthreads = 1\nbatch_sizes = [1]\nmin_iterations = 20\nmin_seconds = 0.2\n'
        'rounds = 8\n[[runtime]]\nname = "onnxruntime"\n[thresholds]\nratio = 1.6\n'
    )
    slow = slowed_copy(artifacts["keyed"], tmp_path / "slow")
    report, result = gate([slow, artifacts["plain"]], profile, attempts=2, out=tmp_path / "out")
    assert not result.passed and [c.kind for c in result.offenders] == ["ratio"]
    assert result.offenders[0].value > 1.6 and (tmp_path / "out" / "latency-attempt2.json").is_file()
    _, result = gate([artifacts["keyed"], artifacts["plain"]], profile, attempts=2)
    assert result.passed and [c.kind for c in result.checks] == ["ratio"]
    # the same rule through the CLI: no --baseline gates the ratios only
    path = tmp_path / "slow.json"
    report.to_json(path)
    cli = runner.invoke(app, ["bench", "regress", "--current", str(path)])
    assert cli.exit_code == 1 and "keyed/plain" in cli.stdout and "FAIL" in cli.stdout
    cli = runner.invoke(app, ["bench", "regress", "--current", str(path), "--only", "speed"])
    assert cli.exit_code == 2 and "unknown check speed" in cli.output


def test_each_precision_is_its_own_row_and_gate_entry():
    """fp16 and dynamic-int8 artifacts of one key had the fp32 label and gate key: rows and baselines collided."""
    from keyedge.benchmarks.report import Artifact, Measurement, Stats

    def measured(precision):
        artifact = Artifact("m.tflite", "litert", "lite0", "abc", "gather", precision, 1, 224, None)
        return Measurement(artifact, "litert", "CPU", 1, 2, 0.1, 1.0, Stats.from_seconds([0.01, 0.011]), 90.0, 1.0)

    rows = [measured(p) for p in ("fp32", "fp16", "dynamic-int8", "int8")]
    assert [m.artifact.label for m in rows] == [
        "lite0-abc",
        "lite0-abc[fp16]",
        "lite0-abc[dynamic-int8]",
        "lite0-abc[int8]",
    ]
    assert len({m.key for m in rows}) == 4 and rows[0].key[-1] == 1  # fp32's key is what baselines recorded


# --------------------------------------------------------------------------- the report reader, fuzzed


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_latency_report_reader_never_crashes(report, data, fuzz_document):
    """Any one edit of a real report reads (and gates and renders) or is one KeyedgeError (issue 19)."""

    def read(doc):
        rep = LatencyReport.from_dict(doc, "r.json")
        compare(rep, rep)
        rep.to_markdown()

    fuzz_document(read, json.loads(json.dumps(report.to_dict())), data)
