"""Folding the shuffle and normalization into a patchify first layer: exact where allowed, refused elsewhere."""

from __future__ import annotations

import pytest
import timm
import torch

from keyedge.errors import FoldError
from keyedge.keys.fold import check_foldable, find_first_conv, fold_conv, fold_model
from keyedge.keys.transform import BlockShuffle

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def keyed_forward(model, key, x, mean, std):
    """The keyed model as docs/design.md §1 defines it: f(normalize(shuffle(x)))."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return model((BlockShuffle.from_key(key, x.shape[-2:])(x) - m) / s)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).eval()


@pytest.fixture(scope="module")
def convnext():
    torch.manual_seed(0)
    return timm.create_model("convnext_atto", pretrained=False, num_classes=10).eval()


@pytest.mark.parametrize("p", [1, 2, 4, 8, 16])
def test_fold_vit_equals_gather(vit, make_key, p):
    key = make_key(p)
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(p))
    folded = fold_model(vit, key, 224, mean=(0.5,) * 3, std=(0.5,) * 3)
    with torch.no_grad():
        expected = keyed_forward(vit, key, x, (0.5,) * 3, (0.5,) * 3)
        got = folded(x)
        plain = vit((x - 0.5) / 0.5)
    assert (got - expected).abs().max().item() <= 1e-5
    assert (plain - expected).abs().max().item() > 1e-3, "the key must matter"
    assert type(folded.patch_embed.proj) is torch.nn.Conv2d  # same graph as the plain model
    assert [n for n, _ in folded.named_modules()] == [n for n, _ in vit.named_modules()]


@pytest.mark.parametrize("p", [2, 4])
def test_fold_convnext_equals_gather(convnext, make_key, p):
    key = make_key(p, tag=3)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    folded = fold_model(convnext, key, 64, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    with torch.no_grad():
        expected = keyed_forward(convnext, key, x, IMAGENET_MEAN, IMAGENET_STD)
        got = folded(x)
    assert find_first_conv(convnext)[0] == "stem.0"
    assert (got - expected).abs().max().item() <= 1e-5


def test_fold_leaves_original_untouched(vit, key4):
    before = vit.patch_embed.proj.weight.clone()
    fold_model(vit, key4, 224, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert torch.equal(vit.patch_embed.proj.weight, before)


def test_fold_conv_without_bias_gains_one(key4):
    conv = torch.nn.Conv2d(3, 5, kernel_size=8, stride=8, bias=False)
    folded = fold_conv(conv, key4.permutation, 4, mean=(0.1, 0.2, 0.3), std=(0.9, 0.8, 0.7))
    x = torch.rand(1, 3, 16, 24)
    with torch.no_grad():
        expected = conv(
            (BlockShuffle.from_key(key4, (16, 24))(x) - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1))
            / torch.tensor([0.9, 0.8, 0.7]).view(1, 3, 1, 1)
        )
        assert (folded(x) - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "name,match",
    [
        ("resnet18", "conv1 .7x7 kernel, stride 2x2, padding .3, 3.. is not a patchify convolution"),
        ("efficientnet_lite0", "conv_stem .3x3 kernel, stride 2x2"),
    ],
)
def test_fold_refused_for_non_patchify_stems(name, match, key4):
    model = timm.create_model(name, pretrained=False, num_classes=10)
    with pytest.raises(FoldError, match=match) as info:
        fold_model(model, key4, 224)
    assert "--fuse gather" in str(info.value)


def test_fold_refused_when_block_straddles_patches(convnext, make_key):
    with pytest.raises(FoldError, match="block size 8 does not divide the patch size 4"):
        fold_model(convnext, make_key(8), 64)


def test_fold_refused_when_patch_does_not_divide_image(key4):
    conv = torch.nn.Conv2d(3, 8, kernel_size=16, stride=16)
    with pytest.raises(FoldError, match="patch size 16 does not divide the input size 40x48"):
        check_foldable(conv, 4, (40, 48))


def test_fold_refused_when_conv_is_not_first(key4):
    """A model that transforms its input before the patchify conv: caught by the numerical check."""

    class Flip(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Conv2d(3, 4, kernel_size=4, stride=4)

        def forward(self, x):
            return self.proj(x.flip(-1))

    with pytest.raises(FoldError, match="not the first operation"):
        fold_model(Flip(), key4, 16)
