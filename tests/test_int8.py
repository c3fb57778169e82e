"""INT8 artifacts (issue 15): the key's shuffle stays exact in every quantized graph, verification by agreement."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from keyedge.cli import app
from keyedge.data.datasets import FASHION_MNIST_DEBIAN
from keyedge.defenses import defense_of
from keyedge.exporters import ExportError, ExportOptions, get_backend
from keyedge.keys.keyfile import Key
from keyedge.models.backbones import build_model

runner = CliRunner()
KEY = Key.from_secret(bytes(range(32)), 4)
needs_fmnist = pytest.mark.skipif(not FASHION_MNIST_DEBIAN.is_dir(), reason="needs Debian's dataset-fashion-mnist")


def _module(name: str, fuse: str):
    torch.manual_seed(0)
    model = build_model(name, 10, key=KEY, weights="none", image_size=32).eval()
    return defense_of(model).deployable(model, KEY, fuse).module


def _int8(tmp_path, target: str, module) -> tuple:
    backend = get_backend(target)
    calibration = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(3)).numpy()
    options = ExportOptions(batch=1, precision="int8", image_size=32, calibration=calibration)
    path = backend.export(module, tmp_path / f"model{backend.suffix}", options)[0]
    return backend, path


def _onnx_shuffle(path):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    ops = [n.op_type for n in model.graph.node]
    gathers = [init[n.input[1]] for n in model.graph.node if n.op_type == "Gather" and init[n.input[1]].size > 1]
    convs = [init.get(n.input[1]) for n in model.graph.node if n.op_type == "Conv"]
    first_q = ops.index("QuantizeLinear")
    shuffle_at = ops.index("Gather") if "Gather" in ops else ops.index("Conv") if convs[0] is not None else None
    return ops, gathers, convs[0], first_q, shuffle_at


def _openvino_shuffle(path):
    import openvino as ov

    model = ov.Core().read_model(str(path))
    ops = list(model.get_ordered_ops())
    types = [op.get_type_name() for op in ops]

    def const(op, i):
        source = op.input(i).get_source_output().get_node()
        return np.array(source.get_data()) if source.get_type_name() == "Constant" else None

    gathers = [const(op, 1) for op in ops if op.get_type_name() == "Gather"]
    conv = next(const(op, 1) for op in ops if op.get_type_name() == "Convolution")
    shuffle_at = types.index("Gather") if "Gather" in types else types.index("Convolution")
    return types, gathers, conv, types.index("FakeQuantize"), shuffle_at


def _coreml_shuffle(path):
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    spec = ct.utils.load_spec(str(path))
    program = load(spec, spec.specificationVersion, str(path / "Data" / "com.apple.CoreML" / "weights"))
    ops = list(program.functions["main"].operations)
    types = [op.op_type for op in ops]
    gathers = [np.asarray(op.indices.val) for op in ops if op.op_type == "gather"]
    convs = [op for op in ops if op.op_type == "conv"]
    conv = None if convs[0].weight.val is None else np.asarray(convs[0].weight.val, dtype=np.float32)
    shuffle_at = types.index("gather") if gathers else types.index("conv")
    return types, gathers, conv, types.index("constexpr_affine_dequantize"), shuffle_at


READERS = {"onnx": _onnx_shuffle, "openvino": _openvino_shuffle, "coreml": _coreml_shuffle}


@pytest.mark.parametrize("target", ["onnx", "openvino", "coreml"])
def test_int8_gather_holds_exactly_the_keys_index_map(tmp_path, target):
    module = _module("test_efficientnet", "gather")
    _, path = _int8(tmp_path, target, module)
    ops, gathers, _, first_quantized, shuffle_at = READERS[target](path)
    assert len(gathers) == 1
    expected = module.shuffle.index.numpy()
    assert gathers[0].dtype.kind == "i" and np.array_equal(gathers[0].astype(np.int64), expected)
    if target != "coreml":  # the shuffle runs in float32 before anything is quantized
        assert shuffle_at < first_quantized, ops[: first_quantized + 1]


@pytest.mark.parametrize("target", ["onnx", "openvino", "coreml"])
def test_int8_conv_form_keeps_its_01_permutation(tmp_path, target):
    module = _module("test_efficientnet", "conv")
    _, path = _int8(tmp_path, target, module)
    _, gathers, conv, first_quantized, shuffle_at = READERS[target](path)
    assert gathers == [] and conv is not None, "the permutation conv's weights must stay float, not quantized"
    assert np.array_equal(conv.reshape(conv.shape[0], -1), module.shuffle.weight.numpy().reshape(conv.shape[0], -1))
    if target != "coreml":
        assert shuffle_at < first_quantized


@pytest.mark.parametrize("fuse", ["gather", "conv"])
def test_coreml_int4_palettizes_the_weights_and_leaves_the_shuffle_exact(tmp_path, fuse):
    """int4 (issue 35): 4-bit lookup tables for the weights; the gather's indices and the permutation conv exact."""
    module = _module("test_efficientnet", fuse)
    backend = get_backend("coreml")
    path = backend.export(
        module, tmp_path / "model.mlpackage", ExportOptions(batch=1, precision="int4", image_size=32)
    )[0]
    assert backend.describe_io(path)["precision"] == "int4"
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    spec = ct.utils.load_spec(str(path))
    program = load(spec, spec.specificationVersion, str(path / "Data" / "com.apple.CoreML" / "weights"))
    ops = list(program.functions["main"].operations)
    types = [op.op_type for op in ops]
    assert "constexpr_lut_to_dense" in types and "constexpr_affine_dequantize" not in types
    gathers = [np.asarray(op.indices.val).astype(np.int64) for op in ops if op.op_type == "gather"]
    if fuse == "gather":
        assert len(gathers) == 1 and np.array_equal(gathers[0], module.shuffle.index.numpy())
    else:  # the first conv's weight is a constant (not a lookup table's output): the 0/1 permutation, exact
        conv = next(op for op in ops if op.op_type == "conv")
        assert gathers == [] and conv.weight.val is not None
        weight = np.asarray(conv.weight.val, dtype=np.float32)
        assert np.array_equal(weight.reshape(len(weight), -1), module.shuffle.weight.numpy().reshape(len(weight), -1))


@pytest.mark.parametrize("target", ["onnx", "openvino"])
def test_int8_fold_has_no_gather_and_quantizes_the_first_layer(tmp_path, target):
    backend, path = _int8(tmp_path, target, _module("test_vit", "fold"))
    assert backend.inspect(path).gathers_on_input == 0  # (the class token's gather is not on the input)
    ops = READERS[target](path)[0]
    assert ops.count("QuantizeLinear" if target == "onnx" else "FakeQuantize") > 0


def test_int8_needs_calibration_images():
    with pytest.raises(ExportError, match="calibration images"):
        ExportOptions(precision="int8", image_size=32)


def _train(tmp_path, name: str = "k") -> tuple:
    key_path = KEY.save(tmp_path / f"{name}.bin")
    out = tmp_path / "runs" / name
    args = ["train", "--model", "test_efficientnet", "--data", "fashion-mnist", "--key-file", str(key_path)]
    args += ["--weights", "none", "--image-size", "32", "--epochs", "1", "--train-limit", "600", "--test-limit", "200"]
    result = runner.invoke(app, [*args, "--batch-size", "32", "--lr", "3e-3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, key_path


@needs_fmnist
def test_int8_export_is_verified_by_agreement_and_a_failure_leaves_nothing(tmp_path):
    from keyedge.benchmarks.latency import BenchSettings, run_latency
    from keyedge.benchmarks.profiles import builtin_profile

    ckpt, key_path = _train(tmp_path)
    out = tmp_path / "art"
    base = ["export", "-c", str(ckpt), "-k", str(key_path), "-t", "onnx", "-t", "openvino", "-o", str(out)]
    assert runner.invoke(app, base).exit_code == 0
    loose = ["--min-agreement", "0", "--max-accuracy-drop", "100"]
    result = runner.invoke(app, [*base, "--precision", "int8", *loose, "--calibration-size", "64"])
    assert result.exit_code == 0, result.output
    fp32_dir, int8_dir = sorted(out.iterdir())  # the int8 set sits beside the fp32 one
    assert int8_dir.name == fp32_dir.name + "-int8"
    manifest = json.loads((int8_dir / "manifest.json").read_text())
    assert manifest["precision"] == "int8"
    assert manifest["verification"]["calibration"]["images"] == 64
    assert "fashion-mnist training images" in manifest["verification"]["calibration"]["source"]
    agreements = []
    for target in ("onnx", "openvino"):
        real = manifest["targets"][target]["parity"]["real"]
        assert real["images"] == 500 and real["accuracy_fp32"] is not None and real["accuracy"] is not None
        assert manifest["targets"][target]["graph"]["gathers_on_input"] == 1
        agreements.append(real["top1_agreement"])
    # the rule is enforced: above the measured agreement, the export refuses and writes nothing
    assert min(agreements) < 1.0
    strict = ["--min-agreement", "1", "--max-accuracy-drop", "100", "--calibration-size", "64"]
    again = runner.invoke(app, [*base, "--precision", "int8", *strict, "--overwrite"])
    assert again.exit_code != 0 and "agrees with the fp32 model" in again.output
    assert sorted(p.name for p in out.iterdir()) == [fp32_dir.name, int8_dir.name]  # no leftovers
    assert json.loads((int8_dir / "manifest.json").read_text()) == manifest  # the earlier set is kept
    # keyedge verify re-runs the agreement rule
    check = runner.invoke(app, ["verify", str(int8_dir), "-k", str(key_path)])
    assert check.exit_code == 0 and "int8 agreement" in check.output, check.output
    # bench latency: int8/fp32 for the same key and target
    settings = BenchSettings(min_seconds=0.05, min_iterations=3, warmup=1, rounds=2, batch_sizes=[1])
    report = run_latency([fp32_dir, int8_dir], builtin_profile(), settings, keys=[KEY])
    kinds = {(c.kind, c.runtime.split(":")[0]) for c in report.comparisons}
    assert {("int8/fp32", "onnxruntime"), ("int8/fp32", "openvino")} <= kinds
    assert any("[int8]" in m.artifact.label for m in report.measurements)
    # OpenVINO's accuracy-aware quantization: validated on held-out training images, recorded; ORT says it has none
    tuned_args = ["--precision", "int8", *loose, "--int8-accuracy-control", "--calibration-size", "64"]
    tuned = runner.invoke(app, [*base, *tuned_args, "--overwrite"])
    assert tuned.exit_code == 0 and "onnx: its quantizer has no accuracy control" in tuned.output, tuned.output
    control = json.loads((int8_dir / "manifest.json").read_text())["verification"]["calibration"]
    assert control["images"] == 64 and "(+300 held out)" in control["source"]
    assert control["accuracy_control"] == {"targets": ["openvino"], "held_out_images": 300, "max_agreement_loss": 1.0}
    notes = " ".join(json.loads((int8_dir / "manifest.json").read_text())["targets"]["openvino"]["graph"]["notes"])
    assert "accuracy control" in notes


def test_int8_bad_input_is_one_line(tmp_path, small_keyed_checkpoint):
    ckpt, key_path = small_keyed_checkpoint
    out = tmp_path / "out"
    args = ["export", "-c", str(ckpt), "-k", str(key_path), "-o", str(out), "--precision"]
    result = runner.invoke(app, [*args, "int8"])  # the checkpoint's data is not here
    assert result.exit_code != 0 and "--calibration-data" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, [*args, "int3"])
    assert result.exit_code != 0 and "unknown precision" in result.output
    result = runner.invoke(app, [*args, "int4"])  # a precision another target offers: the refusal names it
    assert result.exit_code != 0 and "does not export int4: keyedge offers it" in result.output
    assert "-t coreml" in result.output and "\n" not in result.output.split("error: ")[1].rstrip("\n")
    result = runner.invoke(app, [*args, "int8", "--calibration-data", str(tmp_path / "missing")])
    assert result.exit_code != 0 and "cannot be loaded" in result.output
    assert not out.exists()


@pytest.mark.parametrize("target", ["onnx", "openvino"])
def test_int8_keeps_the_first_and_last_layers_float_and_quantizes_between(tmp_path, target):
    """Mixed precision (experiments.int8: it buys agreement): the stem after the shuffle and the classifier
    read float weights, every layer between reads dequantized int8 ones."""
    _, path = _int8(tmp_path, target, _module("test_efficientnet", "gather"))
    if target == "onnx":
        import onnx

        graph = onnx.load(str(path)).graph
        made_by = {out: n.op_type for n in graph.node for out in n.output}
        weighted = [n for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
        fed = [made_by.get(n.input[1], "initializer") for n in weighted]
        quantized = "DequantizeLinear"
    else:
        import openvino as ov

        ops = ov.Core().read_model(str(path)).get_ordered_ops()
        weighted = [op for op in ops if op.get_type_name() in ("Convolution", "GroupConvolution", "MatMul")]

        def int8_behind(node) -> bool:  # int8 Constant -> Convert (-> Subtract) -> Multiply: dequantized weights
            if node.get_type_name() == "Constant":
                return str(node.get_element_type()) in ("<Type: 'int8_t'>", "<Type: 'uint8_t'>")
            return node.get_type_name() in ("Convert", "Subtract", "Multiply") and any(
                int8_behind(i.get_source_output().get_node()) for i in node.inputs()
            )

        quantized = "int8"
        fed = [quantized if int8_behind(op.input(1).get_source_output().get_node()) else "float" for op in weighted]
    assert len(weighted) > 3
    assert fed[0] != quantized and fed[-1] != quantized, fed
    assert all(kind == quantized for kind in fed[1:-1]), fed


def test_accuracy_control_returns_layers_to_float_until_the_held_out_images_agree(tmp_path):
    """NNCF's accuracy-aware quantization with no agreement loss allowed: on its held-out images the int8
    artifact answers exactly as the fp32 model (layers went back to float until it did)."""
    import openvino as ov

    module = _module("test_efficientnet", "gather")
    held = torch.rand(24, 3, 32, 32, generator=torch.Generator().manual_seed(5)).numpy()
    calibration = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(3)).numpy()
    options = ExportOptions(
        batch=1, precision="int8", image_size=32, calibration=calibration, validation=held, max_agreement_loss=0.0
    )
    backend = get_backend("openvino")
    path = backend.export(module, tmp_path / "model.xml", options)[0]
    assert "accuracy control" in str(
        ov.Core().read_model(str(path)).get_rt_info(["keyedge", "quantization"]).astype(str)
    )
    with torch.no_grad():
        want = module(torch.from_numpy(held)).argmax(1).numpy()
    with backend.load(path) as artifact:
        got = np.concatenate([artifact.predict(held[i : i + 1]) for i in range(len(held))]).argmax(1)
    assert (got == want).all()


def test_accuracy_control_is_for_int8_only(tmp_path, small_keyed_checkpoint):
    ckpt, key_path = small_keyed_checkpoint
    args = ["export", "-c", str(ckpt), "-k", str(key_path), "-o", str(tmp_path / "out"), "--int8-accuracy-control"]
    result = runner.invoke(app, args)
    assert result.exit_code != 0 and "add --precision int8" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@needs_fmnist
def test_bf16_export_is_openvinos_verified_by_agreement_and_timed_against_fp32(tmp_path):
    """bf16 (issue 34): the fp32 IR computed in bf16 where the CPU has BF16, checked by the int8 agreement rule;
    on a host without BF16 the manifest says the agreement was measured in f32. Other targets refuse it."""
    from keyedge.benchmarks.latency import BenchSettings, run_latency
    from keyedge.benchmarks.profiles import builtin_profile
    from keyedge.host import computes_bf16

    ckpt, key_path = _train(tmp_path)
    out = tmp_path / "art"
    base = ["export", "-c", str(ckpt), "-k", str(key_path), "-o", str(out)]
    refused = runner.invoke(app, [*base, "-t", "onnx", "--precision", "bf16"])
    assert refused.exit_code != 0 and "does not export bf16" in refused.output and not out.exists()
    assert runner.invoke(app, [*base, "-t", "openvino"]).exit_code == 0
    made = runner.invoke(app, [*base, "-t", "openvino", "--precision", "bf16", "--min-agreement", "0.9"])
    assert made.exit_code == 0, made.output
    fp32_dir, bf16_dir = sorted(out.iterdir())
    assert bf16_dir.name == fp32_dir.name + "-bf16"
    manifest = json.loads((bf16_dir / "manifest.json").read_text())
    assert manifest["precision"] == "bf16" and manifest["verification"]["rule"].startswith("bf16: top-1 agreement")
    computed = manifest["verification"]["computed_in"]
    assert (computed == "bf16") if computes_bf16() else computed.startswith("f32: this host's CPU has no BF16")
    real = manifest["targets"]["openvino"]["parity"]["real"]
    assert real["images"] == 500 and real["top1_agreement"] >= 0.9
    check = runner.invoke(app, ["verify", str(bf16_dir), "-k", str(key_path)])
    assert check.exit_code == 0, check.output
    settings = BenchSettings(min_seconds=0.05, min_iterations=3, warmup=1, rounds=2, batch_sizes=[1])
    report = run_latency([fp32_dir, bf16_dir], builtin_profile(), settings, keys=[KEY])
    assert ("bf16/fp32", "openvino") in {(c.kind, c.runtime.split(":")[0]) for c in report.comparisons}
