"""Shared fixtures: fixed keys (deterministic secrets) and a temporary working directory."""

from __future__ import annotations

import copy

import pytest
from hypothesis import strategies as st

from keyedge.errors import KeyedgeError
from keyedge.keys.keyfile import Key


@pytest.fixture
def key4() -> Key:
    return Key.from_secret(bytes(range(32)), 4)


@pytest.fixture(scope="session")
def small_keyed_checkpoint(tmp_path_factory):
    """A small keyed checkpoint and its key file (test_efficientnet, 32x32, untrained): (directory, key file)."""
    from keyedge.benchmarks.workbench import untrained_checkpoint
    from keyedge.models.backbones import build_model

    root = tmp_path_factory.mktemp("keyed")
    key = Key.from_secret(bytes(range(32)), 4)
    model = build_model("test_efficientnet", 10, key=key, weights="none", image_size=32).eval()
    return untrained_checkpoint(root / "ckpt", model), key.save(root / "k.bin")


@pytest.fixture
def make_key():
    def make(block_size: int, channels: int = 3, tag: int = 7) -> Key:
        return Key.from_secret(bytes([tag]) * 32, block_size, channels)

    return make


# ---- fuzzing readers of JSON documents (manifests, reports) ------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**20), max_value=10**20) | st.floats() | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)


def _paths(node, prefix=()):
    """Every path (tuple of keys / indices) into a JSON document."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _edit(document, path, value, drop):
    doc = copy.deepcopy(document)
    if not path:
        return value
    node = doc
    for step in path[:-1]:
        node = node[step]
    if drop and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return doc


def _fuzz(reader, document: dict, data) -> None:
    """Edit one field anywhere in ``document`` (or drop it); ``reader`` must read it or raise one-line ManifestError."""
    paths = list(_paths(document))
    path = data.draw(st.sampled_from(paths))
    doc = _edit(document, path, data.draw(json_values), data.draw(st.booleans()))
    try:
        reader(doc)
    except KeyedgeError as exc:
        assert "\n" not in str(exc)


@pytest.fixture
def fuzz_document():
    """``fuzz_document(reader, document, data)`` with hypothesis's ``data``: one random edit, read back."""
    return _fuzz


@pytest.fixture
def in_child():
    """``in_child(action)``: run ``action()`` in a forked child and say how it ended (see :func:`_run_in_child`)."""
    return _run_in_child


def _run_in_child(action) -> str:
    """Run ``action()`` in a forked child; return how it ended: ``ok``, ``refused`` (one-line KeyedgeError),
    ``exception <type>`` (anything else: a traceback for a user) or ``signal <name>`` (the process died)."""
    import os
    import signal

    from keyedge.errors import KeyedgeError

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            action()
            verdict = "ok"
        except KeyedgeError as exc:
            verdict = "refused" if "\n" not in str(exc) else f"two lines: {exc!s:.80}"
        except BaseException as exc:
            verdict = f"exception {type(exc).__name__}: {exc!s:.80}"
        os.write(write, verdict.encode())
        os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    said = os.read(read, 1000).decode()
    os.close(read)
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return said


@pytest.fixture
def check_fp32_artifact():
    """``check(backend, path, module, size)``: an fp32 artifact (batch 1, 10 classes) runs like ``module`` to 1e-4 of
    its scale on random images, and describes itself as float32 ``image`` -> ``logits``."""
    return _check_fp32_artifact


def _check_fp32_artifact(backend, path, module, size: int) -> None:
    import numpy as np
    import torch

    images = np.random.default_rng(1).random((3, 3, size, size), dtype=np.float32)
    with backend.load(path, threads=2) as run:
        got = run.predict(images)
    with torch.no_grad():
        expected = module(torch.from_numpy(images)).numpy()
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, float(np.abs(expected).max()))
    io = backend.describe_io(path)
    assert io["inputs"] == [{"name": "image", "shape": [1, 3, size, size], "dtype": "float32"}]
    assert io["outputs"] == [{"name": "logits", "shape": [1, 10], "dtype": "float32"}] and io["precision"] == "fp32"
