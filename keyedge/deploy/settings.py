"""What to export: requests (a checkpoint and its key), the export's settings, and finding checkpoints for keys."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keyedge.checkpoints import CheckpointManifest, check_key, find_checkpoints, read_manifest
from keyedge.deploy.artifacts import AGREEMENT_PRECISIONS, PRECISIONS
from keyedge.deploy.parity import MAX_ACCURACY_DROP, MIN_AGREEMENT
from keyedge.errors import KeyedgeError
from keyedge.keys.keyfile import Key, key_for, load_keys
from keyedge.keys.seal import SealKey
from keyedge.postures import Posture, parse_posture

__all__ = [
    "DEFAULT_RUNS",
    "VALIDATION_IMAGES",
    "ExportRequest",
    "ExportSettings",
    "artifact_directory",
    "checkpoints_for_keys",
    "plan_requests",
]


#: held-out training images ``--int8-accuracy-control`` validates on (beyond the calibration images)
VALIDATION_IMAGES = 300


@dataclass
class ExportRequest:
    """One checkpoint (and its key) to export."""

    checkpoint: Path
    key: Key | None
    allow_key_mismatch: bool = False  # allow a key whose fingerprint differs from the checkpoint's
    _manifest: CheckpointManifest | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.checkpoint = Path(self.checkpoint)

    def manifest(self) -> CheckpointManifest:
        """The checkpoint's manifest, read (and validated) once."""
        if self._manifest is None:
            self._manifest = read_manifest(self.checkpoint)
        return self._manifest


@dataclass
class ExportSettings:
    targets: list[str]
    out: Path
    fuse: str = "gather"
    batch: int | None = 1
    precision: str = "fp32"
    verify: bool = True
    overwrite: bool = False
    random_inputs: int = 8
    real_inputs: int = 8
    template: bool = True  # fleet export: trace once per architecture (keyedge.exporters.template, MilTemplate)
    # int8 only: the calibration images (None: the checkpoint's training data), how many, drawn with which seed,
    # and the verification rule: top-1 agreement and accuracy drop on (up to) agreement_images real test images
    calibration_data: str | None = None
    calibration_size: int = 300
    calibration_seed: int = 0
    min_agreement: float = MIN_AGREEMENT
    max_accuracy_drop: float = MAX_ACCURACY_DROP
    agreement_images: int = 500
    # int8, OpenVINO: NNCF's accuracy-aware quantization, validated on held-out training images (minutes, not
    # seconds: exporters/openvino.py); the agreement it aims at is min_agreement
    accuracy_control: bool = False
    seal: SealKey | None = None  # write every model file sealed (AES-256-GCM), never in plaintext on disk
    sign: Any = None  # a keyedge.keys.signing.SigningKey: write manifest.sig (Ed25519) beside the manifest
    log: Callable[[str], None] = field(default=lambda _line: None)
    #: what the artifact answers and how (keyedge.postures): its outputs and noise go into the graph, its guard and
    #: rate limit into the manifest for the device runtime; a spec string is parsed (``label+noise:0.02+guard``)
    posture: Posture | str | None = None

    def __post_init__(self) -> None:
        self.out = Path(self.out)  # a str from library callers
        self.posture = parse_posture(self.posture)
        if self.posture.randomized and self.precision in AGREEMENT_PRECISIONS:
            raise KeyedgeError(
                f"keyedge does not export a graph with in-graph noise at {self.precision} yet (its agreement rule "
                "compares top-1 labels call by call)",
                "export the noise posture at fp32, or drop noise:SIGMA from --posture",
            )
        if self.precision not in PRECISIONS:
            raise KeyedgeError(f"unknown precision {self.precision!r}", f"use {', '.join(PRECISIONS)}")
        if self.accuracy_control and self.precision != "int8":
            raise KeyedgeError(
                f"--int8-accuracy-control tunes an int8 quantization, and this export is {self.precision}",
                "add --precision int8, or drop --int8-accuracy-control",
            )
        if self.precision in AGREEMENT_PRECISIONS:
            if self.calibration_size < 1 or self.agreement_images < 1:
                raise KeyedgeError(
                    "--calibration-size and the agreement images must be at least 1", "e.g. --calibration-size 300"
                )
            if not 0.0 <= self.min_agreement <= 1.0 or self.max_accuracy_drop < 0:
                raise KeyedgeError(
                    f"--min-agreement must be in [0, 1] and --max-accuracy-drop >= 0 (points), got "
                    f"{self.min_agreement} and {self.max_accuracy_drop}",
                    "e.g. --min-agreement 0.98 --max-accuracy-drop 1",
                )
            if self.seal is not None and self.precision != "bf16":
                raise KeyedgeError(
                    f"keyedge does not seal {self.precision} artifacts yet: the quantizers write their intermediate "
                    "models to disk",
                    "export int8 without --seal, or seal the fp32/fp16 set",
                )


def artifact_directory(out: Path, name: str, precision: str) -> Path:
    """``OUT/<model>-<fingerprint>/``; an int8 (bf16) set sits beside its fp32 one as ``...-int8/`` (``-bf16/``)."""
    return out / (name + (f"-{precision}" if precision in AGREEMENT_PRECISIONS else ""))


def plan_requests(
    checkpoints: Sequence[Path], key_paths: Sequence[Path], *, allow_key_mismatch: bool = False
) -> list[ExportRequest]:
    """Pair each checkpoint with its key by fingerprint.

    With exactly one checkpoint and one key file whose fingerprints differ, the
    export is refused unless ``allow_key_mismatch`` (the artifact would lose most of its accuracy).
    """
    keys = load_keys(key_paths)
    requests = []
    for ckpt in checkpoints:
        manifest = read_manifest(ckpt)
        if manifest.fingerprint not in keys and len(checkpoints) == 1 and (len(keys) == 1):
            request = ExportRequest(ckpt, next(iter(keys.values())), allow_key_mismatch, manifest)
            check_key(manifest, request.key, allow_mismatch=allow_key_mismatch)
        else:
            request = ExportRequest(ckpt, key_for(manifest.fingerprint, keys, owner=ckpt), False, manifest)
        requests.append(request)
    return requests


DEFAULT_RUNS = Path("runs")  # where `keyedge train` and the quickstart put checkpoints


def checkpoints_for_keys(key_paths: Sequence[Path], runs: Path = DEFAULT_RUNS) -> list[Path]:
    """The checkpoint each key trained, found by fingerprint under ``runs`` (``export --key-file k1.bin`` alone).

    No match, or several, is a one-line error listing what ``runs`` holds.
    """
    keys = load_keys(key_paths)
    if not runs.is_dir():
        raise KeyedgeError(
            f"nothing to export: no --checkpoint given, and no {runs}/ directory here to find the key's model in",
            "pass --checkpoint DIR, or --runs DIR (where `keyedge train --out` wrote it)",
        )
    by_fingerprint: dict[str | None, list[Path]] = {}
    for checkpoint in find_checkpoints(runs):
        try:
            by_fingerprint.setdefault(read_manifest(checkpoint).fingerprint, []).append(checkpoint)
        except KeyedgeError:
            continue  # a broken checkpoint is reported when it is the one asked for, not here
    shown = ", ".join(
        f"{c} ({f'key {fp}' if fp else 'plain'})" for fp, paths in by_fingerprint.items() for c in paths[:4]
    )
    chosen = []
    for fingerprint in keys:
        matches = by_fingerprint.get(fingerprint, [])
        if not matches:
            raise KeyedgeError(
                f"no checkpoint under {runs} was trained with key {fingerprint} (found: {shown or 'none readable'})",
                "pass --checkpoint DIR, or --runs DIR where that key's model is",
            )
        if len(matches) > 1:
            raise KeyedgeError(
                f"{len(matches)} checkpoints under {runs} were trained with key {fingerprint}: "
                + ", ".join(map(str, matches)),
                "pick one with --checkpoint DIR",
            )
        chosen.append(matches[0])
    return chosen
