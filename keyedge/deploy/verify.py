"""``keyedge verify DIR``: is this artifact set still what was exported, and does it still compute the model?

Three checks, each one line when it fails (:class:`~keyedge.deploy.export.VerificationError` or
:class:`~keyedge.errors.SealError`, exit 2):

1. **files**: every file the manifest lists exists and has its SHA-256;
2. **signature** (with a verify key): ``manifest.sig`` is a valid Ed25519 signature of the manifest
   by that key (:mod:`keyedge.keys.signing`) -- the check that authenticates; hashes in an editable
   manifest alone do not (whoever swaps a file can update its hash);
3. **parity** (when the source checkpoint is still there, with its key for a keyed set): each target
   whose runtime runs here reproduces the PyTorch model on random inputs within the export's tolerance
   (:func:`keyedge.deploy.export.check_parity`); a sealed set needs its sealing key.  An int8 set is
   checked by its export's rule instead: top-1 agreement with the checkpoint (and the accuracy drop) on
   its real test images (:func:`keyedge.deploy.export.check_agreement`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from keyedge.checkpoints import MANIFEST as CHECKPOINT_MANIFEST
from keyedge.deploy.artifacts import ArtifactManifest
from keyedge.deploy.export import VerificationError, agreement_inputs, check_agreement, check_parity
from keyedge.fileio import sha256_file
from keyedge.keys.keyfile import Key
from keyedge.keys.signing import VerifyKey, check_signature


def check_files(manifest: ArtifactManifest, targets: list[str] | None = None) -> int:
    """Raise :class:`VerificationError` unless every listed file (of ``targets``) has its SHA-256; the count."""
    directory = manifest.directory or Path(".")
    count = 0
    for target in targets or list(manifest.targets):
        for entry in manifest.targets[target].files:
            path = directory / entry["path"]
            if not path.is_file():
                raise VerificationError(f"{path} is missing from its artifact set", "copy the artifact set again")
            if sha256_file(path) != entry["sha256"]:
                raise VerificationError(
                    f"{path} does not match its SHA-256 in manifest.json (changed, corrupted or swapped)",
                    "do not deploy it; copy the artifact set again, or export again",
                )
            count += 1
    return count


def verify_set(
    directory: str | Path,
    *,
    verify_key: VerifyKey | None = None,
    key: Key | None = None,
    sealkey: Any = None,
    inputs: int = 8,
) -> dict[str, Any]:
    """Run the checks on one export directory; return what was checked (raises on the first failure)."""
    from keyedge.checkpoints import load_checkpoint
    from keyedge.deploy.runtime import open_artifact

    directory = Path(directory)
    manifest = ArtifactManifest.read(directory)
    result: dict[str, Any] = {"directory": str(directory), "files": check_files(manifest)}
    result["signed_by"] = check_signature(directory, verify_key) if verify_key is not None else None
    checkpoint = manifest.checkpoint_path
    parity: dict[str, Any] = {}
    if checkpoint is None or not (checkpoint / CHECKPOINT_MANIFEST).is_file():
        result["parity"] = {"skipped": f"its checkpoint {checkpoint or '(unknown)'} is not here"}
        return result
    if manifest.fingerprint is not None and key is None:
        result["parity"] = {"skipped": "a keyed set: pass its key (--key-file) to re-run parity"}
        return result
    if sha256_file(checkpoint / CHECKPOINT_MANIFEST) != manifest.checkpoint.get("manifest_sha256"):
        result["parity"] = {"skipped": f"{checkpoint} changed since this set was exported"}
        return result
    model, ckpt = load_checkpoint(checkpoint, key)
    labels = None
    if manifest.precision == "int8":  # the export's agreement rule, on its real images
        count = int(manifest.verification.get("inputs", {}).get("real", 500))
        x_np, labels, _ = agreement_inputs(ckpt, manifest.image_size, count)
        if x_np is None:
            result["parity"] = {"skipped": "an int8 set is checked on real images, and none are here"}
            return result
        x = torch.from_numpy(x_np)
    else:
        x = torch.rand(inputs, 3, manifest.image_size, manifest.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = np.concatenate([model(x[i : i + 64]).numpy() for i in range(0, len(x), 64)])
    from keyedge.exporters import get_backend

    for target in manifest.targets:
        ok, why = get_backend(target).can_run()
        if not ok:
            parity[target] = {"skipped": why}
            continue
        with open_artifact(directory, target, sealkey=sealkey) as runner:
            got = runner.predict(x.numpy())
        if manifest.precision == "int8":
            rule = manifest.verification
            outcome = check_agreement(
                reference,
                np.asarray(got),
                labels,
                min_agreement=float(rule.get("min_agreement", 0.98)),
                max_drop=float(rule.get("max_accuracy_drop_points", 1.0)),
            )
            if not outcome["passed"]:
                raise VerificationError(
                    f"{directory}: the int8 {target} artifact no longer agrees with its checkpoint "
                    f"(top-1 agreement {outcome['top1_agreement']:.1%}, needs {outcome['min_agreement']:.0%}, "
                    f"or the accuracy dropped more than the export allowed)",
                    "do not deploy it; export again",
                )
            parity[target] = outcome
            continue
        outcome = check_parity(reference, np.asarray(got), manifest.precision)
        if not outcome["passed"]:
            raise VerificationError(
                f"{directory}: the {target} artifact no longer reproduces its checkpoint "
                f"(max abs diff {outcome['max_abs_diff']:.2e} > {outcome['tolerance']:.0e}, "
                f"top-1 agreement {outcome['top1_agreement']:.0%})",
                "do not deploy it; export again",
            )
        parity[target] = outcome
    result["parity"] = parity
    return result


def describe(result: dict[str, Any]) -> str:
    """One line per verified set, for the CLI."""
    parts = [f"{result['files']} files match their SHA-256"]
    parts.append(
        f"signed by {result['signed_by']} (signature valid)" if result["signed_by"] else "signature not checked"
    )
    parity = result["parity"]
    if "skipped" in parity:
        parts.append(f"parity not re-run ({parity['skipped']})")
    for target, outcome in parity.items():
        if isinstance(outcome, dict) and "min_agreement" in outcome:
            parts.append(f"{target} int8 agreement {outcome['top1_agreement']:.1%} on {outcome['images']} real images")
        elif isinstance(outcome, dict) and "passed" in outcome:
            parts.append(f"{target} parity: max abs diff {outcome['max_abs_diff']:.1e}")
        elif isinstance(outcome, dict):
            parts.append(f"{target} parity not run ({outcome['skipped']})")
    return f"{result['directory']}: " + "; ".join(parts)


__all__ = ["check_files", "describe", "verify_set"]
