"""Deployment postures in the robustness run (``--posture``): each posture against everything without the key.

Per posture and query target, on the query attacks' images (the first ``query_limit``, the common subset):

* clean accuracy through the device (its noise included), on all of the run's images;
* the attacks that know the posture (:func:`keyedge.benchmarks.postures.strategies`), each from a fresh device and
  run once to the largest ``query_budgets`` entry -- every smaller budget is read off the per-image queries;
* the transfer sets and the noise control of the run, classified through the device (a label or top-k posture
  answers the same adversarial inputs; a noisy one adds its noise);
* the worst case per image at each budget (:mod:`.worst`), with the single attack that came closest;
* with a guard: how many attacked images' attackers it flagged and after how many of their queries, and its false
  positives on benign traffic (the run's i.i.d. test images and a camera-like stream of near-duplicates);
* the latency overhead against ``scores``, when the caller measured it (``latency``), else none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from keyedge.attacks import make_attack
from keyedge.benchmarks.postures import (
    camera_stream,
    detection,
    device_answers,
    false_positives,
    run_watched,
    strategies,
)
from keyedge.benchmarks.robustness.config import RobustnessConfig
from keyedge.benchmarks.robustness.evaluation import Evaluation
from keyedge.benchmarks.robustness.members import Member
from keyedge.benchmarks.robustness.worst import Trace, at_budgets, encode, fastest, keyless
from keyedge.errors import KeyedgeError
from keyedge.postures import Posture, parse_posture
from keyedge.postures.guard import GuardConfig
from keyedge.stats import binomial_se

#: latency of a posture relative to ``scores`` (e.g. 1.03), or None where not measured
Latency = Callable[[Posture, Member], float | None]


def posture_targets(members: Sequence[Member], config: RobustnessConfig) -> list[Member]:
    """The models the postures are measured on: ``config.query_targets`` by name, or every model."""
    if not config.postures:
        return []
    names = {m.name for m in members}
    unknown = sorted(set(config.query_targets) - names)
    if unknown:
        raise KeyedgeError(
            f"no evaluated model named {', '.join(unknown)} for the postures", f"use {', '.join(sorted(names))}"
        )
    return [m for m in members if not config.query_targets or m.name in config.query_targets]


def check_postures(members: Sequence[Member], config: RobustnessConfig) -> list[Posture]:
    """Every ``--posture`` parsed and fitted to the models it runs on, its attacks' packages present -- before any
    attack runs (one line naming the bad posture otherwise)."""
    postures = [parse_posture(spec) for spec in config.postures]
    for target in posture_targets(members, config):
        classes = target.model.spec.num_classes
        for p in postures:
            if p.topk is not None and p.topk > classes:
                raise KeyedgeError(
                    f"posture {p} answers the top {p.topk} classes, {target.name} has {classes}",
                    f"use topk:K with K < {classes}, or label",
                )
    for p in postures:
        for strategy in strategies(p):
            make_attack(strategy.attack, nn.Identity(), queries=2)  # a missing package fails now
    return postures


def posture_budgets(config: RobustnessConfig) -> list[int]:
    """The budgets (device queries per image) a posture's worst case is read off at."""
    return sorted(set(config.query_budgets)) or [1000]


def posture_rows(
    ev: Evaluation,
    members: Sequence[Member],
    traces: Sequence[Trace],
    config: RobustnessConfig,
    eps: float,
    latency: Latency | None = None,
) -> list[dict[str, Any]]:
    """One row per (posture, target): clean accuracy, worst case per image at each budget, the attacks, the guard."""
    budgets = posture_budgets(config)
    n = min(config.query_limit, ev.images.shape[0])
    x, y = ev.images[:n], ev.labels[:n]
    rows = []
    for posture in check_postures(members, config):
        for target in posture_targets(members, config):
            model = target.model
            answers = device_answers(model, posture, ev.images, seed=config.seed, batch_size=config.batch_size)
            clean = float((answers == ev.labels).float().mean())
            controls = []
            for t in keyless(traces, target):
                if t.images is None or t.runtime != "torch":
                    continue
                adv = device_answers(model, posture, t.images[:n], seed=config.seed, batch_size=config.batch_size)
                controls.append(Trace.from_standing(t.target, t.scenario, t.attack, "torch", adv == y))
            outcomes = []
            for strategy in strategies(posture):
                tick = ev.progress(f"{strategy.label} on {target.name} under {posture}", n)
                outcomes.append(
                    run_watched(
                        model, x, y, posture, strategy, eps=eps, budget=max(budgets), target=target.name,
                        seed=config.seed, batch_size=config.batch_size, device=config.device, progress=tick,
                    )
                )  # fmt: skip
            queried = [
                Trace(target.name, "query", f"{o.strategy} (knows {posture})", "torch", o.to_break, o.budget)
                for o in outcomes
            ]
            everything = controls + queried
            guard = [d for d in (detection(o) for o in outcomes) if d is not None]
            overhead = latency(posture, target) if latency is not None else None
            rows.append(
                {
                    "posture": str(posture),
                    "target": target.name,
                    "clean_accuracy": clean,
                    "clean_se": binomial_se(clean, len(answers)),
                    "clean_images": len(answers),
                    "latency_overhead": None if overhead is None else float(overhead),
                    "images": n,
                    "worst": at_budgets(everything, budgets, n),
                    "to_break": encode(fastest(everything, n)),
                    "controls": [{"attack": c.label, "robust_accuracy": c.robust(0, n)} for c in controls],
                    "strategies": [o.to_dict() for o in outcomes],
                    # the attacker who knows the guard picks the strategy it catches least
                    "guard": min(guard, key=lambda d: d["detection_rate"] or 0.0) if guard else None,
                }
            )
    return rows


def guard_false_positives(ev: Evaluation, config: RobustnessConfig) -> dict[str, Any] | None:
    """The guard (action ``flag``) on benign traffic: the run's test images in order (i.i.d.) and a camera-like
    stream; None when no posture has a guard."""
    if not any(parse_posture(p).guard for p in config.postures):
        return None
    guard = GuardConfig()
    out: dict[str, Any] = {
        "config": guard.to_dict(),
        "iid": false_positives([img.numpy() for img in ev.images], guard),
    }
    try:
        size = int(ev.images.shape[-1])
        out["camera"] = false_positives(camera_stream(size, config.stream_frames, config.seed), guard)
    except KeyedgeError as exc:  # scikit-image (the samples extra) missing: say so, measure the rest
        out["camera"] = {"skipped": exc.message}
    return out
