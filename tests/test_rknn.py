"""RKNN target (Rockchip NPUs): refusals everywhere; real conversions where ``make rknn-env`` made ``.venv-rknn``.

rknn-toolkit2 runs in its own environment (exporters/rknn_worker.py); a ``.rknn`` runs only on a board, so the
logits are compared with PyTorch in the toolkit's x86 simulator at export time, and the key's permutation is
checked there bit for bit (the float16 prefix up to the conv form's DepthToSpace) and recorded in the file.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from keyedge.defenses import defense_of
from keyedge.errors import DependencyError
from keyedge.exporters import ExportError, ExportOptions, get_backend
from keyedge.exporters import rknn as rk
from keyedge.keys.keyfile import Key
from keyedge.models.backbones import build_model

KEY = Key.from_secret(bytes(range(32)), 4)
SIZE = 32
TOOLKIT = get_backend("rknn").available()  # the environment exists and its toolkit imports
needs_env = pytest.mark.skipif(
    not TOOLKIT[0], reason=f"needs the rknn-toolkit2 environment (make rknn-env): {TOOLKIT[1]}"
)


def _module(fuse: str):
    torch.manual_seed(0)
    model = build_model("test_efficientnet", 10, key=KEY, weights="none", image_size=SIZE).eval()
    return defense_of(model).deployable(model, KEY, fuse).module.eval()


def _calibration(n: int = 8) -> np.ndarray:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3)).numpy()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export (once per module) the conv form at a precision: ``(module, path, report)``."""
    if not TOOLKIT[0]:
        pytest.skip(f"needs the rknn-toolkit2 environment (make rknn-env): {TOOLKIT[1]}")
    root = tmp_path_factory.mktemp("rknn")
    cache: dict[str, tuple] = {}

    def get(precision: str):
        if precision not in cache:
            backend, module = get_backend("rknn"), _module("conv")
            calibration = _calibration()  # fp16 too: its first images are the real probes
            options = ExportOptions(batch=1, image_size=SIZE, precision=precision, calibration=calibration)
            path = root / f"{precision}.rknn"
            assert backend.export(module, path, options) == [path] and path.is_file()
            cache[precision] = (module, path, backend.report)
        return cache[precision]

    return get


# ---- without the environment -----------------------------------------------------------------


def test_registered_with_its_forms_precisions_and_no_runtime_here():
    backend = get_backend("rknn")
    assert (backend.name, backend.suffix, backend.extra) == ("rknn", ".rknn", "rknn")
    assert backend.forms == ("conv",) and backend.auto_form == "conv" and backend.precisions == ("fp16", "int8")
    assert backend.can_run() == (False, rk.RUNS_ON)


def test_a_missing_environment_is_one_line_naming_make_rknn_env(monkeypatch, tmp_path):
    monkeypatch.setenv(rk.ENV_VAR, str(tmp_path / "no-such" / "python"))
    backend = get_backend("rknn")
    ok, reason = backend.available()
    assert not ok and rk.ENV_VAR in reason and "\n" not in reason
    with pytest.raises(DependencyError) as err:
        backend.export(_module("conv"), tmp_path / "m.rknn", ExportOptions(batch=1, image_size=SIZE, precision="fp16"))
    assert err.value.hint == "make rknn-env" and "\n" not in str(err.value)
    assert not (tmp_path / "m.rknn").exists()


def test_fp32_a_dynamic_batch_and_a_gather_are_refused_in_one_line(monkeypatch, tmp_path):
    """Refused before the toolkit is asked: the environment is stood in for (the worker is never run)."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv(rk.ENV_VAR, str(fake))
    monkeypatch.setattr(rk, "_toolkit", lambda: (True, "stood in"))
    backend = get_backend("rknn")
    out = tmp_path / "out"
    out.mkdir()
    for module, options, fragment in (
        (_module("conv"), ExportOptions(batch=1, image_size=SIZE), "does not export fp32: Rockchip NPUs compute"),
        (_module("conv"), ExportOptions(batch=None, image_size=SIZE, precision="fp16"), "fixed input shape"),
        (_module("gather"), ExportOptions(batch=1, image_size=SIZE, precision="fp16"), "no gather op"),
    ):
        with pytest.raises(ExportError, match=fragment) as err:
            backend.export(module, out / "model.rknn", options)
        assert "\n" not in str(err.value) and list(out.iterdir()) == []


def test_loading_a_file_is_refused_in_one_line(tmp_path):
    with pytest.raises(ExportError, match="Rockchip NPU board") as err:
        get_backend("rknn").load(tmp_path / "model.rknn")
    assert "\n" not in str(err.value)


def test_a_file_that_is_not_rknn_is_one_line(tmp_path):
    bad = tmp_path / "model.rknn"
    bad.write_bytes(b"not a model")
    with pytest.raises(ExportError, match="no RKNN header"):
        get_backend("rknn").describe_io(bad)


# ---- with the environment ----------------------------------------------------------------------


@needs_env
def test_fp16_matches_pytorch_in_the_simulator_and_moves_the_keys_pixels_exactly(exported):
    _, path, report = exported("fp16")
    for kind in ("random", "real"):
        assert report["parity"][kind]["passed"] and report["parity"][kind]["top1_agreement"] == 1.0, report
    index = _module("gather").shuffle.index.numpy().reshape(-1)  # the key's index map, as the gather form holds it
    assert report["shuffle"]["exact"] and report["shuffle"]["sha256"] == rk.permutation_sha256(index)
    graph = get_backend("rknn").inspect(path)
    assert graph.gathers_on_input == 0 and graph.ops["DepthToSpace"] == 1 and graph.input_path[0] == "Conv"
    assert any(rk.permutation_sha256(index) in note for note in graph.notes), graph.notes
    io = get_backend("rknn").describe_io(path)
    assert io["inputs"] == [{"name": "image", "shape": [1, 3, SIZE, SIZE], "dtype": "float32"}]
    assert io["outputs"] == [{"name": "logits", "shape": [1, 10], "dtype": "float32"}]
    assert (io["precision"], io["target_platform"]) == ("fp16", "rk3588")


@needs_env
def test_int8_is_calibrated_and_agrees_on_top1(exported):
    _, path, report = exported("int8")
    assert report["parity"]["real"]["top1_agreement"] >= 0.75, report
    assert report["shuffle"]["exact"]
    assert get_backend("rknn").describe_io(path)["precision"] == "int8"
    fp16 = exported("fp16")[1]
    assert path.stat().st_size < fp16.stat().st_size  # int8 weights


@needs_env
def test_a_toolkit_failure_is_one_line_with_its_log(exported, tmp_path, monkeypatch):
    """A build the toolkit refuses (its own error, here a bad platform) is one ExportError; nothing is left."""
    exported("fp16")  # the environment works
    monkeypatch.setattr(rk, "PLATFORM", "rk9999")
    options = ExportOptions(batch=1, image_size=SIZE, precision="fp16")
    with pytest.raises(ExportError, match="rknn-toolkit2 failed") as err:
        get_backend("rknn").export(_module("conv"), tmp_path / "m.rknn", options)
    assert "\n" not in str(err.value) and list(tmp_path.iterdir()) == []


@needs_env
def test_keyedge_export_writes_the_conv_form_and_the_simulators_figures_into_the_manifest(
    small_keyed_checkpoint, tmp_path
):
    """What a user runs: `keyedge export -t rknn` with the default --fuse gather: the conv form instead, said in
    the manifest, and the simulator's parity there (the runtime cannot run here)."""
    import json

    from typer.testing import CliRunner

    from keyedge.cli import app

    checkpoint, key_file = small_keyed_checkpoint
    out = tmp_path / "art"
    args = ["export", "-c", str(checkpoint), "-k", str(key_file), "-t", "rknn", "--precision", "fp16", "-o", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (manifest_path,) = out.glob("*/manifest.json")
    entry = json.loads(manifest_path.read_text())["targets"]["rknn"]
    assert entry["fuse"] == "conv" and entry["form_choice"]["rule"] == "gather"
    parity = entry["parity"]
    assert parity["ran"] is False and "simulator" in parity["reason"]
    simulated = parity["structural"]["simulator"]
    assert simulated["precision"] == "fp16" and simulated["parity"]["random"]["passed"]
    assert simulated["shuffle"]["exact"] and simulated["shuffle"]["pixels"] == 3 * 32 * 32
