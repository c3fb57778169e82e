"""The latency report: data first (a versioned JSON schema, ``keyedge-latency/1``), text second.

:class:`LatencyReport` serializes itself like optimum-benchmark's reports
(``to_dict`` / ``to_json`` / ``to_markdown``) and renders a rich table for the
terminal.  Every field is documented in ``docs/latency-report.md``; a reader
must check ``schema`` before trusting the rest.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from keyedge.benchmarks.profiles import Thresholds
from keyedge.defenses import get_defense
from keyedge.errors import KeyedgeError
from keyedge.fileio import write_bytes_atomic
from keyedge.validate import Fields, read_dataclass, read_json

SCHEMA = "keyedge-latency/1"


# --------------------------------------------------------------------------- what a run measures (the harness fills it)


@dataclass
class Stats:
    """Steady-state latency of one inference call, in milliseconds."""

    mean: float
    p50: float
    p90: float
    p95: float
    p99: float
    stdev: float
    min: float
    max: float
    iterations: int
    seconds: float  # total time spent in the timed calls

    @classmethod
    def from_seconds(cls, samples: list[float]) -> Stats:
        ms = np.asarray(samples, dtype=np.float64) * 1e3
        p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
        return cls(
            mean=float(ms.mean()),
            p50=float(p50),
            p90=float(p90),
            p95=float(p95),
            p99=float(p99),
            stdev=float(ms.std(ddof=1)) if len(ms) > 1 else 0.0,
            min=float(ms.min()),
            max=float(ms.max()),
            iterations=len(ms),
            seconds=float(ms.sum() / 1e3),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Artifact:
    """One exported file and what its manifest says about it."""

    path: str  # the file (.onnx, .xml, .mlpackage), or the checkpoint directory (target torch)
    target: str  # onnx, openvino, coreml, torch
    model: str  # model name, or the file stem without a manifest
    fingerprint: str | None  # key fingerprint; None: plain model (or unknown)
    fuse: str | None  # gather, fold, none
    precision: str | None
    batch: int | None  # fixed batch; None: dynamic (or unknown until loaded)
    image_size: int | None
    export_dir: str | None  # the OUT/<model>-<fingerprint>/ directory, if any
    accuracy: float | None = None  # the checkpoint's test accuracy, from the manifest
    defense: str | None = None  # another defense than a key (volumize), from the manifest
    role: str = ""  # keyed, plain or the defense's name (keyedge.defenses); derived when not given

    def __post_init__(self) -> None:
        if not self.role:
            self.role = get_defense(self.defense).role(self.fingerprint)

    @property
    def label(self) -> str:
        form = self.fuse if self.fuse in ("fold", "conv", "elements", "planes") else None
        tags = [t for t in (form, self.precision_tag) if t]
        return f"{self.model}-{self.fingerprint or self.role}" + (f"[{','.join(tags)}]" if tags else "")

    @property
    def precision_tag(self) -> str | None:
        """The precision of an artifact not in fp32 (``int8``, ``fp16``, ``dynamic-int8``...), else None: each
        precision is its own cell, row label and gate entry beside the fp32 one."""
        return self.precision if self.precision not in (None, "fp32") else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Measurement:
    """One artifact on one runtime/device at one batch size."""

    artifact: Artifact
    runtime: str
    device: str
    batch: int
    threads: int | None
    load_s: float  # read + compile / session creation
    first_ms: float  # the first inference after loading
    steady: Stats
    throughput: float  # images per second: batch / mean latency
    peak_rss_mb: float  # the process's peak resident set size after this measurement (cumulative)
    providers: list[str] | None = None  # onnxruntime: the providers the session actually uses

    @property
    def key(self) -> tuple:
        """What the regression gate matches on: model, role, fuse, target, runtime, device, batch."""
        a = self.artifact
        key = (a.model, a.fingerprint or a.role, a.fuse, a.target, self.runtime, self.device, self.batch)
        return key + ((a.precision_tag,) if a.precision_tag else ())  # fp32 keys stay as baselines recorded them

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["artifact"] = self.artifact.to_dict()
        return d


@dataclass
class Skipped:
    """A runtime/artifact pair not measured, and why (runtime absent on this host, load failure...)."""

    runtime: str
    device: str
    reason: str
    artifact: str | None = None
    target: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Comparison:
    """``numerator / denominator`` steady latency, from per-round ratios of interleaved rounds."""

    kind: str  # keyed/plain, gather/fold, gather/conv, int8/fp32, runtime
    numerator: str
    denominator: str
    model: str
    target: str
    runtime: str  # "ort/ov" style for kind=runtime
    device: str
    batch: int
    median: float
    p10: float
    p90: float
    rounds: int

    @property
    def key(self) -> tuple:
        return (self.kind, self.numerator, self.denominator, self.runtime, self.device, self.batch)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- the report


def wide(console):
    """``console`` on a terminal; else a 220-column twin (files and pipes: tables not squeezed to 80 columns)."""
    from rich.console import Console

    if console.is_terminal:
        return console
    return Console(width=220, highlight=False, soft_wrap=True, stderr=console.stderr)


_NESTED = {"Artifact": Artifact, "Stats": Stats}


@dataclass
class LatencyReport:
    """One ``keyedge bench latency`` run: environment, profile, settings, measurements, skips and ratios."""

    environment: dict[str, Any]
    profile: dict[str, Any]
    settings: dict[str, Any]
    measurements: list[Measurement] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    schema: str = SCHEMA

    # ---------------------------------------------------------------- data

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "created": self.created,
            "environment": self.environment,
            "profile": self.profile,
            "settings": self.settings,
            "measurements": [m.to_dict() for m in self.measurements],
            "comparisons": [c.to_dict() for c in self.comparisons],
            "skipped": [s.to_dict() for s in self.skipped],
        }

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:  # all or nothing: a killed run never leaves half a report
            write_bytes_atomic(path, text.encode(), overwrite=True)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<report>") -> LatencyReport:
        schema = data.get("schema") if isinstance(data, dict) else None
        if schema != SCHEMA:
            raise KeyedgeError(
                f"{source} is not a {SCHEMA} report (schema: {schema!r})",
                "pass a JSON file written by `keyedge bench latency --json`",
            )
        f = Fields(data, source, "pass a JSON file written by `keyedge bench latency --json`")
        profile, environment = f.obj("profile"), f.obj("environment")
        if "thresholds" in profile.data:  # what `bench regress` gates with
            thresholds = profile.obj("thresholds")
            read_dataclass(Thresholds, thresholds)
            unknown = sorted(set(thresholds.data) - set(Thresholds.__dataclass_fields__))
            if unknown:
                raise thresholds.fail(unknown[0], "is not a threshold (ratio, p50, accuracy_drop)")
        if "versions" in environment.data:
            environment.dict("versions")
        return cls(
            environment=f.dict("environment"),
            profile=f.dict("profile"),
            settings=f.dict("settings"),
            measurements=[read_dataclass(Measurement, m, nested=_NESTED) for m in f.objs("measurements")],
            skipped=[read_dataclass(Skipped, m) for m in (f.objs("skipped") if f.has("skipped") else [])],
            comparisons=[
                read_dataclass(Comparison, m) for m in (f.objs("comparisons") if f.has("comparisons") else [])
            ],
            created=f.str("created", default=""),
            schema=schema,
        )

    @classmethod
    def load(cls, path: str | Path) -> LatencyReport:
        path = Path(path)
        data = read_json(path, "latency report", "give a report written by `keyedge bench latency --out`").data
        return cls.from_dict(data, str(path))

    # ---------------------------------------------------------------- text

    def _rows(self) -> list[list[str]]:
        return [
            [
                m.artifact.label,
                m.artifact.target,
                m.runtime,
                m.device,
                str(m.batch),
                f"{m.load_s * 1e3:.1f}",
                f"{m.first_ms:.2f}",
                f"{m.steady.mean:.3f}",
                f"{m.steady.p50:.3f}",
                f"{m.steady.p90:.3f}",
                f"{m.steady.p99:.3f}",
                f"{m.steady.stdev:.3f}",
                str(m.steady.iterations),
                f"{m.throughput:.1f}",
                f"{m.peak_rss_mb:.0f}",
            ]
            for m in self.measurements
        ]

    HEADERS: ClassVar[list[str]] = [
        "artifact",
        "target",
        "runtime",
        "device",
        "batch",
        "load ms",
        "first ms",
        "mean ms",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "stdev ms",
        "iters",
        "img/s",
        "peak RSS MB",
    ]
    RATIO_HEADERS: ClassVar[list[str]] = [
        "kind",
        "numerator",
        "denominator",
        "runtime",
        "batch",
        "median",
        "p10-p90",
        "rounds",
    ]

    def _ratio_rows(self) -> list[list[str]]:
        return [
            [
                c.kind,
                c.numerator,
                c.denominator,
                c.runtime,
                str(c.batch),
                f"{c.median:.3f}",
                f"{c.p10:.3f}-{c.p90:.3f}",
                str(c.rounds),
            ]
            for c in self.comparisons
        ]

    def _header_line(self) -> str:
        env, s = self.environment, self.settings
        return (
            f"{self.profile.get('name')} on {env.get('cpu')} ({env.get('usable_cores')} usable cores), "
            f"{env.get('os')}, python {env.get('python')}; threads {s.get('threads') or 'default'}, "
            f"warm-up {s.get('warmup')}, >= {s.get('min_iterations')} iterations and >= {s.get('min_seconds')} s, "
            f"{s.get('rounds')}+ interleaved rounds"
        )

    def to_markdown(self) -> str:
        def table(headers: list[str], rows: list[list[str]]) -> list[str]:
            return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)] + [
                "| " + " | ".join(r) + " |" for r in rows
            ]

        lines = [f"# Latency ({self.schema}, {self.created})", "", self._header_line(), ""]
        versions = ", ".join(f"{k} {v}" for k, v in self.environment.get("versions", {}).items() if v)
        lines += [f"Versions: {versions}", "", "## Steady state", "", *table(self.HEADERS, self._rows())]
        if self.comparisons:
            lines += ["", "## Ratios (median and p10-p90 of per-round ratios)", ""]
            lines += table(self.RATIO_HEADERS, self._ratio_rows())
        if self.skipped:
            lines += ["", "## Skipped", ""]
            lines += table(
                ["runtime", "device", "artifact", "reason"],
                [[s.runtime, s.device, s.artifact or "-", s.reason] for s in self.skipped],
            )
        return "\n".join(lines) + "\n"

    def print_rich(self, console) -> None:
        """Steady-state, ratio and skipped tables on a rich console."""
        from rich.markup import escape
        from rich.table import Table

        console.print(self._header_line(), markup=False)
        console = wide(console)
        table = Table(title="steady state (ms per call)")
        for h in self.HEADERS:
            table.add_column(h, justify="right" if h not in ("artifact", "target", "runtime", "device") else "left")
        for row in self._rows():
            table.add_row(*map(escape, row))  # labels such as model-fp[conv,int8] are text, not markup
        console.print(table)
        if self.comparisons:
            ratios = Table(title="ratios: median, p10-p90 of per-round ratios")
            for h in self.RATIO_HEADERS:
                ratios.add_column(h)
            for row in self._ratio_rows():
                ratios.add_row(*map(escape, row))
            console.print(ratios)
        for s in self.skipped:
            console.print(
                f"skipped {s.runtime} ({s.device}){' ' + s.artifact if s.artifact else ''}: {s.reason}", markup=False
            )
