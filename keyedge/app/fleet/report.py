"""``fleet report``: one row per device (accuracies, parity, hashes, keyed/plain latency) as JSON, markdown, a plot."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from keyedge.app.fleet.manifest import FleetManifest
from keyedge.app.fleet.state import artifact_sets, checkpoint_state, current_set
from keyedge.benchmarks.latency import BenchSettings, run_latency
from keyedge.benchmarks.profiles import parse_profile
from keyedge.benchmarks.workbench import export_for_timing, untrained_checkpoint
from keyedge.checkpoints import load_checkpoint
from keyedge.deploy.artifacts import ArtifactManifest
from keyedge.exporters import get_backend
from keyedge.fileio import sha256_file, write_bytes_atomic
from keyedge.keys.keyfile import load_key
from keyedge.models.backbones import build_model

REPORT_FORMAT = "keyedge-fleet-report/1"


def _fleet_latency(fleet: FleetManifest, sets: dict[str, Path], log) -> dict[str, Any]:
    """Each device's ONNX artifact against the plain twin of the fleet's architecture, interleaved (onnxruntime)."""
    onnx_sets = {fp: d for fp, d in sets.items() if "onnx" in ArtifactManifest.read(d).targets}
    if not onnx_sets:
        return {"skipped": "no ONNX artifacts (export with -t onnx)"}
    ok, why = get_backend("onnx").can_run()
    if not ok:
        return {"skipped": why}
    first = next(d for d in fleet.devices if d.fingerprint in onnx_sets)
    model, _ = load_checkpoint(fleet.path(first.checkpoint), load_key(fleet.path(first.key_file)))
    spec = model.spec
    plain = build_model(spec.name, spec.num_classes, weights="none", image_size=spec.image_size).eval()
    plain.backbone.load_state_dict(model.backbone.state_dict())
    profile = parse_profile(
        {"name": "fleet-report", "threads": 2, "batch_sizes": [1], "runtime": [{"name": "onnxruntime"}]}
    )
    settings = BenchSettings(min_seconds=0.3, min_iterations=20, warmup=5, rounds=6)
    log(f"timing {len(onnx_sets)} ONNX artifacts against the plain twin of {spec.name} (onnxruntime, batch 1)")
    with tempfile.TemporaryDirectory(prefix=".fleet-latency-", dir=fleet.directory) as tmp:
        twin = export_for_timing(untrained_checkpoint(Path(tmp) / "plain-ckpt", plain), None, Path(tmp), ["onnx"])
        report = run_latency([str(twin), *map(str, onnx_sets.values())], profile, settings)
    ratios = {}
    for c in report.comparisons:
        if c.kind == "keyed/plain":
            ratios[c.numerator.rsplit("-", 1)[-1]] = {
                "median": c.median,
                "p10": c.p10,
                "p90": c.p90,
                "rounds": c.rounds,
            }
    return {"runtime": "onnxruntime", "batch": 1, "threads": 2, "keyed_over_plain": ratios}


def build_report(fleet: FleetManifest, *, latency: bool = True, log=print) -> dict[str, Any]:
    """One row per device: accuracies, parity, artifact hashes and keyed/plain latency (JSON-ready)."""
    sets = {fp: d for fp, d in artifact_sets(fleet).items() if any(x.fingerprint == fp for x in fleet.devices)}
    current = {d.fingerprint: current_set(fleet, d, sets) for d in fleet.devices}
    timing = _fleet_latency(fleet, {fp: s for fp, s in current.items() if s is not None}, log) if latency else {}
    rows = []
    for d in fleet.devices:
        directory = current.get(d.fingerprint)
        row: dict[str, Any] = {
            "device": d.name,
            "fingerprint": d.fingerprint,
            "checkpoint": d.checkpoint,
            "trained": checkpoint_state(fleet, d)[0] == "done",
            "accuracy": (d.trained or {}).get("test_accuracy"),
            "accuracy_other_key": (d.other_key or {}).get("accuracy"),
            "artifacts": None,
            "failed": d.failed,
        }
        if directory is not None:
            manifest = ArtifactManifest.read(directory)
            parity = {}
            for target, record in manifest.targets.items():
                diff = record.parity.max_abs_diff
                parity[target] = diff if diff is not None else record.parity.note
            sha = sha256_file(directory / "manifest.json")
            row["artifacts"] = {
                "path": str(directory.relative_to(fleet.directory)),
                "manifest_sha256": sha,
                "files": {f["path"]: f["sha256"] for r in manifest.targets.values() for f in r.files},
                "parity": parity,
                "verified": bool(d.verified and d.verified.get("sha256") == sha),
            }
        ratio = timing.get("keyed_over_plain", {}).get(d.fingerprint)
        row["keyed_over_plain"] = ratio
        rows.append(row)
    return {
        "format": REPORT_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "recipe": asdict(fleet.recipe),
        "block_size": fleet.block_size,
        "devices": rows,
        "latency": timing,
    }


def _pct(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, (int, float)) else "-"


def _ratio(ratio: dict[str, Any] | None) -> str:
    return f"{ratio['median']:.3f} [{ratio['p10']:.3f}-{ratio['p90']:.3f}]" if ratio else "-"


def to_markdown(report: dict[str, Any]) -> str:
    recipe = report["recipe"]
    lines = [
        f"# Fleet report ({len(report['devices'])} devices)",
        "",
        f"{recipe['model']} on {recipe['data']}, {recipe['finetune']} fine-tune, {recipe['epochs']} epochs, "
        f"block size {report['block_size']}. Accuracy on the checkpoint's test images; *other key*: the same model "
        "fed images shuffled with the next device's key (a keyless or wrong-key use of the model).",
        "",
        "| device | key | accuracy | other key | parity (max abs diff) | verified | keyed/plain (ORT) "
        "| manifest SHA-256 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report["devices"]:
        art = row["artifacts"] or {}
        parity = ", ".join(
            f"{t} {v:.1e}" if isinstance(v, float) else f"{t} not run" for t, v in (art.get("parity") or {}).items()
        )
        ratio = row["keyed_over_plain"]
        lines.append(
            f"| {row['device']} | {row['fingerprint']} | {_pct(row['accuracy'])} | {_pct(row['accuracy_other_key'])} "
            f"| {parity or '-'} | {'yes' if art.get('verified') else 'no'} "
            f"| {_ratio(ratio)} "
            f"| {art.get('manifest_sha256', '-')[:16]} |"
        )
    failed = [(r["device"], s, f["error"]) for r in report["devices"] for s, f in (r["failed"] or {}).items()]
    if failed:
        lines += ["", "Failed:", ""] + [f"- {name} ({stage}): {error}" for name, stage, error in failed]
    if report["latency"].get("skipped"):
        lines += ["", f"Latency not measured: {report['latency']['skipped']}."]
    return "\n".join(lines) + "\n"


def write_report(fleet: FleetManifest, report: dict[str, Any]) -> Path:
    """``report/fleet-report.{json,md}`` and, with the plots extra, ``report/accuracy.png``."""
    out = fleet.path("report")
    out.mkdir(exist_ok=True)
    write_bytes_atomic(out / "fleet-report.json", (json.dumps(report, indent=2) + "\n").encode(), overwrite=True)
    write_bytes_atomic(out / "fleet-report.md", to_markdown(report).encode(), overwrite=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return out
    rows = report["devices"]
    names = [r["device"] for r in rows]
    own = [r["accuracy"] or 0.0 for r in rows]
    other = [r["accuracy_other_key"] or 0.0 for r in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(rows) + 2), 3.2))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], own, 0.4, label="own key")
    ax.bar([x + 0.2 for x in xs], other, 0.4, label="another key")
    ax.set_xticks(list(xs), names, rotation=45, ha="right")
    ax.set_ylabel("top-1 accuracy")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    with contextlib.suppress(OSError):
        tmp = out / f".accuracy.tmp-{os.getpid()}.png"
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, out / "accuracy.png")
    plt.close(fig)
    return out


__all__ = ["REPORT_FORMAT", "build_report", "to_markdown", "write_report"]
