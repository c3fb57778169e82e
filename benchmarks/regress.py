"""Regression gate: compare a current latency report with a baseline, like with like.

Measurements are matched on (model, fingerprint or ``plain``, fuse, target,
runtime, device, batch).  The gate fails when

* a matched p50 grew past the threshold: ``current p50 / baseline p50 > thresholds.p50``;
* a keyed/plain (or gather/fold) ratio recorded in the current report has its median above ``thresholds.ratio``;
* both reports carry an accuracy for a matched artifact and it dropped by more than ``thresholds.accuracy_drop``.

Entries present in only one report are listed as unmatched, never failures.
Thresholds come from ``--profile PROFILE.toml`` or else the profile recorded in the current report.
Without a baseline only the ratios are gated: they are measured side by side in one run, so they need
no reference and mean the same on any machine (this repo's own CI gates exactly that, ``make gate``).

    result = compare(LatencyReport.load("base.json"), LatencyReport.load("cur.json"))
    sys.exit(0 if result.passed else 1)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from keyedge.benchmarks.profiles import Thresholds
from keyedge.benchmarks.report import LatencyReport, wide


def _label(key: tuple) -> str:
    model, role, fuse, target, runtime, device, batch = key
    form = f"[{fuse}]" if fuse in ("fold", "conv", "planes") else ""
    return f"{model}-{role}{form} {target} {runtime}:{device} b{batch}"


@dataclass
class Check:
    """One comparison of the gate."""

    kind: str  # p50, ratio, accuracy
    entry: str
    baseline: float | None
    current: float
    value: float  # the compared quantity: current/baseline p50, the ratio median, the accuracy drop
    threshold: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RegressionResult:
    thresholds: Thresholds
    checks: list[Check] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # "baseline only: ..." / "current only: ..."

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def offenders(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "thresholds": self.thresholds.to_dict(),
            "checks": [c.to_dict() for c in self.checks],
            "unmatched": self.unmatched,
        }

    def print_rich(self, console) -> None:
        from rich.table import Table

        rows = self.offenders if not self.passed else self.checks
        table = Table(
            title=("REGRESSIONS" if not self.passed else "no regression")
            + f" (p50 > x{self.thresholds.p50}, ratio > {self.thresholds.ratio}, "
            f"accuracy drop > {self.thresholds.accuracy_drop})"
        )
        for h in ("check", "entry", "baseline", "current", "value", "threshold", "status"):
            table.add_column(h)
        for c in rows:
            table.add_row(
                c.kind,
                c.entry,
                "-" if c.baseline is None else f"{c.baseline:.4g}",
                f"{c.current:.4g}",
                f"{c.value:.3f}",
                f"{c.threshold:g}",
                "ok" if c.passed else "FAIL",
            )
        console = wide(console)
        console.print(table)
        for line in self.unmatched:
            console.print(f"unmatched ({line})", markup=False)
        console.print(
            f"{len(self.checks)} checks, {len(self.offenders)} failed, {len(self.unmatched)} unmatched", markup=False
        )


GATED = ("p50", "ratio", "accuracy")


def compare(
    baseline: LatencyReport | None,
    current: LatencyReport,
    thresholds: Thresholds | None = None,
    *,
    checks: tuple[str, ...] = GATED,
) -> RegressionResult:
    """Gate ``current`` against ``baseline`` (None: ratios only); ``checks`` picks which kinds are gated."""
    if thresholds is None:
        thresholds = Thresholds(**current.profile.get("thresholds", {}))
    result = RegressionResult(thresholds)
    if baseline is None:
        checks = tuple(c for c in checks if c == "ratio")
    base = {m.key: m for m in baseline.measurements} if baseline is not None else {}
    cur = {m.key: m for m in current.measurements} if baseline is not None else {}
    for key, m in cur.items():
        if key not in base:
            result.unmatched.append(f"current only: {_label(key)}")
            continue
        b = base[key]
        value = m.steady.p50 / b.steady.p50 if b.steady.p50 > 0 else float("inf")
        if "p50" in checks:
            result.checks.append(
                Check("p50", _label(key), b.steady.p50, m.steady.p50, value, thresholds.p50, value <= thresholds.p50)
            )
        if "accuracy" in checks and b.artifact.accuracy is not None and m.artifact.accuracy is not None:
            drop = b.artifact.accuracy - m.artifact.accuracy
            result.checks.append(
                Check(
                    "accuracy",
                    _label(key),
                    b.artifact.accuracy,
                    m.artifact.accuracy,
                    drop,
                    thresholds.accuracy_drop,
                    drop <= thresholds.accuracy_drop,
                )
            )
    result.unmatched += [f"baseline only: {_label(k)}" for k in base if k not in cur]
    if "ratio" not in checks:
        return result
    base_ratios = {c.key: c for c in baseline.comparisons} if baseline is not None else {}
    for c in current.comparisons:
        if c.kind not in ("keyed/plain", "gather/fold"):
            continue  # gather/conv and runtime-vs-runtime ratios are informative, not gated
        b = base_ratios.get(c.key)
        entry = f"{c.kind} {c.numerator} / {c.denominator} {c.runtime} b{c.batch}"
        result.checks.append(
            Check(
                "ratio",
                entry,
                b.median if b else None,
                c.median,
                c.median,
                thresholds.ratio,
                c.median <= thresholds.ratio,
            )
        )
    return result
