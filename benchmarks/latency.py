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
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from keyedge import __version__
from keyedge.benchmarks.profiles import DeviceProfile, RuntimeSpec, runtime_available
from keyedge.benchmarks.report import Artifact, Comparison, LatencyReport, Measurement, Skipped, Stats
from keyedge.checkpoints import MANIFEST as CHECKPOINT_MANIFEST
from keyedge.checkpoints import read_manifest
from keyedge.deploy.artifacts import ArtifactManifest, is_export_directory
from keyedge.deploy.export import load_checkpoint_runner
from keyedge.deploy.runtime import check_sealkeys, open_artifact
from keyedge.deps import version_of
from keyedge.errors import KeyedgeError, SealError
from keyedge.exporters import get_backend, list_backends, target_of
from keyedge.host import cpu_features, cpu_model
from keyedge.keys.keyfile import key_for
from keyedge.stats import ratio_spread
from keyedge.timing import RUNTIME_COOLDOWN_S, interleave

# --------------------------------------------------------------------------- data


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
        fuse=manifest.targets[target].fuse if target in manifest.targets else manifest.fuse,  # auto: per target
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
    path = Path(path)
    if not path.exists():
        raise KeyedgeError(f"{path} does not exist", "pass an export directory or an .onnx/.xml/.mlpackage file")
    if path.is_dir() and (path / CHECKPOINT_MANIFEST).is_file():
        return [_checkpoint_artifact(path)]
    if path.is_dir() and target_of(path, sealed=False) is None:
        manifest = ArtifactManifest.read(path)
        artifacts = [
            _artifact_from_manifest(manifest, target, manifest.artifact(target)) for target in manifest.targets
        ]
        source = manifest.checkpoint_path
        if source is not None and (source / CHECKPOINT_MANIFEST).is_file():
            with contextlib.suppress(KeyedgeError):  # a checkpoint gone bad since the export: artifacts still timed
                artifacts.append(_checkpoint_artifact(source, manifest.fuse, path))
        return artifacts
    target = target_of(path)
    if target is None:
        suffixes = [get_backend(name).suffix for name in list_backends()]
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
        key = key_for(artifact.fingerprint, keys or {}, owner=artifact.path)
        return load_checkpoint_runner(Path(artifact.path), key, fuse=artifact.fuse, device=spec.device, threads=threads)
    return open_artifact(
        Path(artifact.path), spec.target, sealkey=list(sealkeys), threads=threads, posture=False, **spec.run_settings()
    )


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


# --------------------------------------------------------------------------- environment


def environment() -> dict[str, Any]:
    """Host, OS, Python and runtime versions, recorded in every report."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cpu_features": cpu_features(),
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
                for name in (
                    "onnxruntime",
                    "openvino",
                    "coremltools",
                    "ai-edge-litert",
                    "executorch",
                    "MNN",
                    "ncnn",
                    "torch",
                )
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
        """``openvino:CPU``; at the runtime's own default precision here, what it chose: ``openvino:CPU@host:bf16``."""
        chosen = str(getattr(self.runner, "settings", {}).get("precision") or "")
        return f"{self.spec.name}:{self.spec.device_label}" + (f"@{chosen}" if chosen.startswith("host") else "")


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
                    if b.artifact.fingerprint == a.artifact.fingerprint and b.artifact.fuse in (
                        "fold",
                        "conv",
                        "elements",
                        "planes",
                    ):
                        add(f"gather/{b.artifact.fuse}", a, b, a.runtime_label)
        if a.artifact.precision != "fp32":  # what it bought: the same key, fuse and target in fp32
            for b in cells:
                if (
                    b.spec is a.spec
                    and b.artifact.precision == "fp32"
                    and (b.artifact.model, b.artifact.target, b.artifact.fingerprint, b.artifact.fuse, b.artifact.role)
                    == (a.artifact.model, a.artifact.target, a.artifact.fingerprint, a.artifact.fuse, a.artifact.role)
                ):
                    add(f"{a.artifact.precision}/fp32", a, b, a.runtime_label)
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
                pinned = a.spec.precision in (None, "artifact") and b.spec.precision == "host"
                if pinned and (a.spec.name, a.spec.device_label) == (b.spec.name, b.spec.device_label):
                    # one runtime at its own default precision here against the pinned one: what a deployment gets
                    add("host/pinned", b, a, f"{b.runtime_label}/{a.runtime_label}")
                else:
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
        cooldown=RUNTIME_COOLDOWN_S,
        progress=lambda t: tick(t.fraction),
    )
    for i, cell in enumerate(cells):
        cell.first_ms = timing[i].first_s * 1e3
        cell.samples = timing[i].samples
        cell.rounds = timing[i].means


def _check_keys(paths: list[str | Path], artifacts: list[Artifact], keys: Any, sealkeys: Any) -> None:
    """Before anything is loaded: a checkpoint given as an input has its key, a sealed set its sealing key.

    (A checkpoint found only as an export directory's PyTorch reference may still be skipped.)
    A keyed checkpoint without its key used to be a "skipped" line and exit 0 with an empty table.
    """
    given = {Path(p).resolve() for p in paths}
    by_fingerprint = {k.fingerprint: k for k in keys}
    for artifact in artifacts:
        if artifact.target == "torch" and Path(artifact.path).resolve() in given:
            key_for(artifact.fingerprint, by_fingerprint, owner=artifact.path)
    check_sealkeys(paths, sealkeys)


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


def _usable_runtimes(profile: DeviceProfile, skipped: list[Skipped]) -> list[RuntimeSpec]:
    """The profile's runtimes that run on this host; the others are skipped, with the reason."""
    usable: list[RuntimeSpec] = []
    for spec in profile.runtimes:
        ok, reason = runtime_available(spec)
        if ok:
            usable.append(spec)
        else:
            skipped.append(Skipped(runtime=spec.name, device=spec.device_label, reason=reason, target=spec.target))
    return usable


def _load_cells(
    artifacts: list[Artifact],
    usable: list[RuntimeSpec],
    resolved: dict[str, Any],
    keys: dict[str, Any],
    sealkeys: Any,
    skipped: list[Skipped],
) -> list[_Cell]:
    """Load every artifact on every usable runtime of its target once (load time measured here): one cell per
    batch size it runs at.  A load failure is a skip; a missing or wrong sealing key, or a tampered file, is
    bad input, said as it is (:class:`SealError`)."""
    cells: list[_Cell] = []
    for spec in usable:
        matching = [a for a in artifacts if a.target == spec.target]
        if not matching:
            reason = f"no {spec.target} artifact among the inputs"
            skipped.append(Skipped(runtime=spec.name, device=spec.device_label, target=spec.target, reason=reason))
        for artifact in matching:
            threads = spec.threads or resolved["threads"]
            try:
                start = time.perf_counter()
                runner = load_runner(artifact, spec, threads, keys, sealkeys)
                load_s = time.perf_counter() - start
            except SealError:
                raise
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
            for batch in [fixed] if fixed else resolved["batch_sizes"]:
                cells.append(_Cell(artifact, spec, runner, batch, threads, load_s))
    return cells


def _measure(group: list[_Cell], batch: int, resolved: dict[str, Any], tick: Callable[[float], None]):
    """Time one batch size's cells interleaved: their measurements and ratios (an inference failure raises)."""
    _interleave(group, resolved, tick)
    rss = peak_rss_mb()
    measurements = []
    for cell in group:
        stats = Stats.from_seconds(cell.samples)
        measurements.append(
            Measurement(
                artifact=cell.artifact,
                runtime=cell.spec.name,
                device=cell.runtime_label.split(":", 1)[1],  # CPU, or CPU@host:bf16 at the plugin's own precision
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
    return measurements, _comparisons(group, batch)


def run_latency(
    paths: list[str | Path],
    profile: DeviceProfile,
    settings: BenchSettings | None = None,
    *,
    progress: Any = None,
    keys: Any = (),
    sealkeys: Any = (),
) -> LatencyReport:
    """Measure every artifact under ``paths`` on every runtime of ``profile``; return a :class:`LatencyReport`.

    ``progress``: a :class:`rich.progress.Progress` to advance (one task per batch size), or None.
    ``keys``: :class:`~keyedge.keys.keyfile.Key` objects for the ``torch`` runtime's keyed checkpoints (never recorded).
    ``sealkeys``: :class:`~keyedge.keys.seal.SealKey` objects for sealed artifacts (matched by fingerprint).
    """
    resolved = (settings or BenchSettings()).resolve(profile)
    artifacts = [a for p in paths for a in discover(p)]
    _check_keys(paths, artifacts, keys, sealkeys)
    skipped: list[Skipped] = []
    usable = _usable_runtimes(profile, skipped)
    cells = _load_cells(artifacts, usable, resolved, {k.fingerprint: k for k in keys}, sealkeys, skipped)
    _refuse_unloadable(artifacts, usable, cells, skipped)
    measurements: list[Measurement] = []
    comparisons: list[Comparison] = []
    for batch in sorted({c.batch for c in cells}):
        group = [c for c in cells if c.batch == batch]
        task = progress.add_task(f"batch {batch}: {len(group)} artifact/runtime pairs", total=1.0) if progress else None
        tick = (lambda f, task=task: progress.update(task, completed=f)) if progress else (lambda f: None)
        try:
            found, ratios = _measure(group, batch, resolved, tick)
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
        measurements += found
        comparisons += ratios
    return LatencyReport(
        environment=environment(),
        profile=profile.to_dict(),
        settings=resolved,
        measurements=measurements,
        skipped=skipped,
        comparisons=comparisons,
    )
