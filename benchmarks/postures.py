"""Query attacks that know the posture: robust accuracy of a deployed posture against every attacker without the key.

For a posture (:mod:`keyedge.postures`) the harness picks the attacks that fit what the device answers, each
from a fresh device (its own guard history), every query counted -- refused ones included:

* scores or top-k outputs: Square (score-based random search);
* noise in the graph: Square with each query repeated ``repeats`` times and the answers averaged (expectation
  over the noise; every repeat is a query);
* label outputs: HopSkipJump (decision-based);
* a guard: each of the above again with every query blinded (a random brightness offset and per-pixel noise,
  different each time), so the guard's fingerprints do not match.

Each image's *device* queries until it was broken are kept, so robust accuracy at every budget up to the
largest is read off one run, and :func:`worst_per_image` takes, per image, whether any of the attacks broke it
within a budget -- the posture's worst case.  A rate limit turns queries into time: ``minutes_to_break``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from keyedge.attacks import make_attack
from keyedge.postures import Posture, parse_posture
from keyedge.postures.guard import GuardConfig, QueryGuard
from keyedge.postures.oracle import Attacker, Device, describe_attacker
from keyedge.stats import binomial_se

#: repeats per query against noise, and the size of query blinding against a guard
REPEATS = 4
BLIND = 0.05


@dataclass(frozen=True)
class Strategy:
    """One attacker that knows the posture: which attack, averaged over ``repeats``, blinded by ``blind``."""

    attack: str
    repeats: int = 1
    blind: float = 0.0

    @property
    def label(self) -> str:
        parts = [self.attack]
        if self.repeats > 1:
            parts.append(f"EoT x{self.repeats}")
        if self.blind:
            parts.append(f"blinded {self.blind:g}")
        return " ".join(parts)


def strategies(posture: Posture) -> list[Strategy]:
    """The attacks an attacker who knows ``posture`` runs (see the module docstring)."""
    attack = "hsj" if posture.label_only else "square"
    repeats = REPEATS if posture.randomized else 1
    plain = [Strategy(attack)] + ([Strategy(attack, repeats)] if repeats > 1 else [])
    if not posture.guard:
        return plain
    return plain + [Strategy(s.attack, s.repeats, BLIND) for s in plain]


@dataclass
class PostureOutcome:
    """One strategy against one posture on one model: device queries until each image was broken."""

    posture: str
    strategy: str
    target: str
    eps: float
    budget: int  # device queries per image
    to_break: list[float]  # per image; 0 for images the model gets wrong clean; inf if never
    refused: int = 0
    flagged: int = 0
    device_queries: int = 0
    first_flag: float | None = None  # device queries until the guard first flagged this attacker
    rate: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def images(self) -> int:
        return len(self.to_break)

    def robust_accuracy(self, budget: int | None = None) -> float:
        """Share of images not broken within ``budget`` device queries (default: the whole budget)."""
        budget = self.budget if budget is None else budget
        return sum(q > budget for q in self.to_break) / max(self.images, 1)

    def minutes_to_break(self) -> float | None:
        """Median minutes until an image broke, at the posture's rate limit (None: no limit or none broke)."""
        broken = sorted(q for q in self.to_break if math.isfinite(q) and q > 0)
        if self.rate is None or not broken:
            return None
        return broken[len(broken) // 2] / self.rate

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["to_break"] = [q if math.isfinite(q) else None for q in self.to_break]
        data["robust_accuracy"] = self.robust_accuracy()
        data["robust_se"] = binomial_se(self.robust_accuracy(), self.images)
        data["minutes_to_break"] = self.minutes_to_break()
        return data


def run_strategy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    posture: Posture | str,
    strategy: Strategy,
    *,
    eps: float,
    budget: int,
    target: str = "model",
    guard_config: GuardConfig | None = None,
    in_graph: bool = True,
    seed: int = 0,
    batch_size: int = 100,
) -> PostureOutcome:
    """Attack ``images`` on a fresh device under ``posture`` with ``strategy``; ``budget`` device queries each."""
    posture = parse_posture(posture)
    guard = QueryGuard(guard_config, posture.guard, autosave=False) if posture.guard else None
    device = Device(model, posture, guard=guard, in_graph=in_graph, seed=seed)
    attacker = Attacker(device, repeats=strategy.repeats, blind=strategy.blind, seed=seed + 1)
    calls = max(2, budget // strategy.repeats)  # the attacker's own queries, each costing `repeats` device queries
    attack = make_attack(strategy.attack, attacker, eps=eps, queries=calls, seed=seed)
    attack.judge = device.unguarded()
    _, calls_to_break = attack.run_queries(images, labels, batch_size=batch_size)
    to_break = [float(q) * strategy.repeats if math.isfinite(q) and q > 1 else (0.0 if q == 1 else math.inf)
                for q in calls_to_break.tolist()]  # fmt: skip
    # an image the model gets wrong clean took one query and counts as broken from the start
    stats = describe_attacker(attacker)
    return PostureOutcome(
        posture=str(posture),
        strategy=strategy.label,
        target=target,
        eps=eps,
        budget=budget,
        to_break=to_break,
        refused=int(stats["refused"]),
        flagged=int(stats["flagged"]),
        device_queries=int(stats["device_queries"]),
        first_flag=None if stats["first_flag"] is None else float(stats["first_flag"]),
        rate=posture.rate,
    )


def worst_per_image(outcomes: list[PostureOutcome], budget: int) -> tuple[float, int]:
    """(robust accuracy, images): per image, broken if any outcome broke it within ``budget`` device queries.

    The outcomes must cover the same images in the same order (one common subset)."""
    if not outcomes:
        raise ValueError("no outcomes")
    n = outcomes[0].images
    if any(o.images != n for o in outcomes):
        raise ValueError("worst case per image needs every outcome on the same images")
    standing = [all(o.to_break[i] > budget for o in outcomes) for i in range(n)]
    return sum(standing) / max(n, 1), n
