"""The robustness report (``keyedge-robustness/1``): data first (JSON), then markdown, a rich table and PNG plots.

``write(out)`` produces, all or nothing (a temporary directory renamed into place):

* ``robustness.json``  -- the whole report (schema in ``docs/robustness-report.md``),
* ``robustness.md``    -- the same as tables, trust checks and white-box sanity first,
* ``key-diversity.png``, ``transferability.png``, ``gradient-similarity.png`` -- heatmaps,
* ``eps-sweep.png``, ``block-size.png``, ``queries.png``, ``postures.png`` -- curves (when there is something to
  draw): robust accuracy against queries is read off the per-image queries until broken, one run per attack.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from keyedge.attacks import ATTACKS
from keyedge.benchmarks.report import wide
from keyedge.deps import require
from keyedge.errors import KeyedgeError
from keyedge.fileio import staged_directory
from keyedge.stats import binomial_se
from keyedge.validate import Fields, read_dataclass, read_json

SCHEMA = "keyedge-robustness/1"


# --------------------------------------------------------------------------- what a run finds (filled by the harness)


@dataclass
class Outcome:
    """One adversarial set classified by one target."""

    scenario: str
    target: str
    sources: list[str]
    attack: dict[str, Any]
    images: int
    clean_accuracy: float
    robust_accuracy: float
    attack_success_rate: float | None  # of the images the target got right clean: share wrong after the attack
    fooling_ratio: float | None  # the same over images source(s) and target both got right (orthogonal §IV)
    fooling_images: int  # how many images the fooling ratio is over
    runtime: str = "torch"  # or onnx:<file> / openvino:<file> for deployed artifacts
    queries: dict[str, Any] | None = None  # query attacks: budget, median queries to success, successes
    precision: str = "fp32"  # of the model classifying: fp32 (PyTorch), or the deployed artifact's (fp16, int8)

    @property
    def robust_se(self) -> float:
        return binomial_se(self.robust_accuracy, self.images)

    @property
    def clean_se(self) -> float:
        return binomial_se(self.clean_accuracy, self.images)

    @property
    def delta(self) -> float:
        """The volumization paper's robustness score: accuracy under attack - clean accuracy."""
        return self.robust_accuracy - self.clean_accuracy

    @property
    def defense_success_rate(self) -> float | None:
        """Of the attacked images the target got right, the share it still gets right (1 - attack success)."""
        return None if self.attack_success_rate is None else 1.0 - self.attack_success_rate

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            "robust_se": self.robust_se,
            "clean_se": self.clean_se,
            "delta": self.delta,
            "defense_success_rate": self.defense_success_rate,
        }


@dataclass
class Matrix:
    """A models x columns table: key diversity, transferability or gradient similarity."""

    kind: str
    rows: list[str]
    columns: list[str]
    values: list[list[float | None]]
    images: int
    note: str = ""

    def get(self, row: str, column: str) -> float | None:
        return self.values[self.rows.index(row)][self.columns.index(column)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Check:
    """A trust check of docs/design.md §10, with the numbers behind it."""

    name: str
    passed: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def attack_label(attack: dict[str, Any]) -> str:
    """The attack's ``label`` from its ``describe()``; for older reports without one, its class's ``label_format``."""
    if "label" in attack:
        return str(attack["label"])
    name = ATTACKS.resolve(str(attack.get("name")))
    try:
        return ATTACKS.get(name).label_format.format_map(attack)
    except (AttributeError, KeyError, TypeError, ValueError):  # an unknown name is a ValueError
        return str(attack.get("name"))


def block_size_points(outcomes: Sequence[Outcome], models: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Clean and robust accuracy vs block size (paper Fig. 7), from the scenario outcomes of keyed full models."""
    by_name = {m["name"]: m for m in models}
    points = []
    for o in outcomes:
        m = by_name.get(o.target, {})
        if m.get("block_size") and o.runtime == "torch" and o.scenario not in ("localized", "query"):
            points.append(
                {
                    "block_size": m["block_size"],
                    "finetune": m["finetune"],
                    "target": o.target,
                    "scenario": o.scenario,
                    "clean_accuracy": o.clean_accuracy,
                    "robust_accuracy": o.robust_accuracy,
                    "robust_se": o.robust_se,
                }
            )
    return points


def precision_pairs(outcomes: Sequence[Outcome], artifacts: Sequence[Outcome]) -> list[tuple[Outcome, Outcome]]:
    """Each quantized artifact's outcome beside its fp32 counterpart: the fp32 artifact of the same target
    and runtime classifying the same set where it was evaluated too, else the PyTorch model.

    The sets were crafted on the differentiable fp32 models: an int8 artifact's white-box figure is a transfer
    from fp32 (it has no gradients); its query attacks ran on the artifact itself.
    """

    def same(o: Outcome) -> tuple:
        budget = o.queries["budget"] if o.queries else None
        return (o.scenario, o.target, tuple(o.sources), attack_label(o.attack), budget)

    fp32 = {(same(o), o.runtime.split(":")[0]): o for o in artifacts if o.precision == "fp32"}
    torch_ = {same(o): o for o in outcomes if o.runtime == "torch"}
    pairs = []
    for o in artifacts:
        if o.precision == "fp32":
            continue
        match = fp32.get((same(o), o.runtime.split(":")[0])) or torch_.get(same(o))
        if match is not None:
            pairs.append((match, o))
    return pairs


# --------------------------------------------------------------------------- reading a report back


# the fields of the report's plain-dict rows that its text and plots read: name -> (type, optional: False,
# True (may be absent or null) or "null" (must be present, may be null))
_MODEL = {
    "name": (str, False),
    "role": (str, False),
    "finetune": (str, False),
    "block_size": (int, True),
    "recipe": (str, True),
}
_SWEEP = {
    "target": (str, False),
    "scenario": (str, False),
    "eps_255": (float, False),
    "images": (int, False),
    "robust_accuracy": (float, False),
    "robust_se": (float, False),
}
_HEADLINE = {
    **{k: v for k, v in _SWEEP.items() if k != "eps_255"},
    "role": (str, False),
    "attack": (str, False),
    "runtime": (str, False),
    "sources": (list, False),
    "over": (list, False),
    "queries": (int, True),
}
_QUERIES = {"budget": (int, False), "max": (int, False), "median_to_success": (float, "null")}
_DATA = {"images": (int, False), "name": (str, False), "image_size": (int, False)}
_CONFIG = {
    "seed": (object, False),
    "attack": (object, False),
    "eps": (object, False),
    "steps": (object, False),
    "query": (list, True),
    "query_limit": (int, True),
}
_SKIPPED = {"scenario": (str, False), "target": (str, False), "reason": (str, False)}
_BUDGET = {
    "budget": (int, False),
    "robust_accuracy": (float, False),
    "robust_se": (float, False),
    "attack": (str, False),
    "attack_robust_accuracy": (float, False),
}
_WORST = {"target": (str, False), "role": (str, False), "images": (int, False), "over": (list, False)}
_POSTURE = {
    "posture": (str, False),
    "target": (str, False),
    "clean_accuracy": (float, False),
    "clean_se": (float, False),
    "clean_images": (int, False),
    "latency_overhead": (float, "null"),
    "images": (int, False),
}
_GUARD = {"strategy": (str, False), "detection_rate": (float, "null"), "median_queries_to_flag": (float, "null")}
_STREAM = {"queries": (int, False), "flagged": (int, False), "rate": (float, False)}


def _to_break(f: Fields, name: str) -> list[float]:
    """Per image, the queries until broken (null: never) -> floats with inf for never."""
    value = f.raw(name)
    if not isinstance(value, list) or not all(
        v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < math.inf) for v in value
    ):
        raise f.fail(name, "must be a list of query counts >= 0 (null: never broken)")
    return [math.inf if v is None else float(v) for v in value]


def _read_worst(f: Fields) -> list[dict[str, Any]]:
    rows = []
    for row in f.objs("worst_case"):
        _check(row, _WORST)
        _rows(row, "budgets", _BUDGET)
        _to_break(row, "to_break")
        rows.append(dict(row.data))
    return rows


def _read_postures(f: Fields) -> list[dict[str, Any]]:
    rows = []
    for row in f.objs("postures"):
        _check(row, _POSTURE)
        _rows(row, "worst", _BUDGET)
        _to_break(row, "to_break")
        for strategy in row.objs("strategies"):
            strategy.str("strategy")
            _to_break(strategy, "to_break")
        if row.raw("guard", None) is not None:
            _rows(row, "guard", _GUARD, single=True)
        rows.append(dict(row.data))
    return rows


def _read_false_positives(f: Fields) -> dict[str, Any] | None:
    fp = f.obj("guard_false_positives", optional=True)
    if fp is None:
        return None
    for name in ("iid", "camera"):
        stream = fp.obj(name, optional=True)
        if stream is not None and not stream.has("skipped"):
            _rows(fp, name, _STREAM, single=True)
        elif stream is not None:
            stream.str("skipped")
    return dict(fp.data)


def _matrix(m: Fields) -> Matrix:
    matrix = read_dataclass(Matrix, m)
    values = matrix.values
    if len(values) != len(matrix.rows) or not all(
        isinstance(row, list)
        and len(row) == len(matrix.columns)
        and all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in row)
        for row in values
    ):
        raise m.fail("values", "must be one list of numbers (or null) per row, one per column")
    return matrix


def _check(row: Fields, spec: dict[str, tuple[type, bool | str]]) -> None:
    """Check the fields ``spec`` names in one object."""
    for key, (kind, optional) in spec.items():
        if optional and (row.raw(key) if optional == "null" else row.raw(key, None)) is None:
            continue  # True: may be absent or null; "null": must be there, may be null
        if kind is str:
            row.str(key)
        elif kind is int:
            row.int(key)
        elif kind is float:
            row.float(key)
        elif kind is list:
            row.strs(key)
        else:  # shown as it is: only needs to be there
            row.raw(key)


def _rows(f: Fields, name: str, spec: dict[str, tuple[type, bool | str]], *, single: bool = False) -> Any:
    """Check the fields ``spec`` names in the list of objects ``name`` (or the one object, ``single``)."""
    rows = [f.obj(name)] if single else f.objs(name)
    for row in rows:
        _check(row, spec)
    return rows[0].data if single else [row.data for row in rows]


_OUTCOME_HEADERS = [
    "scenario",
    "target",
    "source(s)",
    "runtime",
    "n",
    "clean",
    "robust",
    "attack success",
    "fooling ratio",
]


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table, and the blank line after it."""
    return (
        ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        + ["| " + " | ".join(r) + " |" for r in rows]
        + [""]
    )


@dataclass
class RobustnessReport:
    environment: dict[str, Any]
    config: dict[str, Any]
    data: dict[str, Any]
    models: list[dict[str, Any]]
    outcomes: list[Outcome] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    matrices: list[Matrix] = field(default_factory=list)
    sweeps: list[dict[str, Any]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    artifacts: list[Outcome] = field(default_factory=list)
    headline: list[dict[str, Any]] = field(default_factory=list)
    #: per model, the worst case per image on one common subset, at each query budget (benchmarks.robustness.worst)
    worst_case: list[dict[str, Any]] = field(default_factory=list)
    #: per (posture, model): clean accuracy, latency overhead, worst case per image at each budget, the guard
    postures: list[dict[str, Any]] = field(default_factory=list)
    #: the query guard on benign traffic (i.i.d. test images, a camera-like stream); None: no posture has a guard
    guard_false_positives: dict[str, Any] | None = None
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    schema: str = SCHEMA

    # ---------------------------------------------------------------- data

    @property
    def sanity(self) -> dict[str, Any]:
        white = [o for o in self.outcomes if o.scenario == "white-box"]
        check = next((c for c in self.checks if c.name == "white-box attack succeeds"), None)
        return {"passed": bool(check and check.passed), "white_box": {o.target: o.robust_accuracy for o in white}}

    def matrix(self, kind: str) -> Matrix | None:
        return next((m for m in self.matrices if m.kind == kind), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "created": self.created,
            "sanity": self.sanity,
            "headline": self.headline,
            "worst_case": self.worst_case,
            "postures": self.postures,
            "guard_false_positives": self.guard_false_positives,
            "environment": self.environment,
            "config": self.config,
            "data": self.data,
            "models": self.models,
            "checks": [c.to_dict() for c in self.checks],
            "outcomes": [o.to_dict() for o in self.outcomes],
            "skipped": self.skipped,
            "matrices": [m.to_dict() for m in self.matrices],
            "sweeps": {"eps": self.sweeps, "block_size": block_size_points(self.outcomes, self.models)},
            "artifacts": [o.to_dict() for o in self.artifacts],
            "precision_pairs": [
                {"fp32": f.to_dict(), "quantized": q.to_dict()}
                for f, q in precision_pairs(self.outcomes, self.artifacts)
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<report>") -> RobustnessReport:
        schema = data.get("schema") if isinstance(data, dict) else None
        if schema != SCHEMA:
            raise KeyedgeError(
                f"{source} is not a {SCHEMA} report (schema: {schema!r})",
                "pass a robustness.json written by `keyedge bench robustness`",
            )
        f = Fields(data, source, "pass a robustness.json written by `keyedge bench robustness`")
        derived = ("robust_se", "clean_se", "delta", "defense_success_rate")

        def outcome(o: Fields) -> Outcome:
            o.obj("attack").str("name")
            if o.has("queries") or o.raw("scenario") == "query":  # a query attack's outcome needs its budgets
                _rows(o, "queries", _QUERIES, single=True)
            return read_dataclass(Outcome, o, skip=derived)

        def outcomes(name: str) -> list[Outcome]:
            return [outcome(o) for o in f.objs(name)] if f.has(name) else []

        sweeps = f.obj("sweeps")
        config = _rows(f, "config", _CONFIG, single=True)
        if config.get("query"):  # the header names the images query attacks ran on
            f.obj("config").int("query_limit")
        return cls(
            environment=f.dict("environment"),
            config=config,
            data=_rows(f, "data", _DATA, single=True),
            models=_rows(f, "models", _MODEL),
            outcomes=outcomes("outcomes"),
            skipped=_rows(f, "skipped", _SKIPPED) if f.has("skipped") else [],
            matrices=[_matrix(m) for m in f.objs("matrices")],
            sweeps=_rows(sweeps, "eps", _SWEEP),
            checks=[read_dataclass(Check, c) for c in f.objs("checks")],
            artifacts=outcomes("artifacts"),
            headline=_rows(f, "headline", _HEADLINE) if f.has("headline") else [],
            worst_case=_read_worst(f) if f.has("worst_case") else [],
            postures=_read_postures(f) if f.has("postures") else [],
            guard_false_positives=_read_false_positives(f),
            created=f.str("created", default=""),
        )

    @classmethod
    def load(cls, path: str | Path) -> RobustnessReport:
        path = Path(path)
        data = read_json(path, "robustness report", "give a report written by `keyedge bench robustness --out`").data
        return cls.from_dict(data, str(path))

    # ---------------------------------------------------------------- text

    def _outcome_rows(self, outcomes: list[Outcome]) -> list[list[str]]:
        def pct(v: float | None) -> str:
            return "-" if v is None else f"{v:.1%}"

        return [
            [
                o.scenario,
                o.target,
                "+".join(o.sources),
                o.runtime,
                str(o.images),
                f"{o.clean_accuracy:.1%} ± {o.clean_se:.1%}",
                f"{o.robust_accuracy:.1%} ± {o.robust_se:.1%}",
                pct(o.attack_success_rate),
                f"{pct(o.fooling_ratio)} (n={o.fooling_images})",
            ]
            for o in outcomes
        ]

    def _header(self) -> str:
        c, d = self.config, self.data
        queries = f"; query attacks {', '.join(c['query'])} on {c['query_limit']} images" if c.get("query") else ""
        return (
            f"{d['images']} {d['name']} test images at {d['image_size']}px (seed {c['seed']}); attack "
            f"{c['attack']} eps {c['eps']}, {c['steps']} steps, seed {c['seed']}{queries}; "
            f"± is one binomial standard error"
        )

    def _headline_rows(self) -> list[list[str]]:
        return [
            [
                h["target"],
                h["role"],
                f"{h['robust_accuracy']:.1%} ± {h['robust_se']:.1%}",
                h["scenario"] + (f" ({h['queries']} queries)" if h.get("queries") else ""),
                h["attack"]
                + (f" from {'+'.join(h['sources'])}" if h["sources"] and h["sources"] != [h["target"]] else ""),
                h["runtime"],
                str(h["images"]),
                ", ".join(h["over"]),
            ]
            for h in self.headline
        ]

    def _precision_rows(self) -> list[list[str]]:
        return [
            [
                q.scenario,
                q.target,
                "+".join(q.sources),
                attack_label(q.attack) + (f" ({q.queries['budget']} queries)" if q.queries else ""),
                str(q.images),
                f.runtime,
                f"{f.robust_accuracy:.1%} ± {f.robust_se:.1%}",
                f"{q.runtime} ({q.precision})",
                f"{q.robust_accuracy:.1%} ± {q.robust_se:.1%}",
                f"{100 * (q.robust_accuracy - f.robust_accuracy):+.1f} points",
            ]
            for f, q in precision_pairs(self.outcomes, self.artifacts)
        ]

    def _query_rows(self, outcomes: list[Outcome]) -> list[list[str]]:
        def median(q: dict[str, Any]) -> str:
            return "-" if q["median_to_success"] is None else f"{q['median_to_success']:g}"

        return [
            [
                o.target,
                o.runtime,
                attack_label(o.attack).split(" ")[0],
                str(o.queries["budget"]),
                str(o.images),
                f"{o.clean_accuracy:.1%}",
                f"{o.robust_accuracy:.1%} ± {o.robust_se:.1%}",
                "-" if o.attack_success_rate is None else f"{o.attack_success_rate:.1%}",
                median(o.queries),
            ]
            for o in outcomes
            if o.scenario == "query"
        ]

    def to_markdown(self) -> str:
        lines = ["# Robustness", "", self._header(), ""]
        for section in (
            self._md_models,
            self._md_worst_case,
            self._md_postures,
            self._md_headline,
            self._md_checks,
            self._md_scenarios,
            self._md_queries,
            self._md_localized,
            self._md_deployed,
            self._md_quantized,
            self._md_matrices,
            self._md_sweeps,
        ):
            lines += section()
        return "\n".join(lines)

    def _md_models(self) -> list[str]:
        lines = ["## Models and how each was fine-tuned", ""]
        lines += _table(
            ["model", "role", "architecture", "block size", "fine-tune recipe"],
            [
                [
                    m["name"],
                    m["role"],
                    str(m.get("arch", "-")),
                    "-" if m.get("block_size") is None else str(m["block_size"]),
                    m.get("recipe") or m["finetune"],
                ]
                for m in self.models
            ],
        )
        return lines

    def _worst_case_rows(self) -> list[list[str]]:
        return [
            [
                w["target"],
                w["role"],
                f"{b['budget']:,}" if b["budget"] else "none",
                f"{b['robust_accuracy']:.1%} ± {b['robust_se']:.1%}",
                str(w["images"]),
                b["attack"],
                f"{b['attack_robust_accuracy']:.1%}",
                str(len(w["over"])),
            ]
            for w in self.worst_case
            for b in w["budgets"]
        ]

    def _md_worst_case(self) -> list[str]:
        if not self.worst_case:
            return []
        lines = [
            "## Headline: the worst case per image without the key",
            "",
            "On one common subset of images (the query attacks' images: the first n of the run's, the same images "
            "by index), an image counts as broken when *any* attack an attacker without the key can run broke it: "
            "transfer from every other model (the plain model, every surrogate key and fine-tune recipe, other "
            "architectures), multi-key EoT, the random-noise control, and the query attacks (PyTorch and deployed) "
            "within the query budget. Not white-box, which needs the key (models without a key: white-box too). "
            "Closest single attack: the one attack with the lowest robust accuracy on the same images.",
            "",
        ]
        return lines + _table(
            ["model", "role", "queries", "robust (worst per image)", "n", "closest single attack", "its robust",
             "attacks"],
            self._worst_case_rows(),
        )  # fmt: skip

    def _posture_rows(self) -> tuple[list[str], list[list[str]]]:
        budgets = sorted({b["budget"] for p in self.postures for b in p["worst"]})
        fp = self.guard_false_positives or {}

        def stream(name: str) -> str:
            s = fp.get(name) or {}
            if s.get("skipped") is not None:
                return "not measured"
            return "-" if "rate" not in s else f"{s['rate']:.1%} ({s['flagged']}/{s['queries']})"

        def guard(g: dict[str, Any] | None) -> list[str]:
            if g is None:
                return ["-", "-", "-"]
            rate = "-" if g["detection_rate"] is None else f"{g['detection_rate']:.0%} ({g['strategy']})"
            first = "-" if g["median_queries_to_flag"] is None else f"{g['median_queries_to_flag']:g}"
            return [rate, first, f"{stream('iid')} / {stream('camera')}"]

        headers = ["posture", "model", "clean", "latency vs scores"]
        headers += [f"worst @{b:,} queries (closest attack)" for b in budgets]
        headers += ["n", "guard detects", "queries to flag", "false positives i.i.d. / camera"]
        rows = []
        for p in self.postures:
            worst = {b["budget"]: b for b in p["worst"]}
            cells = [
                p["posture"],
                p["target"],
                f"{p['clean_accuracy']:.1%} ± {p['clean_se']:.1%} (n={p['clean_images']})",
                "not measured" if p["latency_overhead"] is None else f"{p['latency_overhead']:.3f}x",
            ]
            for b in budgets:
                w = worst.get(b)
                cells.append("-" if w is None else f"{w['robust_accuracy']:.1%} ± {w['robust_se']:.1%} ({w['attack']})")
            rows.append([*cells, str(p["images"]), *guard(p.get("guard"))])
        return headers, rows

    def _md_postures(self) -> list[str]:
        if not self.postures:
            return []
        lines = [
            "## Postures: what the device answers, against attackers who know it",
            "",
            "Per deployment posture and model: clean accuracy through the device (its noise included); latency "
            "overhead against `scores` (a ratio, where measured); the worst case per image without the key at each "
            "budget of device queries per image (refused ones included), over the attacks that know the posture "
            "(each run once to the largest budget), the run's transfer sets and the noise control answered by the "
            "device, with the single attack that came closest; the guard: the share of attacked images whose "
            "attacker it flagged (for the strategy it caught least), the median of their queries until the first "
            "flag, and its false positives on benign traffic (the test images in order; a camera-like stream of "
            "near-duplicates).",
            "",
        ]
        lines += _table(*self._posture_rows())
        timed = [
            f"{p['posture']} on {p['target']}: {s['strategy']} {s['minutes_to_break']:.1f}"
            for p in self.postures
            for s in p["strategies"]
            if isinstance(s.get("minutes_to_break"), (int, float)) and not isinstance(s["minutes_to_break"], bool)
        ]
        if timed:  # a rate limit turns queries into time
            lines += ["At the posture's rate limit, median minutes until an image broke: " + "; ".join(timed) + ".", ""]
        return lines

    def _md_headline(self) -> list[str]:
        if not self.headline:
            return []
        title = "## The strongest single attack" if self.worst_case else "## Headline"
        lines = [
            f"{title}: the worst case over everything an attacker without the key can run",
            "",
            "Keyed models: transfer attacks, the random-noise control and query attacks (PyTorch and deployed); "
            "not white-box, which needs the key. Models without a key: white-box too. The minimum over outcomes "
            "(their numbers of images differ).",
            "",
        ]
        return lines + _table(
            ["model", "role", "robust", "worst scenario", "attack", "runtime", "n", "over"], self._headline_rows()
        )

    def _md_checks(self) -> list[str]:
        rows = [[c.name, "yes" if c.passed else "**NO**", c.detail] for c in self.checks]
        return ["## Trust checks (white-box sanity first)", "", *_table(["check", "passed", "detail"], rows)]

    def _md_scenarios(self) -> list[str]:
        gradient = [o for o in self.outcomes if o.scenario not in ("localized", "query")]
        return ["## Scenarios", "", *_table(_OUTCOME_HEADERS, self._outcome_rows(gradient))]

    def _md_queries(self) -> list[str]:
        queried = self._query_rows(self.outcomes + self.artifacts)
        if not queried:
            return []
        lines = [
            "## Query attacks (the target's outputs only: no gradients, no key)",
            "",
            "Robust accuracy after at most `budget` queries per image, read off one run; median queries: "
            "of the images the target got right and the attack broke within the budget.",
            "",
        ]
        return lines + _table(
            ["target", "runtime", "attack", "budget", "n", "clean", "robust", "attack success", "median queries"],
            queried,
        )

    def _md_localized(self) -> list[str]:
        """The localized attacks, then the scenarios that could not run."""
        lines = []
        localized = [o for o in self.outcomes if o.scenario == "localized"]
        if localized:
            lines += [
                "## Localized attacks (white-box on each model)",
                "",
                "δ = accuracy under attack − clean accuracy (higher is more robust); defense success = share of "
                "the correctly classified attacked images still classified correctly.",
                "",
            ]
            lines += _table(
                ["target", "attack", "n", "clean", "under attack", "δ", "defense success"],
                [
                    [
                        o.target,
                        attack_label(o.attack),
                        str(o.images),
                        f"{o.clean_accuracy:.1%}",
                        f"{o.robust_accuracy:.1%} ± {o.robust_se:.1%}",
                        f"{o.delta:+.1%}",
                        "-" if o.defense_success_rate is None else f"{o.defense_success_rate:.1%}",
                    ]
                    for o in localized
                ],
            )
        if self.skipped:
            lines += [
                "Not run: " + "; ".join(f"{s['scenario']} on {s['target']} ({s['reason']})" for s in self.skipped),
                "",
            ]
        return lines

    def _md_deployed(self) -> list[str]:
        deployed = [o for o in self.artifacts if o.scenario != "query"]
        if not deployed:
            return []
        return ["## On the deployed artifacts", "", *_table(_OUTCOME_HEADERS, self._outcome_rows(deployed))]

    def _md_quantized(self) -> list[str]:
        pairs = self._precision_rows()
        if not pairs:
            return []
        lines = [
            "## Quantized artifacts beside fp32",
            "",
            "The same adversarial sets, classified by each quantized artifact and by its fp32 counterpart (the "
            "fp32 artifact of the same runtime, else PyTorch). The sets were crafted on the differentiable fp32 "
            "models: a quantized artifact has no gradients, so its white-box figure is a transfer from fp32; "
            "query attacks ran on the quantized artifact itself.",
            "",
        ]
        return lines + _table(
            [
                "scenario",
                "target",
                "source(s)",
                "attack",
                "n",
                "fp32 on",
                "fp32 robust",
                "quantized on",
                "quantized robust",
                "difference",
            ],
            pairs,
        )

    def _md_matrices(self) -> list[str]:
        lines = []
        for m in self.matrices:
            lines += [f"## {m.kind} ({m.images} images)", "", m.note, ""]
            lines += _table(
                ["", *m.columns],
                [[r] + ["-" if v is None else f"{v:.3f}" for v in row] for r, row in zip(m.rows, m.values)],
            )
        return lines

    def _md_sweeps(self) -> list[str]:
        """Robust accuracy vs eps, and accuracy vs block size."""
        lines = []
        if self.sweeps:
            lines += ["## Robust accuracy vs eps", ""]
            lines += _table(
                ["target", "scenario", "eps", "n", "robust"],
                [
                    [
                        p["target"],
                        p["scenario"],
                        f"{p['eps_255']:g}/255",
                        str(p["images"]),
                        f"{p['robust_accuracy']:.1%} ± {p['robust_se']:.1%}",
                    ]
                    for p in self.sweeps
                ],
            )
        blocks = block_size_points(self.outcomes, self.models)
        if blocks:
            lines += ["## Accuracy vs block size", ""]
            lines += _table(
                ["P", "model", "fine-tune", "scenario", "clean", "robust"],
                [
                    [
                        str(p["block_size"]),
                        p["target"],
                        p["finetune"],
                        p["scenario"],
                        f"{p['clean_accuracy']:.1%}",
                        f"{p['robust_accuracy']:.1%}",
                    ]
                    for p in sorted(blocks, key=lambda p: (p["block_size"], p["target"]))
                ],
            )
        return lines

    def print_rich(self, console) -> None:
        from rich.markup import escape
        from rich.table import Table

        console = wide(console)
        console.print(self._header(), markup=False)
        if self.worst_case:
            worst = Table(title="headline: worst case per image without the key (one common subset)")
            for h in ("model", "role", "queries", "robust", "n", "closest single attack", "its robust", "attacks"):
                worst.add_column(h, overflow="fold")
            for row in self._worst_case_rows():
                worst.add_row(*map(escape, row))
            console.print(worst)
        if self.postures:
            headers, rows = self._posture_rows()
            postures = Table(title="postures: worst case per image against attackers who know them")
            for h in headers:
                postures.add_column(h, overflow="fold")
            for row in rows:
                postures.add_row(*map(escape, row))
            console.print(postures)
        if self.headline:
            head = Table(title="strongest single attack without the key")
            for h in ("model", "role", "robust", "worst scenario", "attack", "runtime", "n", "over"):
                head.add_column(h, overflow="fold")
            for row in self._headline_rows():
                head.add_row(*row)
            console.print(head)
        checks = Table(title="trust checks")
        for h in ("check", "passed", "detail"):
            checks.add_column(h, overflow="fold")
        for c in self.checks:
            checks.add_row(c.name, "yes" if c.passed else "NO", c.detail)
        console.print(checks)
        table = Table(title="scenarios")
        for h in ("scenario", "target", "source(s)", "runtime", "n", "clean", "robust", "attack success", "fooling"):
            table.add_column(h)
        for row in self._outcome_rows([o for o in self.outcomes + self.artifacts if o.scenario != "query"]):
            table.add_row(*row)
        console.print(table)
        queried = self._query_rows(self.outcomes + self.artifacts)
        if queried:
            q = Table(title="query attacks")
            for h in ("target", "runtime", "attack", "budget", "n", "clean", "robust", "success", "median queries"):
                q.add_column(h)
            for row in queried:
                q.add_row(*row)
            console.print(q)
        for m in self.matrices:
            t = Table(title=f"{m.kind} ({m.images} images)")
            t.add_column("")
            for col in m.columns:
                t.add_column(col[:18])
            for r, row in zip(m.rows, m.values):
                t.add_row(r, *["-" if v is None else f"{v:.3f}" for v in row])
            console.print(t)

    # ---------------------------------------------------------------- files

    def plots(self, directory: Path) -> list[Path]:
        """Heatmaps of the matrices and curves of the sweeps, as PNG files in ``directory``."""
        matplotlib = require("matplotlib", extra="plots")
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figures = [(f"{m.kind}.png", _heatmap(plt, m)) for m in self.matrices]
        figures.append(("eps-sweep.png", _eps_plot(plt, self.sweeps, self.config)))
        figures.append(("block-size.png", _block_size_plot(plt, block_size_points(self.outcomes, self.models))))
        figures.append(("queries.png", _query_plot(plt, self.outcomes + self.artifacts, self.config, self.worst_case)))
        figures.append(("postures.png", _posture_plot(plt, self.postures, self.config)))
        written = []
        for name, fig in figures:
            if fig is None:
                continue
            fig.tight_layout()
            written.append(directory / name)
            fig.savefig(written[-1], dpi=120)
            plt.close(fig)
        return written

    def write(self, out: str | Path, *, overwrite: bool = False) -> Path:
        """Write JSON, markdown and plots into ``out`` -- all of them, or nothing (an old ``out`` stays until then)."""
        out = Path(out)
        with staged_directory(out, overwrite=overwrite, mode=0o755) as tmp:
            (tmp / "robustness.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")
            (tmp / "robustness.md").write_text(self.to_markdown() + "\n")
            self.plots(tmp)
        return out


# --------------------------------------------------------------------------- plots (matplotlib, lazily)


def _heatmap(plt: Any, m: Matrix) -> Any:
    import numpy as np

    values = np.array([[np.nan if v is None else v for v in row] for row in m.values], dtype=float)
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * len(m.columns), 1.2 + 0.6 * len(m.rows)))
    image = ax.imshow(values, cmap="viridis", vmin=min(0.0, np.nanmin(values)), vmax=1.0)
    ax.set_xticks(range(len(m.columns)), [c[:12] for c in m.columns], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(m.rows)), m.rows, fontsize=8)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if not np.isnan(values[i, j]):
                color = "white" if values[i, j] < 0.6 else "black"
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=7, color=color)
    ylabel, xlabel, meaning = _HEATMAP_AXES.get(m.kind, ("model", "", m.kind))
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_title(f"{m.kind} ({m.images} images)", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).set_label(meaning, fontsize=8)
    return fig


#: per matrix kind: (rows axis, columns axis, what a cell is)
_HEATMAP_AXES = {
    "transferability": (
        "source of the examples (crafted white-box on)",
        "target model (classifies them)",
        "robust accuracy of the target",
    ),
    "key-diversity": ("model", "key it is given at inference", "clean accuracy"),
    "gradient-similarity": ("model", "model", "mean cosine of input gradients"),
}


def _eps_plot(plt: Any, sweeps: list[dict[str, Any]], config: dict[str, Any]) -> Any:
    if not sweeps:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    curves: dict[tuple, list[dict[str, Any]]] = {}
    for p in sweeps:
        curves.setdefault((p["target"], p["scenario"]), []).append(p)
    for (target, scenario), pts in sorted(curves.items()):
        pts.sort(key=lambda p: p["eps"])
        ax.errorbar(
            [p["eps_255"] for p in pts],
            [p["robust_accuracy"] for p in pts],
            yerr=[p["robust_se"] for p in pts],
            marker="o",
            capsize=3,
            label=f"{target}: {scenario}",
        )
    ax.set_xlabel("eps (x/255)")
    ax.set_ylabel("robust accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title(f"robust accuracy vs eps ({config['attack']}, {config['steps']} steps)", fontsize=10)
    return fig


def _block_size_plot(plt: Any, points: list[dict[str, Any]]) -> Any:
    import numpy as np

    blocks = [p for p in points if p["finetune"] == "full"]
    if len({p["block_size"] for p in blocks}) <= 1:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[str, dict[int, list[float]]] = {"clean": {}}
    for p in blocks:
        series["clean"].setdefault(p["block_size"], []).append(p["clean_accuracy"])
        series.setdefault(p["scenario"], {}).setdefault(p["block_size"], []).append(p["robust_accuracy"])
    for name, by_p in series.items():
        xs = sorted(by_p)
        ax.plot(xs, [float(np.mean(by_p[x])) for x in xs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("block size P")
    ax.set_ylabel("accuracy (mean over keyed full fine-tunes)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    return fig


def _queries_grid(largest: float) -> Any:
    """Query counts from 1 to ``largest`` on a log scale (where a curve read off per-image queries is evaluated)."""
    import numpy as np

    return np.unique(np.round(np.geomspace(1, max(largest, 2), 200)))


def _curve(to_break: list[float | None], grid: Any) -> list[float]:
    """Robust accuracy at each query count of ``grid``: the share of images not broken within it."""
    import numpy as np

    q = np.array([np.inf if v is None else v for v in to_break], dtype=float)
    return [float((q > x).mean()) if q.size else float("nan") for x in grid]


def _query_plot(
    plt: Any, outcomes: list[Outcome], config: dict[str, Any], worst_case: Sequence[dict[str, Any]] = ()
) -> Any:
    queried: dict[tuple, list[Outcome]] = {}
    for o in outcomes:
        if o.scenario == "query":
            runtime = o.runtime.split(":")[0] + ("" if o.precision == "fp32" else f" {o.precision}")
            queried.setdefault((o.target, runtime, attack_label(o.attack).split(" ")[0]), []).append(o)
    if not queried:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (target, runtime, name), pts in sorted(queried.items()):
        pts.sort(key=lambda o: o.queries["budget"])
        ax.errorbar(
            [o.queries["budget"] for o in pts],
            [o.robust_accuracy for o in pts],
            yerr=[o.robust_se for o in pts],
            marker="o" if runtime == "torch" else "x",
            linestyle="-" if runtime == "torch" else "--",
            capsize=3,
            label=f"{target} ({runtime}): {name}",
        )
    largest = max(o.queries["max"] for pts in queried.values() for o in pts)
    grid = _queries_grid(largest)
    for w in worst_case:
        if len(w["budgets"]) > 1:  # query attacks ran on it: the worst case per image, read off per-image queries
            ax.step(grid, _curve(w["to_break"], grid), where="post", linewidth=2.2,
                    label=f"{w['target']}: worst case per image, every keyless attack (n={w['images']})")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("queries per image (log scale)")
    ax.set_ylabel("robust accuracy (share of images not broken)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=6)
    ax.set_title(f"query attacks, eps {config['eps']}", fontsize=10)
    return fig


def _posture_plot(plt: Any, postures: list[dict[str, Any]], config: dict[str, Any]) -> Any:
    """One panel per model: per posture, robust accuracy against device queries per image -- the worst case per
    image (solid) and each attack that knows the posture (dashed), all read off per-image queries until broken."""
    if not postures:
        return None
    targets = list(dict.fromkeys(p["target"] for p in postures))
    fig, axes = plt.subplots(1, len(targets), figsize=(7 * len(targets), 4.5), squeeze=False)
    largest = max(max(b["budget"] for b in p["worst"]) for p in postures)
    grid = _queries_grid(largest)
    for ax, target in zip(axes[0], targets):
        for i, p in enumerate(q for q in postures if q["target"] == target):
            color = f"C{i % 10}"
            ax.step(grid, _curve(p["to_break"], grid), where="post", color=color, linewidth=2.2,
                    label=f"{p['posture']}: worst case per image")  # fmt: skip
            for s in p["strategies"]:
                ax.step(grid, _curve(s["to_break"], grid), where="post", color=color, linestyle="--",
                        linewidth=1, alpha=0.8, label=f"{p['posture']}: {s['strategy']} alone")  # fmt: skip
        n = next(p["images"] for p in postures if p["target"] == target)
        ax.set_xscale("log")
        ax.set_xlabel("device queries per image (log scale; refused queries count)")
        ax.set_ylabel("robust accuracy (share of images not broken)")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=6)
        ax.set_title(f"{target}: postures against attackers who know them ({n} images, eps {config['eps']})",
                     fontsize=9)  # fmt: skip
    return fig
