"""``keyedge export``: per-key ONNX / OpenVINO / CoreML artifacts with the shuffle fused in, verified."""

from __future__ import annotations

from pathlib import Path

import typer

from keyedge.cli._console import console
from keyedge.cli._flags import expand_targets, key_file_option, overwrite_option, retired, target_option


def export(
    checkpoint: list[Path] | None = typer.Option(None, "--checkpoint", "-c", help="Checkpoint directory (repeatable)."),
    runs: Path | None = typer.Option(
        None,
        "--runs",
        help="Directory of checkpoints: export each of them. With only --key-file: the key's checkpoint is "
        "looked up (by fingerprint) under ./runs.",
    ),
    key_file: list[Path] | None = key_file_option("Key file (repeatable); matched to checkpoints by fingerprint."),
    keys: Path | None = typer.Option(None, "--keys", help="Directory of key files, matched by fingerprint."),
    target: list[str] = target_option(),
    fuse: str = typer.Option(
        "gather",
        "--fuse",
        help="gather (one Gather op), fold (into a patchify first layer, when "
        "exact), conv (space-to-depth + 1x1 permutation conv: no gather) or auto (fold where exact, "
        "else conv for CoreML and gather elsewhere).",
    ),
    batch: int = typer.Option(1, "--batch", min=1, help="Fixed batch size of the artifact."),
    dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="Export with a dynamic batch dimension instead."),
    precision: str = typer.Option(
        "fp32",
        "--precision",
        help="fp32, fp16 or int8 (I/O stays float32). int8: static quantization calibrated on the checkpoint's "
        "training images, the key's shuffle kept exact, verified by top-1 agreement; written to "
        "OUT/<model>-<fingerprint>-int8/.",
    ),
    calibration_data: str | None = typer.Option(
        None,
        "--calibration-data",
        help="int8: calibrate on this dataset (as `keyedge train --data` takes) or image directory instead of "
        "the checkpoint's training data.",
    ),
    calibration_size: int = typer.Option(300, "--calibration-size", min=1, help="int8: calibration images."),
    calibration_seed: int = typer.Option(0, "--calibration-seed", min=0, help="int8: seed drawing them."),
    min_agreement: float = typer.Option(
        0.98, "--min-agreement", min=0.0, max=1.0, help="int8: least top-1 agreement with the fp32 model."
    ),
    max_accuracy_drop: float = typer.Option(
        1.0, "--max-accuracy-drop", min=0.0, help="int8: most test-accuracy drop, in points."
    ),
    out: Path = typer.Option(
        Path("artifacts"), "--out", "-o", help="Output directory; one OUT/<model>-<fingerprint>/ per key."
    ),
    overwrite: bool = overwrite_option("Replace existing artifact directories."),
    allow_key_mismatch: bool = typer.Option(
        False, "--allow-key-mismatch", help="Export even if the key's fingerprint differs from the checkpoint's."
    ),
    old_force: bool = retired(
        "--force", message="--force no longer allows a key mismatch", hint="use --allow-key-mismatch", flag=True
    ),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check parity with the PyTorch model (default on)."),
    template: bool = typer.Option(
        True,
        "--template/--no-template",
        help="Several keys of one architecture: trace once, "
        "write each key's ONNX/OpenVINO/CoreML artifact from that template.",
    ),
    sign_key: Path | None = typer.Option(
        None,
        "--sign-key",
        help="Signing key file (keyedge signkey new): sign each manifest (manifest.sig, Ed25519) so that "
        "`keyedge verify --verify-key` and loaders can refuse a swapped model.",
    ),
    seal: Path | None = typer.Option(
        None,
        "--seal",
        help="Sealing key file (keyedge sealkey new): write the model files encrypted (AES-256-GCM), "
        "never in plaintext on disk; ONNX and OpenVINO, on Linux.",
    ),
) -> None:
    """Export keyed models to ONNX, OpenVINO, CoreML, LiteRT and ExecuTorch: one verified artifact set per key."""
    from keyedge.checkpoints import find_checkpoints
    from keyedge.deploy.export import ExportSettings, checkpoints_for_keys, export_many, plan_requests
    from keyedge.errors import KeyedgeError
    from keyedge.exporters import get_backend

    targets = expand_targets(target, precision)
    key_paths = list(key_file or []) + ([keys] if keys is not None else [])
    if not checkpoint and runs is None and not key_paths:
        raise KeyedgeError("nothing to export", "pass --checkpoint DIR (repeatable), --runs DIR, or the --key-file")
    sealkey = None
    if seal is not None:
        from keyedge.deploy.export import check_sealable
        from keyedge.keys.seal import load_sealkey

        sealkey = load_sealkey(seal)
        check_sealable([get_backend(t) for t in targets])
    signer = None
    if sign_key is not None:
        from keyedge.keys.signing import load_signing_key

        signer = load_signing_key(sign_key)
    if checkpoint or runs is not None:
        checkpoints = list(checkpoint or []) + (find_checkpoints(runs) if runs is not None else [])
    else:  # `keyedge export --key-file k1.bin`: the model that key trained, found under ./runs
        checkpoints = checkpoints_for_keys(key_paths)
    requests = plan_requests(checkpoints, key_paths, allow_key_mismatch=allow_key_mismatch)
    settings = ExportSettings(
        targets=targets,
        out=out,
        fuse=fuse,
        batch=None if dynamic_batch else batch,
        precision=precision,
        calibration_data=calibration_data,
        calibration_size=calibration_size,
        calibration_seed=calibration_seed,
        min_agreement=min_agreement,
        max_accuracy_drop=max_accuracy_drop,
        verify=verify,
        overwrite=overwrite,
        template=template,
        seal=sealkey,
        sign=signer,
        log=lambda line: console.print(line, markup=False),
    )
    export_many(requests, settings)


def verify(
    directories: list[Path] = typer.Argument(..., help="Export directories (OUT/<model>-<fingerprint>/)."),
    verify_key: Path | None = typer.Option(
        None, "--verify-key", help="Verify key (signer.pub): require a valid manifest signature by it."
    ),
    key_file: list[Path] | None = key_file_option(
        "Key of a keyed set (repeatable): re-run parity against its checkpoint."
    ),
    seal: list[Path] | None = typer.Option(None, "--seal", help="Sealing key of sealed sets (repeatable)."),
) -> None:
    """Check artifact sets: every file's SHA-256, the manifest signature, and parity with the checkpoint."""
    from keyedge.deploy.verify import describe, verify_set
    from keyedge.keys.keyfile import load_keys
    from keyedge.keys.seal import load_sealkey
    from keyedge.keys.signing import load_verify_key

    public = load_verify_key(verify_key) if verify_key is not None else None
    keys = load_keys(list(key_file or []))
    sealkeys = [load_sealkey(p) for p in seal or []]
    for directory in directories:
        from keyedge.deploy.artifacts import ArtifactManifest

        fingerprint = ArtifactManifest.read(directory).fingerprint
        result = verify_set(directory, verify_key=public, key=keys.get(fingerprint or ""), sealkey=sealkeys)
        console.print(describe(result), markup=False)


def register(app: typer.Typer) -> None:
    app.command("export")(export)
    app.command("verify")(verify)
