"""Query attacks: the target's outputs only (Square, HopSkipJump), one outcome per query budget."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from keyedge.attacks import get_attack, list_attacks, make_attack
from keyedge.benchmarks.robustness.config import RobustnessConfig
from keyedge.benchmarks.robustness.evaluation import Evaluation
from keyedge.benchmarks.robustness.members import Member
from keyedge.benchmarks.robustness.worst import Trace
from keyedge.benchmarks.robustness_report import Outcome
from keyedge.errors import KeyedgeError


def parse_query(spec: str) -> tuple[str, int]:
    """``square:5000`` -> ("square", 5000); ``hsj`` -> ("hsj", its default budget)."""
    names = list_attacks(kind="query")
    hint = "write " + " or ".join(f"{n}[:QUERIES]" for n in names) + ", e.g. square:5000"
    name, _, text = spec.strip().partition(":")
    if name not in names:
        raise KeyedgeError(f"bad query attack {spec!r}", hint)
    try:
        queries = int(text) if text else int(get_attack(name).options()["queries"])
    except ValueError:
        raise KeyedgeError(f"bad query attack {spec!r} (queries must be an integer)", hint) from None
    if queries < 1:
        raise KeyedgeError(f"bad query attack {spec!r} (queries must be >= 1)", hint)
    return name, queries


def query_targets(members: Sequence[Member], config: RobustnessConfig) -> list[Member]:
    """The models the query attacks run on: ``config.query_targets`` by name, or every model."""
    if not config.query:
        return []
    names = {m.name for m in members}
    unknown = sorted(set(config.query_targets) - names)
    if unknown:
        raise KeyedgeError(
            f"no evaluated model named {', '.join(unknown)} for the query attacks", f"use {', '.join(sorted(names))}"
        )
    return [m for m in members if not config.query_targets or m.name in config.query_targets]


def query_outcomes(
    ev: Evaluation,
    target: str,
    model: nn.Module,
    config: RobustnessConfig,
    eps: float,
    norm: str,
    runtime: str = "torch",
) -> list[Outcome]:
    """Each query attack of ``config.query`` on one model (a PyTorch model or a :class:`Queried` artifact):
    one outcome per query budget, read off one run (robust = not broken within that many queries); the per-image
    queries go to ``ev.traces``."""
    n = min(config.query_limit, ev.images.shape[0])
    clean_ok = ev.clean[target][:n] == ev.labels[:n]
    out = []
    for spec in config.query:
        name, queries = parse_query(spec)
        attack = make_attack(name, model, eps=eps, queries=queries, norm=norm, seed=config.seed)
        tick = ev.progress(f"{attack.label()} on {target} ({runtime.split(':')[0]})", n)
        _, used = attack.run_queries(
            ev.images[:n], ev.labels[:n], batch_size=config.batch_size, device=config.device, progress=tick
        )
        info = attack.describe()
        ev.traces.append(Trace(target, "query", attack.label(), runtime, [float(q) for q in used.tolist()], queries))
        for budget in sorted({b for b in config.query_budgets if 0 < b < queries} | {queries}):
            broken = used <= budget
            won = broken & clean_ok  # images the target got right, broken within the budget
            median = float(used[won].median()) if won.any() else None
            record = {"budget": budget, "max": queries, "median_to_success": median, "successes": int(won.sum())}
            out.append(ev.scored("query", target, [target], ~broken, info, runtime, record))
    return out
