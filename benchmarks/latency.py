"""Latency of exported artifacts on a device profile, several artifacts interleaved, with keyed/plain ratios.

The measurement protocol follows optimum-benchmark (model load, first inference and
steady state timed separately; warm-up, then at least ``min_iterations`` *and*
``min_seconds``; mean/p50/p90/p95/p99/stdev; throughput; peak memory) and the
side-by-side idea of :mod:`keyedge.benchmarks.experiments.keyed_latency`: every artifact of one
batch size -- all runtimes, all export directories -- is loaded, then timed in many
short *rounds* whose order is rotated each round, so drift on a shared machine
cancels out of the per-round ratios.  Ratios are reported as the median and the
10th-90th percentile of the per-round ratios for

* ``keyed/plain``: a keyed artifact vs the plain one (manifest fingerprint null) of the same model,
* ``gather/fold``: the shuffle as one Gather vs folded into the first layer, same key,
* ``gather/conv``: the shuffle as one Gather vs space-to-depth + 1x1 permutation conv, same key (not gated),
* ``volumize/plain``: a volumized model vs the plain model of the same architecture (not gated),
* ``runtime``: one export directory's artifacts on two runtimes/devices.

    from keyedge.benchmarks.latency import BenchSettings, run_latency
    from keyedge.benchmarks.profiles import load_profile
    report = run_latency([Path("artifacts/m-abc"), Path("artifacts/m-plain")], load_profile("devices/cpu-x86.toml"))
    print(report.to_markdown())

Run: ``keyedge bench latency DIR... [--profile devices/cpu-x86.toml] [--json out.json]``.
"""

from __future__ import annotations

import contextlib
import functools
import platform
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, astuple, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from keyedge.benchmarks.profiles import DeviceProfile, RuntimeSpec, runtime_available
from keyedge.benchmarks.timing import interleave
from keyedge.deploy.artifacts import ArtifactManifest, is_export_directory
from keyedge.deploy.runtime import artifact_target
from keyedge.errors import KeyedgeError, SealError
from keyedge.stats import ratio_spread

#: untimed pause after each pair's turn in a round: spinning runtime threads park before the next pair runs
COOLDOWN_S = 0.01


# --------------------------------------------------------------------------- data


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
            from keyedge.defenses import get_defense

            self.role = get_defense(self.defense).role(self.fingerprint)

    @property
    def label(self) -> str:
        tags = [t for t in (self.fuse if self.fuse in ("fold", "conv") else None, self.quantized) if t]
        return f"{self.model}-{self.fingerprint or self.role}" + (f"[{','.join(tags)}]" if tags else "")

    @property
    def quantized(self) -> str | None:
        """``int8`` for a quantized artifact (its own cell and gate entry beside the fp32 one), else None."""
        return "int8" if self.precision == "int8" else None

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
        return key + ((a.quantized,) if a.quantized else ())  # fp32/fp16 keys stay as baselines recorded them

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


@dataclass
class BenchSettings:
    """Overrides of the profile from the command line (``None``: the profile's value)."""

    threads: int | None = None
    min_seconds: float | None = None
    min_iterations: int | None = None
    warmup: int | None = None
    rounds: int | None = None
    batch_sizes: list[int] | None = None

    def resolve(self, profile: DeviceProfile) -> dict[str, Any]:
        return {
            "threads": self.threads if self.threads is not None else profile.threads,
            "min_seconds": self.min_seconds if self.min_seconds is not None else profile.min_seconds,
            "min_iterations": self.min_iterations if self.min_iterations is not None else profile.min_iterations,
            "warmup": self.warmup if self.warmup is not None else profile.warmup,
            "rounds": self.rounds if self.rounds is not None else profile.rounds,
            "batch_sizes": list(self.batch_sizes or profile.batch_sizes),
        }


# --------------------------------------------------------------------------- artifacts


def _artifact_from_manifest(manifest: ArtifactManifest, target: str, path: Path) -> Artifact:
    return Artifact(
        path=str(path),
        target=target,
        model=manifest.model_name,
        fingerprint=manifest.fingerprint,
        fuse=manifest.fuse,
        precision=manifest.precision,
        batch=manifest.batch,
        image_size=manifest.image_size,
        export_dir=str(manifest.directory),
        accuracy=manifest.test_accuracy,
        defense=manifest.defense and manifest.defense_name,
        role=manifest.role,
    )


def _checkpoint_artifact(directory: Path, fuse: str | None = None, export_dir: Path | None = None) -> Artifact:
    """A training checkpoint, timed in PyTorch eager mode (the reference the exported artifacts are compared with)."""
    from keyedge.checkpoints import read_manifest

    manifest = read_manifest(directory)
    return Artifact(
        path=str(directory),
        target="torch",
        model=manifest.model.name,
        fingerprint=manifest.fingerprint,
        fuse=fuse or ("gather" if manifest.fingerprint else "none"),
        precision="fp32",
        batch=None,
        image_size=manifest.model.image_size,
        export_dir=str(export_dir) if export_dir else None,
        accuracy=manifest.test_accuracy,
        defense=manifest.defense and manifest.defense_name,
    )


def discover(path: str | Path) -> list[Artifact]:
    """The artifacts in an export directory (from its manifest.json), or the one artifact file given.

    An export directory also yields its source checkpoint (for the ``torch`` runtime) when that still exists;
    a checkpoint directory (``keyedge.json``) yields just that.
    """
    from keyedge.checkpoints import MANIFEST as CHECKPOINT_MANIFEST
    from keyedge.exporters import get_backend, list_backends

    path = Path(path)
    suffixes = {get_backend(name).suffix: name for name in list_backends()}
    if not path.exists():
        raise KeyedgeError(f"{path} does not exist", "pass an export directory or an .onnx/.xml/.mlpackage file")
    if path.is_dir() and (path / CHECKPOINT_MANIFEST).is_file():
        return [_checkpoint_artifact(path)]
    if path.is_dir() and path.suffix not in suffixes:
        manifest = ArtifactManifest.read(path)
        artifacts = [
            _artifact_from_manifest(manifest, target, manifest.artifact(target)) for target in manifest.targets
        ]
        source = manifest.checkpoint_path
        if source is not None and (source / CHECKPOINT_MANIFEST).is_file():
            with contextlib.suppress(KeyedgeError):  # a checkpoint gone bad since the export: artifacts still timed
                artifacts.append(_checkpoint_artifact(source, manifest.fuse, path))
        return artifacts
    target = artifact_target(path)
    if target is None:
        raise KeyedgeError(
            f"{path}: unknown artifact type {path.suffix!r}", f"expected {', '.join(suffixes)}, or an export directory"
        )
    if is_export_directory(path.parent):
        return [_artifact_from_manifest(ArtifactManifest.read(path.parent), target, path)]
    return [
        Artifact(
            path=str(path),
            target=target,
            model=path.stem,
            fingerprint=None,
            fuse=None,
            precision=None,
            batch=None,
            image_size=None,
            export_dir=None,
        )
    ]


# --------------------------------------------------------------------------- runners


def load_runner(
    artifact: Artifact,
    spec: RuntimeSpec,
    threads: int | None,
    keys: dict[str, Any] | None = None,
    sealkeys: Sequence[Any] = (),
):
    """Load ``artifact`` on ``spec``'s runtime (:func:`keyedge.runtime.open_artifact`).

    ``keys`` (by fingerprint) serve checkpoints; ``sealkeys`` open sealed artifacts (decrypted in memory,
    inside the timed load)."""
    if spec.name == "torch":
        from keyedge.deploy.export import load_checkpoint_runner
        from keyedge.keys.keyfile import key_for

        key = key_for(artifact.fingerprint, keys or {}, owner=artifact.path)
        return load_checkpoint_runner(Path(artifact.path), key, fuse=artifact.fuse, device=spec.device, threads=threads)
    from keyedge.deploy.runtime import open_artifact

    return open_artifact(
        Path(artifact.path), spec.target, sealkey=list(sealkeys), threads=threads, **spec.run_settings()
    )


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


# --------------------------------------------------------------------------- environment


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        import subprocess

        try:
            return (
                subprocess.run(
                    ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, check=False, timeout=5
                ).stdout.strip()
                or platform.processor()
            )
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Host, OS, Python and runtime versions, recorded in every report."""
    import os

    from keyedge import __version__
    from keyedge.deps import version_of

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "os": platform.platform(),
        "python": platform.python_version(),
        "hostname": platform.node(),
        "versions": {
            "keyedge": __version__,
            "numpy": np.__version__,
            **{
                name: version_of(name)
                for name in ("onnxruntime", "openvino", "coremltools", "ai-edge-litert", "executorch", "torch")
            },
        },
    }


# --------------------------------------------------------------------------- measurement


@dataclass
class _Cell:
    artifact: Artifact
    spec: RuntimeSpec
    runner: Any  # keyedge.exporters.base.Runner, or keyedge.deploy.export.TorchRunner
    batch: int
    threads: int | None
    load_s: float
    first_ms: float = 0.0
    samples: list[float] = field(default_factory=list)
    rounds: list[float] = field(default_factory=list)  # per-round mean latency (s)

    @property
    def runtime_label(self) -> str:
        return f"{self.spec.name}:{self.spec.device_label}"


def _comparisons(cells: list[_Cell], batch: int) -> list[Comparison]:
    out: list[Comparison] = []

    def add(kind: str, a: _Cell, b: _Cell, runtime: str) -> None:
        n = min(len(a.rounds), len(b.rounds))
        if n == 0:
            return
        median, p10, p90 = astuple(ratio_spread(a.rounds[:n], b.rounds[:n]))
        out.append(
            Comparison(
                kind=kind,
                numerator=a.artifact.label,
                denominator=b.artifact.label,
                model=a.artifact.model,
                target=a.artifact.target,
                runtime=runtime,
                device=a.spec.device_label if a.spec is b.spec else f"{a.spec.device_label}/{b.spec.device_label}",
                batch=batch,
                median=median,
                p10=p10,
                p90=p90,
                rounds=n,
            )
        )

    for a in cells:
        same = [
            b
            for b in cells
            if b is not a
            and b.spec is a.spec
            and b.artifact.model == a.artifact.model
            and b.artifact.target == a.artifact.target
            and b.artifact.precision == a.artifact.precision
        ]
        if a.artifact.defense:  # another defense against the undefended model: what it costs
            plains = [b for b in same if b.artifact.role == "plain" and b.artifact.fuse != "fold"]
            if plains:
                add(f"{a.artifact.defense}/plain", a, plains[0], a.runtime_label)
        if a.artifact.role == "keyed":
            plains = [b for b in same if b.artifact.role == "plain"]
            # prefer the plain twin of the same graph: gather vs plain (fuse none), fold vs plain folded
            plains.sort(key=lambda b: (b.artifact.fuse == "fold") != (a.artifact.fuse == "fold"))
            if plains:
                add("keyed/plain", a, plains[0], a.runtime_label)
            if a.artifact.fuse == "gather":
                for b in same:
                    if b.artifact.fingerprint == a.artifact.fingerprint and b.artifact.fuse in ("fold", "conv"):
                        add(f"gather/{b.artifact.fuse}", a, b, a.runtime_label)
        if a.artifact.precision == "int8":  # what quantizing bought: the same key, fuse and target in fp32
            for b in cells:
                if (
                    b.spec is a.spec
                    and b.artifact.precision == "fp32"
                    and (b.artifact.model, b.artifact.target, b.artifact.fingerprint, b.artifact.fuse, b.artifact.role)
                    == (a.artifact.model, a.artifact.target, a.artifact.fingerprint, a.artifact.fuse, a.artifact.role)
                ):
                    add("int8/fp32", a, b, a.runtime_label)
                    break
    # runtimes vs each other: the same export directory on two runtimes/devices (first profile runtime on top)
    order = {id(c.spec): i for i, c in enumerate(cells)}
    for a in cells:
        for b in cells:
            if (
                a.spec is not b.spec
                and order[id(a.spec)] < order[id(b.spec)]
                and a.artifact.export_dir
                and a.artifact.export_dir == b.artifact.export_dir
                and a.artifact.precision == b.artifact.precision
            ):
                add("runtime", a, b, f"{a.runtime_label}/{b.runtime_label}")
    return out


def _interleave(cells: list[_Cell], settings: dict[str, Any], tick: Callable[[float], None]) -> None:
    """Warm up each cell, then rotated rounds until every cell has min_iterations and min_seconds (and >= rounds)."""
    calls = {}
    for i, cell in enumerate(cells):
        shape = [cell.batch, 3, cell.artifact.image_size or 224, cell.artifact.image_size or 224]
        rin = cell.runner.input_shape
        if len(rin) == 4:
            shape = [cell.batch] + [d or s for d, s in zip(rin[1:], shape[1:])]
        calls[i] = functools.partial(cell.runner.infer, np.random.default_rng(0).random(shape, dtype=np.float32))
    # the first call timed alone, then the warm-up; a round of each cell lasts about min_seconds / rounds
    timing = interleave(
        calls,
        rounds=settings["rounds"],
        warmup=settings["warmup"] + 1,
        min_iterations=settings["min_iterations"],
        min_seconds=settings["min_seconds"],
        cooldown=COOLDOWN_S,
        progress=lambda t: tick(t.fraction),
    )
    for i, cell in enumerate(cells):
        cell.first_ms = timing[i].first_s * 1e3
        cell.samples = timing[i].samples
        cell.rounds = timing[i].means


def _refuse_unloadable(
    artifacts: list[Artifact], usable: list[RuntimeSpec], cells: list[_Cell], skipped: list[Skipped]
) -> None:
    """An artifact file that no runtime of this host could open is bad input (exit 2), not a skip.

    ("skipped" is for runtimes absent on this host, and for the PyTorch reference of an export directory.)
    """
    loaded = {c.artifact.path for c in cells}
    for artifact in artifacts:
        tried = [s for s in usable if s.target == artifact.target]
        if artifact.target == "torch" or not tried or artifact.path in loaded:
            continue
        reason = next((k.reason for k in skipped if k.artifact == artifact.path), "it cannot be loaded")
        raise KeyedgeError(
            f"cannot load {artifact.path}: {reason}",
            "check that the file is an artifact written by `keyedge export`, or export it again",
        )


def run_latency(
    paths: list[str | Path],
    profile: DeviceProfile,
    settings: BenchSettings | None = None,
    *,
    progress: Any = None,
    keys: Any = (),
    sealkeys: Any = (),
) -> Any:
    """Measure every artifact under ``paths`` on every runtime of ``profile``; return a :class:`LatencyReport`.

    ``progress``: a :class:`rich.progress.Progress` to advance (one task per batch size), or None.
    ``keys``: :class:`~keyedge.keys.keyfile.Key` objects for the ``torch`` runtime's keyed checkpoints (never recorded).
    ``sealkeys``: :class:`~keyedge.keys.seal.SealKey` objects for sealed artifacts (matched by fingerprint).
    """
    from keyedge.benchmarks.report import LatencyReport

    resolved = (settings or BenchSettings()).resolve(profile)
    artifacts = [a for p in paths for a in discover(p)]
    skipped: list[Skipped] = []
    usable: list[RuntimeSpec] = []
    for spec in profile.runtimes:
        ok, reason = runtime_available(spec)
        if ok:
            usable.append(spec)
        else:
            skipped.append(Skipped(runtime=spec.name, device=spec.device_label, reason=reason, target=spec.target))
    # load everything once (load time measured here), then group by batch size
    cells: list[_Cell] = []
    for spec in usable:
        matching = [a for a in artifacts if a.target == spec.target]
        if not matching:
            skipped.append(
                Skipped(
                    runtime=spec.name,
                    device=spec.device_label,
                    target=spec.target,
                    reason=f"no {spec.target} artifact among the inputs",
                )
            )
        for artifact in matching:
            threads = spec.threads or resolved["threads"]
            try:
                start = time.perf_counter()
                runner = load_runner(artifact, spec, threads, {k.fingerprint: k for k in keys}, sealkeys)
                load_s = time.perf_counter() - start
            except SealError:
                raise  # a missing or wrong sealing key, or a tampered file: bad input, said as it is
            except Exception as exc:
                skipped.append(
                    Skipped(
                        runtime=spec.name,
                        device=spec.device_label,
                        artifact=artifact.path,
                        target=artifact.target,
                        reason=f"load failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                    )
                )
                continue
            fixed = runner.input_shape[0] if runner.input_shape else artifact.batch
            batches = [fixed] if fixed else resolved["batch_sizes"]
            for batch in batches:
                cells.append(_Cell(artifact, spec, runner, batch, threads, load_s))
    _refuse_unloadable(artifacts, usable, cells, skipped)
    measurements: list[Measurement] = []
    comparisons: list[Comparison] = []
    for batch in sorted({c.batch for c in cells}):
        group = [c for c in cells if c.batch == batch]
        task = progress.add_task(f"batch {batch}: {len(group)} artifact/runtime pairs", total=1.0) if progress else None
        tick = (lambda f, task=task: progress.update(task, completed=f)) if progress else (lambda f: None)
        try:
            _interleave(group, resolved, tick)
        except Exception as exc:
            for cell in group:
                skipped.append(
                    Skipped(
                        runtime=cell.spec.name,
                        device=cell.spec.device_label,
                        target=cell.artifact.target,
                        artifact=cell.artifact.path,
                        reason=f"inference failed at batch {batch}: {type(exc).__name__}: {exc}".splitlines()[0],
                    )
                )
            continue
        rss = peak_rss_mb()
        for cell in group:
            stats = Stats.from_seconds(cell.samples)
            measurements.append(
                Measurement(
                    artifact=cell.artifact,
                    runtime=cell.spec.name,
                    device=cell.spec.device_label,
                    batch=batch,
                    threads=cell.threads,
                    load_s=cell.load_s,
                    first_ms=cell.first_ms,
                    steady=stats,
                    throughput=batch / (stats.mean / 1e3),
                    peak_rss_mb=rss,
                    providers=cell.runner.providers,
                )
            )
        comparisons.extend(_comparisons(group, batch))
    return LatencyReport(
        environment=environment(),
        profile=profile.to_dict(),
        settings=resolved,
        measurements=measurements,
        skipped=skipped,
        comparisons=comparisons,
    )
