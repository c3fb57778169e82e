"""A deployed posture as a query attacker meets it, and the attacker who knows it.

:class:`Device` answers queries the way a device under a posture does: the query guard and rate limit in front
(refused queries come back as NaN rows: no information, but spent), then the in-graph part -- a fresh noise draw
per query and the posture's outputs -- around the model's logits.  A deployed artifact already holds the in-graph
part (pass ``in_graph=False`` with a :class:`~keyedge.attacks.query.Queried` runner).

:class:`Attacker` is what the attacker who knows the defense queries through (Carlini et al.'s rule for
stateful and randomized defenses: count every query, average repeated queries against randomness, randomize
queries against detectors): each query is sent ``repeats`` times and the answers averaged (expectation over the
noise; every repeat is a query), and with ``blind`` each query is *blinded* -- a random brightness offset and
per-pixel uniform noise of that size, different every time (query blinding, Chen, Carlini & Wagner 2019) -- so
that its fingerprint does not match the attacker's earlier queries.

Query attacks (:mod:`keyedge.attacks.query`) run on an :class:`Attacker`; their success is judged by the
:class:`Device` without its guard (``judge``): the adversarial image is shown to the deployed model once.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from keyedge.postures.graph import posture_outputs
from keyedge.postures.guard import QueryGuard
from keyedge.postures.spec import Posture


class Device(nn.Module):
    """A model under a posture: guard (optional) -> noise -> model -> outputs; ``queries`` counts every query."""

    def __init__(
        self,
        model: nn.Module,
        posture: Posture,
        *,
        guard: QueryGuard | None = None,
        in_graph: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        self.model, self.posture, self.guard, self.in_graph = model, posture, guard, in_graph
        self.generator = torch.Generator().manual_seed(seed)
        self.queries = 0
        self.refused = 0
        self.flagged = 0
        self.first_flag: int | None = None  # device queries until the guard first flagged a query
        self._width = 0  # the outputs' width, once known

    def unguarded(self) -> Device:
        """The same device without its guard (noise drawn from its own generator): the evaluator's view."""
        return Device(self.model, self.posture, in_graph=self.in_graph, seed=int(self.generator.initial_seed()) + 1)

    def answer(self, x: torch.Tensor) -> torch.Tensor:
        """The in-graph part: noise, model, outputs (no guard)."""
        if self.in_graph and self.posture.noise:
            noise = torch.randn(x.shape, generator=self.generator).to(x.device)
            x = x + self.posture.noise * noise
        logits = self.model(x)
        return posture_outputs(logits, self.posture) if self.in_graph else logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.queries += x.shape[0]
        if self.guard is None or x.shape[0] == 0:
            return self.answer(x)
        verdicts = self.guard.check_batch(x.detach().cpu().numpy())
        first = next((i for i, v in enumerate(verdicts) if v.flagged), None)
        if first is not None and self.first_flag is None:
            self.first_flag = self.queries - x.shape[0] + first + 1
        self.flagged += sum(v.flagged for v in verdicts)
        keep = torch.tensor([v.answered for v in verdicts], device=x.device)
        self.refused += int((~keep).sum())
        if not keep.any() and self._width:  # nothing answered (a locked device): no model call at all
            return torch.full((x.shape[0], self._width), float("nan"), device=x.device, dtype=x.dtype)
        answered = self.answer(x[keep])  # an empty batch still has the outputs' width
        self._width = int(answered.shape[1])
        out = torch.full((x.shape[0], answered.shape[1]), float("nan"), device=x.device, dtype=answered.dtype)
        out[keep] = answered
        return out


class Attacker(nn.Module):
    """Queries a :class:`Device` the way an attacker who knows its posture does: ``repeats`` answers averaged,
    each query blinded by ``blind`` (0: not blinded)."""

    def __init__(self, device: Device, *, repeats: int = 1, blind: float = 0.0, seed: int = 0):
        super().__init__()
        if repeats < 1 or not 0 <= blind <= 0.5:
            raise ValueError(f"repeats must be >= 1 and blind in [0, 0.5], got {repeats}, {blind}")
        self.device, self.repeats, self.blind = device, int(repeats), float(blind)
        self.generator = torch.Generator().manual_seed(seed)

    def _blinded(self, x: torch.Tensor) -> torch.Tensor:
        if not self.blind:
            return x
        shape = (x.shape[0], 1, 1, 1)
        offset = (torch.rand(shape, generator=self.generator) * 2 - 1) * self.blind
        jitter = (torch.rand(x.shape, generator=self.generator) * 2 - 1) * self.blind
        return (x + offset.to(x.device) + jitter.to(x.device)).clamp(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        answers = torch.stack([self.device(self._blinded(x)) for _ in range(self.repeats)])
        return torch.nanmean(answers, dim=0) if self.repeats > 1 else answers[0]


def describe_attacker(attacker: Attacker) -> dict[str, float | int | None]:
    """What the attacker did to the posture, for reports."""
    device = attacker.device
    return {
        "repeats": attacker.repeats,
        "blind": attacker.blind,
        "device_queries": device.queries,
        "refused": device.refused,
        "flagged": device.flagged,
        "first_flag": device.first_flag,
        "refused_share": device.refused / device.queries if device.queries else float(np.nan),
    }
