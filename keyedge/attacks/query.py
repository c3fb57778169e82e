"""Query attacks: what an attacker who holds the device but not the key can do (no gradients, no key).

Both query the target through its forward pass only, so they run on a PyTorch model and, through
:class:`Queried`, on a deployed artifact's runner (ONNX Runtime, OpenVINO...) alike:

* :class:`Square` (score-based: the logits) -- the reference code of Andriushchenko et al. 2020 as
  shipped in ``pyautoattack`` (the AutoAttack authors' package), which takes any callable;
* :class:`HopSkipJump` (decision-based: only the top-1 label) -- the Adversarial Robustness Toolbox's
  implementation (Chen, Jordan & Wainwright 2020), fed a labels-only black-box classifier.

Every query is counted per image.  :meth:`QueryAttack.run_queries` returns, beside the adversarial
images, the number of queries each image took until the attacker held an adversarial example within
the budget (``inf`` if never), so robust accuracy at any smaller query budget is read off one run:
Square runs the paper's fixed 10,000-query schedule (no rescaling to the budget), and HopSkipJump's
every query is checked as it is made, so a run with budget B is exactly the first B queries of a
longer one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import numpy as np
import torch
from torch import nn

from keyedge.deps import require

from .base import Attack, AttackError, Models, check_positive, register_attack

#: the clean images the queries in flight are about, one per row, when the attack says so (RayS does): a harness
#: that gives each attacked image its own device (keyedge.benchmarks.postures) routes each query by it
QUERIES_ABOUT: ContextVar[torch.Tensor | None] = ContextVar("queries_about", default=None)


class Queried(nn.Module):
    """A deployed artifact's runner as a model that query attacks can call: forward only, no gradients.

    ``runner.predict`` takes NCHW float32 numpy images in [0, 1] and returns logits (every keyedge
    backend's :class:`~keyedge.exporters.base.Runner`); the key's shuffle is inside the artifact.
    """

    def __init__(self, runner: Any, label: str = "artifact"):
        super().__init__()
        self.runner, self.label, self._classes = runner, label, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.new_zeros((0, self._classes))
        out = torch.from_numpy(np.ascontiguousarray(self.runner.predict(x.detach().cpu().numpy()))).to(x.device)
        self._classes = out.shape[1]
        return out

    def extra_repr(self) -> str:
        return self.label


class QueryAttack(Attack):
    """Base of the query attacks: one target, forward passes only, a budget of ``queries`` per image.

    Subclasses implement :meth:`attack_queries` (adversarial images and queries-to-success per image).
    Images the target already gets wrong cost one query (the clean one) and are not attacked further.
    """

    kind = "query"
    queries: int

    def __init__(self, model: Models, *, eps: float, queries: int, norm: str, seed: int = 0):
        super().__init__(model, seed=seed)
        if len(self.models) != 1:
            raise AttackError(
                f"{self.name} queries one model, got {len(self.models)}",
                "a query attacker holds one device; run it once per target",
            )
        check_positive("queries", queries, integer=True)
        check_positive("eps", eps, allow_zero=True)
        if norm not in ("Linf", "L2"):
            raise AttackError(f"{type(self).__name__} norm must be Linf or L2, got {norm!r}")
        self.eps, self.queries, self.norm = float(eps), int(queries), norm
        self._record: list[torch.Tensor] | None = None
        self.classes = 0  # the target's output width, known after its first (clean) look
        #: who decides whether an image is misclassified (clean, and at the end): the queried model itself unless
        #: set -- a posture's attacker queries through blinding/averaging/a guard, while success is judged by
        #: showing the image to the deployed model once (keyedge.postures.oracle)
        self.judge: nn.Module | None = None

    def attack_queries(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(adversarial images, queries each image took until it was adversarial within eps; inf if never)."""
        raise NotImplementedError

    def perturb(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        adv, queries = self.attack_queries(images, labels, generator)
        if self._record is not None:
            self._record.append(queries.cpu())
        return adv

    def run_queries(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        batch_size: int = 128,
        device: torch.device | str | None = None,
        progress: Callable[[int], Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Like :meth:`run`, and the queries-to-success of every image (float; ``inf`` = held out)."""
        self._record = []
        try:
            adv = self.run(images, labels, batch_size=batch_size, device=device, progress=progress)
            return adv, torch.cat(self._record) if self._record else torch.zeros(0)
        finally:
            self._record = None

    def clean_wrong(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One query of the clean images: which ones the target already gets wrong."""
        return self.judged_wrong(images, labels)

    def judged_wrong(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Which images the target misclassifies, as :attr:`judge` (default: the queried model) sees them."""
        if self.judge is None:
            out = self.logits(images)
        else:
            with torch.no_grad():
                out = self.judge(images)
        self.classes = int(out.shape[1])
        return out.argmax(1) != labels

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"queries": self.queries}


def _seed_from(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))


@register_attack
class Square(QueryAttack):
    r"""Square Attack, 'Square Attack: a query-efficient black-box adversarial attack via random search'
    (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020), run by the reference implementation in
    ``pyautoattack`` (``pyautoattack.square.SquareAttack``; margin loss, one restart).

    Score-based: it sees the target's logits, never its gradients or key.  Randomized square-shaped
    updates at the corners of the eps-ball are kept when they lower the margin of the true class.
    ``p_init`` follows the paper's schedule for 10,000 queries, not rescaled to ``queries``, so robust
    accuracy at a smaller budget is the same run cut short (see :meth:`run_queries`).  With a
    :attr:`judge` set, an image's attack ends only at a success the judge confirms (behind blinding or
    noise the attacker's negative margin can be a lucky answer; the reference code would stop there).

    Distance measure: Linf (or L2 with ``norm="L2"``).

    Arguments:
        model: the one model (or :class:`Queried` artifact) to query.
        eps (float): perturbation budget. (Default: 8/255)
        queries (int): queries per image. (Default: 5000)
        norm (str): ``"Linf"`` or ``"L2"``. (Default: "Linf")
        p_init (float): initial share of pixels a square covers. (Default: 0.8, AutoAttack's)
        seed (int): seed of the random search. (Default: 0)

    Example::
        >>> adv, queries = Square(model, eps=16/255, queries=1000).run_queries(images, labels)
    """

    name = "square"
    norm = "Linf"
    paper = (
        "Andriushchenko et al. 2020, Square Attack: a query-efficient black-box adversarial attack via random search"
    )
    hyperparameters = ("eps", "norm", "queries", "p_init")
    budget = ("eps", "queries")
    label_format = "{name} {queries}q"

    def __init__(
        self,
        model: Models,
        *,
        eps: float = 8 / 255,
        queries: int = 5000,
        norm: str = "Linf",
        p_init: float = 0.8,
        seed: int = 0,
    ):
        super().__init__(model, eps=eps, queries=queries, norm=norm, seed=seed)
        if not 0 < p_init <= 1:
            raise AttackError(f"Square p_init must be in (0, 1], got {p_init!r}")
        self.p_init = float(p_init)
        self._square = _refusal_aware(require("pyautoattack.square", extra="query").SquareAttack)

    def attack_queries(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        queries = torch.ones(images.shape[0], device=images.device)
        adv = images.clone()
        todo = (~self.clean_wrong(images, labels)).nonzero().flatten()
        if todo.numel() == 0 or self.eps == 0:
            queries[todo] = math.inf
            return adv, queries
        seed = _seed_from(generator)
        square = self._square(
            self.models[0],
            norm=self.norm,
            n_queries=self.queries - 1,  # the clean query above is one of the budget
            eps=self.eps,
            p_init=self.p_init,
            n_restarts=1,
            seed=seed,
            loss="margin",
            resc_schedule=False,
            device=images.device,
        )
        square.init_hyperparam(images)
        if self.judge is not None:  # a success is the judge's, not the attacker's belief
            square.confirm = self.judged_wrong
        devices = [images.device.index or 0] if images.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the reference code draws from the global RNG
            torch.manual_seed(seed)
            used, best = square.attack_single_run(images[todo], labels[todo])
        fooled = self.judged_wrong(best, labels[todo])  # the evaluator's check, not the attacker's query
        queries[todo] = torch.where(fooled, 1 + used, torch.full_like(used, math.inf))
        adv[todo] = torch.where(fooled.view(-1, 1, 1, 1), best, images[todo])
        return adv, queries


#: the margin a refused query reads as: far from any success, and finite (the reference code mixes margins by
#: multiplying with 0/1 masks, where an infinite or NaN margin would poison the kept one)
REFUSED_MARGIN = 1e9
#: the margin of a candidate the attacker's answer called adversarial and the judge did not: at the boundary
UNCONFIRMED_MARGIN = 1e-6


def _refusal_aware(square: type) -> type:
    """The reference Square, reading an unanswered query (a NaN row: a guard refused it) as no improvement, and
    a success the judge does not confirm (``confirm``) as a point at the boundary: the search goes on from it.

    The reference code stops attacking an image at its first negative margin; behind blinding or noise that
    margin can be a lucky answer, and stopping there would make a soft attack."""

    class RefusalAwareSquare(square):
        confirm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

        def margin_and_loss(self, x, y):
            margin, loss = super().margin_and_loss(x, y)
            margin, loss = margin.nan_to_num(REFUSED_MARGIN), loss.nan_to_num(REFUSED_MARGIN)
            believed = margin <= 0
            if self.confirm is not None and believed.any():
                unconfirmed = believed.clone()
                unconfirmed[believed] = ~self.confirm(x[believed], y.view(-1)[believed])
                margin = margin.masked_fill(unconfirmed, UNCONFIRMED_MARGIN)
                loss = loss.masked_fill(unconfirmed, UNCONFIRMED_MARGIN)
            return margin, loss

    return RefusalAwareSquare


class _Spent(Exception):
    """The query budget of one image is used up (raised inside the black-box classifier)."""


class _Ledger:
    """Answers a decision-based attacker's queries about one image with top-1 labels only, counts every
    query, and ends the attack at the first adversarial image within eps (noting how many queries it took).

    ``confirm`` (default: none, the answer is the truth) shows a candidate the attacker believes adversarial to
    the evaluator once; an unconfirmed one -- a lucky noise draw, a blinded query the plain image does not
    repeat -- does not end the attack, which goes on looking."""

    def __init__(
        self,
        model: nn.Module,
        x: np.ndarray,
        label: int,
        classes: int,
        eps: float,
        norm: str,
        budget: int,
        confirm: Callable[[np.ndarray], bool] | None = None,
    ):
        self.model, self.x, self.label, self.classes = model, x, label, classes
        self.eps, self.order, self.budget, self.confirm = eps, (np.inf if norm == "Linf" else 2), budget, confirm
        self.used, self.found, self.adv = 0, math.inf, None
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, dtype=np.float32).reshape(-1, *self.x.shape)
        spent = self.used + batch.shape[0] > self.budget
        batch = batch[: self.budget - self.used]
        with torch.no_grad():
            out = self.model(torch.from_numpy(batch).to(self.device))
        refused = torch.isnan(out).any(1).cpu().numpy()  # a guard's refusal: no answer, read as "not adversarial"
        top = out.nan_to_num(float("-inf")).argmax(1).cpu().numpy()
        top[refused] = self.label
        wrong = np.flatnonzero(top != self.label)
        if wrong.size:
            distances = np.linalg.norm((batch[wrong] - self.x).reshape(wrong.size, -1), ord=self.order, axis=1)
            for i in wrong[distances <= self.eps + 1e-7]:
                if self.confirm is None or self.confirm(batch[i]):
                    self.found, self.adv = self.used + int(i) + 1, batch[i].copy()
                    self.used += batch.shape[0]
                    raise _Spent  # broken within the budget: nothing further to learn about this image
        self.used += batch.shape[0]
        if spent:
            raise _Spent
        return np.eye(self.classes, dtype=np.float32)[top]  # labels only: the attacker sees no scores


@register_attack
class HopSkipJump(QueryAttack):
    r"""HopSkipJumpAttack, 'HopSkipJumpAttack: a query-efficient decision-based attack' (Chen, Jordan &
    Wainwright, IEEE S&P 2020), run by the Adversarial Robustness Toolbox (``art.attacks.evasion.HopSkipJump``).

    Decision-based: the target answers each query with its top-1 label only.  HopSkipJump walks from an
    adversarial starting point (seeded uniform noise the target misclassifies) towards the image along
    the decision boundary, estimating the boundary's normal from label queries.  It is a minimum-norm
    attack; an image counts as broken at the first query whose image is misclassified *and* within
    ``eps`` of the original (every query is checked as it is made, and confirmed by the :attr:`judge` when
    one is set), which ends its attack; otherwise the attack stops at ``queries``.

    Distance measure: Linf (or L2 with ``norm="L2"``).

    Arguments:
        model: the one model (or :class:`Queried` artifact) to query.
        eps (float): perturbation budget. (Default: 8/255)
        queries (int): queries per image. (Default: 1000)
        norm (str): ``"Linf"`` or ``"L2"``. (Default: "Linf")
        init_eval (int): queries of the first boundary-normal estimate (grows as sqrt(iteration)). (Default: 50)
        max_eval (int): most queries of one estimate. (Default: 500)
        seed (int): seed of the starting point and the estimates. (Default: 0)

    Example::
        >>> adv, queries = HopSkipJump(model, eps=16/255, queries=1000).run_queries(images, labels)
    """

    name = "hsj"
    norm = "Linf"
    paper = "Chen et al. 2020, HopSkipJumpAttack: a query-efficient decision-based attack"
    hyperparameters = ("eps", "norm", "queries", "init_eval", "max_eval")
    budget = ("eps", "queries")
    label_format = "{name} {queries}q"

    def __init__(
        self,
        model: Models,
        *,
        eps: float = 8 / 255,
        queries: int = 1000,
        norm: str = "Linf",
        init_eval: int = 50,
        max_eval: int = 500,
        seed: int = 0,
    ):
        super().__init__(model, eps=eps, queries=queries, norm=norm, seed=seed)
        check_positive("init_eval", init_eval, integer=True)
        check_positive("max_eval", max_eval, integer=True)
        self.init_eval, self.max_eval = int(init_eval), int(max_eval)
        evasion = require("art.attacks.evasion", extra="query")
        self._art = (evasion.HopSkipJump, require("art.estimators.classification", extra="query").BlackBoxClassifier)

    def attack_queries(
        self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        art_attack, black_box = self._art
        queries = torch.ones(images.shape[0], device=images.device)
        adv = images.clone()
        wrong = self.clean_wrong(images, labels)
        classes = self.classes  # the clean look's width: no extra query to learn it
        x_all, y_all = images.detach().cpu().numpy().astype(np.float32), labels.cpu().numpy()
        state = np.random.get_state()  # ART draws its estimates from numpy's global RNG: seed it, then restore
        try:
            for i in np.flatnonzero(~wrong.cpu().numpy()):
                seed = _seed_from(generator)
                np.random.seed(seed)
                ledger = _Ledger(
                    self.models[0], x_all[i], int(y_all[i]), classes, self.eps, self.norm, self.queries - 1,
                    confirm=self._confirmer(labels[i : i + 1], images),
                )  # fmt: skip
                classifier = black_box(ledger, x_all[i].shape, classes, clip_values=(0.0, 1.0))
                attack = art_attack(
                    classifier,
                    norm=np.inf if self.norm == "Linf" else 2,
                    max_iter=10**6,  # the query budget stops it
                    max_eval=self.max_eval,
                    init_eval=self.init_eval,
                    init_size=self.queries,
                    verbose=False,
                )
                try:
                    start = self._start(ledger, seed)
                    if start is not None:  # else: no misclassified noise in 100 tries, nothing to walk from
                        attack.generate(x_all[i : i + 1], y=y_all[i : i + 1], x_adv_init=start)
                except _Spent:
                    pass
                found = ledger.adv is not None
                queries[i] = 1 + ledger.found if found else math.inf
                if found:
                    adv[i] = torch.from_numpy(ledger.adv).to(adv)
        finally:
            np.random.set_state(state)
        return adv, queries

    def _confirmer(self, label: torch.Tensor, like: torch.Tensor) -> Callable[[np.ndarray], bool] | None:
        """The evaluator's check of a candidate the attacker believes adversarial (none without a judge)."""
        if self.judge is None:
            return None
        return lambda candidate: bool(self.judged_wrong(torch.from_numpy(candidate[None]).to(like), label)[0])

    def _start(self, ledger: _Ledger, seed: int) -> np.ndarray | None:
        """A seeded uniform-noise image the target misclassifies (ART's own search is not seedable)."""
        rng = np.random.default_rng(seed)
        for _ in range(100):
            candidate = rng.uniform(0, 1, size=(1, *ledger.x.shape)).astype(np.float32)
            if int(ledger(candidate)[0].argmax()) != ledger.label:
                return candidate
        return None
