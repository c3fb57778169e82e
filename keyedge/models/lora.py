"""LoRA fine-tuning through peft: per-family defaults, applying adapters, merging them for export.

One pretrained backbone, many keys: each keyed model is the shared base plus a
small adapter (and its own classifier head), as in the paper's §III-D. Defaults
per family adapt the input layer too -- it is the layer that meets the
shuffled pixels:

* ViT: ``qkv`` and ``patch_embed.proj``, r = 16, alpha = 16 (the paper's setting);
* ConvNeXt: the stem conv and the MLP ``fc1``/``fc2``, r = 16, alpha = 16;
* ResNet: every ``conv1``/``conv2`` (stem included), r = 8, alpha = 8;
* EfficientNet: ``conv_stem`` and the pointwise ``conv_pw``/``conv_pwl``, r = 8, alpha = 8.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from keyedge.deps import require
from keyedge.errors import KeyedgeError
from keyedge.models.backbones import KeyedModel, head_names


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraSettings:
        return cls(int(data["r"]), float(data["alpha"]), tuple(data["targets"]), float(data.get("dropout", 0.0)))


LORA_DEFAULTS: dict[str, LoraSettings] = {
    "vit": LoraSettings(16, 16, ("qkv", "patch_embed.proj")),
    "convnext": LoraSettings(16, 16, ("stem.0", "mlp.fc1", "mlp.fc2")),
    "resnet": LoraSettings(8, 8, ("conv1", "conv2")),
    "efficientnet": LoraSettings(8, 8, ("conv_stem", "conv_pw", "conv_pwl")),
}


def lora_settings(
    family: str, *, r: int | None = None, alpha: float | None = None, targets: Sequence[str] | None = None
) -> LoraSettings:
    """The family's defaults, overridden by what the user gave."""
    base = LORA_DEFAULTS.get(family)
    if base is None and not targets:
        raise KeyedgeError(
            f"no LoRA defaults for this model family ({family})",
            "name the layers to adapt with --lora-targets (e.g. --lora-targets qkv)",
        )
    base = base or LoraSettings(16, 16, ())
    return LoraSettings(
        r or base.r, alpha if alpha is not None else (r or base.alpha), tuple(targets) if targets else base.targets
    )


_ADAPTABLE = (nn.Linear, nn.Conv2d)


def resolve_targets(backbone: nn.Module, targets: Sequence[str]) -> list[str]:
    """Full names of the Linear/Conv2d layers that ``targets`` name (suffix match, as peft does).

    A target naming a container (e.g. ResNet's deep-stem ``conv1`` Sequential) adapts
    the Linear/Conv2d layers inside it.  Depthwise convolutions are skipped.
    """
    heads = tuple(head_names(backbone))
    found: list[str] = []
    for name, module in backbone.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        inner = (
            [(name, module)]
            if isinstance(module, _ADAPTABLE)
            else [(f"{name}.{sub}", m) for sub, m in module.named_modules() if sub and isinstance(m, _ADAPTABLE)]
        )
        for full, layer in inner:
            if isinstance(layer, nn.Conv2d) and layer.groups != 1:
                continue
            if not any(full == h or full.startswith(h + ".") for h in heads) and full not in found:
                found.append(full)
    if not found:
        raise KeyedgeError(
            f"no Linear or Conv2d layer matches the LoRA targets {', '.join(targets)}",
            "name layers of this model with --lora-targets",
        )
    return found


def apply_lora(model: KeyedModel, settings: LoraSettings) -> KeyedModel:
    """Wrap ``model.backbone`` with LoRA adapters (in place); only adapters and the head stay trainable."""
    peft = require("peft", extra="train")
    config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=resolve_targets(model.backbone, settings.targets),
        modules_to_save=head_names(model.backbone),
        bias="none",
    )
    try:
        model.backbone = peft.get_peft_model(model.backbone, config)
    except ValueError as exc:
        raise KeyedgeError(
            f"cannot apply LoRA to {model.spec.name}: {str(exc).splitlines()[0][:200]}",
            "check --lora-targets against the model's layer names",
        ) from None
    return model


def is_lora(model: KeyedModel) -> bool:
    return type(model.backbone).__module__.startswith("peft")


def adapter_state_dict(model: KeyedModel) -> dict[str, torch.Tensor]:
    """The adapter and head weights only: what a LoRA checkpoint stores."""
    peft = require("peft", extra="train")
    return peft.get_peft_model_state_dict(model.backbone)


def load_adapter_state_dict(model: KeyedModel, state: dict[str, torch.Tensor]) -> None:
    peft = require("peft", extra="train")
    result = peft.set_peft_model_state_dict(model.backbone, state)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k or "modules_to_save" in k]
    if unexpected:
        raise KeyedgeError(
            f"the adapter weights do not fit the model ({len(unexpected)} unexpected tensors, e.g. {unexpected[0]})",
            "the checkpoint does not belong to this base model",
        )


def _peft_layers(module: nn.Module) -> list[str]:
    return [name for name, m in module.named_modules() if type(m).__module__.startswith("peft")]


def merge_lora(model: KeyedModel, *, atol: float = 1e-5, verify: bool = True) -> KeyedModel:
    """A copy of ``model`` with the adapters merged into a plain timm backbone (for export).

    Verifies that merged and unmerged outputs agree within ``atol`` (times the
    largest logit when that exceeds 1) on a random input and that no peft module remains.
    """
    if not is_lora(model):
        return model
    merged = copy.deepcopy(model)
    merged.backbone = merged.backbone.merge_and_unload()
    leftovers = _peft_layers(merged.backbone)
    if leftovers:
        raise KeyedgeError(f"merging left peft modules behind ({leftovers[0]}...)", "report this as a bug")
    if verify:
        size = model.spec.image_size
        x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        param = next(model.parameters())
        x = x.to(param.device)
        was = model.training
        model.eval()
        merged.eval()
        with torch.no_grad():
            reference = model(x)
            diff = (reference - merged(x)).abs().max().item()
        model.train(was)
        tolerance = atol * max(1.0, reference.abs().max().item())  # relative to the logits' scale
        if diff > tolerance:
            raise KeyedgeError(
                f"merged LoRA model differs from the unmerged one by {diff:.2e} (> {tolerance:.1e})",
                "report this as a bug",
            )
    return merged
