"""LiteRT, ExecuTorch, MNN and ncnn targets (issues 16, 35): real conversions, read back from the files, run here.

Each form of the shuffle is checked in the file itself: the gather form holds exactly one gather
on the input whose indices are the key's index map (LiteRT: ``GATHER_ND`` with int32 indices;
ExecuTorch: ``aten::index_select`` on a portable kernel between XNNPACK delegates; MNN: ``GatherV2``),
the conv form and fold none; ncnn has no gather and runs the conv form, its permutation checked bit for
bit.  Outputs are compared with PyTorch in each runtime, and int8 artifacts keep the shuffle in float32
ahead of the first quantize.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from keyedge.cli import app
from keyedge.data.datasets import FASHION_MNIST_DEBIAN
from keyedge.defenses import defense_of
from keyedge.exporters import ExportError, ExportOptions, get_backend, mnn
from keyedge.exporters import executorch as et
from keyedge.exporters import litert as lt
from keyedge.exporters import ncnn as nc
from keyedge.keys.keyfile import Key
from keyedge.models.backbones import build_model

pytest.importorskip("litert_torch")
pytest.importorskip("executorch")
pytest.importorskip("MNN")
pytest.importorskip("ncnn")

runner = CliRunner()
KEY_A = Key.from_secret(bytes(range(32)), 4)
KEY_B = Key.from_secret(bytes(range(100, 132)), 4)
SIZE = 32
TARGETS = ("litert", "executorch", "mnn")
QUANTIZING = ("litert", "executorch")  # MNN: fp32 and fp16
FORMS = [
    ("test_efficientnet", "gather"),
    ("test_efficientnet", "elements"),
    ("test_efficientnet", "conv"),
    ("test_efficientnet", "planes"),
    ("test_vit", "fold"),
]
READ_INDICES = {"litert": lt.shuffle_indices, "executorch": et.shuffle_indices, "mnn": mnn.shuffle_indices}
needs_fmnist = pytest.mark.skipif(not FASHION_MNIST_DEBIAN.is_dir(), reason="needs Debian's dataset-fashion-mnist")


def _module(name: str, fuse: str, key: Key = KEY_A):
    torch.manual_seed(0)
    model = build_model(name, 10, key=key, weights="none", image_size=SIZE).eval()
    return defense_of(model).deployable(model, key, fuse).module.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export (once per module) a form to a target: ``(module, path)``."""
    root = tmp_path_factory.mktemp("mobile")
    cache: dict[tuple, tuple] = {}

    def get(target: str, name: str, fuse: str, key: Key = KEY_A, precision: str = "fp32"):
        ident = (target, name, fuse, key.fingerprint, precision)
        if ident not in cache:
            backend = get_backend(target)
            module = _module(name, fuse, key)
            calibration = None
            if precision == "int8":  # dynamic-int8, fp16: no calibration
                calibration = torch.rand(16, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3)).numpy()
            options = ExportOptions(batch=1, image_size=SIZE, precision=precision, calibration=calibration)
            path = root / f"{'-'.join(ident)}{backend.suffix}"
            assert backend.export(module, path, options) == backend.planned_outputs(path) and path.is_file()
            cache[ident] = (module, path)
        return cache[ident]

    return get


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize(("name", "fuse"), FORMS)
def test_each_form_reproduces_pytorch_and_holds_the_keys_shuffle(exported, target, name, fuse, check_fp32_artifact):
    module, path = exported(target, name, fuse)
    backend = get_backend(target)
    graph = backend.inspect(path)
    indices = READ_INDICES[target](path)
    if fuse in ("gather", "elements", "planes"):  # planes: the 48 channel planes' order, between pixel moves
        assert graph.gathers_on_input == 1, graph.input_path
        assert indices is not None and np.array_equal(indices.reshape(-1), module.shuffle.index.numpy())
    else:
        assert graph.gathers_on_input == 0 and indices is None, graph.input_path
    check_fp32_artifact(backend, path, module, SIZE)


def test_litert_gather_is_one_gather_nd_with_int32_indices(exported):
    _, path = exported("litert", "test_efficientnet", "gather")
    nodes, interpreter = lt._read_nodes(get_backend("litert"), path)
    gathers = [n for n in nodes if n.type in lt.GATHERS]
    assert [n.type for n in gathers] == ["GATHER_ND"]
    dtypes = {str(t["index"]): np.dtype(t["dtype"]).name for t in interpreter.get_tensor_details()}
    assert dtypes[gathers[0].inputs[1]] == "int32"  # what LiteRT's kernels and GPU delegate take
    assert [n.type for n in nodes[:4]] == ["RESHAPE", "GATHER_ND", "RESHAPE", "SUB"]


def test_executorch_delegates_everything_but_the_gather(exported):
    _, path = exported("executorch", "test_efficientnet", "gather")
    nodes, *_ = et.program_nodes(get_backend("executorch"), path)
    portable = [n.type for n in nodes if not n.type.startswith("XNN")]
    assert portable == ["index_select"]  # XNNPACK has no gather: it runs on the portable kernel, int64 indices
    assert [n.type for n in nodes[:4]] == ["XNNStaticReshape", "index_select", "XNNStaticReshape", "XNNSubtract"]
    _, conv = exported("executorch", "test_efficientnet", "conv")
    assert all(n.type.startswith("XNN") for n in et.program_nodes(get_backend("executorch"), conv)[0])


@pytest.mark.parametrize("target", TARGETS)
def test_folded_models_of_two_keys_have_the_same_graph(exported, target):
    graphs = [get_backend(target).inspect(exported(target, "test_vit", "fold", key)[1]) for key in (KEY_A, KEY_B)]
    assert graphs[0].structure == graphs[1].structure and graphs[0].ops == graphs[1].ops


@pytest.mark.parametrize("target", QUANTIZING)
def test_int4_and_a_dynamic_batch_are_refused_in_one_line(tmp_path, target):
    backend = get_backend(target)
    module = _module("test_efficientnet", "gather")
    for options, fragment in (
        (ExportOptions(batch=1, image_size=SIZE, precision="int4"), "does not export int4: .* -t coreml"),
        (ExportOptions(batch=None, image_size=SIZE), "fixed batch"),
    ):
        with pytest.raises(ExportError, match=fragment) as err:
            backend.export(module, tmp_path / f"m{backend.suffix}", options)
        assert "\n" not in str(err.value) and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", QUANTIZING)
def test_int8_keeps_the_shuffle_in_float_before_the_first_quantize(exported, target):
    module, path = exported(target, "test_efficientnet", "gather", precision="int8")
    backend = get_backend(target)
    assert backend.describe_io(path)["precision"] == "int8"
    assert np.array_equal(READ_INDICES[target](path), module.shuffle.index.numpy())
    if target == "litert":
        nodes, _ = lt._read_nodes(backend, path)
        types = [n.type for n in nodes]
        assert types.index("GATHER_ND") < types.index("QUANTIZE"), types[:8]
    else:
        types = [n.type for n in et.program_nodes(backend, path)[0]]
        assert types.index("index_select") < types.index("XNNConvert"), types[:8]
    with backend.load(path) as run:
        images = np.random.default_rng(2).random((4, 3, SIZE, SIZE), dtype=np.float32)
        assert run.predict(images).shape == (4, 10)


@pytest.mark.parametrize("target", QUANTIZING)
@pytest.mark.parametrize("precision", ["fp16", "dynamic-int8"])
def test_fp16_and_dynamic_int8_keep_the_shuffle_exact_and_follow_pytorch(exported, target, precision):
    """Issue 35's precision modes: the file says its precision, its gather holds the key's indices, ahead of any
    quantized op, and it computes what the module does (to half precision / int8 weights)."""
    module, path = exported(target, "test_efficientnet", "gather", precision=precision)
    backend = get_backend(target)
    assert backend.describe_io(path)["precision"] == precision
    graph = backend.inspect(path)
    assert graph.gathers_on_input == 1 and np.array_equal(READ_INDICES[target](path), module.shuffle.index.numpy())
    if target == "litert":
        types = [n.type for n in lt._read_nodes(backend, path)[0]]
        weights = "DEQUANTIZE" if precision == "fp16" else "FULLY_CONNECTED"
        assert types.index("GATHER_ND") < types.index(weights) and "QUANTIZE" not in types, types[:8]
    else:
        types = [n.type for n in et.program_nodes(backend, path)[0]]
        assert types.index("index_select") < types.index("XNNConv2d")
        if precision == "dynamic-int8":  # activations quantized per call, after the shuffle, inside XNNPACK
            assert types.index("index_select") < types.index("XNNConvert") and "choose_qparams" not in types
    images = np.random.default_rng(2).random((4, 3, SIZE, SIZE), dtype=np.float32)
    with backend.load(path) as run:
        got = run.predict(images)
    with torch.no_grad():
        expected = module(torch.from_numpy(images)).numpy()
    tolerance = (5e-3 if precision == "fp16" else 5e-2) * float(np.abs(expected).max())
    assert np.abs(got - expected).max() <= tolerance


def test_litert_int8_conv_form_keeps_its_01_permutation(exported):
    module, path = exported("litert", "test_efficientnet", "conv", precision="int8")
    nodes, interpreter = lt._read_nodes(get_backend("litert"), path)
    first_conv = next(n for n in nodes if n.type == "CONV_2D")
    weight = lt._weight(interpreter, first_conv)
    assert weight is not None and weight.dtype == np.float32, "the permutation conv must stay float"
    assert np.array_equal(weight[:, :, 0, 0], module.shuffle.weight.numpy()[:, :, 0, 0])
    types = [n.type for n in nodes]
    assert types.index("CONV_2D") < types.index("QUANTIZE")


@needs_fmnist
def test_export_verify_and_time_litert_and_executorch_from_the_cli(tmp_path):
    """What a user runs: train, export to both (verified, in the manifest), int8 by agreement, bench latency."""
    key_path = KEY_A.save(tmp_path / "k1.bin")
    args = ["train", "--model", "test_efficientnet", "--data", "fashion-mnist", "--weights", "none"]
    args += ["--image-size", "32", "--epochs", "1", "--train-limit", "300", "--test-limit", "100"]
    assert runner.invoke(app, [*args, "--key-file", str(key_path), "--out", str(tmp_path / "k1")]).exit_code == 0
    assert runner.invoke(app, [*args, "--out", str(tmp_path / "plain")]).exit_code == 0
    out = tmp_path / "art"
    base = ["export", "-t", "litert", "-t", "executorch", "-t", "mnn", "-t", "ncnn", "-t", "pt2", "-o", str(out)]
    result = runner.invoke(app, [*base, "-c", str(tmp_path / "k1"), "-k", str(key_path)])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, [*base, "-c", str(tmp_path / "plain")]).exit_code == 0
    keyed = out / f"test_efficientnet-{KEY_A.fingerprint}"
    manifest = json.loads((keyed / "manifest.json").read_text())
    assert sorted(manifest["targets"]) == ["executorch", "litert", "mnn", "ncnn", "pt2"]
    ncnn = manifest["targets"]["ncnn"]  # no gather in ncnn: the conv form instead, and the manifest says why
    assert ncnn["fuse"] == "conv" and ncnn["graph"]["gathers_on_input"] == 0
    assert ncnn["form_choice"]["rule"] == "gather" and "does not run the gather form" in ncnn["form_choice"]["reason"]
    for target, entry in manifest["targets"].items():
        assert entry["graph"]["gathers_on_input"] == (target != "ncnn") and entry["source"] == "full-export"
        for kind in ("random", "real"):
            assert entry["parity"][kind]["max_abs_diff"] <= 1e-4
    assert KEY_A.fingerprint in json.dumps(manifest) and bytes(range(32)).hex() not in json.dumps(manifest)

    rule = ["--calibration-size", "64", "--min-agreement", "0", "--max-accuracy-drop", "100"]
    base = base[:5] + base[11:]  # MNN and ncnn: fp32 and fp16; pt2: fp32
    for precision in ("int8", "dynamic-int8"):
        args = [*base, "-c", str(tmp_path / "k1"), "-k", str(key_path), "--precision", precision, *rule]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        quantized = json.loads((out / f"{keyed.name}-{precision}" / "manifest.json").read_text())
        assert quantized["precision"] == precision
        assert {t: e["parity"]["kind"] for t, e in quantized["targets"].items()} == {
            "litert": "agreement",
            "executorch": "agreement",
        }

    report = tmp_path / "latency.json"
    bench = ["bench", "latency", str(keyed), str(out / "test_efficientnet-plain"), "--min-seconds", "0.05"]
    result = runner.invoke(app, [*bench, "--min-iterations", "5", "--batch", "1", "--json", str(report)])
    assert result.exit_code == 0, result.output
    ratios = json.loads(report.read_text())["comparisons"]
    runtimes = {r["runtime"] for r in ratios if r["kind"] == "keyed/plain"}
    assert {"litert:CPU", "executorch:CPU", "mnn:CPU", "ncnn:CPU", "aoti:CPU"} <= runtimes, runtimes


def test_all_targets_take_the_phone_runtimes_when_installed_and_only_at_precisions_they_export():
    from keyedge.cli._flags import expand_targets

    rknn = ["rknn"] if get_backend("rknn").available()[0] else []  # where `make rknn-env` made its converter
    assert expand_targets(["all"]) == ["onnx", "openvino", "coreml", "litert", "executorch", "mnn", "ncnn", "pt2"]
    fp16 = ["onnx", "openvino", "coreml", "litert", "executorch", "mnn", "ncnn", *rknn]
    assert expand_targets(["all"], "fp16") == fp16
    assert expand_targets(["all"], "int8") == ["onnx", "openvino", "coreml", "litert", "executorch", *rknn]
    assert expand_targets(["all"], "dynamic-int8") == ["litert", "executorch"]
    assert expand_targets(["all"], "int4") == ["coreml"]
    assert expand_targets(["pt2", "all"], "int4")[0] == "pt2"  # named: kept, and refused in one line later


def test_mnn_gather_is_the_bare_gather_and_fp16_halves_the_weights(exported, tmp_path):
    """Level-2 optimization leaves Reshape -> GatherV2 -> Reshape (no per-call Shape/Rank/BinaryOp index fix-up);
    fp16 stores half-size weights, keeps the key's indices exact and stays within the fp16 tolerance."""
    module, path = exported("mnn", "test_efficientnet", "gather")
    backend = get_backend("mnn")
    nodes = [n.type for n in mnn._read(backend, path)[0] if n.type not in ("Input", "Const")]
    assert nodes[:4] == ["Reshape", "GatherV2", "Reshape", "SUB"], nodes[:8]
    _, half = exported("mnn", "test_efficientnet", "gather", precision="fp16")
    assert backend.describe_io(half)["precision"] == "fp16"
    assert half.stat().st_size < 0.6 * path.stat().st_size
    assert np.array_equal(mnn.shuffle_indices(half), module.shuffle.index.numpy())
    images = np.random.default_rng(4).random((3, 3, SIZE, SIZE), dtype=np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(images)).numpy()
    with backend.load(half) as run:
        assert np.abs(run.predict(images) - expected).max() <= 1e-2 * max(1.0, float(np.abs(expected).max()))
    for options, fragment in (
        (ExportOptions(batch=None, image_size=SIZE), "fixed batch"),
        (ExportOptions(batch=1, image_size=SIZE, precision="int8", calibration=images), "does not export int8"),
    ):
        with pytest.raises(ExportError, match=fragment) as err:
            backend.export(module, tmp_path / "m.mnn", options)
        assert "\n" not in str(err.value) and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_ncnn_runs_the_conv_form_and_moves_the_keys_pixels_exactly(exported, precision):
    """ncnn has no gather: the key's shuffle is a stride-P 0/1 Convolution + PixelShuffle, run by ncnn up to the
    PixelShuffle it equals the key's shuffle bit for bit (fp16 too: a permutation moves values, it does not round
    them again); the logits match PyTorch within the precision's tolerance."""
    module, path = exported("ncnn", "test_efficientnet", "conv", precision=precision)
    backend = get_backend("ncnn")
    assert nc.weights_of(path).is_file()
    graph = backend.inspect(path)
    layers = [layer[0] for layer in nc.parse_param(path.read_text())]
    assert graph.gathers_on_input == 0 and layers[:3] == ["Input", "Convolution", "PixelShuffle"], layers[:6]
    images = np.random.default_rng(5).random((3, 3, SIZE, SIZE), dtype=np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(images)).numpy()
        shuffled = module.shuffle(torch.from_numpy(images)).numpy()
    half = precision == "fp16"
    for image, want in zip(images, shuffled):  # fp16 storage (ARM) rounds the pixels first; x86 keeps float32
        got = nc.shuffled(path, image)
        assert np.array_equal(got, want) or (half and np.array_equal(got, want.astype(np.float16).astype(np.float32)))
    with backend.load(path, threads=2) as run:
        diff = np.abs(run.predict(images) - expected).max()
    assert diff <= (1e-2 if half else 1e-4) * max(1.0, float(np.abs(expected).max()))
    io = backend.describe_io(path)
    assert io["precision"] == precision and io["inputs"][0]["shape"] == [1, 3, SIZE, SIZE]
    assert io["inputs"][0]["name"] == "image" and io["outputs"] == [
        {"name": "logits", "shape": [1, 10], "dtype": "float32"}
    ]


def test_ncnn_takes_a_vit_through_multihead_attention_folded(exported):
    """timm's attention (5-D qkv, unbind) has no ncnn spelling: the exporter swaps in nn.MultiheadAttention with
    the same weights, pnnx writes ncnn's MultiHeadAttention; the folded ViT matches PyTorch, keys share a graph."""
    module, path = exported("ncnn", "test_vit", "fold")
    backend = get_backend("ncnn")
    graph = backend.inspect(path)
    assert graph.gathers_on_input == 0 and graph.ops.get("MultiHeadAttention", 0) >= 1, graph.ops
    images = np.random.default_rng(7).random((2, 3, SIZE, SIZE), dtype=np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(images)).numpy()
    with backend.load(path, threads=2) as run:
        assert np.abs(run.predict(images) - expected).max() <= 1e-4 * max(1.0, float(np.abs(expected).max()))
    other = backend.inspect(exported("ncnn", "test_vit", "fold", KEY_B)[1])
    assert other.structure == graph.structure


def test_ncnn_param_text_is_parsed_strictly_and_renamed_without_clashes():
    text = "7767517\n3 3\nInput in0 0 1 in0\nConvolution c 1 1 in0 1 0=48\nInnerProduct fc 1 1 1 out0 0=10\n"
    layers = nc.parse_param(text)
    assert [layer[0] for layer in layers] == ["Input", "Convolution", "InnerProduct"]
    renamed = nc.rename_blobs(layers, {"in0": "image", "out0": "logits"}, (3, 32, 32))
    assert renamed.splitlines()[2].split() == ["Input", "image", "0", "1", "image", "0=32", "1=32", "2=3"]
    assert nc.parse_param(renamed)[2][3] == ["logits"]
    with pytest.raises(ExportError, match="already has a blob named '1'"):
        nc.rename_blobs(layers, {"in0": "1"})
    for bad in ("7767518\n0 0\n", text.replace("3 3", "4 3"), text.replace("1 1 in0 1", "1 3 in0 1")):
        with pytest.raises(ValueError):
            nc.parse_param(bad)


def test_ncnn_refuses_in_one_line_what_it_cannot_hold(tmp_path):
    """A gather form (ncnn has none), a batch other than 1, int8: one line each, nothing written."""
    backend = get_backend("ncnn")
    module = _module("test_efficientnet", "gather")
    images = np.random.default_rng(6).random((4, 3, SIZE, SIZE), dtype=np.float32)
    for options, fragment in (
        (ExportOptions(batch=1, image_size=SIZE), "no gather op"),
        (ExportOptions(batch=2, image_size=SIZE), "one image per call"),
        (ExportOptions(batch=1, image_size=SIZE, precision="int8", calibration=images), "does not export int8"),
    ):
        with pytest.raises(ExportError, match=fragment) as err:
            backend.export(module, tmp_path / "model.param", options)
        assert "\n" not in str(err.value) and list(tmp_path.iterdir()) == []


def test_litert_gather_at_a_device_size_is_the_bare_gather(tmp_path):
    """At 224x224 litert-torch leaves index_select's in-bounds mask (REDUCE_ALL + SELECT_V2 per pixel) unfolded:
    the exporter rewrites the gather so the file holds RESHAPE -> GATHER_ND -> RESHAPE and nothing more."""
    torch.manual_seed(0)
    model = build_model("test_efficientnet", 10, key=KEY_A, weights="none", image_size=224).eval()
    module = defense_of(model).deployable(model, KEY_A, "gather").module.eval()
    backend = get_backend("litert")
    path = backend.export(module, tmp_path / "m.tflite", ExportOptions(batch=1, image_size=224))[0]
    types = [n.type for n in lt._read_nodes(backend, path)[0]]
    assert types[:2] == ["RESHAPE", "GATHER_ND"] and not {"SELECT_V2", "REDUCE_ALL"} & set(types), types[:6]
    assert np.array_equal(lt.shuffle_indices(path), module.shuffle.index.numpy())


@pytest.mark.parametrize("target", TARGETS)
def test_a_broken_file_is_a_one_line_error_not_a_crash(exported, tmp_path, target):
    """ExecuTorch's C++ runtime aborts the process on a malformed program: the file is read in Python first."""
    _, good = exported(target, "test_efficientnet", "gather")
    backend = get_backend(target)
    data = good.read_bytes()
    for name, content in (("garbage", np.random.default_rng(0).bytes(1000)), ("truncated", data[: len(data) // 2])):
        path = tmp_path / f"{name}{backend.suffix}"
        path.write_bytes(content)
        for action in (backend.load, backend.inspect):
            with pytest.raises(ExportError, match="cannot read") as err:
                action(path)
            assert "\n" not in str(err.value)


def _every_reader(backend, path):
    def read():  # one thread: ncnn's OpenMP pool, started in the parent, hangs in a forked child
        with backend.load(path, threads=1) as runner:
            runner(np.zeros((1, 3, SIZE, SIZE), np.float32))
        backend.inspect(path)
        backend.describe_io(path)

    return read


def test_a_damaged_program_header_is_refused_not_an_abort(exported, tmp_path, in_child):
    """Issue 33: two bytes of a .pte's magic changed (found by the fuzzer below): Python's reader accepts the
    file, ExecuTorch's C++ runtime called abort() -- `bench latency` died of SIGABRT without a word."""
    _, good = exported("executorch", "test_efficientnet", "gather")
    data = bytearray(good.read_bytes())
    data[4], data[11] = 0x82, ord("\\")
    path = tmp_path / "damaged.pte"
    path.write_bytes(bytes(data))
    assert in_child(_every_reader(get_backend("executorch"), path)) == "refused"


@pytest.mark.parametrize("target", TARGETS)
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_file_reader_fuzz_never_aborts_nor_tracebacks(exported, tmp_path, target, data, in_child):
    """Like the manifest fuzzers, for the phone formats: a damaged .pte / .tflite / .mnn (bytes flipped in the
    header or anywhere, or cut short) is read, run, inspected and described -- or refused in one line; the
    process never dies (each example runs in a forked child) and no other exception escapes."""
    _fuzz(exported, tmp_path, target, data, in_child)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_ncnn_param_fuzz_never_aborts_nor_tracebacks(exported, tmp_path, data, in_child):
    """The same for a damaged ncnn .param (text: fewer examples, each loads ncnn in a probe child first)."""
    _fuzz(exported, tmp_path, "ncnn", data, in_child)


def test_a_forked_probe_of_a_process_whose_openmp_pool_ran_does_not_hang(exported, in_child):
    """The fuzzer above took 6 minutes in the full suite: a forked child (single-threaded, so its probe forks
    too) inherited the parent's libgomp pool from torch's matmuls, and the probe's first parallel region in ncnn
    waited out the 120 s timeout.  The probe now runs one thread."""
    from keyedge.exporters.base import _probe_forked

    _, good = exported("ncnn", "test_efficientnet", "conv")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.randn(256, 256)
        for _ in range(8):
            x = x @ x.T / 256  # torch's OpenMP pool, up in this process
    finally:
        torch.set_num_threads(threads)

    def probe():
        started = time.monotonic()
        status = _probe_forked("ncnn", str(good), 30.0)
        assert status == 0 and time.monotonic() - started < 20, status

    assert in_child(probe) == "ok"


def _fuzz(exported, tmp_path, target, data, in_child):
    _, good = exported(target, "test_efficientnet", "conv" if target == "ncnn" else "gather")
    content = bytearray(good.read_bytes())
    how = data.draw(st.sampled_from(["header", "anywhere", "cut"]))
    if how == "cut":
        content = content[: data.draw(st.integers(0, len(content) - 1))]
    else:
        span = 64 if how == "header" else len(content)
        for _ in range(data.draw(st.integers(1, 6))):
            content[data.draw(st.integers(0, span - 1))] = data.draw(st.integers(0, 255))
    backend = get_backend(target)
    path = tmp_path / f"fuzzed{backend.suffix}"
    path.write_bytes(bytes(content))
    if target == "ncnn":  # the weights beside the damaged .param, intact
        nc.weights_of(path).write_bytes(nc.weights_of(good).read_bytes())
    verdict = in_child(_every_reader(backend, path))
    assert verdict in ("ok", "refused"), (how, verdict)
