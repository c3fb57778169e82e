"""The key-based defense: ``backbone(normalize(shuffle(x)))`` with a secret key; without a key, the plain model.

Deployable forms of the shuffle (``fuse``): ``gather`` (one Gather over the flattened
input), ``fold`` (re-indexed into a patchify first layer where that is exact, so the graph
is the plain model's), ``conv`` (space-to-depth + a 1x1 permutation convolution +
depth-to-space, for accelerators that run no gather) and ``auto`` (fold where exact,
else gather).  LoRA adapters are merged (and the merge verified) first.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from keyedge.defenses import Defense, Deployable, register_defense
from keyedge.errors import FoldError, KeyedgeError
from keyedge.keys.fold import fold_model
from keyedge.keys.keyfile import Key
from keyedge.keys.transform import BlockShuffleConv
from keyedge.models.backbones import KeyedModel, build_model
from keyedge.models.lora import apply_lora, merge_lora

FUSE_MODES = ("gather", "fold", "conv", "auto")


class RawInputModel(nn.Module):
    """A folded backbone: it takes raw [0, 1] input, the shuffle and normalization live in its first layer."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def conv_variant(merged: nn.Module, key: Key | None) -> Deployable:
    """The keyed model with its shuffle as space-to-depth + 1x1 permutation conv + depth-to-space."""

    assert key is not None and merged.keyed
    variant = KeyedModel(merged.backbone, merged.spec, key)  # shares the backbone; only the shuffle differs
    variant.shuffle = BlockShuffleConv.from_key(key, merged.spec.image_size)
    return Deployable(variant.eval(), "conv")


@register_defense
class KeyedDefense(Defense):
    """The block-wise pixel shuffle with a secret key (the plain model when there is no key)."""

    name = "keyed"
    takes_key = True

    def build(self, backbone: nn.Module, spec: Any, record: dict[str, Any] | None, key: Key | None) -> nn.Module:
        return KeyedModel(backbone, spec, key)

    def evaluated(self, model: nn.Module) -> nn.Module:
        return merge_lora(model)

    def deployable(self, model: nn.Module, key: Key | None, fuse: str = "gather") -> Deployable:
        if fuse not in FUSE_MODES:
            raise KeyedgeError(f"unknown fuse mode {fuse!r}", f"use {', '.join(FUSE_MODES)}")
        merged = merge_lora(model).eval()
        if fuse == "gather" or (fuse == "conv" and not merged.keyed):
            return Deployable(merged, "gather" if merged.keyed else "none")
        if fuse == "conv":
            return conv_variant(merged, key)
        # A plain model folds its normalization alone (the identity permutation), so that a folded keyed
        # model and the plain model export to the very same graph.
        fold_key = key if merged.keyed else Key.from_permutation(range(3), 1)
        assert fold_key is not None
        try:
            folded = fold_model(
                merged.backbone, fold_key, merged.spec.image_size, mean=merged.spec.mean, std=merged.spec.std
            )
        except FoldError as exc:
            if fuse == "fold":
                raise
            return Deployable(merged, "gather" if merged.keyed else "none", f"auto: not folded ({exc.message})")
        return Deployable(RawInputModel(folded).eval(), "fold")

    def role(self, fingerprint: str | None) -> str:
        return "keyed" if fingerprint else "plain"

    def new_model(self, config: Any, key: Key | None, num_classes: int) -> nn.Module:
        model = build_model(config.model, num_classes, key=key, weights=config.weights, image_size=config.image_size)
        if config.finetune == "lora":
            apply_lora(model, config.lora_recipe(model.spec.family))
        return model

    def training_note(self, config: Any, key: Key | None) -> str:
        return "with key " + key.fingerprint if key else "without a key (plain)"

    def artifact_name(self, model_name: str, fingerprint: str | None) -> str:
        return f"{model_name}-{fingerprint or 'plain'}"
