"""``keyedge export``: per-key ONNX / OpenVINO / CoreML artifacts with the shuffle fused in, verified."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import typer

from keyedge.cli._console import console
from keyedge.cli._flags import (
    expand_targets,
    key_file_option,
    overwrite_option,
    retired,
    sign_key_option,
    target_option,
)

# export's options, declared here so that the command reads as its list of settings
CHECKPOINT = typer.Option(None, "--checkpoint", "-c", help="Checkpoint directory (repeatable).")
RUNS = typer.Option(
    None,
    "--runs",
    help="Directory of checkpoints: export each of them. With only --key-file: the key's checkpoint is "
    "looked up (by fingerprint) under ./runs.",
)
KEY_FILE = key_file_option("Key file (repeatable); matched to checkpoints by fingerprint.")
KEYS = typer.Option(None, "--keys", help="Directory of key files, matched by fingerprint.")
FUSE = typer.Option(
    "gather",
    "--fuse",
    help="gather (one Gather op), elements (one GatherElements op), conv (one strided 0/1 conv + "
    "depth-to-space: no gather), planes (space-to-depth, a gather of whole channel planes, depth-to-space), fold "
    "(into a patchify first layer, when exact); auto (fold where exact, else "
    "each target's measured fastest form) or fastest (fold where exact, else every form timed here per target). "
    "All forms are exact.",
)
BATCH = typer.Option(1, "--batch", min=1, help="Fixed batch size of the artifact.")
DYNAMIC_BATCH = typer.Option(False, "--dynamic-batch", help="Export with a dynamic batch dimension instead.")
PRECISION = typer.Option(
    "fp32",
    "--precision",
    help="fp32, fp16, bf16, int8, dynamic-int8 or int4 (I/O stays float32). int8: static quantization calibrated "
    "on the checkpoint's training images, the key's shuffle kept exact, verified by top-1 agreement; written to "
    "OUT/<model>-<fingerprint>-int8/. bf16 (OpenVINO): computed in bf16 where the CPU has BF16; dynamic-int8 "
    "(LiteRT, ExecuTorch): int8 weights, activations quantized per call; int4 (CoreML): 4-bit palettized weights; "
    "each verified by the same rule and written to ...-<precision>/.",
)
CALIBRATION_DATA = typer.Option(
    None,
    "--calibration-data",
    help="int8: calibrate on this dataset (as `keyedge train --data` takes) or image directory instead of "
    "the checkpoint's training data.",
)
CALIBRATION_SIZE = typer.Option(300, "--calibration-size", min=1, help="int8: calibration images.")
ACCURACY_CONTROL = typer.Option(
    False,
    "--int8-accuracy-control",
    help="int8, OpenVINO: NNCF's accuracy-aware quantization -- layers go back to float, most sensitive first, "
    "until agreement with fp32 on 300 held-out training images meets --min-agreement. Minutes, not seconds.",
)
CALIBRATION_SEED = typer.Option(0, "--calibration-seed", min=0, max=2**32 - 1, help="int8: seed drawing them.")
MIN_AGREEMENT = typer.Option(
    0.98, "--min-agreement", min=0.0, max=1.0, help="int8: least top-1 agreement with the fp32 model."
)
MAX_ACCURACY_DROP = typer.Option(1.0, "--max-accuracy-drop", min=0.0, help="int8: most test-accuracy drop, in points.")
OUT = typer.Option(Path("artifacts"), "--out", "-o", help="Output directory; one OUT/<model>-<fingerprint>/ per key.")
ALLOW_KEY_MISMATCH = typer.Option(
    False, "--allow-key-mismatch", help="Export even if the key's fingerprint differs from the checkpoint's."
)
OLD_FORCE = retired(
    "--force", message="--force no longer allows a key mismatch", hint="use --allow-key-mismatch", flag=True
)
VERIFY = typer.Option(True, "--verify/--no-verify", help="Check parity with the PyTorch model (default on).")
TEMPLATE = typer.Option(
    True,
    "--template/--no-template",
    help="Several keys of one architecture: trace once, "
    "write each key's ONNX/OpenVINO/CoreML artifact from that template.",
)
SIGN_KEY = sign_key_option("each artifact set's manifest (manifest.sig)")
SEAL = typer.Option(
    None,
    "--seal",
    help="Sealing key file (keyedge sealkey new): write the model files encrypted (AES-256-GCM), "
    "never in plaintext on disk; ONNX and OpenVINO, on Linux.",
)
POSTURE = typer.Option(
    None,
    "--posture",
    help="What the device answers and how (docs/postures.md): scores (default), topk:K[:D] or label, plus "
    "noise:SIGMA in the graph, guard[:refuse|lock|flag] and rate:N for the runtime, e.g. label+noise:0.02+guard.",
)


def export(
    checkpoint: list[Path] | None = CHECKPOINT,
    runs: Path | None = RUNS,
    key_file: list[Path] | None = KEY_FILE,
    keys: Path | None = KEYS,
    target: list[str] = target_option(),
    fuse: str = FUSE,
    batch: int = BATCH,
    dynamic_batch: bool = DYNAMIC_BATCH,
    precision: str = PRECISION,
    calibration_data: str | None = CALIBRATION_DATA,
    calibration_size: int = CALIBRATION_SIZE,
    calibration_seed: int = CALIBRATION_SEED,
    int8_accuracy_control: bool = ACCURACY_CONTROL,
    min_agreement: float = MIN_AGREEMENT,
    max_accuracy_drop: float = MAX_ACCURACY_DROP,
    out: Path = OUT,
    overwrite: bool = overwrite_option("Replace existing artifact directories."),
    allow_key_mismatch: bool = ALLOW_KEY_MISMATCH,
    old_force: bool = OLD_FORCE,
    verify: bool = VERIFY,
    template: bool = TEMPLATE,
    sign_key: Path | None = SIGN_KEY,
    seal: Path | None = SEAL,
    posture: str | None = POSTURE,
) -> None:
    """Export checkpoints (keyed, plain or volumized) to ONNX, OpenVINO, CoreML, LiteRT and ExecuTorch, verified."""
    options = SimpleNamespace(**locals())  # first: the options, nothing else
    from keyedge.checkpoints import find_checkpoints
    from keyedge.deploy.export import check_posture, checkpoints_for_keys, export_many, plan_requests
    from keyedge.errors import KeyedgeError
    from keyedge.exporters import get_backend
    from keyedge.postures import parse_posture

    options.posture = parse_posture(posture)
    targets = expand_targets(target, precision, randomized=options.posture.randomized)
    check_posture(options.posture, None, [get_backend(t) for t in targets])
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
    export_many(requests, _export_settings(options, targets, sealkey, signer))


def _export_settings(o: SimpleNamespace, targets: list[str], sealkey, signer):
    """``keyedge export``'s options as ``ExportSettings`` (a dynamic batch is ``batch=None``)."""
    from keyedge.deploy.export import ExportSettings

    return ExportSettings(
        targets=targets,
        out=o.out,
        fuse=o.fuse,
        batch=None if o.dynamic_batch else o.batch,
        precision=o.precision,
        calibration_data=o.calibration_data,
        calibration_size=o.calibration_size,
        calibration_seed=o.calibration_seed,
        accuracy_control=o.int8_accuracy_control,
        min_agreement=o.min_agreement,
        max_accuracy_drop=o.max_accuracy_drop,
        verify=o.verify,
        overwrite=o.overwrite,
        template=o.template,
        seal=sealkey,
        sign=signer,
        posture=o.posture,
        log=lambda line: console.print(line, markup=False),
    )


def verify(
    directories: list[Path] = typer.Argument(
        ..., help="Export directories (OUT/<model>-<fingerprint>/) or checkpoint directories (keyedge train -o)."
    ),
    verify_key: Path | None = typer.Option(
        None, "--verify-key", help="Verify key (signer.pub): require a valid signature by it (set or checkpoint)."
    ),
    key_file: list[Path] | None = key_file_option(
        "Key of a keyed set (repeatable): re-run parity against its checkpoint."
    ),
    seal: list[Path] | None = typer.Option(None, "--seal", help="Sealing key of sealed sets (repeatable)."),
) -> None:
    """Check artifact sets (every file's SHA-256, the signature, parity with the checkpoint) and checkpoints
    (every file's SHA-256, the signature)."""
    from keyedge.checkpoints import MANIFEST, verify_checkpoint
    from keyedge.deploy.verify import describe, verify_set
    from keyedge.keys.keyfile import load_keys
    from keyedge.keys.seal import load_sealkey
    from keyedge.keys.signing import load_verify_key

    public = load_verify_key(verify_key) if verify_key is not None else None
    keys = load_keys(list(key_file or []))
    sealkeys = [load_sealkey(p) for p in seal or []]
    for directory in directories:
        from keyedge.deploy.artifacts import ArtifactManifest, is_export_directory

        if (directory / MANIFEST).is_file() and not is_export_directory(directory):
            console.print(describe(verify_checkpoint(directory, verify_key=public), what="checkpoint"), markup=False)
            continue
        fingerprint = ArtifactManifest.read(directory).fingerprint
        result = verify_set(directory, verify_key=public, key=keys.get(fingerprint or ""), sealkey=sealkeys)
        console.print(describe(result), markup=False)


def register(app: typer.Typer) -> None:
    app.command("export")(export)
    app.command("verify")(verify)
