"""The key-based block-wise pixel shuffle (docs/design.md §1), exact and fast.

The transform splits a (B, C, H, W) image into non-overlapping PxP blocks
(row-major over the block grid), flattens each block in (height, width,
channel) order -- element (h, w, c) of a block has index ``(h*P + w)*C + c``,
the layout of the authors' reference code -- permutes every block vector with
the key's permutation ``v`` (``b'[k] = b[v[k]]``) and puts the blocks back.

As a whole it is one fixed permutation of the C*H*W values of an image, so it
runs as a single gather with a constant index vector (:func:`block_index_map`):

* :class:`BlockShuffle` -- a torch module doing one ``index_select`` (exports
  as one Gather op; its inverse with ``inverse=True``);
* :class:`BlockShuffleElements` -- the same gather with a per-element index
  (``torch.gather``: one GatherElements op), which ONNX Runtime runs ~4x faster
  than its Gather over single elements;
* :class:`BlockShuffleConv` -- the same permutation as one strided 0/1 convolution
  (space-to-depth and the permutation at once) and depth-to-space, for accelerators
  without a fast gather;
* :class:`HostShuffle` -- the same gather in numpy, for host-side use;
* :func:`blockwise_shuffle` -- the literal reshape/permute chain, the readable
  definition, kept for tests and the benchmark.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from keyedge.errors import ShapeError

if TYPE_CHECKING:
    from keyedge.keys.keyfile import Key


def check_divisible(height: int, width: int, block_size: int, what: str = "image") -> None:
    """Raise :class:`ShapeError` unless ``block_size`` divides both sides of the image."""
    if block_size < 1:
        raise ShapeError(f"block size must be positive, got {block_size}")
    if height % block_size or width % block_size:
        side = "height" if height % block_size else "width"
        fit_h, fit_w = height - height % block_size, width - width % block_size
        if fit_h and fit_w:
            hint = f"crop or resize it to a multiple of {block_size}, e.g. {fit_h}x{fit_w}"
        else:  # smaller than one block: cropping cannot help
            up_h, up_w = -(-height // block_size) * block_size, -(-width // block_size) * block_size
            hint = f"resize or pad it to a multiple of {block_size}, e.g. {up_h}x{up_w}"
        raise ShapeError(f"{what} is {height}x{width} (HxW): block size {block_size} does not divide its {side}", hint)


def _permute_axes(x: Any, axes: Sequence[int]) -> Any:
    return x.permute(*axes) if isinstance(x, torch.Tensor) else np.transpose(x, axes)


def blockwise_shuffle(
    x: Any, permutation: Sequence[int] | np.ndarray, block_size: int, *, inverse: bool = False
) -> Any:
    """The transform written as its definition: a reshape/permute chain on (B, C, H, W).

    Works on numpy arrays and torch tensors.  Slower than the gather; kept as the
    readable reference for tests and as the baseline in ``benchmarks/transform.py``.
    """
    b, c, h, w = x.shape
    p = block_size
    check_divisible(h, w, p)
    perm = np.asarray(permutation, dtype=np.int64)
    if perm.shape != (c * p * p,):
        raise ShapeError(f"the permutation has {perm.size} entries, a {p}x{p} block of {c} channels has {c * p * p}")
    if inverse:
        perm = np.argsort(perm)
    if isinstance(x, torch.Tensor):
        perm = torch.from_numpy(perm).to(x.device)
    blocks = _permute_axes(x, (0, 2, 3, 1))  # NHWC
    blocks = blocks.reshape(b, h // p, p, w // p, p, c)
    blocks = _permute_axes(blocks, (0, 1, 3, 2, 4, 5)).reshape(b, h // p, w // p, p * p * c)
    blocks = blocks[..., perm]  # b'[k] = b[v[k]]
    blocks = _permute_axes(blocks.reshape(b, h // p, w // p, p, p, c), (0, 1, 3, 2, 4, 5))
    return _permute_axes(blocks.reshape(b, h, w, c), (0, 3, 1, 2))


def block_index_map(
    channels: int,
    height: int,
    width: int,
    block_size: int,
    permutation: Sequence[int] | np.ndarray,
    *,
    inverse: bool = False,
) -> np.ndarray:
    """Gather indices of the whole transform: ``out.flat[i] = x.flat[idx[i]]`` per (C, H, W) image."""
    ids = np.arange(channels * height * width, dtype=np.int64).reshape(1, channels, height, width)
    return np.ascontiguousarray(blockwise_shuffle(ids, permutation, block_size, inverse=inverse).reshape(-1))


def _image_spec(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, (int, np.integer)):
        return int(image_size), int(image_size)
    height, width = (int(v) for v in image_size)
    return height, width


def _check_input(x: torch.Tensor, shape: tuple[int, int, int]) -> None:
    """Raise :class:`ShapeError` unless ``x`` is (B, C, H, W) of the (C, H, W) a shuffle module was built for."""
    if x.dim() != 4 or tuple(x.shape[1:]) != shape:
        raise ShapeError(
            f"expected input of shape (B, {', '.join(map(str, shape))}), got {tuple(x.shape)}",
            "resize the input to the size the key transform was built for",
        )


class BlockShuffle(nn.Module):
    """The key's block-wise shuffle (or its inverse) as one ``index_select`` gather.

    Takes (B, C, H, W) tensors of the fixed size it was built for.  The index
    vector is a non-persistent buffer: it moves with ``.to(device)`` and is baked
    into traced/exported graphs, but never lands in a ``state_dict`` -- a model
    checkpoint does not carry the key.

    Example::

        shuffle = BlockShuffle.from_key(load_key("k1.bin"), image_size=224)
        y = shuffle(x)                       # x: (B, 3, 224, 224) in [0, 1]
        x_again = shuffle.inverse()(y)
    """

    index: torch.Tensor

    def __init__(
        self,
        permutation: Sequence[int] | np.ndarray,
        block_size: int,
        image_size: int | Sequence[int],
        channels: int = 3,
        *,
        inverse: bool = False,
    ):
        super().__init__()
        height, width = _image_spec(image_size)
        check_divisible(height, width, block_size)
        self._perm = np.asarray(permutation, dtype=np.int64).copy()
        self.block_size = int(block_size)
        self.shape = (int(channels), height, width)
        self.is_inverse = inverse
        idx = block_index_map(channels, height, width, block_size, self._perm, inverse=inverse)
        self.register_buffer("index", torch.from_numpy(idx), persistent=False)

    @classmethod
    def from_key(cls, key: Key, image_size: int | Sequence[int], *, inverse: bool = False) -> BlockShuffle:
        return cls(key.permutation, key.block_size, image_size, key.channels, inverse=inverse)

    def inverse(self) -> BlockShuffle:
        """The module undoing this one, exactly."""
        return BlockShuffle(self._perm, self.block_size, self.shape[1:], self.shape[0], inverse=not self.is_inverse).to(
            self.index.device
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.shape)
        # index_select + view: exports as exactly one Gather (docs/design.md §6), unlike x[:, idx].
        return torch.index_select(x.flatten(1), 1, self.index).view(x.shape)

    def extra_repr(self) -> str:  # never the permutation
        c, h, w = self.shape
        return f"block_size={self.block_size}, shape=({c}, {h}, {w}), inverse={self.is_inverse}"


def conv_permutation_matrix(permutation: Sequence[int] | np.ndarray, block_size: int, channels: int = 3) -> np.ndarray:
    """The 0/1 matrix ``M`` (n x n, n = C*P*P) applying the key in ``pixel_unshuffle``'s channel order.

    ``pixel_unshuffle`` puts element (c, i, j) of a block in channel ``c*P*P + i*P + j``;
    the key's block layout (docs/design.md §1) indexes it ``(i*P + j)*C + c``.  Output channel
    of position k takes the input channel of position ``v[k]``: ``M[out, in] = 1``.
    """
    p, c = block_size, channels
    k = np.arange(c * p * p)
    i, j, ch = (k // c) // p, (k // c) % p, k % c  # decode the key layout (h, w, c)
    to_unshuffled = ch * p * p + i * p + j  # the same element's pixel_unshuffle channel
    matrix = np.zeros((c * p * p, c * p * p), dtype=np.float32)
    matrix[to_unshuffled, to_unshuffled[np.asarray(permutation, dtype=np.int64)]] = 1.0
    return matrix


def conv_selection_weight(permutation: Sequence[int] | np.ndarray, block_size: int, channels: int = 3) -> np.ndarray:
    """The (n, C, P, P) 0/1 weight of a stride-P convolution doing space-to-depth and the key at once (n = C*P*P).

    Output channel ``o`` (in ``pixel_shuffle``'s order, :func:`conv_permutation_matrix`) picks one element of
    each block: flattened over (C, P, P), the weight is that permutation matrix.
    """
    p, c = block_size, channels
    return conv_permutation_matrix(permutation, p, c).reshape(c * p * p, c, p, p)


class BlockShuffleElements(BlockShuffle):
    """The same gather written per element (``torch.gather``, ONNX GatherElements) instead of ``index_select``.

    One index per output value, as :class:`BlockShuffle` has; only the op differs.  ONNX Runtime copies a
    Gather's selected slices one ``memcpy`` each -- 150,528 single floats at 224x224 -- but runs GatherElements
    as a typed loop: the shuffle alone takes about a quarter of the time (``benchmarks/experiments/forms.py``).
    The index is expanded to the batch (a constant of the artifact's fixed batch after constant folding).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.shape)
        flat = x.flatten(1)
        return torch.gather(flat, 1, self.index.expand(flat.shape[0], -1)).view(x.shape)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", op=gather_elements"


class _BlockForm(nn.Module):
    """A shuffle form that works on whole PxP blocks (space-to-depth): shape checks, ``from_key``, a key-free repr.

    A subclass registers its key-derived buffer in :meth:`_register` (non-persistent: it is the key, and never
    lands in a state dict) and names itself in ``formulation``.
    """

    formulation: str = ""

    def __init__(
        self,
        permutation: Sequence[int] | np.ndarray,
        block_size: int,
        image_size: int | Sequence[int],
        channels: int = 3,
    ):
        super().__init__()
        height, width = _image_spec(image_size)
        check_divisible(height, width, block_size)
        self.block_size = int(block_size)
        self.shape = (int(channels), height, width)
        self._register(permutation, self.block_size, self.shape[0])

    def _register(self, permutation: Sequence[int] | np.ndarray, block_size: int, channels: int) -> None:
        raise NotImplementedError

    @classmethod
    def from_key(cls, key: Key, image_size: int | Sequence[int]):
        return cls(key.permutation, key.block_size, image_size, key.channels)

    def extra_repr(self) -> str:  # never the permutation
        c, h, w = self.shape
        return f"block_size={self.block_size}, shape=({c}, {h}, {w}), formulation={self.formulation}"


class BlockShuffleConv(_BlockForm):
    """The same shuffle as one strided 0/1 convolution and depth-to-space.

    ``pixel_shuffle(conv2d(x, W, stride=P), P)`` with ``W`` (:func:`conv_selection_weight`) picking, for each
    output channel, one element of each PxP block: space-to-depth and the key's permutation in one op, with no
    transpose (a 1x1 convolution after ``pixel_unshuffle`` needs one, which cost ONNX Runtime more than the
    gather).  Every output is exactly one input times 1 plus zeros, so it equals :class:`BlockShuffle` bit for
    bit in fp32 and fp16, using only operations accelerators run natively (CoreML's Neural Engine runs no
    gather).  The weight is a non-persistent buffer: it is the key, and never lands in a state dict.
    """

    weight: torch.Tensor
    formulation = "strided_selection_conv+depth_to_space"

    def _register(self, permutation: Sequence[int] | np.ndarray, block_size: int, channels: int) -> None:
        weight = conv_selection_weight(permutation, block_size, channels)
        self.register_buffer("weight", torch.from_numpy(weight), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.shape)
        blocks = nn.functional.conv2d(x, self.weight.to(x.dtype), stride=self.block_size)
        return nn.functional.pixel_shuffle(blocks, self.block_size)


class BlockShufflePlanes(_BlockForm):
    """The same shuffle as space-to-depth, a gather of whole channel planes, and depth-to-space.

    ``pixel_unshuffle`` puts element (c, i, j) of every PxP block in channel ``c*P*P + i*P + j`` -- one
    (H/P, W/P) plane per position of the block -- so the key, one permutation of each block's C*P*P values,
    is a permutation of those C*P*P planes: ``index_select`` on the channel axis with C*P*P indices
    (:func:`conv_permutation_matrix`'s, as an index), each copying one contiguous plane, then ``pixel_shuffle``.
    Where a runtime moves pixels fast but gathers single elements slowly (LiteRT's GATHER_ND, ExecuTorch's
    portable ``index_select``: XNNPACK runs the two pixel moves, the gather copies 48 planes instead of
    150,528 floats at 224x224) this is the fastest exact form (``benchmarks/experiments/forms.py``).  Pure
    data movement: bit for bit :class:`BlockShuffle` in any dtype.  The index is a non-persistent buffer.
    """

    index: torch.Tensor
    formulation = "space_to_depth+plane_gather"

    def _register(self, permutation: Sequence[int] | np.ndarray, block_size: int, channels: int) -> None:
        planes = conv_permutation_matrix(permutation, block_size, channels).argmax(axis=1)  # out plane <- in plane
        self.register_buffer("index", torch.from_numpy(planes.astype(np.int64)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.shape)
        planes = nn.functional.pixel_unshuffle(x, self.block_size)
        return nn.functional.pixel_shuffle(torch.index_select(planes, 1, self.index), self.block_size)


class HostShuffle:
    """The same gather in numpy, for host-side preprocessing (any dtype, no torch tensors).

    ``__call__`` takes (..., C, H, W) arrays; :meth:`image` takes one (H, W, C) image,
    the layout image libraries use.
    """

    def __init__(
        self,
        permutation: Sequence[int] | np.ndarray,
        block_size: int,
        image_size: int | Sequence[int],
        channels: int = 3,
        *,
        inverse: bool = False,
    ):
        height, width = _image_spec(image_size)
        check_divisible(height, width, block_size)
        self.shape = (int(channels), height, width)
        self.block_size = int(block_size)
        self.index = block_index_map(channels, height, width, block_size, permutation, inverse=inverse)

    @classmethod
    def from_key(cls, key: Key, image_size: int | Sequence[int], *, inverse: bool = False) -> HostShuffle:
        return cls(key.permutation, key.block_size, image_size, key.channels, inverse=inverse)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.ndim < 3 or tuple(x.shape[-3:]) != self.shape:
            raise ShapeError(f"expected an array of shape (..., {', '.join(map(str, self.shape))}), got {x.shape}")
        flat = x.reshape(*x.shape[:-3], -1)
        return np.take(flat, self.index, axis=-1).reshape(x.shape)

    def image(self, img: np.ndarray) -> np.ndarray:
        """Shuffle one (H, W, C) image, returning (H, W, C)."""
        return np.ascontiguousarray(self(np.ascontiguousarray(img.transpose(2, 0, 1))).transpose(1, 2, 0))
