"""Defenses: how a model is built from its manifest, made deployable, and counted in benchmarks.

keyedge knows two defenses, each one module behind :class:`Defense` and registered by name
(the timm registry pattern): ``keyed`` (:mod:`.keyed`, the block-wise pixel shuffle with a
secret key; without a key the same model is the *plain* baseline) and ``volumize``
(:mod:`.volumize`, the patch-volume defense against localized attacks).  Callers ask the
model's defense -- ``defense_of(model)``, or ``get_defense(manifest.defense_name)`` --
instead of testing for a defense by name: a new defense is one module here and nothing else.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from torch import nn

from keyedge.errors import KeyedgeError
from keyedge.registry import Registry

if TYPE_CHECKING:
    from keyedge.keys.keyfile import Key
    from keyedge.models.backbones import ModelSpec
    from keyedge.validate import Fields


@dataclass
class Deployable:
    """The module an exporter converts, and how the defense sits in it (``gather|fold|conv|none``)."""

    module: nn.Module
    fuse: str
    note: str | None = None


class Defense(abc.ABC):
    """One defense: rebuild its model from a checkpoint, make it deployable, name it in reports."""

    name: ClassVar[str] = ""
    takes_key: ClassVar[bool] = False  # whether models of this defense are built with a secret key
    #: fine-tuning modes a model of this defense supports
    finetune_modes: ClassVar[tuple[str, ...]] = ("full", "lora")

    @abc.abstractmethod
    def build(self, backbone: nn.Module, spec: ModelSpec, record: dict[str, Any] | None, key: Key | None) -> nn.Module:
        """The model a checkpoint holds, around a freshly built ``backbone`` (weights are loaded after)."""

    def record(self, model: nn.Module) -> dict[str, Any] | None:
        """What a checkpoint manifest records under ``defense`` to rebuild ``model`` (None: nothing)."""
        return None

    def check_record(self, record: dict[str, Any] | None, source: str) -> None:
        """Raise a one-line error if a manifest's ``defense`` record cannot rebuild a model."""
        return None  # nothing recorded: nothing to check

    @abc.abstractmethod
    def deployable(self, model: nn.Module, key: Key | None, fuse: str = "gather") -> Deployable:
        """The module to export (LoRA merged, the defense inside the graph in the requested form)."""

    def evaluated(self, model: nn.Module) -> nn.Module:
        """The module attacks and evaluation run on (e.g. LoRA merged)."""
        return model

    @abc.abstractmethod
    def role(self, fingerprint: str | None) -> str:
        """The model's role in latency and robustness reports: ``keyed``, ``plain``, or the defense's name."""

    @abc.abstractmethod
    def artifact_name(self, model_name: str, fingerprint: str | None) -> str:
        """The export directory's name: ``<model>-<fingerprint>``, ``<model>-plain``..."""

    # ---- training (keyedge.training.loop) ---------------------------------------------------------------------------
    #: TrainConfig fields of this defense that a resumed run must repeat, with their defaults
    training_fields: ClassVar[dict[str, Any]] = {}

    def check_training(self, config: Any, image_size: int | None = None) -> None:
        """Refuse (one line) what this defense cannot train, before any data or model is loaded."""
        if config.finetune not in self.finetune_modes:
            raise KeyedgeError(
                f"--defense {config.defense} cannot --finetune {config.finetune}",
                f"use --finetune {' or '.join(self.finetune_modes)}",
            )

    @abc.abstractmethod
    def new_model(self, config: Any, key: Key | None, num_classes: int) -> nn.Module:
        """The model to fine-tune: pretrained backbone, new head, and this defense around it."""

    @abc.abstractmethod
    def training_note(self, config: Any, key: Key | None) -> str:
        """How the model is defended, for the training log."""

    def logits_and_loss(self, model: nn.Module, x: Any, y: Any, config: Any) -> tuple[Any, Any]:
        """Image logits and the training loss (cross-entropy with the configured label smoothing)."""
        logits = model(x)
        return logits, nn.functional.cross_entropy(logits, y, label_smoothing=config.label_smoothing)


#: Registry: defense name -> class (filled by :func:`register_defense`); ``none`` names the key's defense
DEFENSES: Registry[type[Defense]] = Registry("defense", Defense, aliases={"none": "keyed"})
D = TypeVar("D", bound=type[Defense])


def register_defense(cls: D) -> D:
    """Class decorator: make ``cls`` available as ``get_defense(cls.name)``."""
    return DEFENSES.register(cls)


def list_defenses() -> list[str]:
    """Registered defense names (``keyed`` first)."""
    return DEFENSES.names()


def is_defense(name: str) -> bool:
    """Whether ``name`` (``none`` included: the key's defense) is a registered defense."""
    return name in DEFENSES


def get_defense(name: str | None) -> Defense:
    """The defense called ``name`` (``None`` or ``"none"``: keyed); a one-line error for an unknown one."""
    return DEFENSES.get(name or "none")()


def defense_record(fields: Fields) -> dict[str, Any] | None:
    """A manifest's ``defense`` record, validated: None (the key's defense) or a known other defense's settings."""
    d = fields.obj("defense", optional=True)
    if d is None:
        return None
    name = d.str("name")
    others = [n for n in DEFENSES if n != "keyed"]
    if name not in others:
        raise d.fail(
            "name", f"names an unknown defense {name!r} (known: {', '.join(others)}; leave it out for the key)"
        )
    record = dict(d.data)
    get_defense(name).check_record(record, fields.source)
    return record


def defense_of(model: nn.Module) -> Defense:
    """The defense a model belongs to (its class's ``defense_name``; keyed models have none set)."""
    return get_defense(getattr(model, "defense_name", None))


# isort: off
# importing a defense module registers it
from keyedge.defenses import keyed as _keyed  # noqa: E402, F401
from keyedge.defenses import volumize as _volumize  # noqa: E402, F401
# isort: on

__all__ = [
    "DEFENSES",
    "Defense",
    "Deployable",
    "defense_of",
    "defense_record",
    "get_defense",
    "is_defense",
    "list_defenses",
    "register_defense",
]
