"""The block-wise shuffle: the gather equals the 4-step definition, the inverse is exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from keyedge.errors import ShapeError
from keyedge.keys.keyfile import Key
from keyedge.keys.transform import BlockShuffle, HostShuffle, block_index_map, blockwise_shuffle


def four_steps(x: np.ndarray, perm: np.ndarray, p: int) -> np.ndarray:
    """docs/design.md §1 verbatim, with loops: split into blocks, flatten (h, w, c), permute, put back."""
    b, c, h, w = x.shape
    out = np.empty_like(x)
    for n in range(b):
        for bi in range(h // p):
            for bj in range(w // p):
                block = np.empty(c * p * p, dtype=x.dtype)
                for hh in range(p):
                    for ww in range(p):
                        for cc in range(c):
                            block[(hh * p + ww) * c + cc] = x[n, cc, bi * p + hh, bj * p + ww]
                shuffled = block[perm]  # b'[k] = b[v[k]]
                for hh in range(p):
                    for ww in range(p):
                        for cc in range(c):
                            out[n, cc, bi * p + hh, bj * p + ww] = shuffled[(hh * p + ww) * c + cc]
    return out


CASES = [  # (P, C, H, W, B)
    (1, 3, 4, 6, 2),
    (2, 3, 8, 6, 3),
    (4, 3, 16, 12, 2),
    (8, 3, 16, 32, 1),
    (16, 3, 32, 16, 2),
    (4, 1, 8, 8, 2),
    (2, 4, 6, 4, 1),
    (16, 3, 48, 64, 1),
]


@pytest.mark.parametrize("p,c,h,w,b", CASES)
def test_gather_equals_four_step_definition(p, c, h, w, b, make_key):
    key = make_key(p, c)
    x = np.random.default_rng(p * 100 + h).random((b, c, h, w), dtype=np.float32)
    expected = four_steps(x, key.permutation, p)
    assert not np.array_equal(expected, x), "a derangement must change the image"
    shuffle = BlockShuffle.from_key(key, (h, w))
    got = shuffle(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(blockwise_shuffle(x, key.permutation, p), expected)
    np.testing.assert_array_equal(blockwise_shuffle(torch.from_numpy(x), key.permutation, p).numpy(), expected)
    np.testing.assert_array_equal(HostShuffle.from_key(key, (h, w))(x), expected)


@pytest.mark.parametrize("p,c,h,w,b", CASES)
def test_inverse_restores_input_exactly(p, c, h, w, b, make_key):
    key = make_key(p, c, tag=11)
    x = torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(1))
    shuffle = BlockShuffle.from_key(key, (h, w))
    y = shuffle(x)
    assert torch.equal(shuffle.inverse()(y), x)
    assert torch.equal(BlockShuffle.from_key(key, (h, w), inverse=True)(y), x)
    host = HostShuffle.from_key(key, (h, w), inverse=True)
    np.testing.assert_array_equal(host(y.numpy()), x.numpy())
    np.testing.assert_array_equal(blockwise_shuffle(y, key.permutation, p, inverse=True), x)


def test_reference_layout_hwc_within_block():
    """A permutation moving value k to k+1 (cyclic) inside one 2x2 block of 3 channels, checked by hand."""
    p, c = 2, 3
    perm = np.roll(np.arange(12), -1)  # b'[k] = b[k+1]
    x = np.arange(12, dtype=np.int64).reshape(1, c, p, p)  # x[0, c, h, w] = c*4 + h*2 + w
    y = blockwise_shuffle(x, perm, p)
    # position k = (h*2 + w)*3 + c receives block value k+1: at (h=0, w=0, c=0) that is (h=0, w=0, c=1) = 4
    assert y[0, 0, 0, 0] == x[0, 1, 0, 0]
    # (h=0, w=0, c=2) receives k=3 -> (h=0, w=1, c=0)
    assert y[0, 2, 0, 0] == x[0, 0, 0, 1]
    # (h=1, w=1, c=2) is k=11, receives k=0 -> (h=0, w=0, c=0)
    assert y[0, 2, 1, 1] == x[0, 0, 0, 0]


def test_index_map_is_a_permutation(make_key):
    idx = block_index_map(3, 8, 12, 4, make_key(4).permutation)
    assert sorted(idx.tolist()) == list(range(3 * 8 * 12))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8])
def test_gather_is_exact_for_every_dtype(dtype, key4):
    x = (torch.rand(2, 3, 8, 8) * 255).to(dtype)
    shuffle = BlockShuffle.from_key(key4, 8)
    y = shuffle(x)
    assert y.dtype == dtype
    assert torch.equal(shuffle.inverse()(y), x)
    assert torch.equal(torch.sort(y.flatten(1)).values, torch.sort(x.flatten(1)).values)  # values only move


def test_key_never_in_state_dict(key4):
    module = torch.nn.Sequential(BlockShuffle.from_key(key4, 16), torch.nn.Identity())
    assert module.state_dict() == {}
    assert str(key4.permutation[0]) + ", " + str(key4.permutation[1]) not in repr(module)


def test_shape_errors(key4):
    with pytest.raises(ShapeError, match="does not divide its height"):
        BlockShuffle.from_key(key4, (30, 32))
    with pytest.raises(ShapeError, match=r"e\.g\. 28x32"):
        HostShuffle.from_key(key4, (30, 32))
    shuffle = BlockShuffle.from_key(key4, 16)
    with pytest.raises(ShapeError, match=r"expected input of shape \(B, 3, 16, 16\)"):
        shuffle(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ShapeError):
        HostShuffle.from_key(key4, 16)(np.zeros((3, 8, 8)))


def test_host_image_layout_matches_torch(key4):
    img = (np.random.default_rng(0).random((16, 24, 3)) * 255).astype(np.uint8)
    host = HostShuffle.from_key(key4, (16, 24)).image(img)
    torch_out = BlockShuffle.from_key(key4, (16, 24))(torch.from_numpy(img).permute(2, 0, 1)[None].contiguous())
    np.testing.assert_array_equal(host, torch_out[0].permute(1, 2, 0).numpy())


def test_single_gather_in_exported_graph(key4):
    """The module traces to exactly one index_select on the input (the fused-gather contract)."""
    shuffle = BlockShuffle.from_key(key4, 32)
    program = torch.export.export(shuffle, (torch.rand(1, 3, 32, 32),))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert sum("index_select" in t for t in targets) == 1
    assert not any("permute" in t or "transpose" in t or "gather" in t for t in targets), targets


def test_device_move_keeps_index(key4):
    shuffle = BlockShuffle.from_key(key4, 8).to(torch.float64)
    assert shuffle.index.dtype == torch.int64
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    assert torch.equal(shuffle.inverse()(shuffle(x)), x)
    assert Key.from_permutation(key4.permutation, 4).fingerprint == key4.fingerprint


@pytest.mark.parametrize("form", ["conv", "elements", "planes"])
@pytest.mark.parametrize("p", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("size", [(16, 16), (32, 48), (64, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_form_equals_the_gather_bit_for_bit(form, p, size, dtype, make_key):
    from keyedge.defenses.keyed import SHUFFLE_FORMS

    if size[0] % p or size[1] % p:
        pytest.skip("block size does not divide this size")
    key = make_key(p, tag=5)
    x = torch.rand(3, 3, *size, generator=torch.Generator().manual_seed(p)).to(dtype)
    x[0, 0, 0, :4] = torch.tensor([0.0, 1.0, 1e-6, 1 / 3]).to(dtype)  # the ends of [0, 1], a tiny and an inexact one
    gather = BlockShuffle.from_key(key, size)(x)
    other = SHUFFLE_FORMS[form].from_key(key, size)(x)
    assert other.dtype == dtype and torch.equal(other, gather)
    assert torch.equal(SHUFFLE_FORMS[form].from_key(key, size)(x[:1]), gather[:1])  # any batch


def test_conv_form_is_one_strided_selection_conv(key4):
    """Space-to-depth and the permutation in one stride-P conv: each output channel picks one block element."""
    from keyedge.exporters.graph import is_permutation_matrix
    from keyedge.keys.transform import BlockShuffleConv, conv_permutation_matrix

    module = BlockShuffleConv.from_key(key4, 16)
    weight = module.weight.numpy()
    assert weight.shape == (48, 3, 4, 4) and is_permutation_matrix(weight)
    assert np.array_equal(weight.reshape(48, 48), conv_permutation_matrix(key4.permutation, 4))
    assert is_permutation_matrix(weight.reshape(48, 48, 1, 1))  # the 1x1 form after space-to-depth, as before
    broken = weight.copy()
    broken[0, 0, 0, 0] = 1 - broken[0, 0, 0, 0]  # one element picked twice (or not at all)
    assert not is_permutation_matrix(broken) and not is_permutation_matrix(weight * 0.5)
    assert not is_permutation_matrix(np.ones((3, 3, 3, 3), np.float32))  # a real 3x3 conv


@pytest.mark.parametrize("form", ["conv", "elements", "planes"])
def test_every_form_hides_key_and_checks_shape(key4, form):
    from keyedge.defenses.keyed import SHUFFLE_FORMS

    module = SHUFFLE_FORMS[form].from_key(key4, 16)
    assert module.state_dict() == {}
    assert str(key4.permutation[:8])[1:-1] not in repr(module)
    with pytest.raises(ShapeError):
        module(torch.zeros(1, 3, 8, 8))
