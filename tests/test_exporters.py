"""Export backends: real ONNX, OpenVINO and CoreML artifacts of keyed, plain and folded tiny timm models.

Every artifact is produced by the real converter and read back: ONNX and OpenVINO
outputs are compared with PyTorch, CoreML packages are checked structurally (their
prediction test runs on macOS only).  The graph checks pin what the key costs: a
keyed model with the gather has exactly the plain graph plus Reshape -> Gather ->
Reshape on the input; a folded model has exactly the plain backbone's graph, the
same for every key.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from keyedge.deps import EXTRAS
from keyedge.errors import DependencyError, KeyedgeError, OutputError, ShapeError
from keyedge.exporters import ExportError, ExportOptions, get_backend, list_backends, target_of
from keyedge.exporters.coreml import CoreMLBackend
from keyedge.exporters.onnx import OnnxBackend
from keyedge.exporters.openvino import OpenVinoBackend
from keyedge.keys.fold import fold_model
from keyedge.keys.keyfile import Key
from keyedge.models.backbones import KeyedModel, build_model

SIZE = 32
KEY_A = Key.from_secret(bytes(range(32)), 4)
KEY_B = Key.from_secret(bytes(range(100, 132)), 4)
TARGETS = ("onnx", "openvino", "coreml")
RUNNABLE = ("onnx", "openvino")  # CoreML predicts on macOS only
#: The op each target makes of the first step of normalization, (x - mean) / std.
NORM_OP = {"onnx": "Sub", "openvino": "Add", "coreml": "sub"}
#: The ops normalization adds to a graph (what folding absorbs), constants left out.
NORMALIZATION = {"onnx": {"Sub": 1, "Div": 1}, "openvino": {"Add": 1, "Divide": 1}, "coreml": {"sub": 1, "mul": 1}}
FIRST_CONV = {"onnx": "Conv", "openvino": "Convolution", "coreml": "conv"}
CONSTANT_OPS = {"Constant", "const"}
SHAPE_OPS = {"Shape", "ShapeOf", "shape"}


def _build(name: str, key: Key | None) -> KeyedModel:
    torch.manual_seed(0)  # keyed and plain models share the same backbone weights
    return build_model(name, 10, key=key, weights="none", image_size=SIZE).eval()


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    vit = _build("test_vit", KEY_A)
    spec = vit.spec
    fold = lambda key: fold_model(vit.backbone, key, SIZE, mean=spec.mean, std=spec.std).eval()  # noqa: E731
    return {
        "effnet-keyed": _build("test_efficientnet", KEY_A),
        "effnet-plain": _build("test_efficientnet", None),
        "vit-keyed": vit,
        "vit-plain": _build("test_vit", None),
        # folded: raw [0, 1] input straight into the backbone whose patchify conv absorbed shuffle + normalization
        "vit-folded-a": fold(KEY_A),
        "vit-folded-b": fold(KEY_B),
        # the same backbone on raw input, unfolded: the apples-to-apples plain graph for the folded ones
        "vit-raw": vit.backbone,
    }


@pytest.fixture(scope="module")
def export(models, tmp_path_factory):
    """Export (once per module) and return the artifact path."""
    root = tmp_path_factory.mktemp("exports")
    cache: dict[tuple, Path] = {}

    def get(target: str, model: str, batch: int | None = 1, precision: str = "fp32") -> Path:
        key = (target, model, batch, precision)
        if key not in cache:
            backend = get_backend(target)
            path = root / f"{target}-{model}-{batch or 'dyn'}-{precision}{backend.suffix}"
            options = ExportOptions(batch=batch, precision=precision, image_size=SIZE)
            files = backend.export(models[model], path, options)
            assert path in files and all(f.exists() for f in files)
            cache[key] = path
        return cache[key]

    return get


def _images(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((batch, 3, SIZE, SIZE), dtype=np.float32)


def _torch(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def _non_constant(ops: dict[str, int]) -> Counter:
    return Counter({k: v for k, v in ops.items() if k not in CONSTANT_OPS})


# ---- registry and interface ------------------------------------------------------------------


def test_registry_lists_the_targets():
    assert list_backends() == ["onnx", "openvino", "coreml", "litert", "executorch", "mnn", "ncnn", "rknn", "pt2"]
    suffixes = {"onnx": ".onnx", "openvino": ".xml", "coreml": ".mlpackage", "litert": ".tflite", "executorch": ".pte"}
    suffixes |= {"mnn": ".mnn", "ncnn": ".param", "rknn": ".rknn", "pt2": ".pt2"}
    for name in list_backends():
        backend = get_backend(name)
        assert (backend.name, backend.suffix) == (name, suffixes[name])
        assert backend.extra in EXTRAS


def test_an_artifact_file_name_gives_its_target():
    for name in list_backends():
        suffix = get_backend(name).suffix
        assert target_of(f"out/model{suffix}") == name
        assert target_of(Path(f"model{suffix}.sealed")) == name
        assert target_of(f"model{suffix}.sealed", sealed=False) is None
    assert target_of("model.bin") is None and target_of("model.sealed") is None and target_of("model") is None


def test_unknown_target_is_a_keyedge_error():
    with pytest.raises(KeyedgeError) as err:
        get_backend("tflite")
    targets = "onnx, openvino, coreml, litert, executorch, mnn, ncnn, rknn or pt2"
    assert str(err.value) == f"unknown export target 'tflite'; use {targets}"


def test_availability_here():
    for name in ("onnx", "openvino", "coreml"):
        ok, reason = get_backend(name).available()
        assert ok, reason
    assert get_backend("onnx").can_run()[0] and get_backend("openvino").can_run()[0]
    ok, reason = get_backend("coreml").can_run()
    assert ok == (sys.platform == "darwin")
    if not ok:
        assert "macOS" in reason


def test_missing_dependency_names_the_extra(models, tmp_path):
    class Missing(OnnxBackend):
        export_modules = ("keyedge_no_such_converter",)

    backend = Missing()
    ok, reason = backend.available()
    assert not ok and "keyedge_no_such_converter" in reason
    with pytest.raises(DependencyError, match=r"pip install 'keyedge\[onnx\]'"):
        backend.export(models["effnet-plain"], tmp_path / "m.onnx", ExportOptions(image_size=SIZE))
    assert not (tmp_path / "m.onnx").exists()


def test_missing_runtime_names_the_extra(export):
    class NoRuntime(OpenVinoBackend):
        runtime_modules = ("keyedge_no_such_runtime",)

    path = export("openvino", "effnet-keyed")
    assert NoRuntime().inspect(path).gathers_on_input == 1  # reading back needs no runtime here
    with pytest.raises(DependencyError, match=r"pip install 'keyedge\[openvino\]'"):
        NoRuntime().run(path, _images(1))


def test_options_are_validated():
    for bad in (
        {"batch": 0},
        {"precision": "int8"},
        {"image_size": 0},
        {"input_name": "a b"},
        {"input_name": "x", "output_name": "x"},
    ):
        with pytest.raises(ExportError):
            ExportOptions(**bad)
    assert ExportOptions(batch=None).input_shape == (-1, 3, 224, 224)


def test_export_refuses_bad_requests(models, tmp_path):
    backend = get_backend("onnx")
    options = ExportOptions(image_size=SIZE)
    model = models["effnet-plain"]
    with pytest.raises(ExportError, match=r"must end in \.onnx"):
        backend.export(model, tmp_path / "m.xml", options)
    (tmp_path / "taken.onnx").write_bytes(b"")
    with pytest.raises(OutputError, match="already exists"):
        backend.export(model, tmp_path / "taken.onnx", options)
    with pytest.raises(OutputError, match="does not exist"):
        backend.export(model, tmp_path / "no" / "m.onnx", options)
    model.train()
    try:
        with pytest.raises(ExportError, match="training mode"):
            backend.export(model, tmp_path / "m.onnx", options)
    finally:
        model.eval()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.onnx"]


class DataDependent(nn.Module):
    """Control flow on tensor values: tracing freezes one branch, torch.export refuses it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0.5:
            return x.flatten(1)[:, :10]
        return -x.flatten(1)[:, :10]


class RefusesTorchExport(nn.Module):
    """Stands in for a model torch.export cannot capture but a trace reproduces faithfully."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():
            raise RuntimeError("this model cannot go through torch.export")
        return x.mean((2, 3)).repeat(1, 4)[:, :10] * 2.0


@pytest.mark.parametrize("target", TARGETS)
def test_frozen_branch_is_refused_not_exported(tmp_path, target):
    # every path fails: the trace-based one is caught by the probe check, torch.export refuses the branch
    backend = get_backend(target)
    with pytest.raises(ExportError) as err:
        backend.export(DataDependent().eval(), tmp_path / f"m{backend.suffix}", ExportOptions(image_size=SIZE))
    message = str(err.value)
    assert "\n" not in message and f"{target} export failed" in message
    assert "does not reproduce the model" in message, message
    assert list(tmp_path.iterdir()) == []


def test_onnx_falls_back_to_torchscript_and_says_so(tmp_path):
    backend = get_backend("onnx")
    path = tmp_path / "m.onnx"
    assert backend.export(RefusesTorchExport().eval(), path, ExportOptions(batch=None, image_size=SIZE)) == [path]
    assert backend.describe_io(path)["exporter"] == "torchscript"
    notes = backend.inspect(path).notes
    assert any("torchscript exporter" in note and "cannot go through torch.export" in note for note in notes), notes
    x = _images(3)
    assert np.abs(backend.run(path, x) - _torch(RefusesTorchExport().eval(), x)).max() <= 1e-6


def test_two_outputs_are_refused(tmp_path):
    class Two(nn.Module):
        def forward(self, x):
            return x.mean((2, 3)), x.amax((2, 3))

    with pytest.raises(ExportError, match="2 outputs"):
        get_backend("onnx").export(Two().eval(), tmp_path / "m.onnx", ExportOptions(image_size=SIZE))
    assert not (tmp_path / "m.onnx").exists()


def test_converter_chatter_stays_out_of_the_output(models, tmp_path, capfd, recwarn):
    # coremltools draws progress bars on stderr; torch.jit.trace warns (deprecation, TracerWarning)
    for target in ("onnx", "coreml"):
        backend = get_backend(target)
        backend.export(models["effnet-keyed"], tmp_path / f"quiet{backend.suffix}", ExportOptions(image_size=SIZE))
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert [str(w.message) for w in recwarn] == []


# ---- parity: ONNX and OpenVINO against PyTorch ------------------------------------------------


# OpenVINO's dynamic EfficientNet is covered by test_fallback_converters (a fifth OpenVINO export costs ~4 s here)
PARITY = [
    (t, m, b)
    for t in RUNNABLE
    for m in ("effnet-keyed", "vit-keyed")
    for b in (1, None)
    if (t, m, b) != ("openvino", "effnet-keyed", None)
]


@pytest.mark.parametrize("target, model, batch", PARITY, ids=lambda v: "dynamic" if v is None else str(v))
def test_fp32_matches_pytorch(export, models, target, model, batch):
    backend = get_backend(target)
    path = export(target, model, batch)
    io = backend.describe_io(path)
    assert io["inputs"] == [{"name": "image", "shape": [batch or -1, 3, SIZE, SIZE], "dtype": "float32"}]
    assert io["outputs"] == [{"name": "logits", "shape": [batch or -1, 10], "dtype": "float32"}]
    assert io["precision"] == "fp32"
    for n in [1] if batch else [1, 3]:
        x = _images(n, seed=n)
        got, expected = backend.run(path, x), _torch(models[model], x)
        assert got.dtype == np.float32 and got.shape == (n, 10)
        diff = np.abs(got - expected).max()
        assert diff <= 1e-4 and diff <= 1e-3 * np.abs(expected).max(), diff
        assert (got.argmax(1) == expected.argmax(1)).all()


@pytest.mark.parametrize("target", RUNNABLE)
def test_fixed_batch_artifact_refuses_other_batches(export, target):
    with pytest.raises(ShapeError, match="1x3x32x32"):
        get_backend(target).run(export(target, "effnet-keyed"), _images(3))


# ---- graph structure: what the key costs -------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("family", ["effnet", "vit"])
def test_keyed_graph_is_plain_graph_plus_one_gather(export, target, family):
    backend = get_backend(target)
    keyed = backend.inspect(export(target, f"{family}-keyed"))
    plain = backend.inspect(export(target, f"{family}-plain"))
    assert keyed.gathers_on_input == 1
    assert plain.gathers_on_input == 0
    # the input path: flatten, the gather, unflatten, then normalization -- no Transpose chain
    data_path = [op for op in keyed.input_path if op not in SHAPE_OPS]
    assert [op.lower() for op in data_path[:3]] == ["reshape", "gather", "reshape"]
    assert data_path[3:] == [NORM_OP[target]]
    assert [op for op in plain.input_path if op not in SHAPE_OPS] == [NORM_OP[target]]
    # keyed = plain + Reshape, Gather, Reshape (and their constants), nothing else
    added = _non_constant(keyed.ops) - _non_constant(plain.ops)
    assert {k.lower(): v for k, v in added.items()} == {"reshape": 2, "gather": 1}
    assert not _non_constant(plain.ops) - _non_constant(keyed.ops)
    assert keyed.structure != plain.structure


@pytest.mark.parametrize("target", TARGETS)
def test_folded_graph_is_the_plain_backbone_graph_for_every_key(export, target):
    backend = get_backend(target)
    folded_a = backend.inspect(export(target, "vit-folded-a"))
    folded_b = backend.inspect(export(target, "vit-folded-b"))
    raw = backend.inspect(export(target, "vit-raw"))
    plain = backend.inspect(export(target, "vit-plain"))
    assert folded_a.ops == folded_b.ops == raw.ops
    assert folded_a.structure == folded_b.structure == raw.structure  # only the weights differ
    assert folded_a.gathers_on_input == 0
    assert [op for op in folded_a.input_path if op not in SHAPE_OPS] == [FIRST_CONV[target]]
    # the plain keyed-model export = the folded graph + the normalization folding absorbed
    assert _non_constant(plain.ops) - _non_constant(folded_a.ops) == Counter(NORMALIZATION[target])
    assert not _non_constant(folded_a.ops) - _non_constant(plain.ops)
    assert plain.structure != folded_a.structure


@pytest.mark.parametrize("target", RUNNABLE)
def test_folded_artifact_computes_the_keyed_model(export, models, target):
    backend = get_backend(target)
    x = _images(1, seed=7)
    keyed = _torch(models["vit-keyed"], x)
    got_a = backend.run(export(target, "vit-folded-a"), x)
    got_b = backend.run(export(target, "vit-folded-b"), x)
    assert np.abs(got_a - keyed).max() <= 1e-4
    assert np.abs(got_b - keyed).max() > 1e-3, "a folded model for another key must differ"


# ---- fp16 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", RUNNABLE)
def test_fp16_runs_with_float32_io(export, models, target):
    backend = get_backend(target)
    path = export(target, "vit-keyed", None, "fp16")
    io = backend.describe_io(path)
    assert io["precision"] == "fp16"
    assert io["inputs"][0]["dtype"] == io["outputs"][0]["dtype"] == "float32"
    x = _images(3, seed=3)
    got, expected = backend.run(path, x), _torch(models["vit-keyed"], x)
    diff = np.abs(got - expected).max()
    # measured here: ~3e-4 (ONNX) and ~5e-4 (OpenVINO, f16 inference) on outputs of magnitude ~0.4
    assert 1e-6 < diff <= 1e-2 * np.abs(expected).max(), diff
    report = backend.inspect(path)
    assert report.gathers_on_input == 1
    fp32 = backend.inspect(export(target, "vit-keyed", None))
    if target == "onnx":  # half weights, casts at the I/O
        import onnx

        init_types = Counter(i.data_type for i in onnx.load(str(path)).graph.initializer)
        assert init_types[onnx.TensorProto.FLOAT16] > 0 and init_types[onnx.TensorProto.FLOAT] == 0
        assert report.ops.get("Cast", 0) == fp32.ops.get("Cast", 0) + 2
    else:  # compressed weights, decompressed by Convert ops
        assert report.ops.get("Convert", 0) > fp32.ops.get("Convert", 0)


# ---- fallback converters -------------------------------------------------------------------------


FALLBACKS = [
    OnnxBackend(exporters=("torchscript",)),
    OpenVinoBackend(sources=("torch.export",)),
    CoreMLBackend(sources=("torch.export",)),
]


@pytest.mark.parametrize("backend", FALLBACKS, ids=lambda b: b.name)
def test_fallback_converters(models, tmp_path, backend):
    path = tmp_path / f"model{backend.suffix}"
    backend.export(models["effnet-keyed"], path, ExportOptions(batch=None, image_size=SIZE))
    report = backend.inspect(path)
    assert report.gathers_on_input == 1
    assert backend.describe_io(path)["inputs"][0]["shape"] == [-1, 3, SIZE, SIZE]
    if backend.can_run()[0]:
        x = _images(3)
        assert np.abs(backend.run(path, x) - _torch(models["effnet-keyed"], x)).max() <= 1e-4


# ---- CoreML: structure everywhere, prediction on macOS ------------------------------------------


@pytest.mark.parametrize("family", ["effnet", "vit"])
def test_coreml_package_structure(export, family):
    backend = get_backend("coreml")
    path = export("coreml", f"{family}-keyed")
    assert path.is_dir() and (path / "Manifest.json").is_file()
    io = backend.describe_io(path)
    assert io["inputs"] == [{"name": "image", "shape": [1, 3, SIZE, SIZE], "dtype": "float32"}]
    assert io["outputs"] == [{"name": "logits", "shape": [1, 10], "dtype": "float32"}]
    report = backend.inspect(path)
    assert report.ops["gather"] == 1 and report.gathers_on_input == 1
    assert report.ops.get("cast", 0) == 0  # fp32 end to end


def test_coreml_dynamic_batch_and_fp16(export):
    backend = get_backend("coreml")
    dynamic = export("coreml", "vit-keyed", None)
    io = backend.describe_io(dynamic)
    assert io["inputs"][0]["shape"] == [-1, 3, SIZE, SIZE] and io["outputs"][0]["shape"] == [-1, 10]
    assert backend.inspect(dynamic).gathers_on_input == 1  # (a second gather reads the batch size from a shape)
    half = export("coreml", "effnet-keyed", 1, "fp16")
    io = backend.describe_io(half)
    assert io["precision"] == "fp16"
    assert io["inputs"][0]["dtype"] == io["outputs"][0]["dtype"] == "float32"
    report = backend.inspect(half)
    assert report.ops["cast"] == 2 and report.input_path[:2] == ["cast", "reshape"]
    assert report.gathers_on_input == 1


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the refusal off macOS")
def test_coreml_run_refused_off_macos(export):
    with pytest.raises(ExportError, match="only on macOS"):
        get_backend("coreml").run(export("coreml", "effnet-keyed"), _images(1))


@pytest.mark.macos
@pytest.mark.skipif(sys.platform != "darwin", reason="CoreML prediction needs macOS")
@pytest.mark.parametrize("model", ["effnet-keyed", "vit-keyed", "vit-folded-a"])
def test_coreml_matches_pytorch_on_macos(export, models, model):
    backend = get_backend("coreml")
    path = export("coreml", model)
    x = _images(1, seed=11)
    got, expected = backend.run(path, x), _torch(models[model], x)
    assert got.shape == (1, 10)
    assert np.abs(got - expected).max() <= 1e-4
    assert (got.argmax(1) == expected.argmax(1)).all()


# ---- runners: the one way an artifact is opened ---------------------------------------------------------------------


@pytest.mark.parametrize("target", ["onnx", "openvino"])
def test_runner_loads_once_and_predicts_any_number_of_images(models, export, target):
    path = export(target, "effnet-keyed", batch=4)
    x = _images(10)
    with get_backend(target).load(path, threads=1) as runner:
        assert runner.batch == 4 and runner.input_shape == [4, 3, SIZE, SIZE]
        got = runner.predict(x)  # 4 + 4 + 2 (the last chunk padded, the padding dropped)
        assert got.shape == (10, 10)
        np.testing.assert_allclose(got, _torch(models["effnet-keyed"], x), atol=1e-4)
        raw = runner.infer(np.ascontiguousarray(x[:4]))
        np.testing.assert_allclose(runner.logits(raw), got[:4], atol=1e-6)
        info = runner.describe()
        assert info["backend"] == target and info["threads"] == 1 and info["path"] == str(path)
        with pytest.raises(KeyedgeError, match="takes input of shape 4x3"):
            runner(x[:3])


def test_runner_refuses_an_absent_provider_in_one_line(export):
    backend = get_backend("onnx")
    ok, reason = backend.can_run(providers=["TensorrtExecutionProvider"])
    assert not ok and "lacks TensorrtExecutionProvider" in reason
    with pytest.raises(ExportError) as err:
        backend.load(export("onnx", "effnet-keyed"), providers=["TensorrtExecutionProvider"])
    assert "\n" not in str(err.value) and "TensorrtExecutionProvider" in str(err.value)
    ok, reason = get_backend("openvino").can_run(device="NPU")
    assert not ok and "NPU" in reason
