"""``keyedge verify DIR``: is this artifact set still what was exported, and does it still compute the model?

Three checks, each one line when it fails (:class:`~keyedge.deploy.parity.VerificationError` or
:class:`~keyedge.errors.SealError`, exit 2):

1. **files**: every file the manifest lists exists and has its SHA-256
   (:meth:`~keyedge.deploy.artifacts.ArtifactManifest.check_files`);
2. **signature** (with a verify key): ``manifest.sig`` is a valid Ed25519 signature of the manifest
   by that key (:mod:`keyedge.keys.signing`) -- the check that authenticates; hashes in an editable
   manifest alone do not (whoever swaps a file can update its hash);
3. **parity** (when the source checkpoint is still there, with its key for a keyed set): each target
   whose runtime runs here reproduces the PyTorch model on random inputs within the export's tolerance
   (:func:`keyedge.deploy.parity.check_parity`); a sealed set needs its sealing key.  An int8 set is
   checked by its export's rule instead: top-1 agreement with the checkpoint (and the accuracy drop) on
   its real test images (:func:`keyedge.deploy.parity.check_agreement`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from keyedge.checkpoints import MANIFEST as CHECKPOINT_MANIFEST
from keyedge.checkpoints import load_checkpoint
from keyedge.deploy.artifacts import AGREEMENT_PRECISIONS, ArtifactManifest
from keyedge.deploy.inputs import agreement_inputs
from keyedge.deploy.parity import (
    AgreementCheck,
    Parity,
    VerificationError,
    check_agreement,
    check_from_dict,
    check_parity,
)
from keyedge.deploy.runtime import open_artifact
from keyedge.deploy.verification import NOISE_IMAGES, noise_check
from keyedge.errors import SealError
from keyedge.exporters import get_backend
from keyedge.fileio import sha256_file
from keyedge.keys.keyfile import Key
from keyedge.keys.signing import VerifyKey, check_signature
from keyedge.postures.graph import PostureModule, posture_outputs


def check_files(manifest: ArtifactManifest, targets: list[str] | None = None) -> int:
    """Raise :class:`VerificationError` unless every listed file (of ``targets``) has its SHA-256; the count.

    The check is :meth:`ArtifactManifest.check_files`; this name stays for its callers.
    """
    return manifest.check_files(targets)


def verify_set(
    directory: str | Path,
    *,
    verify_key: VerifyKey | None = None,
    key: Key | None = None,
    sealkey: Any = None,
    inputs: int = 8,
) -> dict[str, Any]:
    """Run the checks on one export directory; return what was checked (raises on the first failure).

    ``parity`` is ``{"skipped": why}`` when parity could not be re-run for the set, else per target the
    comparison's JSON (:class:`~keyedge.deploy.parity.ToleranceCheck` or ``AgreementCheck``) or ``{"skipped": why}``.
    """
    directory = Path(directory)
    manifest = ArtifactManifest.read(directory)
    result: dict[str, Any] = {"directory": str(directory), "files": manifest.check_files()}
    result["signed_by"] = check_signature(directory, verify_key) if verify_key is not None else None
    result["unlisted"] = manifest.unlisted_files()
    if result["unlisted"] and verify_key is not None:
        shown = ", ".join(result["unlisted"][:5]) + (" ..." if len(result["unlisted"]) > 5 else "")
        raise SealError(
            f"{directory} holds files its signed manifest does not list, which the signature does not cover: {shown}",
            "remove them, or export and sign the set again",
        )
    parity = rerun_parity(manifest, key=key, sealkey=sealkey, inputs=inputs)
    if isinstance(parity, Parity):
        result["parity"] = parity.to_dict()
    else:
        result["parity"] = {target: _outcome(p) for target, p in parity.items()}
    return result


def rerun_parity(
    manifest: ArtifactManifest, *, key: Key | None = None, sealkey: Any = None, inputs: int = 8
) -> Parity | dict[str, Parity]:
    """Each target against its checkpoint, by the export's rule: a :class:`Parity` per target, or one skipped
    :class:`Parity` for the whole set when it cannot be re-run here (no checkpoint, no key, changed, no images)."""
    checkpoint = manifest.checkpoint_path
    if checkpoint is None or not (checkpoint / CHECKPOINT_MANIFEST).is_file():
        return Parity.skip(f"its checkpoint {checkpoint or '(unknown)'} is not here")
    if manifest.fingerprint is not None and key is None:
        return Parity.skip("a keyed set: pass its key (--key-file) to re-run parity")
    if sha256_file(checkpoint / CHECKPOINT_MANIFEST) != manifest.checkpoint.get("manifest_sha256"):
        return Parity.skip(f"{checkpoint} changed since this set was exported")
    model, ckpt = load_checkpoint(checkpoint, key)
    labels = None
    if manifest.precision in AGREEMENT_PRECISIONS:  # the export's agreement rule, on its real images
        count = int(manifest.verification.get("inputs", {}).get("real", 500))
        x_np, labels, _ = agreement_inputs(ckpt, manifest.image_size, count)
        if x_np is None:
            return Parity.skip(f"an {manifest.precision} set is checked on real images, and none are here")
        x = torch.from_numpy(x_np)
    else:
        x = torch.rand(inputs, 3, manifest.image_size, manifest.image_size, generator=torch.Generator().manual_seed(1))
    posture = manifest.deployed_posture
    with torch.no_grad():  # what the set answers: its posture's outputs (the noise is checked statistically)
        reference = posture_outputs(torch.cat([model(x[i : i + 64]) for i in range(0, len(x), 64)]), posture).numpy()
    noisy = PostureModule(model, posture).eval() if posture.randomized else None
    return {
        target: _rerun(manifest, target, x.numpy(), reference, labels, sealkey, noisy) for target in manifest.targets
    }


def _rerun(
    manifest: ArtifactManifest,
    target: str,
    x: np.ndarray,
    reference: np.ndarray,
    labels: np.ndarray | None,
    sealkey: Any,
    noisy: nn.Module | None = None,
) -> Parity:
    ok, why = get_backend(target).can_run()
    if not ok:
        return Parity.skip(why)
    directory = manifest.directory
    with open_artifact(directory, target, sealkey=sealkey, posture=False) as runner:
        if noisy is not None:  # a randomized graph: its answers' statistics against the posture's, as at export
            record = noise_check(runner.predict, noisy, x[:NOISE_IMAGES], f"{directory}: the {target} artifact")
            return Parity(ran=True, passed=True, noise=record)
        got = np.asarray(runner.predict(x))
    if manifest.precision in AGREEMENT_PRECISIONS:
        rule = manifest.verification
        outcome = check_agreement(
            reference,
            got,
            labels,
            min_agreement=float(rule.get("min_agreement", 0.98)),
            max_drop=float(rule.get("max_accuracy_drop_points", 1.0)),
        )
        if not outcome.passed:
            raise VerificationError(
                f"{directory}: the {manifest.precision} {target} artifact no longer agrees with its checkpoint "
                f"(top-1 agreement {outcome.top1_agreement:.1%}, needs {outcome.min_agreement:.0%}, "
                f"or the accuracy dropped more than the export allowed)",
                "do not deploy it; export again",
            )
        return Parity.numerical({"real": outcome})
    outcome = check_parity(reference, got, manifest.precision)
    if not outcome.passed:
        raise VerificationError(
            f"{directory}: the {target} artifact no longer reproduces its checkpoint "
            f"(max abs diff {outcome.max_abs_diff:.2e} > {outcome.tolerance:.0e}, "
            f"top-1 agreement {outcome.top1_agreement:.0%})",
            "do not deploy it; export again",
        )
    return Parity.numerical({"random": outcome})


def _outcome(parity: Parity) -> dict[str, Any]:
    """A target's entry in the result: its one comparison's JSON, or ``{"skipped": why}``."""
    if parity.skipped is not None or not parity.checks:
        return parity.to_dict()
    return next(iter(parity.checks.values())).to_dict()


def describe(result: dict[str, Any], what: str = "") -> str:
    """One line per verified set (or checkpoint: ``what``), for the CLI."""
    parts = ([what] if what else []) + [f"{result['files']} files match their SHA-256"]
    parts.append(
        f"signed by {result['signed_by']} (signature valid)" if result["signed_by"] else "signature not checked"
    )
    if result.get("unlisted"):
        parts.append(f"{len(result['unlisted'])} file(s) not in the manifest: {', '.join(result['unlisted'][:5])}")
    parity = result.get("parity", {})
    if "skipped" in parity:
        parts.append(f"parity not re-run ({parity['skipped']})")
    else:
        parts += [_describe_target(target, outcome) for target, outcome in parity.items()]
    return f"{result['directory']}: " + "; ".join(parts)


def _describe_target(target: str, outcome: dict[str, Any]) -> str:
    if "skipped" in outcome:
        return f"{target} parity not run ({outcome['skipped']})"
    if "noise" in outcome:
        noise = outcome["noise"]
        return f"{target} noise: spread {noise['spread_ratio']:.2f}x PyTorch's over {noise['draws']} draws"
    check = check_from_dict(outcome)
    if isinstance(check, AgreementCheck):
        return f"{target} int8 agreement {check.top1_agreement:.1%} on {check.images} real images"
    return f"{target} parity: max abs diff {check.max_abs_diff:.1e}"


__all__ = ["check_files", "describe", "rerun_parity", "verify_set"]
