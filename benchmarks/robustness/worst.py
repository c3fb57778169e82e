"""The worst case per image: on one common subset of images, whether any attack without the key broke each one.

Every keyless attack of a run leaves a :class:`Trace` per target: per image, the queries it needed to break that
image (0: broken without a query -- a transfer set or the noise control; ``inf``: never).  The query attacks ran on
the first ``query_limit`` of the run's images and the transfer sets on all of them, so the first ``n`` images
(``n`` = the shortest trace) are one common subset, the same images by index.  Per image the fastest break over
all traces is kept; robust accuracy at a budget is the share of images no attack broke within it -- never more than
any single attack's figure on the same images, and not biased low the way a minimum over outcomes of different
sample sizes is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from keyedge.benchmarks.robustness.members import Member
from keyedge.stats import binomial_se


@dataclass
class Trace:
    """One attack without the key on one target: queries until each image broke (0: no query needed; inf: never)."""

    target: str
    scenario: str  # non-adaptive, adaptive, multi-key-eot, cross-arch, transfer, noise, query, white-box (no key)
    attack: str  # what it was, for reports: "pgd from m-kb", "square 1000q", "noise Linf"
    runtime: str
    to_break: list[float]
    budget: int | None = None  # query attacks: the most queries per image
    #: transfer sets and the noise control: the adversarial images, so a posture's device can classify them too
    images: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def from_standing(
        cls, target: str, scenario: str, attack: str, runtime: str, standing: torch.Tensor, **kw
    ) -> Trace:
        """A trace of a set that needs no query: images the target still gets right stand, the others broke."""
        return cls(target, scenario, attack, runtime, [math.inf if s else 0.0 for s in standing.tolist()], **kw)

    @property
    def label(self) -> str:
        where = "" if self.runtime == "torch" else f" on {self.runtime}"
        return f"{self.scenario}: {self.attack}{where}"

    def robust(self, budget: int, n: int) -> float:
        """Share of the first ``n`` images this attack did not break within ``budget`` queries."""
        return sum(q > budget for q in self.to_break[:n]) / max(n, 1)


def fastest(traces: Sequence[Trace], n: int) -> list[float]:
    """Per image of the first ``n``, the fewest queries any of ``traces`` needed to break it (inf: none did)."""
    return [min((t.to_break[i] for t in traces), default=math.inf) for i in range(n)]


def at_budgets(traces: Sequence[Trace], budgets: Sequence[int], n: int) -> list[dict[str, Any]]:
    """The worst case per image at each budget, with the single attack that came closest (its own figure)."""
    per_image = fastest(traces, n)
    rows = []
    for budget in budgets:
        robust = sum(q > budget for q in per_image) / max(n, 1)
        strongest = min(traces, key=lambda t: t.robust(budget, n))
        rows.append(
            {
                "budget": int(budget),
                "robust_accuracy": robust,
                "robust_se": binomial_se(robust, n),
                "attack": strongest.label,
                "attack_robust_accuracy": strongest.robust(budget, n),
            }
        )
    return rows


def encode(to_break: Sequence[float]) -> list[float | None]:
    """Queries until broken as JSON: null for never."""
    return [q if math.isfinite(q) else None for q in to_break]


def keyless(traces: Sequence[Trace], target: Member) -> list[Trace]:
    """The traces an attacker without ``target``'s key can produce: for a keyed target everything but white-box
    (it needs the key); a model without a key has nothing to withhold, so white-box counts too."""
    return [t for t in traces if t.target == target.name and not (target.keyed and t.scenario == "white-box")]


def worst_case(
    traces: Sequence[Trace], members: Sequence[Member], query_budgets: Sequence[int]
) -> list[dict[str, Any]]:
    """Per model, the worst case per image over every keyless trace, at each query budget (0: no queries).

    Budgets: ``query_budgets`` up to the largest query attack's budget, and that budget; 0 alone without query
    attacks.  Each row names the images (``images``: the common subset's size), the attacks it is over and, per
    image, the fewest queries any of them needed (``to_break``)."""
    rows = []
    for m in members:
        mine = keyless(traces, m)
        if not mine:
            continue
        n = min(len(t.to_break) for t in mine)
        largest = max((t.budget or 0 for t in mine), default=0)
        budgets = sorted({0} | {b for b in query_budgets if 0 < b < largest} | ({largest} if largest else set()))
        rows.append(
            {
                "target": m.name,
                "role": m.role,
                "images": n,
                "budgets": at_budgets(mine, budgets, n),
                "over": [t.label for t in mine],
                "to_break": encode(fastest(mine, n)),
            }
        )
    return rows
