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

import io
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from keyedge.attacks import make_attack
from keyedge.attacks.query import QUERIES_ABOUT
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
    """The attacks an attacker who knows ``posture`` runs (see the module docstring); against labels two
    decision-based ones: HopSkipJump and RayS (an Linf ray search)."""
    attacks = ("hsj", "rays") if posture.label_only else ("square",)
    repeats = REPEATS if posture.randomized else 1
    plain = [Strategy(a) for a in attacks] + ([Strategy(a, repeats) for a in attacks] if repeats > 1 else [])
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
    return _outcome(posture, strategy, target, eps, budget, calls_to_break, attacker)


def _outcome(
    posture: Posture,
    strategy: Strategy,
    target: str,
    eps: float,
    budget: int,
    calls_to_break: torch.Tensor,
    attacker: Attacker,
    extra: dict[str, Any] | None = None,
) -> PostureOutcome:
    """The outcome of one strategy: the attacker's calls per image turned into device queries, and its counters."""
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
        extra=extra if extra is not None else {},
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


# --------------------------------------------------------------------------- added for `bench robustness --posture`


def device_answers(
    model: nn.Module, posture: Posture | str, images: torch.Tensor, *, seed: int = 0, batch_size: int = 100
) -> torch.Tensor:
    """The top-1 class a device under ``posture`` answers for each image, shown once (no guard; fresh noise).

    What a transfer or noise example meets on the device: a label or top-k posture answers the same adversarial
    input (such attacks need no scores), a noisy posture adds its noise first."""
    device = Device(model, parse_posture(posture), seed=seed)
    out = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            out.append(device(images[start : start + batch_size]).argmax(1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


class _Watch:
    """The guard seen from outside: which attacked image each query belongs to, and whether it was flagged.

    A query is attributed to ``current`` when set (HopSkipJump runs one image at a time), else to the image the
    attack says it is about (:data:`~keyedge.attacks.query.QUERIES_ABOUT`, RayS), else to the original image
    nearest in Linf within ``radius`` (a score-based attacker's queries stay within eps of the image it attacks,
    plus the blinding); a query near none is not attributed.  With ``per_image`` each image has a guard of its
    own (``make_guard``) -- its own device -- and an unattributed query meets a spare one; else all share one."""

    def __init__(
        self, make_guard: Callable[[], QueryGuard], originals: torch.Tensor, radius: float, *, per_image: bool
    ):
        self.make_guard, self.radius, self.per_image = make_guard, radius, per_image
        self.guard = make_guard()  # the shared one, or the spare for unattributed queries
        self.guards: dict[int, QueryGuard] = {}
        self.originals = originals.detach().cpu().flatten(1).float()
        n = self.originals.shape[0]
        self.current: int | None = None
        self.queries = [0] * n
        self.flagged = [0] * n
        self.first: list[int | None] = [None] * n  # the image's own queries until its first flagged one

    def _owners(self, batch: Any) -> list[int]:
        if self.current is not None:
            return [self.current] * len(batch)
        about, radius = QUERIES_ABOUT.get(), self.radius
        if about is not None and len(about) == len(batch):
            batch, radius = about, 1e-6
        flat = torch.as_tensor(batch).detach().cpu().flatten(1).float()
        distance = torch.cdist(flat, self.originals, p=float("inf"))
        nearest, owner = distance.min(1)
        return [int(o) if d <= radius else -1 for d, o in zip(nearest.tolist(), owner.tolist())]

    def _guard(self, owner: int) -> QueryGuard:
        if not self.per_image or owner < 0:
            return self.guard
        if owner not in self.guards:
            self.guards[owner] = self.make_guard()
        return self.guards[owner]

    def check_batch(self, batch: Any) -> list:
        owners = self._owners(batch)
        verdicts = [self._guard(owner).check(image) for owner, image in zip(owners, batch)]
        for owner, verdict in zip(owners, verdicts):
            if owner < 0:
                continue
            self.queries[owner] += 1
            if verdict.flagged:
                self.flagged[owner] += 1
                if self.first[owner] is None:
                    self.first[owner] = self.queries[owner]
        return verdicts


def run_watched(
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
    seed: int = 0,
    batch_size: int = 100,
    device: str | None = None,
    progress: Any = None,
) -> PostureOutcome:
    """:func:`run_strategy`, and per image whether the guard flagged its attacker and after how many queries.

    One device for all images, as in :func:`run_strategy`, except under a ``lock`` guard: a lock would protect
    every image attacked after it, so there each image is attacked on a device of its own (an empty history: the
    attacker who owns many devices).  Square and RayS run batched, each query routed to its image's device;
    HopSkipJump runs one image at a time (it does anyway).  ``extra`` holds ``flagged`` (flagged queries per
    image) and ``first_flag`` (the image's own queries until its first flagged one, None if never)."""
    posture = parse_posture(posture)
    if not posture.guard:
        return run_strategy(
            model, images, labels, posture, strategy, eps=eps, budget=budget, target=target, seed=seed,
            batch_size=batch_size, guard_config=guard_config,
        )  # fmt: skip
    make_guard = lambda: QueryGuard(guard_config, posture.guard, autosave=False)  # noqa: E731
    radius = eps + 2 * strategy.blind + 1e-4
    watch = _Watch(make_guard, images, radius, per_image=posture.guard == "lock")
    oracle = Device(model, posture, guard=watch, seed=seed)  # type: ignore[arg-type]  # duck-typed guard
    attacker = Attacker(oracle, repeats=strategy.repeats, blind=strategy.blind, seed=seed + 1)
    calls = max(2, budget // strategy.repeats)
    attack = make_attack(strategy.attack, attacker, eps=eps, queries=calls, seed=seed)
    attack.judge = oracle.unguarded()
    if strategy.attack in ("square", "rays"):  # batched; every query attributed (see _Watch)
        _, used = attack.run_queries(images, labels, batch_size=batch_size, device=device, progress=progress)
    else:  # one image at a time, each query attributed to it
        parts = []
        for i in range(images.shape[0]):
            watch.current = i
            parts.append(attack.run_queries(images[i : i + 1], labels[i : i + 1], device=device)[1])
            if progress is not None:
                progress(i + 1)
        watch.current = None
        used = torch.cat(parts)
    extra = {"flagged": list(watch.flagged), "first_flag": list(watch.first)}
    return _outcome(posture, strategy, target, eps, budget, used, attacker, extra)


def detection(outcome: PostureOutcome) -> dict[str, Any] | None:
    """How often the guard caught the attacker: of the attacked images (those the device got right clean), the
    share whose queries it flagged at least once, and the median of the image's queries until the first flag.

    None when the outcome was not watched (:func:`run_watched` on a posture with a guard)."""
    flagged, first = outcome.extra.get("flagged"), outcome.extra.get("first_flag")
    if flagged is None or first is None:
        return None
    attacked = [i for i, q in enumerate(outcome.to_break) if q != 0]
    caught = [i for i in attacked if flagged[i] > 0]
    firsts = sorted(first[i] for i in caught if first[i] is not None)
    return {
        "strategy": outcome.strategy,
        "attacked": len(attacked),
        "detected": len(caught),
        "detection_rate": len(caught) / len(attacked) if attacked else None,
        "median_queries_to_flag": float(firsts[len(firsts) // 2]) if firsts else None,
        "first_flag": outcome.first_flag,
    }


def camera_stream(size: int, frames: int, seed: int = 0) -> list[np.ndarray]:
    """Benign near-duplicates: each sample photo as a static camera sees it, ``frames`` frames per scene.

    Per frame: a shift of up to 2 pixels, brightness within 5%, JPEG quality 70-95, Gaussian sensor noise
    of 2/255 (CHW float32 in [0, 1]; the photos come from scikit-image, the ``samples`` extra)."""
    from PIL import Image

    from keyedge.data.samples import PHOTOS, sample_photo

    rng = np.random.default_rng(seed)
    out = []
    for name in PHOTOS:
        scene = Image.fromarray(sample_photo(name)).resize((size + 4, size + 4), Image.BILINEAR)
        for _ in range(frames):
            dx, dy = rng.integers(0, 5, size=2)
            frame = scene.crop((int(dx), int(dy), int(dx) + size, int(dy) + size))
            buffer = io.BytesIO()
            frame.save(buffer, format="JPEG", quality=int(rng.integers(70, 96)))
            x = np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32) / 255
            x = x * (1 + rng.uniform(-0.05, 0.05)) + rng.normal(0, 2 / 255, x.shape)
            out.append(np.clip(x, 0, 1).transpose(2, 0, 1).astype(np.float32))
    return out


def false_positives(stream: Sequence[np.ndarray], config: GuardConfig | None = None) -> dict[str, float]:
    """Share of a benign stream the guard flags (action ``flag``: it answers every query), and its cost per query."""
    guard = QueryGuard(config, "flag", autosave=False)
    start = time.perf_counter()
    verdicts = guard.check_batch(list(stream))
    ms = (time.perf_counter() - start) / max(len(stream), 1) * 1e3
    flagged = sum(v.flagged for v in verdicts)
    return {"queries": len(stream), "flagged": flagged, "rate": flagged / max(len(stream), 1), "ms_per_query": ms}
