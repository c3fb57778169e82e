"""RayS, a hard-label (decision-based) Linf attack, batched over images in torch.

Chen & Gu, 'RayS: A Ray Searching Method for Hard-label Adversarial Attack' (KDD 2020, arXiv:2006.12792;
reference code: github.com/uclaml/RayS).  Written here rather than taken from a library: the Adversarial
Robustness Toolbox's decision-based attacks other than HopSkipJump do not fit an Linf budget on a labels-only
device -- its SignOPT minimizes L2 only, and its GeoDA (Linf variant) fails on NumPy 2 (``np.mat``), writes a
DCT basis file into the working directory and broke no image of a small Fashion-MNIST CNN within 1,000 queries
at eps = 16/255 -- and they run one image and often one query per call.  RayS needs no gradient estimate: it
searches over *ray directions* (sign vectors, i.e. the corners of the Linf ball) for the one whose decision
boundary is nearest, flipping the signs of ever smaller blocks of pixel values, and finds each ray's boundary
by bisection; a direction is only bisected if it is adversarial at the current best radius (one query).
"""

from __future__ import annotations

import math

import torch

from .base import AttackError, Models, check_positive, register_attack
from .query import QUERIES_ABOUT, QueryAttack


@register_attack
class RayS(QueryAttack):
    r"""RayS, 'RayS: A Ray Searching Method for Hard-label Adversarial Attack' (Chen & Gu, KDD 2020).

    Decision-based: the target answers each query with its top-1 label only (a refused query -- a NaN row, a
    guard's refusal -- reads as "not adversarial" and is spent).  For each image it keeps a sign vector ``s``
    (start: all ``+1``, as in the reference code, or seeded random signs) and the radius ``r`` of the nearest
    boundary found along the ray ``clip(x + r * s)``.  Round ``t`` flips the signs of one block of the
    flattened C*H*W values (blocks halve in size level by level: 1 block, 2, 4, ...), asks once whether the
    flipped ray is adversarial at ``r``, and only if so bisects it to tolerance ``tol`` and keeps it.  All
    images run the same schedule as one batch, one model call per step, and each image's queries depend only on
    its own answers, so batching changes nothing for a stateless target.

    Budget-aware (as :class:`~keyedge.attacks.query.HopSkipJump` here, not in the paper): an image counts as
    broken at its first query that is misclassified *and* within ``eps`` (every query is checked as it is made,
    and confirmed by the :attr:`judge` when one is set), and it is not queried further; a bisection whose
    interval holds ``eps`` probes the point at ``eps`` first, so the example kept is the farthest one on its ray
    inside the ball.  No image is queried more than ``queries`` times (the clean query included), so a run with
    budget B is the first B queries of a longer one.

    Distance measure: Linf.

    Arguments:
        model: the one model (or :class:`~keyedge.attacks.query.Queried` artifact) to query.
        eps (float): perturbation budget. (Default: 8/255)
        queries (int): queries per image. (Default: 1000)
        norm (str): ``"Linf"`` only (taken so harnesses can pass their norm). (Default: "Linf")
        tol (float): bisection tolerance, in Linf radius. (Default: 1e-4)
        init (str): ``"ones"`` (the paper's start) or ``"random"`` (seeded random signs). (Default: "ones")
        seed (int): seed of the random start. (Default: 0)

    Shape:
        - images: ``(N, C, H, W)`` in [0, 1]; labels: ``(N,)``; output: like images.

    Example::
        >>> adv, queries = RayS(model, eps=16/255, queries=1000).run_queries(images, labels)
    """

    name = "rays"
    norm = "Linf"
    paper = "Chen & Gu 2020, RayS: a ray searching method for hard-label adversarial attack"
    hyperparameters = ("eps", "queries", "tol", "init")
    budget = ("eps", "queries")
    label_format = "{name} {queries}q"

    def __init__(
        self,
        model: Models,
        *,
        eps: float = 8 / 255,
        queries: int = 1000,
        norm: str = "Linf",
        tol: float = 1e-4,
        init: str = "ones",
        seed: int = 0,
    ):
        if norm != "Linf":
            raise AttackError(f"RayS is an Linf attack, got norm {norm!r}", "use hsj for L2")
        super().__init__(model, eps=eps, queries=queries, norm=norm, seed=seed)
        check_positive("tol", tol)
        if init not in ("ones", "random"):
            raise AttackError(f"RayS init must be 'ones' or 'random', got {init!r}")
        self.tol, self.init = float(tol), init

    def attack_queries(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        queries = torch.ones(images.shape[0], device=images.device)  # the clean query
        adv = images.clone()
        todo = (~self.clean_wrong(images, labels)).nonzero().flatten()
        if todo.numel() == 0:
            return adv, queries
        found, best = _Search(self, images[todo], labels[todo], generator).run()
        hit = torch.isfinite(found)
        queries[todo] = torch.where(hit, 1 + found, torch.full_like(found, math.inf))
        adv[todo[hit]] = best[hit]
        return adv, queries


class _Search:
    """One batch of RayS: per image a sign vector, its boundary radius, the queries spent and the first
    adversarial query within eps."""

    def __init__(self, attack: RayS, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator):
        self.attack, self.x, self.y = attack, x, y
        self.model = attack.models[0]
        self.eps, self.budget = attack.eps, attack.queries - 1  # the clean query is one of the budget
        n, self.dim = x.shape[0], x[0].numel()
        if attack.init == "random":
            draw = torch.randint(0, 2, (n, self.dim), generator=generator, device=x.device)
            self.signs = (2 * draw - 1).to(x.dtype)
        else:
            self.signs = torch.ones(n, self.dim, device=x.device, dtype=x.dtype)
        self.radius = torch.full((n,), math.inf, device=x.device)  # nearest boundary found (inf: none yet)
        self.used = torch.zeros(n, dtype=torch.long, device=x.device)
        self.found = torch.full((n,), math.inf, device=x.device)  # queries until the first hit within eps
        self.best = x.clone()

    def point(self, rows: torch.Tensor, radius: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
        step = radius[rows].view(-1, 1) * signs[rows]  # an infinite radius goes to the corner of [0, 1]
        return (self.x[rows].flatten(1) + step).clamp(0, 1).view_as(self.x[rows])

    def ask(self, mask: torch.Tensor, radius: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
        """Query the images of ``mask`` that have budget left at ``radius`` along ``signs``: which are adversarial.

        Every query is counted; a refused one (a NaN row) is not adversarial.  A hit within eps ends the image."""
        mask = mask & (self.used < self.budget) & ~torch.isfinite(self.found)
        result = torch.zeros_like(mask)
        rows = mask.nonzero().flatten()
        if rows.numel() == 0:
            return result
        points = self.point(rows, radius, signs)
        about = QUERIES_ABOUT.set(self.x[rows])  # far along a ray a query no longer looks like its image
        try:
            with torch.no_grad():
                out = self.model(points)
        finally:
            QUERIES_ABOUT.reset(about)
        refused = torch.isnan(out).any(1)
        wrong = (out.nan_to_num(float("-inf")).argmax(1) != self.y[rows]) & ~refused
        self.used[rows] += 1
        result[rows] = wrong
        distance = (points - self.x[rows]).flatten(1).abs().amax(1)
        hit = wrong & (distance <= self.eps + 1e-7)
        if hit.any() and self.attack.judge is not None:  # the attacker's belief, confirmed by showing it once;
            # an unconfirmed hit (a lucky noise draw, a blinded query) does not end the image: the search goes on
            hit[hit.clone()] = self.attack.judged_wrong(points[hit], self.y[rows][hit])
        if hit.any():
            self.found[rows[hit]] = self.used[rows[hit]].to(self.found.dtype)
            self.best[rows[hit]] = points[hit]
        return result

    def active(self) -> torch.Tensor:
        return (self.used < self.budget) & ~torch.isfinite(self.found)

    def run(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.eps == 0 or self.budget < 1:
            return self.found, self.best
        level, block, levels = 0, 0, math.ceil(math.log2(self.dim))
        while self.active().any():
            size = math.ceil(self.dim / 2**level)
            start, end = block * size, min(self.dim, (block + 1) * size)
            attempt = self.signs.clone()
            attempt[:, start:end] *= -1
            self.bisect(attempt)
            block += 1
            if block == 2**level or end == self.dim:
                level, block = min(level + 1, levels), 0
        return self.found, self.best

    def bisect(self, attempt: torch.Tensor) -> None:
        """Keep ``attempt`` for the images whose boundary along it is nearer than their current one."""
        low = torch.zeros_like(self.radius)
        high = self.radius.clamp(max=1.0)  # radius 1 reaches the corner, as an infinite one does
        searching = kept = self.ask(self.active(), self.radius, attempt)
        while searching.any():
            straddles = (low < self.eps) & (self.eps < high)  # probe eps first: the farthest point inside the ball
            middle = torch.where(straddles, torch.full_like(low, self.eps), (low + high) / 2)
            asked = searching & self.active()
            wrong = self.ask(asked, middle, attempt)
            high = torch.where(asked & wrong, middle, high)
            low = torch.where(asked & ~wrong, middle, low)
            searching = asked & self.active() & (high - low > self.attack.tol)
        better = kept & (high < self.radius)
        self.radius = torch.where(better, high, self.radius)
        self.signs[better] = attempt[better]
