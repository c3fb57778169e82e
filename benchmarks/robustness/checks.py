"""The trust checks of docs/design.md §10, and the headline: the worst case without the key."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

from keyedge.benchmarks.robustness.config import KEYED_ONLY, RobustnessConfig
from keyedge.benchmarks.robustness.evaluation import Evaluation
from keyedge.benchmarks.robustness.members import Member
from keyedge.benchmarks.robustness_report import Check, Matrix, Outcome, attack_label, binomial_se


def trust_checks(
    ev: Evaluation, outcomes: Sequence[Outcome], transfer: Matrix, eps: float, config: RobustnessConfig
) -> list[Check]:
    checks = []
    white = [o for o in outcomes if o.scenario == "white-box"]
    worst = max(white, key=lambda o: o.robust_accuracy)
    # like the other checks, allow for sampling: on 64 images a 5% limit is 3 images, and one more image left
    # standing is not a broken attack; a broken attack (or wrapper) leaves about the clean accuracy standing
    limit = config.sanity_max + 2 * binomial_se(config.sanity_max, worst.images)
    checks.append(
        Check(
            "white-box attack succeeds",
            worst.robust_accuracy <= limit,
            f"white-box robust accuracy <= {config.sanity_max:.0%} on every model (within 2 standard errors, "
            f"{limit:.1%} on {worst.images} images): max {worst.robust_accuracy:.1%} ({worst.target}); if not, "
            f"the attack or the model wrapper is broken and no other number here can be trusted",
        )
    )
    if config.fgsm_check and config.attack != "fgsm":
        worse = []
        for o in white:
            adv, _ = ev.adversarial([o.target], eps, attack="fgsm")
            fgsm = float((ev.predict(ev.members[o.target].model, adv) == ev.labels).float().mean())
            if o.robust_accuracy > fgsm + 2 * binomial_se(fgsm, o.images):
                worse.append(f"{o.target}: {config.attack} {o.robust_accuracy:.1%} > FGSM {fgsm:.1%}")
            else:
                worse.append(f"{o.target}: {o.robust_accuracy:.1%} <= FGSM {fgsm:.1%}")
        bad = [w for w in worse if ">" in w]
        checks.append(Check(f"{config.attack} does at least as well as FGSM", not bad, "; ".join(worse)))
    violations = []
    for t in transfer.columns:
        diag = transfer.get(t, t)
        for s in transfer.rows:
            if s != t and transfer.get(s, t) < diag - 2 * binomial_se(diag, transfer.images) - 1e-9:
                violations.append(f"{s} -> {t}: {transfer.get(s, t):.1%} < white-box {diag:.1%}")
    checks.append(
        Check(
            "transfer never beats white-box",
            not violations,
            "; ".join(violations)
            or "every off-diagonal robust accuracy >= its white-box one "
            "(within 2 standard errors): no sign of gradient masking",
        )
    )
    return checks


def sweep_checks(points: Sequence[dict[str, Any]]) -> list[Check]:
    bad = []
    curves: dict[tuple, list[dict[str, Any]]] = {}
    for p in points:
        curves.setdefault((p["scenario"], p["target"]), []).append(p)
    for (scenario, target), curve in curves.items():
        curve.sort(key=lambda p: p["eps"])
        if scenario != "white-box":
            continue
        for a, b in itertools.pairwise(curve):
            if b["robust_accuracy"] > a["robust_accuracy"] + 2 * max(a["robust_se"], b["robust_se"], 1e-9):
                bad.append(
                    f"{target}: {b['robust_accuracy']:.1%} at {b['eps_255']:g}/255 > "
                    f"{a['robust_accuracy']:.1%} at {a['eps_255']:g}/255"
                )
    if not curves:
        return []
    return [
        Check(
            "white-box accuracy falls as eps grows",
            not bad,
            "; ".join(bad) or "non-increasing within 2 standard errors on every white-box curve",
        )
    ]


def noise_check(outcomes: Sequence[Outcome]) -> Check:
    """Every attack scenario must leave at most as many images standing as random noise of its budget."""
    noise = {o.target: o for o in outcomes if o.scenario == "noise"}
    weaker, compared = [], 0
    for o in outcomes:
        ref = noise.get(o.target)
        if ref is None or o.scenario in ("noise", "localized"):
            continue
        if o.queries and o.queries["budget"] != o.queries["max"]:  # a query attack at its full budget only
            continue
        compared += 1
        if o.robust_accuracy > ref.robust_accuracy + 2 * math.hypot(o.robust_se, ref.robust_se) + 1e-9:
            label = attack_label(o.attack)
            source = f" from {'+'.join(o.sources)}" if o.sources and o.sources != [o.target] else ""
            weaker.append(
                f"{o.scenario} ({label}{source}) on {o.target}: {o.robust_accuracy:.1%} "
                f"> noise {ref.robust_accuracy:.1%}"
            )
    detail = (
        "; ".join(weaker) + ": these attacks are weaker than random noise of the same budget for those models "
        "(the headline robust accuracy takes the worst case, noise included)"
        if weaker
        else f"all {compared} attack outcomes leave at most as many images standing as noise (within 2 standard errors)"
    )
    return Check("every attack does at least as well as random noise", not weaker, detail)


def headline(outcomes: Sequence[Outcome], members: Sequence[Member]) -> list[dict[str, Any]]:
    """Per model, the worst robust accuracy over everything an attacker without its key can run at the budget.

    Keyed models: transfer (non-adaptive, adaptive, multi-key EoT, cross-arch), the noise control and the query
    attacks, on PyTorch and on the deployed artifacts; not white-box (it needs the key). Models without a key
    (plain, volumized): white-box too -- the attacker holds everything.  Localized attacks have another budget
    (pixels, area) and are reported on their own.
    """
    rows = []
    for m in members:
        excluded = set(KEYED_ONLY) if m.keyed else {"localized"}
        candidates = [o for o in outcomes if o.target == m.name and o.scenario not in excluded]
        if not candidates:
            continue
        worst = min(candidates, key=lambda o: (o.robust_accuracy, -o.images))
        rows.append(
            {
                "target": m.name,
                "role": m.role,
                "robust_accuracy": worst.robust_accuracy,
                "robust_se": worst.robust_se,
                "images": worst.images,
                "scenario": worst.scenario,
                "sources": worst.sources,
                "attack": worst.attack["name"] if worst.queries else attack_label(worst.attack),
                "queries": worst.queries["budget"] if worst.queries else None,
                "runtime": worst.runtime,
                "over": sorted({o.scenario for o in candidates}),
            }
        )
    return rows
