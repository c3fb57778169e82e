"""LoRA fine-tuning through peft: per-family recipes, applying adapters, merging them for export.

One pretrained backbone, many keys: each keyed model is the shared base plus a
small adapter, its own classifier head -- and its own *first layer*, trained
fully.  The key permutes the pixels of every block, a full-rank change of what
the first layer sees that a rank-r update cannot express (arXiv 2507.11943: LoRA
on block-encrypted images matches full fine-tuning only with a trainable patch
embedding).  The defaults per family were chosen by ``python -m keyedge.benchmarks.experiments.lora``
(docs/lora.md has its table):

* ViT: LoRA on ``qkv``, r = 16, alpha = 16 (the paper's setting); ``patch_embed.proj`` trained fully;
* ConvNeXt: LoRA on the MLP ``fc1``/``fc2``, r = 16; the stem (``stem.0``, ``stem.1``) trained fully;
* ResNet: LoRA on every ``conv1``/``conv2`` of the blocks, r = 8; the stem ``conv1``/``bn1`` trained fully;
* EfficientNet: LoRA on the pointwise ``conv_pw``/``conv_pwl``, r = 8; ``conv_stem``/``bn1`` trained fully.

Fully trained layers are named exactly (``conv1`` is the stem only, not every block's ``conv1``);
LoRA targets match by suffix, as peft does, and skip what is trained fully.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from keyedge.deps import require
from keyedge.errors import KeyedgeError
from keyedge.models.backbones import KeyedModel, head_names
from keyedge.models.recipes import LORA_DEFAULTS, LoraSettings, lora_settings

__all__ = ["LORA_DEFAULTS", "LoraSettings", "apply_lora", "is_lora", "lora_settings", "merge_lora"]


_ADAPTABLE = (nn.Linear, nn.Conv2d)


def resolve_targets(backbone: nn.Module, targets: Sequence[str], full: Sequence[str] = ()) -> list[str]:
    """Full names of the Linear/Conv2d layers that ``targets`` name (suffix match, as peft does).

    A target naming a container (e.g. ResNet's deep-stem ``conv1`` Sequential) adapts
    the Linear/Conv2d layers inside it.  Depthwise convolutions, the head and layers
    trained fully (``full``, exact names, and what is inside them) are skipped.
    """
    skipped = (*head_names(backbone), *full)
    found: list[str] = []
    for name, module in backbone.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        inner = (
            [(name, module)]
            if isinstance(module, _ADAPTABLE)
            else [(f"{name}.{sub}", m) for sub, m in module.named_modules() if sub and isinstance(m, _ADAPTABLE)]
        )
        for path, layer in inner:
            if isinstance(layer, nn.Conv2d) and layer.groups != 1:
                continue
            if not any(path == h or path.startswith(h + ".") for h in skipped) and path not in found:
                found.append(path)
    if not found:
        raise KeyedgeError(
            f"no Linear or Conv2d layer matches the LoRA targets {', '.join(targets)}",
            "name layers of this model with --lora-targets",
        )
    return found


def full_layers(backbone: nn.Module, full: Sequence[str]) -> dict[str, nn.Module]:
    """The modules a recipe trains fully, by exact name; a name this model lacks is a one-line error."""
    modules = dict(backbone.named_modules())
    missing = [name for name in full if name not in modules or not name]
    if missing:
        close = [n for n in modules if n.endswith(missing[0].split(".")[-1])][:3]
        raise KeyedgeError(
            f"this model has no layer named {missing[0]!r} to train fully",
            f"give exact layer names to --lora-full{' (e.g. ' + ', '.join(close) + ')' if close else ''}, or none",
        )
    return {name: modules[name] for name in full}


def apply_lora(model: KeyedModel, settings: LoraSettings) -> KeyedModel:
    """Wrap ``model.backbone`` with LoRA adapters (in place); adapters, head and ``full`` layers stay trainable."""
    peft = require("peft", extra="train")
    fully = full_layers(model.backbone, settings.full)
    config = peft.LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=resolve_targets(model.backbone, settings.targets, settings.full),
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
    for module in fully.values():  # the same objects, now inside the peft wrapper; frozen by it, thawed here
        for p in module.parameters():
            p.requires_grad_(True)
    model.lora_full = tuple(settings.full)
    return model


def is_lora(model: KeyedModel) -> bool:
    return type(model.backbone).__module__.startswith("peft")


_FULL = "full."  # prefix of the fully trained layers' weights in a LoRA checkpoint's adapter tensors


def _full_parameters(model: KeyedModel) -> dict[str, torch.Tensor]:
    """Parameters of the layers the recipe trains fully, by name in the base model."""
    base = model.backbone.get_base_model()
    full = getattr(model, "lora_full", ())
    return {
        f"{layer}.{name}": p
        for layer, module in full_layers(base, full).items()
        for name, p in module.named_parameters()
    }


def adapter_state_dict(model: KeyedModel) -> dict[str, torch.Tensor]:
    """What a LoRA checkpoint stores of the trained weights: adapters, head and the fully trained layers."""
    peft = require("peft", extra="train")
    state = dict(peft.get_peft_model_state_dict(model.backbone))
    state.update({_FULL + name: p for name, p in _full_parameters(model).items()})
    return state


def load_adapter_state_dict(model: KeyedModel, state: dict[str, torch.Tensor]) -> None:
    peft = require("peft", extra="train")
    full = {k[len(_FULL) :]: v for k, v in state.items() if k.startswith(_FULL)}
    result = peft.set_peft_model_state_dict(model.backbone, {k: v for k, v in state.items() if not k.startswith(_FULL)})
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k or "modules_to_save" in k]
    expected = set(_full_parameters(model))
    if set(full) != expected:
        unexpected.extend(sorted(set(full) ^ expected))
    if unexpected:
        raise KeyedgeError(
            f"the adapter weights do not fit the model ({len(unexpected)} unexpected tensors, e.g. {unexpected[0]})",
            "the checkpoint does not belong to this base model",
        )
    if full:
        base = model.backbone.get_base_model()
        params = dict(base.named_parameters())
        with torch.no_grad():
            for name, value in full.items():
                if params[name].shape != value.shape:
                    raise KeyedgeError(
                        f"the fully trained layer {name} has shape {tuple(value.shape)}, "
                        f"not {tuple(params[name].shape)}",
                        "the checkpoint does not belong to this base model",
                    )
                params[name].copy_(value)


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
