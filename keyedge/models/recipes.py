"""Fine-tuning recipes: what a LoRA run adapts, trains fully and at which learning rate, per model family.

Pure data (no torch import), so ``keyedge train --help`` can print the defaults without loading
PyTorch.  The defaults come from ``python -m keyedge.benchmarks.experiments.lora`` (docs/lora.md has the
table); :mod:`keyedge.models.lora` applies a recipe to a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from keyedge.errors import KeyedgeError

#: Peak learning rate of a full fine-tune (AdamW, warm-up + cosine).
FULL_LR = 5e-4


@dataclass(frozen=True)
class LoraSettings:
    """One LoRA recipe's model side: rank, alpha, adapted layers and layers trained fully (exact names)."""

    r: int
    alpha: float
    targets: tuple[str, ...]
    dropout: float = 0.0
    full: tuple[str, ...] = ()
    lr: float = 5e-3  # the recipe's peak learning rate (a run's --lr overrides it)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "targets": list(self.targets), "full": list(self.full)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraSettings:
        return cls(
            int(data["r"]),
            float(data["alpha"]),
            tuple(data["targets"]),
            float(data.get("dropout", 0.0)),
            tuple(data.get("full", ())),  # checkpoints before the full-layer recipe: adapters only
            float(data.get("lr", 5e-3)),
        )

    def label(self) -> str:
        """A one-line name of the recipe, for logs and reports."""
        full = f", full {'+'.join(self.full)}" if self.full else ", no full layers"
        return f"LoRA r{self.r:g}/a{self.alpha:g} on {'+'.join(self.targets)}{full}"


LORA_DEFAULTS: dict[str, LoraSettings] = {  # chosen from the keyed accuracies in docs/lora.md
    "vit": LoraSettings(16, 16, ("qkv",), full=("patch_embed.proj",), lr=2e-3),  # 1e-2 diverged
    "convnext": LoraSettings(16, 16, ("mlp.fc1", "mlp.fc2"), full=("stem.0", "stem.1"), lr=5e-3),
    "resnet": LoraSettings(8, 8, ("conv1", "conv2"), full=("conv1", "bn1"), lr=5e-3),
    "efficientnet": LoraSettings(8, 8, ("conv_pw", "conv_pwl"), full=("conv_stem", "bn1"), lr=1e-2),
}


def lora_settings(
    family: str,
    *,
    r: int | None = None,
    alpha: float | None = None,
    targets: Sequence[str] | None = None,
    full: Sequence[str] | None = None,
) -> LoraSettings:
    """The family's recipe, overridden by what the user gave (``full=[]``: adapters only)."""
    base = LORA_DEFAULTS.get(family)
    if base is None and not targets:
        raise KeyedgeError(
            f"no LoRA defaults for this model family ({family})",
            "name the layers to adapt with --lora-targets (e.g. --lora-targets qkv)",
        )
    base = base or LoraSettings(16, 16, ())
    return LoraSettings(
        r or base.r,
        alpha if alpha is not None else (r or base.alpha),
        tuple(targets) if targets else base.targets,
        full=tuple(full) if full is not None else base.full,
        lr=base.lr,
    )


def default_lr(finetune: str, family: str) -> float:
    """The peak learning rate a run gets without ``--lr``: the full fine-tune's, or the family's LoRA recipe's."""
    if finetune != "lora":
        return FULL_LR
    settings = LORA_DEFAULTS.get(family)
    return settings.lr if settings else LoraSettings(16, 16, ()).lr
