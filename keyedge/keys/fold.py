"""Folding the key's shuffle (and the input normalization) into a patchify convolution.

Where a model's first layer is a *patchify* convolution -- kernel = stride = S,
no padding, no dilation, no groups: timm ViT ``patch_embed.proj`` (S = 16),
ConvNeXt ``stem.0`` (S = 4) -- and P divides S and S divides H and W, every
PxP block lies inside one SxS patch and every patch is permuted the same way.
Then ``conv(normalize(shuffle(x))) == conv'(x)`` where ``conv'`` re-indexes the
weight by the shuffle of one patch and absorbs the per-channel normalization::

    W'[o, idx[k]] = W[o, k] / std[c(k)]
    b'[o]         = b[o] - sum_k W[o, k] * mean[c(k)] / std[c(k)]

(``idx`` = :func:`block_index_map` of one SxS patch, ``c(k)`` the channel of
position k).  The folded model has exactly the plain model's graph: the key
costs nothing at inference (docs/design.md §1).  Everywhere else the shuffle stays a
gather, and :func:`fold_model` says why with a :class:`FoldError`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from keyedge.errors import FoldError
from keyedge.keys.transform import BlockShuffle, _image_spec, block_index_map

if TYPE_CHECKING:
    from keyedge.keys.keyfile import Key

#: Where timm keeps the first layer of the families whose stem can be patchify.
FIRST_LAYER_PATHS = ("patch_embed.proj", "stem.0", "stem.conv", "stem", "conv_stem", "conv1", "stem.conv1")

_GATHER_HINT = "keep the shuffle as a gather (--fuse gather)"


def find_first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """The model's input convolution: timm's ``first_conv``, a known stem path, else the first Conv2d."""
    first = getattr(model, "pretrained_cfg", {}).get("first_conv")
    for path in ((first,) if isinstance(first, str) else ()) + FIRST_LAYER_PATHS:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(module, nn.Conv2d):
            return path, module
    for path, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return path, module
    raise FoldError(f"{type(model).__name__} has no Conv2d input layer to fold the shuffle into", _GATHER_HINT)


def check_foldable(conv: nn.Conv2d, block_size: int, image_size: int | Sequence[int], *, name: str = "conv") -> int:
    """Raise :class:`FoldError` unless folding into ``conv`` is exact; return the patch size S."""
    height, width = _image_spec(image_size)
    k, s = tuple(conv.kernel_size), tuple(conv.stride)
    pad = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
    what = f"first layer {name} ({k[0]}x{k[1]} kernel, stride {s[0]}x{s[1]}, padding {pad})"
    if k[0] != k[1] or k != s or pad not in ((0, 0), "valid") or tuple(conv.dilation) != (1, 1) or conv.groups != 1:
        raise FoldError(
            f"{what} is not a patchify convolution (square kernel = stride, no padding, "
            f"no dilation, no groups), so folding the shuffle into it would not be exact",
            _GATHER_HINT,
        )
    patch = k[0]
    if patch % block_size:
        raise FoldError(
            f"block size {block_size} does not divide the patch size {patch} of {what}: blocks would straddle patches",
            f"use a block size dividing {patch}, or {_GATHER_HINT}",
        )
    if height % patch or width % patch:
        raise FoldError(
            f"patch size {patch} does not divide the input size {height}x{width}",
            f"use an input size that is a multiple of {patch}, or {_GATHER_HINT}",
        )
    return patch


def fold_conv(
    conv: nn.Conv2d,
    permutation: Sequence[int] | np.ndarray,
    block_size: int,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> nn.Conv2d:
    """A copy of the patchify ``conv`` that equals ``conv(normalize(shuffle(x)))`` on raw x.

    Call :func:`check_foldable` first (or use :func:`fold_model`, which does).
    """
    out_ch, in_ch, patch, _ = conv.weight.shape
    mean_v = np.zeros(in_ch) if mean is None else np.asarray(mean, dtype=np.float64)
    std_v = np.ones(in_ch) if std is None else np.asarray(std, dtype=np.float64)
    idx = torch.from_numpy(block_index_map(in_ch, patch, patch, block_size, permutation))
    chan = torch.arange(in_ch).repeat_interleave(patch * patch)  # channel of each CHW position k
    weight = conv.weight.detach().to(torch.float64).reshape(out_ch, -1)
    scaled = weight / torch.from_numpy(std_v)[chan]
    new_weight = torch.empty_like(scaled)
    new_weight[:, idx] = scaled  # W'[o, idx[k]] = W[o, k] / std[c(k)]
    shift = scaled @ torch.from_numpy(mean_v)[chan]
    bias = conv.bias.detach().to(torch.float64) if conv.bias is not None else torch.zeros(out_ch, dtype=torch.float64)
    folded = copy.deepcopy(conv)
    with torch.no_grad():
        folded.weight.copy_(new_weight.reshape(conv.weight.shape).to(conv.weight.dtype))
        if folded.bias is None:
            folded.bias = nn.Parameter(torch.zeros(out_ch, dtype=conv.weight.dtype, device=conv.weight.device))
        folded.bias.copy_((bias - shift).to(folded.bias.dtype))
    return folded


def fold_model(
    model: nn.Module,
    key: Key,
    image_size: int | Sequence[int],
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    verify: bool = True,
    atol: float = 1e-4,
) -> nn.Module:
    """A copy of ``model`` whose input layer absorbs the key's shuffle and the normalization.

    The result takes raw [0, 1] input and equals ``model(normalize(shuffle(x)))``.
    With ``verify`` (the default) that is checked on a random input, which also
    catches models whose first convolution is not really the first operation.
    """
    height, width = _image_spec(image_size)
    path, conv = find_first_conv(model)
    if conv.in_channels != key.channels:
        raise FoldError(f"first layer {path} takes {conv.in_channels} channels, the key is for {key.channels}")
    check_foldable(conv, key.block_size, (height, width), name=path)
    folded_model = copy.deepcopy(model)
    folded_conv = fold_conv(conv, key.permutation, key.block_size, mean=mean, std=std)
    if path:
        parent_path, _, attr = path.rpartition(".")
        setattr(folded_model.get_submodule(parent_path) if parent_path else folded_model, attr, folded_conv)
    else:  # the model is the conv itself
        folded_model = folded_conv
    if verify:
        _verify_fold(model, folded_model, key, (height, width), mean, std, atol)
    return folded_model


def _verify_fold(
    model: nn.Module,
    folded: nn.Module,
    key: Key,
    size: tuple[int, int],
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    atol: float,
) -> None:
    param = next(model.parameters())
    x = torch.rand(2, key.channels, *size, generator=torch.Generator().manual_seed(0)).to(param.device, param.dtype)
    shuffle = BlockShuffle.from_key(key, size).to(param.device)
    m = torch.tensor(mean if mean is not None else [0.0] * key.channels, dtype=param.dtype, device=param.device)
    s = torch.tensor(std if std is not None else [1.0] * key.channels, dtype=param.dtype, device=param.device)
    was_training = model.training
    model.eval()
    folded.eval()
    try:
        with torch.no_grad():
            reference = model((shuffle(x) - m.view(1, -1, 1, 1)) / s.view(1, -1, 1, 1))
            got = folded(x)
    finally:
        model.train(was_training)
        folded.train(was_training)
    diff = (reference - got).abs().max().item()
    scale = max(1.0, reference.abs().max().item())
    if not diff <= atol * scale:
        raise FoldError(
            f"folding changed the model's output (max abs diff {diff:.2e}): its first convolution is "
            f"not the first operation on the input",
            _GATHER_HINT,
        )
