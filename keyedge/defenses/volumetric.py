"""3D counterparts of timm 2D CNNs for volumized input, and the volumized classifier (volumization paper §4.2).

:func:`to_3d` turns a timm CNN into one that reads a volume (B, C, D, ph, pw)
-- D patches of ph x pw stacked along depth (:mod:`keyedge.defenses.volumizer`) -- and
returns per-patch class scores (B, D, classes):

* ``Conv2d`` k x k (stride s, padding p, dilation d, groups g) -> ``Conv3d`` with
  kernel (kd, k, k), stride (1, s, s), padding (kd // 2, p, p), dilation
  (1, d, d), groups g; timm's ``Conv2dSame`` likewise, keeping its dynamic
  "same" padding on H, W.  Depth is never strided, so D is kept end to end.
* ``BatchNorm2d`` -> ``BatchNorm3d``; timm's ``BatchNormAct2d`` -> :class:`BatchNormAct3d`.
* ``MaxPool2d`` -> ``MaxPool3d`` with a depth window of 1, ``AvgPool2d`` per patch
  (:class:`PerPatch`; ``avg_pool3d`` rejects ceil-mode windows larger than
  the input, which timm ResNets' avg-down meets on 1x1 maps); adaptive pools
  and timm's ``SelectAdaptivePool2d`` pool over H, W only (:class:`PatchPool`),
  and flattening keeps the patch axis (:class:`PatchFlatten`), so the
  classifier ``Linear`` maps each patch's features to its class scores, the
  paper's FC : R^(M, N) -> R^(L, N).
* Squeeze-excite blocks (EfficientNet's ``SqueezeExcite``, timm's ``SEModule``)
  run per patch (:class:`PerPatch` folds depth into the batch): their mean is
  over H, W of each patch, never across patches.
* Activations, dropout, ``Identity``, ``DropPath``, ``Linear`` are unchanged.

Any other layer raises :class:`~keyedge.models.backbones.ModelError` rather than being
silently mis-converted.  Verified: timm ResNets (``resnet18``, ``test_resnet``)
and EfficientNets (``tf_efficientnet_lite0``, ``test_efficientnet``).

**Depth kernel** ``kd`` (default 1).  The paper turns k x k convolutions into
"k x k x N" with N the depth, yet also asks that "the kernel operate on each
patch"; a full-depth kernel with "same" padding would make every output patch
depend on every input patch (and its reported parameter increases -- e.g.
ResNet50 +48.6M on 25.6M -- match kd = 3 on every convolution, +2 x 23.5M,
not kd = N).  We make kd a choice: ``kd = 1`` processes patches independently
(the default: ImageNet weights carry over unchanged, no extra parameters,
and an attacked patch can only change its own scores -- the property the
aggregation below turns into robustness; the patch order is then irrelevant
to the classifier); ``kd = 3`` mixes each patch with its neighbours in the
ranked order, as the paper's 3D convolutions do, at kd times the conv weights.

**Inflation.**  The 2D kernel goes into the centre depth slice, the other
slices start at zero -- not I3D's "divide by kd across depth", which averages
neighbouring patches (different image regions here, not repeated video
frames).  With zero padding on depth, the inflated model then computes, for
every kd, exactly the 2D model on each patch: the pretrained weights carry
over and training starts from the 2D model's function.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.utils import _pair

from keyedge.defenses.volumizer import VolumizeConfig, Volumizer, check_patch, to_patches
from keyedge.errors import KeyedgeError, ShapeError
from keyedge.models.backbones import ModelError, ModelSpec, Normalize, create_backbone

AGGREGATIONS = ("mean-logits", "mean-probs", "majority")


# -- 3D layers ----------------------------------------------------------------------------------------------------


class Conv3dSame(nn.Conv3d):
    """timm's ``Conv2dSame`` in 3D: TF "same" padding computed per input on H, W; fixed kd // 2 on depth."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from timm.layers.padding import pad_same

        x = pad_same(x, self.kernel_size[1:], self.stride[1:], self.dilation[1:])  # pads the last two dims
        return F.conv3d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class BatchNormAct3d(nn.BatchNorm3d):
    """``BatchNorm3d`` then timm's optional dropout and activation, as ``BatchNormAct2d`` does in 2D."""

    def __init__(self, num_features: int, *, drop: nn.Module, act: nn.Module, **kwargs: Any):
        super().__init__(num_features, **kwargs)
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


class PerPatch(nn.Module):
    """Run a 2D module on every patch of a volume: (B, C, D, H, W) -> fold D into the batch -> back."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        y = self.module(x.transpose(1, 2).reshape(b * d, c, h, w))
        return y.reshape(b, d, *y.shape[1:]).transpose(1, 2)


class PatchPool(nn.Module):
    """Global pooling over H, W of each patch: (B, C, D, H, W) -> (B, D, C) (flatten) or (B, C, D, 1, 1).

    ``pool_type`` as timm's: avg, max, avgmax (their mean), catavgmax (both, concatenated on channels).
    """

    def __init__(self, pool_type: str = "avg", flatten: bool = True):
        super().__init__()
        kind = pool_type.lower().removeprefix("fast") or "avg"
        if kind not in ("avg", "max", "avgmax", "catavgmax"):
            raise ModelError(
                f"unsupported global pool type {pool_type!r} for a volumetric model",
                "use avg, max, avgmax or catavgmax",
            )
        self.pool_type, self.flatten = kind, flatten

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "avg":
            y = x.mean((-2, -1), keepdim=True)
        elif self.pool_type == "max":
            y = x.amax((-2, -1), keepdim=True)
        else:
            avg, peak = x.mean((-2, -1), keepdim=True), x.amax((-2, -1), keepdim=True)
            y = 0.5 * (avg + peak) if self.pool_type == "avgmax" else torch.cat((avg, peak), 1)
        return y.flatten(3).squeeze(3).transpose(1, 2) if self.flatten else y

    def extra_repr(self) -> str:
        return f"pool_type={self.pool_type}, flatten={self.flatten}"


class PatchFlatten(nn.Module):
    """``Flatten(1)`` per patch: (B, C, D, H, W) -> (B, D, C*H*W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).flatten(2)


# -- conversion ---------------------------------------------------------------------------------------------------


def _factory(module: nn.Module) -> dict[str, Any]:
    tensor = next(iter(module.parameters()), None)
    tensor = tensor if tensor is not None else next(iter(module.buffers()), None)
    return {"device": tensor.device, "dtype": tensor.dtype} if tensor is not None else {}


def _conv3d(conv: nn.Conv2d, kd: int) -> nn.Conv3d:
    from timm.layers import Conv2dSame

    same = type(conv) is Conv2dSame
    if isinstance(conv.padding, str):
        padding: Any = "same" if conv.padding == "same" else (kd // 2, 0, 0)
    else:
        padding = (kd // 2, *_pair(conv.padding))
    cls = Conv3dSame if same else nn.Conv3d
    conv3 = cls(
        conv.in_channels,
        conv.out_channels,
        (kd, *conv.kernel_size),
        stride=(1, *conv.stride),
        padding=padding,
        dilation=(1, *conv.dilation),
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        **_factory(conv),
    )
    with torch.no_grad():
        conv3.weight.zero_()
        conv3.weight[:, :, kd // 2] = conv.weight  # centre-slice inflation: exactly the 2D conv per patch
        if conv.bias is not None:
            conv3.bias.copy_(conv.bias)
    return conv3


def _batchnorm3d(bn: nn.BatchNorm2d) -> nn.BatchNorm3d:
    from timm.layers import BatchNormAct2d

    kwargs = dict(
        eps=bn.eps, momentum=bn.momentum, affine=bn.affine, track_running_stats=bn.track_running_stats, **_factory(bn)
    )
    if type(bn) is BatchNormAct2d:
        bn3: nn.BatchNorm3d = BatchNormAct3d(bn.num_features, drop=bn.drop, act=bn.act, **kwargs)
    else:
        bn3 = nn.BatchNorm3d(bn.num_features, **kwargs)
    bn3.load_state_dict(bn.state_dict())
    bn3.train(bn.training)
    return bn3


def _adaptive(output_size: Any) -> tuple[Any, Any, Any]:
    return (None, *_pair(output_size))


def _select_pool(pool: nn.Module) -> nn.Module:
    flatten = isinstance(pool.flatten, nn.Flatten) or getattr(pool.pool, "flatten", False) is True
    if not pool.pool_type:
        return PatchFlatten() if flatten else nn.Identity()
    output = getattr(pool.pool, "output_size", 1)
    if _pair(output) != (1, 1):
        raise ModelError(f"global pooling to {output} is not supported for a volumetric model", "pool to 1x1")
    return PatchPool(pool.pool_type, flatten)


def _convert(module: nn.Module, kd: int) -> nn.Module | None:
    """The 3D replacement of one layer, or None when ``module`` is a container to descend into."""
    import timm.layers as tl
    from timm.models import _efficientnet_blocks as eb
    from timm.models import efficientnet, resnet

    kind = type(module)
    if kind in (nn.Conv2d, tl.Conv2dSame):
        return _conv3d(module, kd)
    if kind in (nn.BatchNorm2d, tl.BatchNormAct2d):
        return _batchnorm3d(module)
    if kind is nn.MaxPool2d:
        return nn.MaxPool3d(
            (1, *_pair(module.kernel_size)),
            (1, *_pair(module.stride)),
            (0, *_pair(module.padding)),
            (1, *_pair(module.dilation)),
            module.return_indices,
            module.ceil_mode,
        )
    if kind is nn.AvgPool2d:  # avg_pool3d refuses ceil-mode windows larger than the input, avg_pool2d takes them
        return PerPatch(module)  # (timm ResNets' avg-down on 1x1 maps): depth window 1 by folding depth instead
    if kind is nn.AdaptiveAvgPool2d:
        return nn.AdaptiveAvgPool3d(_adaptive(module.output_size))
    if kind is nn.AdaptiveMaxPool2d:
        return nn.AdaptiveMaxPool3d(_adaptive(module.output_size))
    if kind is tl.SelectAdaptivePool2d:
        return _select_pool(module)
    if kind is nn.Flatten:
        if module.start_dim != 1 or module.end_dim != -1:
            raise ModelError(f"cannot convert Flatten({module.start_dim}, {module.end_dim}) to a volumetric model")
        return PatchFlatten()
    if kind in (eb.SqueezeExcite, tl.SEModule, tl.EffectiveSEModule):
        return PerPatch(module)
    if kind in (nn.Linear, nn.Identity, tl.DropPath) or kind.__module__ in (
        "torch.nn.modules.activation",
        "torch.nn.modules.dropout",
        "timm.layers.activations",
        "timm.layers.activations_me",
    ):
        return module  # shape-agnostic: kept as is
    if kind in (
        nn.Sequential,
        resnet.ResNet,
        resnet.BasicBlock,
        resnet.Bottleneck,
        efficientnet.EfficientNet,
        eb.ConvBnAct,
        eb.DepthwiseSeparableConv,
        eb.InvertedResidual,
        eb.EdgeResidual,
    ):
        return None  # verified containers: their forward works on 5D tensors once their layers are 3D
    raise ModelError(
        f"to_3d does not know how to convert {kind.__name__}",
        "volumetric models support timm ResNets and EfficientNets",
    )


def _walk(parent: nn.Module, kd: int, path: str) -> None:
    for name, child in parent.named_children():
        where = f"{path}.{name}" if path else name
        try:
            replacement = _convert(child, kd)
        except ModelError as exc:
            raise ModelError(f"{exc.message} (layer {where})", exc.hint) from None
        if replacement is None:
            _walk(child, kd, where)
        elif replacement is not child:
            setattr(parent, name, replacement)


def check_depth_kernel(depth_kernel: int) -> int:
    if isinstance(depth_kernel, bool) or not isinstance(depth_kernel, int) or depth_kernel < 1 or depth_kernel % 2 == 0:
        raise KeyedgeError(
            f"the depth kernel must be a positive odd integer, got {depth_kernel!r}",
            "use 1 (patches independent) or 3 (neighbouring patches mixed)",
        )
    return depth_kernel


def to_3d(model2d: nn.Module, depth_kernel: int = 1, *, inplace: bool = False) -> nn.Module:
    """The 3D counterpart of a timm ResNet/EfficientNet: volume (B, C, D, ph, pw) -> per-patch logits (B, D, classes).

    Weights are inflated from the 2D ones (centre depth slice); see the module docstring.
    """
    check_depth_kernel(depth_kernel)
    model = model2d if inplace else copy.deepcopy(model2d)
    replacement = _convert(model, depth_kernel)
    if replacement is not None:
        raise ModelError(f"to_3d expects a whole timm CNN, got a single {type(model).__name__} layer")
    _walk(model, depth_kernel, "")
    return model


# -- aggregation and the volumized classifier ---------------------------------------------------------------------


def aggregate(per_patch_logits: torch.Tensor, how: str = "mean-logits") -> torch.Tensor:
    """One score vector per image (B, classes) from per-patch logits (B, D, classes).

    * ``mean-logits`` (default): the mean of the D patch logits.  Differentiable
      and linear, so one attacked patch moves the image's logits by exactly 1/D
      of its own change: to flip a decision it must outweigh the other D - 1
      patches together, and gradient-based attacks still see a true gradient.
    * ``mean-probs``: log of the mean of the patch softmax probabilities
      (log-probabilities, usable as logits); one patch moves each probability by
      at most 1/D, but a confident patch weighs no more than a 1/D share.
    * ``majority``: the fraction of patches voting for each class (argmax of
      each patch; ties go to the lower class index).  The most robust to one
      patch -- it changes at most one vote -- but piecewise constant: no
      gradient, so for evaluation only, never for training or white-box attacks.
    """
    if per_patch_logits.ndim != 3:
        raise ShapeError(f"expected per-patch logits (B, D, classes), got shape {tuple(per_patch_logits.shape)}")
    if how == "mean-logits":
        return per_patch_logits.mean(1)
    if how == "mean-probs":
        d = per_patch_logits.shape[1]
        return torch.logsumexp(per_patch_logits.log_softmax(-1), dim=1) - torch.log(torch.tensor(float(d)))
    if how == "majority":
        votes = F.one_hot(per_patch_logits.argmax(-1), per_patch_logits.shape[-1])
        return votes.to(per_patch_logits.dtype).mean(1)
    raise KeyedgeError(f"unknown aggregation {how!r}", f"use one of {', '.join(AGGREGATIONS)}")


class VolumizedModel(nn.Module):
    """``backbone3d(normalize(volumize(x)))`` on [0, 1] NCHW input: the volumization defense as a classifier.

    ``forward(x)`` returns aggregated logits (B, classes), a drop-in for keyed
    models in attacks, evaluation and export; :meth:`patch_logits` returns the
    per-patch logits (B, D, classes) the patch-aggregate loss trains on.  The
    volumizer ranks patches on the [0, 1] pixels (histograms over [0, 1]);
    normalization follows it -- per channel, so it commutes with the patch
    shuffle -- using the same :class:`~keyedge.models.backbones.Normalize` as keyed models.
    A volumized model takes no key (``keyed`` is False).
    """

    key_fingerprint = None
    block_size = None
    defense_name = "volumize"  # keyedge.defenses.volumize

    def __init__(
        self,
        backbone: nn.Module,
        spec: ModelSpec,
        config: VolumizeConfig | None = None,
        *,
        depth_kernel: int = 1,
        aggregation: str = "mean-logits",
    ):
        super().__init__()
        config = config or VolumizeConfig()
        check_patch(spec.image_size, spec.image_size, config.patch)
        if aggregation not in AGGREGATIONS:
            raise KeyedgeError(f"unknown aggregation {aggregation!r}", f"use one of {', '.join(AGGREGATIONS)}")
        self.spec = spec
        self.depth_kernel = check_depth_kernel(depth_kernel)
        self.aggregation = aggregation
        self.volumizer = Volumizer(config)
        self.norm = Normalize(spec.mean, spec.std)
        self.backbone = backbone

    @property
    def keyed(self) -> bool:
        return False

    @property
    def config(self) -> VolumizeConfig:
        return self.volumizer.config

    @property
    def depth(self) -> int:
        return self.config.depth(self.spec.image_size, self.spec.image_size)

    def defense(self) -> dict[str, Any]:
        """What checkpoint manifests record to rebuild this model (with the backbone's spec)."""
        return {
            "name": "volumize",
            **self.config.to_dict(),
            "depth_kernel": self.depth_kernel,
            "aggregation": self.aggregation,
        }

    def forward(self, x: torch.Tensor, per_patch: bool = False) -> torch.Tensor:
        volume = self.volumizer(x)  # (B, C, D, ph, pw), ranked on [0, 1] pixels
        volume = self.norm(volume.flatten(2, 3)).view_as(volume)  # per channel: (B, C, D*ph, pw) view
        logits = self.backbone(volume)  # (B, D, classes)
        return logits if per_patch else aggregate(logits, self.aggregation)

    def patch_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Per-patch logits (B, D, classes), in the volume's (ranked) patch order."""
        return self(x, per_patch=True)


class RasterVolumizedModel(nn.Module):
    """The deployable form of a volumized model with depth kernel 1: patches in raster order, no ranking.

    With 1-deep kernels every patch is classified on its own and the aggregation (a mean,
    or a vote) does not depend on the patches' order, so the metric-driven ranking cannot
    change the output: this module gives the same logits as the model it wraps (up to the
    summation order of the mean) with nothing but reshapes, convolutions and a mean in the
    graph -- no histogram, sort or TopK for an exporter or an accelerator to stumble on.
    """

    def __init__(self, model: VolumizedModel):
        super().__init__()
        if model.depth_kernel != 1:
            raise KeyedgeError(
                f"with depth kernel {model.depth_kernel} the patch order changes the output, so the "
                "ranking would have to be in the graph",
                "export a model trained with --depth-kernel 1",
            )
        self.model = model
        self.spec = model.spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        volume = to_patches(x, m.config.patch).transpose(1, 2)  # (B, C, D, ph, pw), raster order
        volume = m.norm(volume.flatten(2, 3)).view_as(volume)
        return aggregate(m.backbone(volume), m.aggregation)


def volumize_model(
    backbone2d: nn.Module,
    spec: ModelSpec,
    config: VolumizeConfig | None = None,
    *,
    depth_kernel: int = 1,
    aggregation: str = "mean-logits",
) -> VolumizedModel:
    """Wrap a 2D timm backbone (converted in place to 3D) as a :class:`VolumizedModel`."""
    config = config or VolumizeConfig()
    check_patch(spec.image_size, spec.image_size, config.patch)
    return VolumizedModel(
        to_3d(backbone2d, depth_kernel, inplace=True), spec, config, depth_kernel=depth_kernel, aggregation=aggregation
    )


def build_volumized_model(
    name: str,
    num_classes: int,
    config: VolumizeConfig | None = None,
    *,
    depth_kernel: int = 1,
    aggregation: str = "mean-logits",
    weights: str = "hub",
    image_size: int | None = None,
) -> VolumizedModel:
    """A volumized model from a timm name and a weights source (as :func:`keyedge.models.backbones.build_model`)."""
    backbone, spec = create_backbone(name, num_classes, weights=weights, image_size=image_size)
    return volumize_model(backbone, spec, config, depth_kernel=depth_kernel, aggregation=aggregation)


def model_from_defense(backbone2d: nn.Module, spec: ModelSpec, defense: dict[str, Any]) -> VolumizedModel:
    """Rebuild a volumized model from a manifest's ``defense`` record (the inverse of ``defense()``)."""
    if not isinstance(defense, dict) or defense.get("name") != "volumize":
        name = defense.get("name") if isinstance(defense, dict) else defense
        raise ModelError(f"unknown defense {name!r} in the checkpoint", "upgrade keyedge")
    try:
        config = VolumizeConfig.from_dict(defense)
        depth_kernel = int(defense.get("depth_kernel", 1))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(
            f"the checkpoint's defense record is incomplete ({exc!r})", "the checkpoint is corrupted"
        ) from None
    return volumize_model(
        backbone2d, spec, config, depth_kernel=depth_kernel, aggregation=defense.get("aggregation", "mean-logits")
    )


def patch_aggregate_loss(
    per_patch_logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """PAL (volumization paper Eq. 10): sum over patches of per-patch cross-entropy, mean over the batch.

    It is D times the mean patch loss, so its scale grows with D; AdamW's update is (nearly) invariant to that.

    ``per_patch_logits`` (B, D, classes), ``labels`` (B,) -- every patch is
    trained towards its image's label.
    """
    if per_patch_logits.ndim != 3 or labels.shape != per_patch_logits.shape[:1]:
        raise ShapeError(
            f"expected per-patch logits (B, D, classes) and labels (B,), got "
            f"{tuple(per_patch_logits.shape)} and {tuple(labels.shape)}"
        )
    b, d, classes = per_patch_logits.shape
    per_patch = F.cross_entropy(
        per_patch_logits.reshape(b * d, classes),
        labels.repeat_interleave(d),
        reduction="none",
        label_smoothing=label_smoothing,
    )
    return per_patch.view(b, d).sum(1).mean()
