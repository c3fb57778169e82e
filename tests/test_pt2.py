"""The torch.export / AOTInductor target (issue 35): real compilations, read back from the package, run here.

The package holds the ExportedProgram beside the compiled library, so the graph is read back from the
file: the gather form is one ``index_select`` on the flattened input whose indices are the key's, the
conv form a stride-P ``conv2d`` with a 0/1 permutation weight, fold no gather.  The compiled library
carries no weights: it runs on the program's, so the index map read back is the one that runs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyedge.defenses import defense_of
from keyedge.exporters import ExportError, ExportOptions, get_backend, pt2
from keyedge.exporters.graph import is_permutation_matrix
from keyedge.keys.keyfile import Key
from keyedge.models.backbones import build_model

KEY_A = Key.from_secret(bytes(range(32)), 4)
KEY_B = Key.from_secret(bytes(range(100, 132)), 4)
SIZE = 32
backend = get_backend("pt2")
pytestmark = pytest.mark.skipif(not backend.available()[0], reason=backend.available()[1])


def _module(name: str, fuse: str, key: Key = KEY_A):
    torch.manual_seed(0)
    model = build_model(name, 10, key=key, weights="none", image_size=SIZE).eval()
    return defense_of(model).deployable(model, key, fuse).module.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export (once per module) a form: ``(module, path)``."""
    root = tmp_path_factory.mktemp("pt2")
    cache: dict[tuple, tuple] = {}

    def get(name: str, fuse: str, key: Key = KEY_A):
        ident = (name, fuse, key.fingerprint)
        if ident not in cache:
            module = _module(name, fuse, key)
            path = root / f"{'-'.join(ident)}.pt2"
            assert backend.export(module, path, ExportOptions(batch=1, image_size=SIZE)) == [path]
            cache[ident] = (module, path)
        return cache[ident]

    return get


@pytest.mark.parametrize(
    ("name", "fuse"), [("test_efficientnet", "gather"), ("test_efficientnet", "conv"), ("test_vit", "fold")]
)
def test_each_form_reproduces_pytorch_and_the_package_holds_the_keys_shuffle(exported, name, fuse, check_fp32_artifact):
    module, path = exported(name, fuse)
    graph = backend.inspect(path)
    prefix = [n.type for n in pt2.shuffle_prefix(path)]
    indices = pt2.shuffle_indices(path)
    if fuse == "gather":
        assert graph.gathers_on_input == 1 and prefix == ["flatten", "index_select", "view"], graph.input_path
        assert np.array_equal(indices, module.shuffle.index.numpy())
    else:
        assert graph.gathers_on_input == 0 and indices is None, graph.input_path
    if fuse == "conv":  # the stride-P conv's weight, read from the file, is the key's 0/1 permutation
        assert prefix == ["conv2d", "pixel_shuffle"]
        conv = pt2.shuffle_prefix(path)[0]
        weight = pt2.conv_weight(path, conv)
        assert is_permutation_matrix(weight) and np.array_equal(weight, module.shuffle.weight.numpy())
    if fuse == "fold":
        assert prefix == []
    check_fp32_artifact(backend, path, module, SIZE)


def test_two_keys_compile_to_one_graph_with_different_indices(exported):
    """The key lives in a constant: the graph (and so the compiled code's structure) is the same for every key."""
    (_, a), (module_b, b) = (
        exported("test_efficientnet", "gather"),
        exported("test_efficientnet", "gather", KEY_B),
    )
    assert backend.inspect(a).structure == backend.inspect(b).structure
    assert not np.array_equal(pt2.shuffle_indices(a), pt2.shuffle_indices(b))
    assert np.array_equal(pt2.shuffle_indices(b), module_b.shuffle.index.numpy())


def test_the_weights_are_stored_once_in_the_program_not_in_the_library(exported, in_child):
    """The compiled library alone holds no weights (run without the program's, it dies); keyedge's runner
    loads every one it asks for from the program, which is what the read-back checks."""
    from torch.export.pt2_archive._package import load_pt2

    _, path = exported("test_efficientnet", "gather")

    def bare():
        load_pt2(str(path)).aoti_runners["model"](torch.rand(1, 3, SIZE, SIZE))

    assert in_child(bare).startswith("signal")
    program = torch.export.load(str(path))
    assert set(program.state_dict) | set(program.constants) >= {"shuffle.index", "backbone.conv_stem.weight"}


def test_what_a_package_cannot_hold_is_refused_in_one_line(tmp_path, monkeypatch):
    module = _module("test_efficientnet", "gather")
    for options, fragment in (
        (ExportOptions(batch=1, image_size=SIZE, precision="fp16"), "does not export fp16"),
        (ExportOptions(batch=None, image_size=SIZE), "one batch size"),
    ):
        with pytest.raises(ExportError, match=fragment) as err:
            backend.export(module, tmp_path / "m.pt2", options)
        assert "\n" not in str(err.value) and list(tmp_path.iterdir()) == []
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    ok, why = backend.available()
    assert not ok and "C++ compiler" in why


def test_a_broken_package_is_a_one_line_error(exported, tmp_path):
    _, good = exported("test_efficientnet", "gather")
    data = good.read_bytes()
    for name, content in (("garbage", np.random.default_rng(0).bytes(1000)), ("truncated", data[: len(data) // 2])):
        path = tmp_path / f"{name}.pt2"
        path.write_bytes(content)
        for action in (backend.load, backend.inspect, backend.describe_io):
            with pytest.raises(ExportError, match="cannot") as err:
                action(path)
            assert "\n" not in str(err.value)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_package_fuzz_never_aborts_nor_tracebacks(exported, tmp_path, data, in_child):
    """A damaged package (bytes flipped, or cut short) is read, run and inspected -- or refused in one line;
    the process never dies (each example runs in a forked child)."""

    def read():  # one thread: an OpenMP pool started in the parent hangs in a forked child (and its probe fork)
        torch.set_num_threads(1)
        with backend.load(path, threads=1) as runner:
            runner(np.zeros((1, 3, SIZE, SIZE), np.float32))
        backend.inspect(path)
        backend.describe_io(path)

    _, good = exported("test_efficientnet", "gather")
    content = bytearray(good.read_bytes())
    if data.draw(st.booleans()):
        content = content[: data.draw(st.integers(0, len(content) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 6))):
            content[data.draw(st.integers(0, len(content) - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path / "fuzzed.pt2"
    path.write_bytes(bytes(content))
    assert in_child(read) in ("ok", "refused")


def test_a_fleet_compiles_once_and_writes_each_keys_program_beside_that_library(tmp_path, make_key):
    """Fleets: the library holds no weights, so keys of one architecture share it; each key's package is
    verified, holds its own indices, and its library is byte for byte the first key's."""
    import json
    import zipfile

    from test_export import make_checkpoint

    from keyedge.deploy.export import ExportRequest, ExportSettings, export_many
    from keyedge.keys.transform import block_index_map

    requests = []
    for tag in (1, 2):
        key = make_key(4, tag=tag)
        requests.append(ExportRequest(make_checkpoint(tmp_path / f"k{tag}", "test_efficientnet", key, seed=tag), key))
    directories = export_many(requests, ExportSettings(targets=["pt2"], out=tmp_path / "fleet"))
    manifests = [json.loads((d / "manifest.json").read_text()) for d in directories]
    assert [m["targets"]["pt2"]["source"] for m in manifests] == ["fleet-template", "fleet-template"]
    assert all(m["targets"]["pt2"]["parity"]["passed"] for m in manifests)
    packages = [d / "model.pt2" for d in directories]
    libraries = [{n: z.read(n) for n in z.namelist() if n.endswith(".so")} for z in map(zipfile.ZipFile, packages)]
    assert list(libraries[0].values()) == list(libraries[1].values())
    indices = [pt2.shuffle_indices(p) for p in packages]
    assert not np.array_equal(indices[0], indices[1])
    for request, found in zip(requests, indices):
        assert np.array_equal(found, block_index_map(3, SIZE, SIZE, 4, request.key.permutation))
