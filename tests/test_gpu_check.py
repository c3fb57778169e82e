"""The GPU check (python -m keyedge.benchmarks.gpu_check) in its tiny CPU fallback, run in-process.

No GPU here: the fallback runs every leg on timm's test_* models at 32x32 in seconds, and every leg either
measures or says why not (no CUDA, a provider missing).  Speed is never asserted, only that the figures and
ratios are there and positive.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import timm  # noqa: F401  (imported at collection: the run below is timed without timm's import)
import torch

from keyedge.benchmarks import gpu_check
from keyedge.benchmarks.profiles import DEVICES_DIR, load_profile
from keyedge.benchmarks.workbench import VARIANTS
from keyedge.data.datasets import FASHION_MNIST_DEBIAN

ROOT = Path(__file__).resolve().parents[1]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA paths")


def small_npz(path: Path, train: int = 48, test: int = 16) -> Path:
    """A --data file written by hand: random 28x28 images, 10 classes."""
    rng = np.random.default_rng(0)
    np.savez_compressed(
        path,
        train_images=rng.integers(0, 256, (train, 28, 28), dtype=np.uint8),
        train_labels=rng.integers(0, 10, train),
        test_images=rng.integers(0, 256, (test, 28, 28), dtype=np.uint8),
        test_labels=rng.integers(0, 10, test),
        classes=np.array([str(i) for i in range(10)]),
        source=np.array("hand-made test data"),
    )
    return path


def ratios_in(report: dict) -> list[float]:
    """Every ratio figure (median, p10, p90) in a report's tables."""
    values = []
    for leg in report["legs"].values():
        for table in leg["tables"].values():
            for row in table["rows"]:
                values += [v[k] for v in row.values() if isinstance(v, dict) for k in ("median", "p10", "p90")]
    return values


def reasons(leg: dict) -> dict[str, str]:
    return {s["what"]: s["reason"] for s in leg["skipped"]}


@no_cuda
def test_cpu_fallback_runs_every_leg_and_reports_it(tmp_path, capsys):
    out = tmp_path / "out"
    code = gpu_check.main(["--out", str(out), "--data", str(small_npz(tmp_path / "d.npz"))])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert printed.splitlines()[0].startswith("onnxruntime.get_available_providers(): [")  # printed first
    for stem in ("gpu-check", *gpu_check.LEGS):
        assert (out / f"{stem}.json").is_file() and (out / f"{stem}.md").is_file(), stem
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["schema"] == gpu_check.SCHEMA and report["settings"]["tiny"] is True
    assert report["data"]["real"] is True and "hand-made" in report["data"]["what"]
    legs = report["legs"]
    assert list(legs) == list(gpu_check.LEGS)
    for name, leg in legs.items():  # every leg measured something or says why not
        rows = sum(len(t["rows"]) for t in leg["tables"].values())
        assert leg["status"] in ("measured", "partial", "skipped"), (name, leg["error"])
        assert rows or (leg["skipped"] and all(s["reason"] for s in leg["skipped"])), name

    training = legs["training"]["tables"]["throughput"]["rows"]
    assert {(r["model"], r["role"]) for r in training} == {
        (m, role) for m in ("test_efficientnet", "test_vit") for role in ("plain", "keyed")
    }
    assert all(r["images_per_s"] > 0 and math.isfinite(r["loss_last"]) for r in training)
    assert "CUDA only" in reasons(legs["training"])["test_vit bf16"]

    attacks = legs["attacks"]["tables"]["throughput"]["rows"]
    assert {r["attack"] for r in attacks} == {"pgd-2", "apgd-ce-2"} and {r["device"] for r in attacks} == {"cpu"}
    assert all(r["images_per_s"] > 0 and r["max_perturbation"] <= 16 / 255 + 1e-6 for r in attacks)
    assert "is_available() is False" in reasons(legs["attacks"])["attacks on CUDA"]

    latency = legs["latency"]["tables"]
    forms = {(r["model"], r["artifact"]) for r in latency["artifacts"]["rows"]}
    assert {("test_vit", v) for v in VARIANTS} <= forms  # every form, each keyed one checked against the gather
    assert {("test_resnet", v) for v in VARIANTS if "fold" not in v} <= forms
    assert all(r["p50_ms"] > 0 and r["p90_ms"] >= r["p50_ms"] for r in latency["artifacts"]["rows"])
    assert all(r["max_abs_diff"] < 1e-4 for r in latency["artifacts"]["rows"])  # every form computes the same
    vit = next(r for r in latency["ratios"]["rows"] if r["model"] == "test_vit" and r["batch"] == 1)
    assert all(label in vit for label in ("keyed/plain", "gather/conv", "gather/fold"))
    why = reasons(legs["latency"])
    assert not [w for w, r in why.items() if "Error" in r], why  # a skip is a reason, never a crash of a form
    assert "patchify" in why["test_resnet fold"] and "needs CUDA" in why["mode graphs"]
    assert "--tiny" in why["mode compile"]

    ort = reasons(legs["onnxruntime"])
    assert "lacks CUDAExecutionProvider" in ort["CUDAExecutionProvider"]
    assert "lacks TensorrtExecutionProvider" in ort["TensorrtExecutionProvider"]

    values = ratios_in(report)
    assert len(values) >= 3 * 8 and all(isinstance(v, float) and v > 0 and math.isfinite(v) for v in values)
    markdown = (out / "gpu-check.md").read_text()
    assert "| keyed/plain |" in markdown and "not GPU figures" in markdown and "Not run" in markdown


@no_cuda
def test_cuda_requested_without_cuda_is_a_reason_not_a_failure(tmp_path, capsys):
    out = tmp_path / "out"
    assert gpu_check.main(["--out", str(out), "--device", "cuda"]) == 0
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["data"]["real"] is False and "random tensors" in report["data"]["what"]
    for name in ("training", "attacks", "latency"):
        leg = report["legs"][name]
        assert leg["status"] == "skipped" and "--device cuda" in reasons(leg)[name], leg
    assert report["legs"]["onnxruntime"]["status"] == "skipped"
    assert "legs: training skipped" in capsys.readouterr().out


@no_cuda
def test_a_leg_that_raises_fails_alone(tmp_path, monkeypatch):
    def broken(ctx, leg, budget):
        raise RuntimeError("kernel image not found")

    monkeypatch.setitem(gpu_check.LEG_RUNNERS, "attacks", broken)
    out = tmp_path / "out"
    assert gpu_check.main(["--out", str(out), "--legs", "attacks,onnxruntime"]) == 0
    legs = json.loads((out / "gpu-check.json").read_text())["legs"]
    assert legs["attacks"]["status"] == "failed" and "kernel image not found" in legs["attacks"]["error"]
    assert legs["onnxruntime"]["skipped"] and legs["training"]["skipped"][0]["reason"] == "not selected (--legs)"
    assert "Failed: RuntimeError: kernel image not found" in (out / "attacks.md").read_text()


def _bad_inputs(tmp: Path) -> dict[str, list[str]]:
    (tmp / "file").write_text("x")
    (tmp / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    np.savez(tmp / "foreign.npz", images=np.zeros((2, 28, 28), np.uint8))
    np.savez(
        tmp / "labels.npz",
        train_images=np.zeros((2, 28, 28), np.uint8),
        train_labels=np.array([0, 12]),
        test_images=np.zeros((1, 28, 28), np.uint8),
        test_labels=np.array([0]),
        classes=np.array(["a", "b"]),
    )
    out = str(tmp / "out")
    return {
        "out is a file": ["--out", str(tmp / "file")],
        "no out": [],
        "data missing": ["--out", out, "--data", str(tmp / "missing.npz")],
        "data corrupt": ["--out", out, "--data", str(tmp / "corrupt.npz")],
        "data foreign": ["--out", out, "--data", str(tmp / "foreign.npz")],
        "labels out of range": ["--out", out, "--data", str(tmp / "labels.npz")],
        "unknown leg": ["--out", out, "--legs", "training,warp"],
        "bad batch sizes": ["--out", out, "--batch-sizes", "1,0"],
        "bad budget": ["--out", out, "--budget", "-3"],
        "unknown option": ["--out", out, "--gpus", "8"],
    }


BAD = ("out is a file", "no out", "data missing", "data corrupt", "data foreign", "labels out of range")
BAD += ("unknown leg", "bad batch sizes", "bad budget", "unknown option")


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case):
    code = gpu_check.main(_bad_inputs(tmp_path)[case])
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in captured.err, captured.err
    assert not (tmp_path / "out" / "gpu-check.json").exists()  # nothing ran


@pytest.mark.skipif(not (FASHION_MNIST_DEBIAN / "t10k-labels-idx1-ubyte.gz").is_file(), reason="needs Fashion-MNIST")
def test_write_data_makes_a_small_carryable_npz(tmp_path, capsys):
    path = tmp_path / "sub" / "fm.npz"
    assert gpu_check.main(["--write-data", str(path), "--data-train", "200", "--data-test", "50"]) == 0
    assert f"--data {path}" in capsys.readouterr().out
    data = gpu_check.read_check_data(path)
    assert data.real and data.num_classes == 10 and data.train_images.shape == (200, 28, 28)
    assert len(data.test_labels) == 50 and set(np.unique(data.train_labels)) == set(range(10))  # stratified
    assert path.stat().st_size < 200 * 1024  # the default 2048 + 512 images: about 1.1 MiB


def test_the_nvidia_gpu_profile_matches_what_the_check_runs():
    profile = load_profile(DEVICES_DIR / "nvidia-gpu.toml")
    defaults = gpu_check.Settings.for_device("cuda", tiny=False)
    assert set(profile.batch_sizes) <= set(defaults.batch_sizes)
    torch_runtimes = [r for r in profile.runtimes if r.name == "torch"]
    assert torch_runtimes and all(r.device == "cuda" for r in torch_runtimes)
    gpu_providers = {r.providers[0] for r in profile.runtimes if r.name == "onnxruntime"} - {"CPUExecutionProvider"}
    assert gpu_providers == set(defaults.ort_providers)
    assert "openvino" not in {r.name for r in profile.runtimes}  # not on the GPU image; the check does not run it


def test_the_wrapper_installs_without_a_registry_then_runs_the_check():
    script = ROOT / "benchmarks" / "gpu_check.sh"
    text = script.read_text()
    assert "--no-deps --no-build-isolation -e" in text and "-m keyedge.benchmarks.gpu_check" in text
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: ")


@no_cuda
def test_forms_are_built_before_any_moves_to_the_device():
    """Forms share the source's modules: moving one early moved the source under fold (CUDA weights, CPU indices);
    the meta device shows the same mix without a GPU."""
    leg = gpu_check.Leg("latency")
    forms = gpu_check.latency_forms("test_vit", 32, torch.device("meta"), 0, leg)
    assert set(forms) == set(VARIANTS) and not leg.skipped
    assert all(p.device.type == "meta" for m in forms.values() for p in m.parameters())


def test_a_model_that_cannot_be_built_costs_its_cells_not_the_leg(tmp_path):
    out = tmp_path / "out"
    args = ["--out", str(out), "--legs", "latency", "--models", "no_such_model,test_resnet", "--batch-sizes", "2"]
    assert gpu_check.main(args) == 0
    leg = json.loads((out / "latency.json").read_text())
    assert leg["status"] == "partial" and "unknown model" in reasons(leg)["no_such_model (building its forms)"]
    assert {r["model"] for r in leg["tables"]["artifacts"]["rows"]} == {"test_resnet"}


def test_reports_stay_strict_json_when_a_figure_is_not_finite():
    assert gpu_check.json_safe({"loss": float("nan"), "r": [float("inf"), 1.5], "n": 3}) == {
        "loss": "nan",
        "r": ["inf", 1.5],
        "n": 3,
    }
