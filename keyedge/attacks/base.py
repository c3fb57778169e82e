"""The base class every attack derives from, the attack registry and ``parse_eps``.

Contract (docs/design.md §3, §10):

* models map [0, 1] NCHW float images to logits; keyedge's :class:`~keyedge.models.backbones.KeyedModel`
  already holds the normalization and the key's shuffle, so attacks work in pixel space;
* several models = multi-key EoT: the loss an attack ascends is the **sum** of the
  per-model losses (so its input gradient is the sum of theirs), and success is judged
  on the summed logits;
* all randomness comes from a private ``torch.Generator`` seeded with ``seed`` on the
  images' device, never from the global RNG: same seed and inputs, same output;
* models run in ``eval()`` during an attack and get their previous modes back (per module);
  their parameters are frozen meanwhile and gradients are taken w.r.t. the input only
  (``torch.autograd.grad``), so nothing accumulates in ``param.grad``.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from keyedge.errors import KeyedgeError
from keyedge.registry import Registry

from .gradients import LossFn, input_gradient, loss_and_input_gradient
from .losses import cross_entropy

Models = nn.Module | Sequence[nn.Module]


class AttackError(KeyedgeError, ValueError):
    """Bad attack arguments or inputs (a :class:`ValueError`, printed as one line by the CLI)."""


#: What an attack is, for the harness: one gradient step, many steps in an eps-ball, a few pixels / a patch,
#: random noise (the control: no model, no key, no query) or queries of the target's outputs (no gradients).
KINDS = ("single-step", "iterative", "localized", "random", "query")


_EPS_TEXT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?:/\s*([0-9]*\.?[0-9]+)\s*)?$")


def parse_eps(text: str | float) -> float:
    """A perturbation budget from text: ``"4/255"`` -> 0.01569, ``"0.03"`` -> 0.03, ``"8"`` -> 8.0.

    A bare number is taken as it is (pixel space is [0, 1]: write ``8/255`` for 8 grey levels).
    """
    if isinstance(text, bool):
        raise AttackError(f"eps must be a number or a fraction like 4/255, got {text!r}")
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        match = _EPS_TEXT.match(str(text))
        if not match:
            raise AttackError(f"eps must be a number or a fraction like 4/255, got {text!r}")
        value = float(match.group(1))
        if match.group(2) is not None:
            denominator = float(match.group(2))
            if denominator == 0:
                raise AttackError(f"eps {text!r} divides by zero", "write it like 4/255")
            value /= denominator
    if not math.isfinite(value) or value < 0:
        raise AttackError(f"eps must be a finite number >= 0, got {text!r}")
    return value


def _as_models(model: Models) -> tuple[nn.Module, ...]:
    models = (model,) if isinstance(model, nn.Module) else tuple(model)
    if not models:
        raise AttackError("an attack needs at least one model")
    for m in models:
        if not isinstance(m, nn.Module):
            raise AttackError(f"attack models must be torch.nn.Module, got {type(m).__name__}")
    return models


class Attack:
    """Base class: an attack on one model, or on the sum of several models' losses (multi-key EoT).

    Subclasses set ``name`` (registry key), ``norm``, ``paper``, ``hyperparameters`` (the
    attribute names :meth:`describe` reports), ``kind`` (one of :data:`KINDS`), ``budget`` (the
    keyword arguments that set the perturbation budget and step schedule, which a harness passes)
    and ``label_format`` (:meth:`label`, formatted with ``name`` and the hyperparameters), and
    implement :meth:`perturb`.  The keyword arguments an attack takes are those of its ``__init__``.

    Shape:
        - images: ``(N, C, H, W)`` floats in [0, 1]; labels: ``(N,)`` int64 class indices.
        - output: same shape, dtype and device as ``images``, in [0, 1], detached.
    """

    name: ClassVar[str] = "attack"
    norm: ClassVar[str] = "Linf"
    paper: ClassVar[str] = ""
    hyperparameters: ClassVar[tuple[str, ...]] = ()
    kind: ClassVar[str] = ""
    budget: ClassVar[tuple[str, ...]] = ()
    label_format: ClassVar[str] = "{name}"

    def __init__(self, model: Models, *, seed: int = 0):
        self.models = _as_models(model)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise AttackError(f"seed must be an integer >= 0, got {seed!r}")
        self.seed = seed

    # -- what the attack takes ------------------------------------------------------------------------------------

    @classmethod
    def options(cls) -> dict[str, Any]:
        """The keyword arguments ``__init__`` takes (``seed`` included), with their defaults."""
        parameters = inspect.signature(cls.__init__).parameters.values()
        return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}

    @classmethod
    def accepts(cls, option: str) -> bool:
        """Whether ``option`` is a keyword argument of this attack."""
        return option in cls.options()

    def label(self) -> str:
        """A short human name of this attack and its budget for reports, e.g. ``"4-pixel"``."""
        return self.label_format.format(name=self.name, **{k: getattr(self, k) for k in self.hyperparameters})

    # -- the attack itself ------------------------------------------------------------------------------------------

    def perturb(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Adversarial images for one batch (models already in eval mode). Subclasses implement this."""
        raise NotImplementedError

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Attack one batch; the generator is seeded afresh, so equal calls give equal results."""
        images, labels = self._check(images, labels)
        with self.prepared():
            return self._finish(self.perturb(images, labels, self.generator(images.device)), images)

    def run(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int = 128,
        device: torch.device | str | None = None,
        progress: Callable[[int], Any] | None = None,
    ) -> torch.Tensor:
        """Attack a large tensor batch by batch; returns the adversarial images on ``images``' device.

        ``device`` (default: the first model's) is where batches are attacked; one generator
        runs through all batches, so ``run`` with ``batch_size >= N`` equals ``attack(images, labels)``.
        ``progress(n_done)`` is called after each batch (e.g. to advance a rich progress bar).
        """
        if batch_size < 1:
            raise AttackError(f"batch size must be positive, got {batch_size}")
        images, labels = self._check(images, labels)
        target = torch.device(device) if device is not None else self._model_device(images.device)
        out = torch.empty_like(images)
        generator = self.generator(target)
        with self.prepared():
            for start in range(0, images.shape[0], batch_size):
                x = images[start : start + batch_size].to(target)
                y = labels[start : start + batch_size].to(target)
                out[start : start + x.shape[0]] = self._finish(self.perturb(x, y, generator), x).to(images.device)
                if progress is not None:
                    progress(start + x.shape[0])
        return out

    def describe(self) -> dict[str, Any]:
        """The attack's settings for reports (JSON-serializable)."""
        info: dict[str, Any] = {"name": self.name, "class": type(self).__name__, "paper": self.paper, "norm": self.norm}
        info |= {"kind": self.kind, "label": self.label()}
        for key in self.hyperparameters:
            value = getattr(self, key)
            info[key] = list(value) if isinstance(value, tuple) else value
        if self.norm == "Linf" and isinstance(info.get("eps"), float):
            info["eps_255"] = round(info["eps"] * 255, 4)
        info["seed"] = self.seed
        info["models"] = len(self.models)
        return info

    def __repr__(self) -> str:
        args = ", ".join(
            f"{k}={v!r}" for k, v in self.describe().items() if k not in ("name", "class", "paper", "kind", "label")
        )
        return f"{type(self).__name__}({args})"

    # -- helpers for subclasses -------------------------------------------------------------------------------------

    def generator(self, device: torch.device | str) -> torch.Generator:
        """A fresh private generator seeded with ``seed`` on ``device``."""
        return torch.Generator(device=device).manual_seed(self.seed)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Summed logits of all models (what success is judged on)."""
        with torch.no_grad():
            out = self.models[0](x)
            for m in self.models[1:]:
                out = out + m(x)
        return out

    def input_grad(self, x: torch.Tensor, labels: torch.Tensor, loss_fn: LossFn = cross_entropy) -> torch.Tensor:
        """Gradient w.r.t. ``x`` of ``sum over models and examples of loss_fn(model(x), labels)``."""
        grad = None
        for m in self.models:  # one graph at a time: memory of one model, gradients summed
            g = input_gradient(m, x, labels, loss_fn)
            grad = g if grad is None else grad.add_(g)
        return grad

    def loss_and_grad(
        self, x: torch.Tensor, labels: torch.Tensor, loss_fn: LossFn = cross_entropy
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-example loss summed over models, summed logits and the input gradient, all detached."""
        loss_sum = logits_sum = grad = None
        for m in self.models:
            loss, logits, g = loss_and_input_gradient(m, x, labels, loss_fn)
            if grad is None:
                loss_sum, logits_sum, grad = loss, logits, g
            else:
                loss_sum, logits_sum, grad = loss_sum + loss, logits_sum + logits, grad.add_(g)
        return loss_sum, logits_sum, grad

    def loss(
        self, x: torch.Tensor, labels: torch.Tensor, loss_fn: LossFn = cross_entropy
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example loss summed over models and the summed logits, without gradients."""
        with torch.no_grad():
            loss_sum = logits_sum = None
            for m in self.models:
                logits = m(x)
                loss = loss_fn(logits, labels)
                loss_sum = loss if loss_sum is None else loss_sum + loss
                logits_sum = logits if logits_sum is None else logits_sum + logits
        return loss_sum, logits_sum

    @contextmanager
    def prepared(self) -> Iterator[None]:
        """Models in eval mode and parameters frozen for the attack; every module's state restored after."""
        modes = [(module, module.training) for m in self.models for module in m.modules()]
        frozen = [p for m in self.models for p in m.parameters() if p.requires_grad]
        try:
            for m in self.models:
                m.eval()
            for p in frozen:  # input gradients only: autograd neither keeps nor computes weight gradients
                p.requires_grad_(False)
            yield
        finally:
            for p in frozen:
                p.requires_grad_(True)
            for module, mode in modes:
                module.training = mode

    # -- internals --------------------------------------------------------------------------------------------------

    def _model_device(self, fallback: torch.device) -> torch.device:
        for p in self.models[0].parameters():
            return p.device
        return fallback

    @staticmethod
    def _check(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
            raise AttackError(
                f"images must be a float tensor of shape (N, C, H, W), got "
                f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}"
            )
        labels = torch.as_tensor(labels, device=images.device)
        if labels.shape != images.shape[:1] or labels.dtype.is_floating_point:
            raise AttackError(
                f"labels must be {images.shape[0]} integer class indices, got shape "
                f"{tuple(labels.shape)} ({labels.dtype})"
            )
        if images.numel() and (images.min() < 0 or images.max() > 1):
            raise AttackError(
                "images must hold pixel values in [0, 1]",
                "attacks run before normalization; keyedge models normalize inside",
            )
        return images.detach(), labels.long()

    @staticmethod
    def _finish(adv: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        return adv.detach().clamp_(0, 1).to(images.dtype)


def check_positive(name: str, value: float, *, integer: bool = False, allow_zero: bool = False) -> None:
    """Shared argument validation with a one-line message."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0) and (not integer or float(value).is_integer())
    if not ok:
        kind = "an integer" if integer else "a number"
        raise AttackError(f"{name} must be {kind} {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _check_class(cls: type[Attack]) -> None:
    if cls.kind not in KINDS:
        raise ValueError(f"attack {cls.name!r} has kind {cls.kind!r}, not one of {', '.join(KINDS)}")
    missing = [b for b in cls.budget if not cls.accepts(b)]
    if not cls.budget or missing:
        raise ValueError(f"attack {cls.name!r} declares budget {cls.budget} but takes no {', '.join(missing)}")


#: Registry: attack name -> class (filled by :func:`register_attack` when ``keyedge.attacks`` is imported).
ATTACKS: Registry[type[Attack]] = Registry("attack", Attack, error=AttackError, check=_check_class)

A = TypeVar("A", bound=type[Attack])


def register_attack(cls: A) -> A:
    """Class decorator: add an attack to :data:`ATTACKS` under its ``name`` (its ``kind`` and ``budget`` checked)."""
    return ATTACKS.register(cls)


def _kinds(kind: str | Iterable[str]) -> set[str]:
    kinds = {kind} if isinstance(kind, str) else set(kind)
    unknown = sorted(kinds - set(KINDS))
    if unknown:
        raise AttackError(f"unknown attack kind {', '.join(unknown)}", f"use {', '.join(KINDS)}")
    return kinds


def list_attacks(kind: str | Iterable[str] | None = None) -> list[str]:
    """Registered attack names in registry order, only those of ``kind`` (a kind or several) if given."""
    kinds = set(KINDS) if kind is None else _kinds(kind)
    return ATTACKS.names(lambda cls: cls.kind in kinds)


def is_attack(name: str) -> bool:
    """Whether ``name`` (case and ``_``/``-`` folded) is a registered attack."""
    return name in ATTACKS


def get_attack(name: str) -> type[Attack]:
    """The registered class of ``name`` (case and ``_``/``-`` insensitive)."""
    return ATTACKS.get(name)


def budget_options(name: str, **candidates: Any) -> dict[str, Any]:
    """The ``candidates`` that are budget parameters of attack ``name``, e.g. ``steps`` only for iterative attacks."""
    budget = get_attack(name).budget
    return {k: v for k, v in candidates.items() if k in budget}


def make_attack(name: str, model: Models, **kwargs: Any) -> Attack:
    """Build a registered attack by name, e.g. ``make_attack("pgd", model, eps=8/255, steps=20)``.

    A keyword the attack does not take is refused with the ones it does, not silently dropped.
    """
    cls = get_attack(name)
    accepted = cls.options()
    unknown = [k for k in kwargs if k not in accepted]
    if unknown:
        raise AttackError(
            f"attack {cls.name} takes no {', '.join(repr(k) for k in unknown)}",
            f"it takes {', '.join(sorted(accepted))}",
        )
    return cls(model, **kwargs)
