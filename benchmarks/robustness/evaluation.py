"""One run's shared state: the images, every model's clean predictions, the cached adversarial sets."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from keyedge.attacks import budget_options, make_attack
from keyedge.benchmarks.robustness.config import RobustnessConfig
from keyedge.benchmarks.robustness.members import Member
from keyedge.benchmarks.robustness.worst import Trace
from keyedge.benchmarks.robustness_report import Outcome


class Evaluation:
    """Shared state of one run: the images, every model's clean predictions, cached adversarial sets, and the
    per-image traces of the attacks (:mod:`.worst`)."""

    def __init__(
        self,
        members: list[Member],
        images: torch.Tensor,
        labels: torch.Tensor,
        config: RobustnessConfig,
        progress: Callable[[str, int], Callable[[int], None]] | None = None,
    ):
        self.members = {m.name: m for m in members}
        self.images, self.labels, self.config = images, labels, config
        self.progress = progress or (lambda _description, _total: lambda _n: None)
        self.clean = {m.name: self.predict(m.model, images) for m in members}
        self._adv: dict[tuple, torch.Tensor] = {}
        #: per image, what each attack without the key did to each target (the worst case per image is over these)
        self.traces: list[Trace] = []

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = []
        with torch.inference_mode():
            for start in range(0, x.shape[0], self.config.batch_size):
                out.append(model(x[start : start + self.config.batch_size].to(self.config.device)).argmax(1).cpu())
        return torch.cat(out)

    def attack_for(self, sources: Sequence[str], eps: float, name: str | None = None):
        models = [self.members[s].model for s in sources]
        name = name or self.config.attack
        # the budget the attack declares: steps unless attack_options set them, eps always
        options = budget_options(name, steps=self.config.steps) | dict(self.config.attack_options)
        options |= budget_options(name, eps=eps)
        return make_attack(name, models if len(models) > 1 else models[0], seed=self.config.seed, **options)

    def adversarial(
        self, sources: Sequence[str], eps: float, *, attack: str | None = None, n: int | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Adversarial images crafted on ``sources`` (losses summed when several), cached per set."""
        n = n or self.images.shape[0]
        cache_key = (tuple(sources), round(eps, 8), attack or self.config.attack, n)
        atk = self.attack_for(sources, eps, attack)
        if cache_key not in self._adv:
            if eps == 0:
                self._adv[cache_key] = self.images[:n].clone()
            else:
                label = f"{atk.name} eps {eps * 255:.3g}/255 on {'+'.join(sources)}"
                tick = self.progress(label, n)
                self._adv[cache_key] = atk.run(
                    self.images[:n],
                    self.labels[:n],
                    batch_size=self.config.batch_size,
                    device=self.config.device,
                    progress=tick,
                )
        return self._adv[cache_key], atk.describe()

    def noise(self, eps: float, norm: str, n: int | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """The random-noise control at ``eps`` (sign noise for Linf, Gaussian of norm eps for L2), one set for all."""
        n = n or self.images.shape[0]
        any_model = next(iter(self.members.values())).model  # not queried: noise sees no model
        atk = make_attack("noise", any_model, eps=eps, norm=norm, seed=self.config.seed)
        cache_key = ("noise", round(eps, 8), norm, n)
        if cache_key not in self._adv:
            self._adv[cache_key] = atk.run(self.images[:n], self.labels[:n], batch_size=self.config.batch_size)
        return self._adv[cache_key], atk.describe()

    def outcome(
        self,
        scenario: str,
        target: str,
        sources: Sequence[str],
        adv: torch.Tensor,
        attack: dict[str, Any],
        predictions: torch.Tensor | None = None,
        runtime: str = "torch",
    ) -> Outcome:
        n = adv.shape[0]
        pred = predictions if predictions is not None else self.predict(self.members[target].model, adv)
        return self.scored(scenario, target, sources, pred == self.labels[:n], attack, runtime)

    def scored(
        self,
        scenario: str,
        target: str,
        sources: Sequence[str],
        adv_ok: torch.Tensor,
        attack: dict[str, Any],
        runtime: str = "torch",
        queries: dict[str, Any] | None = None,
    ) -> Outcome:
        """The metrics of one set from which of its first ``len(adv_ok)`` images the target still gets right."""
        n = adv_ok.shape[0]
        y = self.labels[:n]
        clean_ok = self.clean[target][:n] == y
        both = clean_ok.clone()
        for s in sources:
            both &= self.clean[s][:n] == y
        asr = float((clean_ok & ~adv_ok).sum() / clean_ok.sum()) if clean_ok.any() else None
        fooling = float((both & ~adv_ok).sum() / both.sum()) if both.any() else None
        return Outcome(
            scenario=scenario,
            target=target,
            sources=list(sources),
            attack=attack,
            images=n,
            clean_accuracy=float(clean_ok.float().mean()),
            robust_accuracy=float(adv_ok.float().mean()),
            attack_success_rate=asr,
            fooling_ratio=fooling,
            fooling_images=int(both.sum()),
            runtime=runtime,
            queries=queries,
        )
