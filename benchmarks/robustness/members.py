"""The models under evaluation: one :class:`Member` per checkpoint, each loaded with its own key."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from keyedge.checkpoints import load_checkpoint, read_manifest
from keyedge.defenses import defense_of, get_defense
from keyedge.errors import KeyedgeError
from keyedge.keys.keyfile import Key, key_for


@dataclass
class Member:
    """One model under evaluation (a checkpoint with its own key)."""

    name: str
    path: str
    arch: str
    fingerprint: str | None
    block_size: int | None
    finetune: str  # full / lora
    model: nn.Module = field(repr=False)
    recipe: str = ""  # the checkpoint's fine-tune recipe, in one line
    key: Key | None = field(default=None, repr=False)
    defense: str | None = None  # another defense than a key (volumize)

    @property
    def keyed(self) -> bool:
        return self.fingerprint is not None

    @property
    def plain(self) -> bool:
        return not self.keyed and self.defense is None

    @property
    def role(self) -> str:
        return get_defense(self.defense).role(self.fingerprint)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "arch": self.arch,
            "fingerprint": self.fingerprint,
            "block_size": self.block_size,
            "finetune": self.finetune,
            "recipe": self.recipe,
            "role": self.role,
        }


def load_members(checkpoints: Sequence[Path], keys: dict[str, Key], device: str = "cpu") -> list[Member]:
    """Load each checkpoint with its own key (matched by fingerprint); names are the directory names."""
    members, names = [], set()
    for path in checkpoints:
        manifest = read_manifest(path)
        key = key_for(manifest.fingerprint, keys, owner=path)
        model, manifest = load_checkpoint(path, key, map_location=device, manifest=manifest)
        name = Path(path).resolve().name
        if name in names:
            name = f"{Path(path).resolve().parent.name}/{name}"
        names.add(name)
        members.append(
            Member(
                name=name,
                path=str(path),
                arch=manifest.model.name,
                fingerprint=manifest.fingerprint,
                block_size=key.block_size if key else None,
                finetune=manifest.finetune_mode,
                recipe=manifest.recipe,
                model=defense_of(model).evaluated(model).eval().to(device),
                key=key,
                defense=manifest.defense and manifest.defense_name,
            )
        )
    if not members:
        raise KeyedgeError("no checkpoints given", "pass checkpoint directories made by `keyedge train`")
    specs = {(m.model.spec.image_size, m.model.spec.num_classes) for m in members}
    if len(specs) > 1:
        raise KeyedgeError(
            f"the checkpoints differ in image size or classes: {sorted(specs)}",
            "compare models trained on the same data at the same size",
        )
    return members
