"""AutoAttack (Croce & Hein 2020) through the optional PyPI package ``pyautoattack`` (the authors' code)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from keyedge.errors import DependencyError

from .base import Attack, AttackError, Models, check_positive, register_attack

VERSIONS = ("standard", "plus", "rand")


class SummedLogits(nn.Module):
    """Several models as one whose logits are their sum (how multi-key EoT enters a one-model API)."""

    def __init__(self, models: tuple[nn.Module, ...]):
        super().__init__()
        self.members = nn.ModuleList(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.members[0](x)
        for m in self.members[1:]:
            out = out + m(x)
        return out


def _load() -> Any:
    try:
        import pyautoattack
    except ImportError:
        raise DependencyError(
            "AutoAttack needs the optional package pyautoattack",
            "pip install pyautoattack  (or pip install 'keyedge[autoattack]')",
        ) from None
    return pyautoattack


@register_attack
class AutoAttack(Attack):
    r"""AutoAttack, 'Reliable evaluation of adversarial robustness with an ensemble of diverse
    parameter-free attacks' (Croce & Hein, ICML 2020), run by the reference implementation
    (PyPI ``pyautoattack``, module ``pyautoattack``).

    ``version="standard"``: APGD-CE, APGD-T (9 target classes), FAB-T and Square (5000 queries),
    each on the examples the previous ones did not break; the protocol of RobustBench and of
    the key-based-defense paper's tables.  Examples no attack breaks come back unchanged (clean).

    With several models, AutoAttack attacks one model whose logits are the sum of theirs (it has
    no notion of summed losses).  The reference code reseeds the global torch RNG; the wrapper
    runs it inside ``torch.random.fork_rng`` so the caller's RNG state is left as it was.

    Distance measure: Linf (or L2 with ``norm="L2"``).

    Arguments:
        model: model, or several models (logits summed).
        eps (float): perturbation budget. (Default: 8/255)
        norm (str): ``"Linf"`` or ``"L2"``. (Default: "Linf")
        version (str): ``"standard"``, ``"plus"`` or ``"rand"``. (Default: "standard")
        seed (int): seed handed to AutoAttack. (Default: 0)

    Shape:
        - images: ``(N, C, H, W)`` in [0, 1]; labels: ``(N,)``.
        - output: ``(N, C, H, W)`` in [0, 1].

    Example::
        >>> attack = AutoAttack(model, eps=4/255, version="standard")
        >>> adv_images = attack.run(images, labels, batch_size=250)
    """

    name = "autoattack"
    norm = "Linf"
    paper = (
        "Croce & Hein 2020, Reliable evaluation of adversarial robustness with an ensemble of diverse "
        "parameter-free attacks"
    )
    hyperparameters = ("eps", "version", "attacks")
    kind = "iterative"
    budget = ("eps",)  # parameter-free: its own step schedules

    def __init__(
        self, model: Models, *, eps: float = 8 / 255, norm: str = "Linf", version: str = "standard", seed: int = 0
    ):
        super().__init__(model, seed=seed)
        self._module = _load()
        check_positive("eps", eps, allow_zero=True)
        if norm not in ("Linf", "L2"):
            raise AttackError(f"AutoAttack norm must be Linf or L2, got {norm!r}")
        if version not in VERSIONS:
            raise AttackError(f"AutoAttack version must be one of {', '.join(VERSIONS)}, got {version!r}")
        self.eps, self.norm, self.version = float(eps), norm, version
        target = self.models[0] if len(self.models) == 1 else SummedLogits(self.models)
        self._target = target
        self.attacks = tuple(self._make("cpu").attacks_to_run)

    def _make(self, device: torch.device | str) -> Any:
        attack = self._module.AutoAttack(
            self._target, eps=self.eps, norm=self.norm, version=self.version, seed=self.seed, device=device
        )
        attack.verbose = False
        return attack

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["package"] = f"pyautoattack {getattr(self._module, '__version__', '?')}"
        return info

    def perturb(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        attack = self._make(images.device)
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):  # it reseeds the global RNG; leave the caller's alone
            adv, _ = attack.run_standard_evaluation(images, labels, batch_size=images.shape[0])
        return adv
