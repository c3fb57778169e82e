"""The quickstart's summary: the numbers a newcomer looks at first, as JSON and as a markdown table.

Data first: :func:`summarize` builds the ``keyedge-quickstart/1`` record from the stages' results,
:func:`summary_rows` and :func:`to_markdown` render it.
"""

from __future__ import annotations

from typing import Any

from keyedge.deploy.parity import MAX_ACCURACY_DROP, MIN_AGREEMENT, AgreementCheck, Parity

SCHEMA = "keyedge-quickstart/1"


def verified(parity: Parity) -> dict[str, Any]:
    """How an artifact was verified, for the summary; an int8 one with its agreement, judged by the default rule."""
    real = parity.checks.get("real")
    if parity.kind == "agreement" and isinstance(real, AgreementCheck):
        drop = real.accuracy_drop_points
        meets = real.top1_agreement >= MIN_AGREEMENT and (drop is None or drop <= MAX_ACCURACY_DROP)
        labelled = real.accuracy is not None and real.accuracy_fp32 is not None
        return {
            "verified": meets,
            "how": f"int8: top-1 agreement {real.top1_agreement:.1%} with fp32 on {real.images} test images"
            + (f", accuracy {real.accuracy:.1%} vs {real.accuracy_fp32:.1%}" if labelled else "")
            + ("" if meets else f" (below the default rule: >= {MIN_AGREEMENT:.0%}, drop <= {MAX_ACCURACY_DROP:g})"),
            "agreement": real.top1_agreement,
            "accuracy": real.accuracy,
            "accuracy_fp32": real.accuracy_fp32,
        }
    return {
        "verified": parity.passed,
        "how": "numerical parity" if parity.ran else f"structural ({parity.reason or 'not run here'})",
    }


def robustness_summary(robustness: Any, config: Any) -> dict[str, Any]:
    """The robustness part of the summary: sanity, headline, scenarios, deployed artifacts, query attacks."""
    scenarios = {
        f"{o.scenario}:{o.target}": {
            "robust_accuracy": o.robust_accuracy,
            "robust_se": o.robust_se,
            "sources": o.sources,
            "images": o.images,
        }
        for o in robustness.outcomes
        if o.scenario != "query"
    }
    deployed = {
        f"{o.scenario}:{o.runtime.split(':')[0]}"
        + ("" if o.precision == "fp32" else f" {o.precision}"): o.robust_accuracy
        for o in robustness.artifacts
        if o.scenario != "query"
    }
    queries = [
        {
            "target": o.target,
            "runtime": o.runtime.split(":")[0] + ("" if o.precision == "fp32" else f" {o.precision}"),
            "attack": o.attack["name"],
            "queries": o.queries["budget"],
            "robust_accuracy": o.robust_accuracy,
            "robust_se": o.robust_se,
            "images": o.images,
            "median_to_success": o.queries["median_to_success"],
        }
        for o in robustness.outcomes + robustness.artifacts
        if o.scenario == "query"
    ]

    postures = [
        {
            "posture": p["posture"],
            "target": p["target"],
            "clean_accuracy": p["clean_accuracy"],
            "latency_overhead": p["latency_overhead"],
            "images": p["images"],
            "worst": {str(w["budget"]): [w["robust_accuracy"], w["robust_se"], w["attack"]] for w in p["worst"]},
        }
        for p in getattr(robustness, "postures", [])
    ]
    return {
        "sanity_passed": robustness.sanity["passed"],
        "headline": robustness.headline,
        "postures": postures,
        "scenarios": scenarios,
        "deployed": deployed,
        "queries": queries,
        "checks": [c.to_dict() for c in robustness.checks],
        "images": robustness.data["images"],
        "seed": config.seed,
        "eps": config.eps,
        "steps": config.attack_steps,
    }


def summarize(
    config: Any, keys, key_check, exported, latency, robustness, stages, total_s, device_latency=None
) -> dict[str, Any]:
    """The numbers a newcomer looks at first, with where the full reports are (``config``: a QuickstartConfig)."""
    models = {
        name: {"clean_accuracy": v["own"], "wrong_key_accuracy": v["other"], "images": v["images"]}
        for name, v in key_check.items()
    }

    def keyed_plain(report, kind: str = "keyed/plain") -> dict[str, dict[str, float]]:
        return {
            f"{c.kind} {c.runtime}": {"median": c.median, "p10": c.p10, "p90": c.p90, "rounds": c.rounds}
            for c in report.comparisons
            if c.kind == kind
        }

    ratios = keyed_plain(latency)
    return {
        "schema": SCHEMA,
        "config": config.to_dict(),
        "total_seconds": round(total_s, 1),
        "stages": stages,
        "keys": {k: key.fingerprint for k, key in keys.items()},
        "models": models,
        "artifacts": exported,
        "latency": ratios,
        "latency_at_size": (
            {"image_size": config.latency_size, "ratios": keyed_plain(device_latency)} if device_latency else None
        ),
        "latency_int8": keyed_plain(latency, "int8/fp32"),
        "latency_skipped": [f"{s.runtime}:{s.device}: {s.reason}" for s in latency.skipped],
        "robustness": robustness_summary(robustness, config),
        "files": {
            "report": "report/quickstart.md",
            "latency": "report/latency.md",
            "robustness": "report/robustness/robustness.md",
            "plots": "report/robustness/*.png",
            "keys": "keys/",
            "checkpoints": "runs/",
            "artifacts": "artifacts/",
        },
    }


def _ratio(r: dict[str, Any]) -> str:
    return f"{r['median']:.3f} (p10-p90 of {r.get('rounds', '?')} interleaved rounds: {r['p10']:.3f}-{r['p90']:.3f})"


def _model_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    for name, m in summary["models"].items():
        label = "plain model" if name == "plain" else f"keyed model {name}"
        rows.append((f"{label}: clean accuracy ({m['images']} test images)", f"{m['clean_accuracy']:.1%}"))
        other = f"{label}: with the other key" if name != "plain" else "plain model on k1-shuffled input"
        rows.append((other, f"{m['wrong_key_accuracy']:.1%}"))
    verified = sum(a["verified"] for a in summary["artifacts"])
    targets = ", ".join(sorted({a["target"] for a in summary["artifacts"]}))
    rows.append(("artifacts verified", f"{verified}/{len(summary['artifacts'])} ({targets})"))
    return rows


def _latency_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    rows = []
    size = summary["config"]["image_size"]
    at = summary.get("latency_at_size")
    sizes = [(f"{size}x{size}, the trained models", summary["latency"])]
    sizes += [(f"{at['image_size']}x{at['image_size']}, random weights", at["ratios"])] if at else []
    for label, ratios in sizes:
        for key, r in ratios.items():
            rows.append((f"latency keyed/plain {key.split(' ', 1)[1]} at {label}", _ratio(r)))
    if not at:
        rows.append(("latency keyed/plain at a device size", "not measured (--fast: the 224x224 leg is left out)"))
    for a in summary["artifacts"]:
        if a.get("precision") == "int8":
            rows.append((f"int8 k1 artifact ({a['target']})", a["how"]))
    for key, r in summary.get("latency_int8", {}).items():
        rows.append((f"latency int8/fp32 of k1 {key.split(' ', 1)[1]} at {size}x{size}", _ratio(r)))
    return rows


def _robustness_rows(rob: dict[str, Any]) -> list[tuple[str, str]]:
    rows = [("white-box sanity (PGD must break every model)", "passed" if rob["sanity_passed"] else "FAILED")]
    for key, r in rob["scenarios"].items():
        scenario, target = key.split(":")
        if target == "k1" or scenario == "white-box":
            sources = f" (from {'+'.join(r['sources'])})" if r["sources"] else " (random signs, no model)"
            rows.append(
                (
                    f"robust accuracy {scenario} on {target}{sources}",
                    f"{r['robust_accuracy']:.1%} ± {r['robust_se']:.1%}",
                )
            )
    for key, acc in rob["deployed"].items():
        rows.append((f"deployed k1 artifact, {key.replace(':', ' on ')}", f"{acc:.1%}"))
    for q in rob.get("queries", []):
        where = f"deployed k1 artifact ({q['runtime']})" if q["runtime"] != "torch" else q["target"]
        what = f"{q['attack']} query attack, {q['queries']} queries, on {where} ({q['images']} images)"
        rows.append((what, f"{q['robust_accuracy']:.1%} ± {q['robust_se']:.1%}"))
    for p in rob.get("postures", []):
        latency = "" if p["latency_overhead"] is None else f", latency {p['latency_overhead']:.2f}x scores"
        for budget, (robust, se, attack) in p["worst"].items():
            what = (
                f"posture {p['posture']} on {p['target']}: worst case without the key at {int(budget):,} queries "
                f"({p['images']} images; clean {p['clean_accuracy']:.1%}{latency})"
            )
            rows.append((what, f"{robust:.1%} ± {se:.1%} ({attack})"))
    for h in rob.get("headline", []):
        if h["target"] in ("plain", "k1"):
            worst = h["scenario"] + (f" {h['attack']} {h['queries']}q" if h["queries"] else "")
            what = f"headline robust accuracy of {h['target']}: worst case without the key ({worst}, {h['runtime']})"
            rows.append((what, f"{h['robust_accuracy']:.1%} ± {h['robust_se']:.1%}"))
    return rows


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(what, result) rows of the summary table."""
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in summary["stages"].items())
    return [
        *_model_rows(summary),
        *_latency_rows(summary),
        *_robustness_rows(summary["robustness"]),
        ("total time", f"{summary['total_seconds']:.0f} s ({stages})"),
    ]


def to_markdown(summary: dict[str, Any]) -> str:
    rob = summary["robustness"]
    lines = [
        "# keyedge quickstart",
        "",
        f"{summary['config']['model']} ({summary['config']['weights']} weights), {summary['config']['finetune']} "
        f"fine-tuning on {summary['config']['data']}; robustness on {rob['images']} test images, PGD eps "
        f"{rob['eps']}, {rob['steps']} steps, seed {rob['seed']}; ± is one binomial standard error.",
        "",
        "| what | result |",
        "|---|---|",
    ]
    lines += [f"| {what} | {result} |" for what, result in summary_rows(summary)]
    lines += ["", "Full reports: " + ", ".join(f"{k}: `{v}`" for k, v in summary["files"].items()), ""]
    return "\n".join(lines)
