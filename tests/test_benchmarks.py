"""The benchmarks run and report consistent figures (their timings are not asserted: see README)."""

from __future__ import annotations

from keyedge.benchmarks.experiments import transform


def test_transform_benchmark_runs(capsys, tmp_path):
    out = tmp_path / "t.json"
    results = transform.main(["--rounds", "2", "--min-round-ms", "1", "--json", str(out)])
    assert [(r.size, r.batch) for r in results] == transform.CONFIGS
    for r in results:
        assert set(r.us_per_image) == set(transform.METHODS) and all(v > 0 for v in r.us_per_image.values())
        assert r.ratio_to_gather["gather"] == 1.0
    assert "chain/gather" in capsys.readouterr().out and out.exists()


def test_training_benchmark_runs(capsys):
    from keyedge.benchmarks.experiments import training

    result = training.main(
        ["--model", "test_efficientnet", "--image-size", "32", "--batch", "4", "--rounds", "2", "--steps", "1"]
    )
    assert set(result["images_per_s"]) == set(training.VARIANTS)
    assert all(v > 0 for v in result["images_per_s"].values())
    assert set(result["ratios"]) == set(training.RATIOS)
    assert "keyed/plain (full)" in capsys.readouterr().out


def test_export_benchmark_runs(capsys):
    from keyedge.benchmarks.experiments import export

    (result,) = export.main(["--models", "test_efficientnet", "--keys", "2", "--image-size", "32"])
    assert set(result["speedup"]) == {"onnx", "openvino"} and all(v > 0 for v in result["speedup"].values())
    assert max(result["max_abs_diff"].values()) < 1e-3, "template and full exports must agree"
    assert result["onnx_nodes"]["template"] == result["onnx_nodes"]["full"], (
        "the template is optimized like a full export"
    )
    assert set(result["latency_template_over_full"]) == {"onnxruntime", "openvino"}
    assert "s/key" in capsys.readouterr().out


def test_keyed_latency_benchmark_runs(capsys):
    from keyedge.benchmarks.experiments import keyed_latency

    fast = ["--image-size", "32", "--rounds", "2", "--min-seconds", "0.05"]
    report = keyed_latency.main(["--models", "test_vit,test_resnet", *fast, "--host-precision"])
    fuses = {(m.artifact.model, m.artifact.role, m.artifact.fuse, m.runtime) for m in report.measurements}
    vit = {(r, f) for m, r, f, rt in fuses if m == "test_vit" and rt == "openvino"}
    keyed = {("keyed", "gather"), ("keyed", "elements"), ("keyed", "conv"), ("keyed", "planes")}
    assert vit == {("plain", "none"), ("keyed", "fold"), ("plain", "fold")} | keyed
    resnet = {(r, f) for m, r, f, rt in fuses if m == "test_resnet" and rt == "onnxruntime"}
    assert resnet == {("plain", "none")} | keyed  # a ResNet stem does not fold
    host = [c for c in report.comparisons if c.kind == "host/pinned"]
    # every OpenVINO artifact also at the plugin's own precision here (bf16 on AMX hosts), against the pinned one
    openvino = [m for m in report.measurements if m.runtime == "openvino"]
    assert len(host) == len(openvino) // 2 and {m.device.split("@")[0] for m in openvino} == {"CPU"}
    assert all(c.runtime.startswith("openvino:CPU@host:") and c.runtime.endswith("/openvino:CPU") for c in host)
    kinds = {
        m: {
            c.kind
            for c in report.comparisons
            if c.model == m and c.runtime.startswith("onnxruntime:CPU") and c.kind != "runtime"
        }
        for m in ("test_vit", "test_resnet")
    }
    assert kinds == {
        "test_vit": {"keyed/plain", "gather/fold", "gather/conv", "gather/elements", "gather/planes"},
        "test_resnet": {"keyed/plain", "gather/conv", "gather/elements", "gather/planes"},
    }
    assert "keyed/plain" in capsys.readouterr().out


def test_defense_latency_benchmark_runs():
    from keyedge.benchmarks.experiments import defense_latency

    report = defense_latency.main(["--models", "test_efficientnet", "--min-seconds", "0.05", "--rounds", "2"])
    kinds = {(c.kind, c.runtime.split(":")[0]) for c in report.comparisons}
    assert {("volumize/plain", "onnxruntime"), ("volumize/plain", "openvino")} <= kinds


def test_interleave_rotates_the_order_and_meets_every_minimum():
    from keyedge.timing import interleave

    order: list[str] = []
    closed: list[str] = []

    def call(name: str):
        def run() -> str:
            order.append(name)
            return name

        return run

    calls = {name: call(name) for name in "abc"}
    timing = interleave(calls, rounds=3, calls=2, warmup=1, release=closed.append, keep=True)
    assert order[:3] == ["a", "b", "c"], "one warm-up call each, untimed"
    rounds = order[3:]
    assert rounds == ["a", "a", "b", "b", "c", "c", "b", "b", "c", "c", "a", "a", "c", "c", "a", "a", "b", "b"]
    assert closed == order, "every call's result is released"
    for name in "abc":
        r = timing[name]
        assert r.calls == [2, 2, 2] and len(r.samples) == 6 and r.returned == [name] * 3
        assert r.first_s is not None and len(r.means) == len(r.medians) == 3
    assert timing.rounds == 3 and timing.fraction == 1.0
    assert timing.ratio("a", "b").median > 0

    ticks: list[float] = []
    more = interleave(
        {"x": lambda: None},
        rounds=2,
        warmup=2,
        min_iterations=50,
        each=False,
        progress=lambda t: ticks.append(t.fraction),
    )
    assert more["x"].iterations >= 50 and more.rounds >= 2 and more["x"].each == [[]] * more.rounds
    assert ticks[-1] == 1.0 and ticks == sorted(ticks)
