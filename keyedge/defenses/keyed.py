"""The key-based defense: ``backbone(normalize(shuffle(x)))`` with a secret key; without a key, the plain model.

Deployable forms of the shuffle (``fuse``), all exact: ``gather`` (one Gather over the flattened
input), ``elements`` (the same gather per element: one GatherElements), ``fold`` (re-indexed into a
patchify first layer where that is exact, so the graph is the plain model's), ``conv`` (one strided 0/1
convolution + depth-to-space, for accelerators that run no gather); ``auto`` (fold where exact, else each
target's measured fastest form, :attr:`~keyedge.exporters.base.ExportBackend.auto_form`) and ``fastest``
(fold where exact, else each form timed on the export host per target: :mod:`keyedge.deploy.forms`).
LoRA adapters are merged (and the merge verified) first.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from keyedge.defenses import Defense, Deployable, register_defense
from keyedge.errors import FoldError, KeyedgeError
from keyedge.keys.fold import fold_model
from keyedge.keys.keyfile import Key
from keyedge.keys.transform import BlockShuffle, BlockShuffleConv, BlockShuffleElements, BlockShufflePlanes
from keyedge.models.backbones import KeyedModel, build_model
from keyedge.models.lora import apply_lora, merge_lora

#: the exact forms of the shuffle that are a module in front of the backbone (fold rewrites the backbone)
SHUFFLE_FORMS = {
    "gather": BlockShuffle,
    "elements": BlockShuffleElements,
    "conv": BlockShuffleConv,
    "planes": BlockShufflePlanes,
}
#: what ``--fuse`` takes: a form, or a rule choosing one per target
FUSE_MODES = (*SHUFFLE_FORMS, "fold", "auto", "fastest")


class RawInputModel(nn.Module):
    """A folded backbone: it takes raw [0, 1] input, the shuffle and normalization live in its first layer."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def shuffle_variant(merged: nn.Module, key: Key | None, form: str) -> Deployable:
    """The keyed model with its shuffle in ``form`` (:data:`SHUFFLE_FORMS`), sharing the backbone; a plain
    model has no shuffle and is returned as it is."""
    if not merged.keyed:
        return Deployable(merged, "none")
    assert key is not None
    if form == "gather" and type(merged.shuffle) is BlockShuffle:
        return Deployable(merged, "gather")
    variant = KeyedModel(merged.backbone, merged.spec, key)  # shares the backbone; only the shuffle differs
    variant.shuffle = SHUFFLE_FORMS[form].from_key(key, merged.spec.image_size)
    return Deployable(variant.eval(), form)


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
        if fuse in SHUFFLE_FORMS:
            return shuffle_variant(merged, key, fuse)
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
            # each target then takes its form (keyedge.deploy.targets): the gather stands in until then
            return Deployable(merged, "gather" if merged.keyed else "none", f"{fuse}: not folded ({exc.message})")
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
