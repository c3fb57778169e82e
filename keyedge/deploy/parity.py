"""Parity: does an artifact still compute what its checkpoint computes?  The rules and the typed result.

Two rules compare an artifact's logits with the PyTorch keyed model's on the same images:

* :func:`check_parity` (fp32, fp16): max abs diff within the tolerance (scaled by the largest logit when
  that exceeds 1) and the same top-1 -- a :class:`ToleranceCheck`;
* :func:`check_agreement` (int8): top-1 agreement with the fp32 model and, with labels, the accuracy drop
  in points -- an :class:`AgreementCheck`.

:class:`Parity` is one target's verification as ``manifest.json`` records it (``targets.T.parity``):
numerical (its checks per input kind, ``random``/``real``), structural only (the runtime does not run
here: ``reason`` and the interface checked instead) or skipped (``--no-verify``, or ``keyedge verify``
could not re-run it: ``skipped``).  ``to_dict``/``from_dict`` write and read the manifest's JSON with
the same keys as ever, so manifests written before the type read the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from keyedge.errors import KeyedgeError

FP32_ATOL = 1e-4  # times max(1, largest reference logit)
FP16_RTOL = 2e-2  # likewise
MIN_AGREEMENT = 0.98  # int8: top-1 agreement with the fp32 keyed model on real test images
MAX_ACCURACY_DROP = 1.0  # int8: percentage points of test accuracy

__all__ = [
    "FP16_RTOL",
    "FP32_ATOL",
    "MAX_ACCURACY_DROP",
    "MIN_AGREEMENT",
    "AgreementCheck",
    "Parity",
    "ToleranceCheck",
    "VerificationError",
    "check_agreement",
    "check_from_dict",
    "check_parity",
]


class VerificationError(KeyedgeError):
    """An exported artifact does not reproduce the PyTorch keyed model (or its set does not match its manifest)."""


@dataclass
class ToleranceCheck:
    """The fp32/fp16 rule on one set of inputs: max abs diff against the tolerance, and top-1 agreement."""

    max_abs_diff: float
    tolerance: float
    top1_agreement: float
    passed: bool
    images: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance,
            "top1_agreement": self.top1_agreement,
            "passed": self.passed,
            "images": self.images,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ToleranceCheck:
        names = ("max_abs_diff", "tolerance", "top1_agreement", "images")
        return cls(**{name: data.get(name) for name in names}, passed=bool(data.get("passed")))

    def describe(self) -> str:
        return f"max abs diff {self.max_abs_diff:.1e}, top-1 {self.top1_agreement:.0%}"


@dataclass
class AgreementCheck:
    """The int8 rule on real images: top-1 agreement with fp32 and, with labels, the accuracy drop in points."""

    images: int
    top1_agreement: float
    min_agreement: float
    max_abs_diff: float
    passed: bool
    accuracy: float | None = None  # None: no labelled test data here, agreement only
    accuracy_fp32: float | None = None
    accuracy_drop_points: float | None = None
    max_drop_points: float | None = None

    @property
    def labelled(self) -> bool:
        return self.accuracy_drop_points is not None

    def to_dict(self) -> dict[str, Any]:
        head = {
            "images": self.images,
            "top1_agreement": self.top1_agreement,
            "min_agreement": self.min_agreement,
            "max_abs_diff": self.max_abs_diff,
        }
        accuracy = (
            {
                "accuracy_fp32": self.accuracy_fp32,
                "accuracy": self.accuracy,
                "accuracy_drop_points": self.accuracy_drop_points,
                "max_drop_points": self.max_drop_points,
            }
            if self.labelled
            else {"accuracy": self.accuracy}
        )
        return head | accuracy | {"passed": self.passed}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AgreementCheck:
        names = ("images", "top1_agreement", "min_agreement", "max_abs_diff", "accuracy", "accuracy_fp32")
        return cls(
            **{name: data.get(name) for name in names},
            passed=bool(data.get("passed")),
            accuracy_drop_points=data.get("accuracy_drop_points"),
            max_drop_points=data.get("max_drop_points"),
        )

    def describe(self) -> str:
        accuracy = (
            f", accuracy {self.accuracy:.1%} vs fp32 {self.accuracy_fp32:.1%}" if self.accuracy is not None else ""
        )
        return f"top-1 agreement with fp32 {self.top1_agreement:.1%} on {self.images} real images{accuracy}"


Check = ToleranceCheck | AgreementCheck


def check_from_dict(data: Mapping[str, Any]) -> Check:
    """A check as JSON holds it: the agreement rule names its ``min_agreement``."""
    return AgreementCheck.from_dict(data) if "min_agreement" in data else ToleranceCheck.from_dict(data)


@dataclass
class Parity:
    """One target's verification: numerical (``checks`` per input kind), structural only, or skipped.

    Read it by its fields; :meth:`to_dict` / :meth:`from_dict` are the manifest's JSON.
    """

    checks: dict[str, Check] = field(default_factory=dict)  # input kind (random, real) -> comparison
    ran: bool = False  # run numerically here
    passed: bool = False
    reason: str | None = None  # why the runtime did not run here (checked structurally instead)
    structural: dict[str, Any] | None = None  # the interface checked instead: {"inputs", "outputs"}
    skipped: str | None = None  # not verified at all, and why (``--no-verify``, nothing to compare with)
    #: a posture's in-graph noise: ``checks`` are its deterministic twin's, this the shipped artifact's
    #: statistical check (keyedge.deploy.verification.check_noise), or ``{"ran": False, "reason": ...}``
    noise: dict[str, Any] | None = None

    @classmethod
    def skip(cls, why: str) -> Parity:
        return cls(skipped=why)

    @classmethod
    def structural_only(cls, why: str, interface: dict[str, Any]) -> Parity:
        return cls(ran=False, reason=why, structural=interface, passed=True)

    @classmethod
    def numerical(cls, checks: dict[str, Check]) -> Parity:
        return cls(checks=checks, ran=True, passed=all(c.passed for c in checks.values()))

    @property
    def kind(self) -> str:
        """``agreement`` (int8's rule) or ``tolerance``."""
        return "agreement" if any(isinstance(c, AgreementCheck) for c in self.checks.values()) else "tolerance"

    @property
    def max_abs_diff(self) -> float | None:
        """The largest max abs diff over its checks; None when it did not run numerically."""
        diffs = [c.max_abs_diff for c in self.checks.values() if c.max_abs_diff is not None]
        return max(diffs) if diffs else None

    @property
    def note(self) -> str | None:
        """Why it was not run numerically (``reason`` or ``skipped``); None when it was."""
        return self.reason or self.skipped

    def describe(self) -> str:
        """One line for the export log."""
        if self.skipped is not None:
            return f"not verified ({self.skipped})"
        if not self.ran:
            return f"checked structurally ({self.reason})"
        noise = ""
        if self.noise and self.noise.get("passed"):
            noise = (
                f"; noise: spread {self.noise['spread_ratio']:.2f}x PyTorch's, means within "
                f"{self.noise['max_mean_z']:.1f} SE over {self.noise['draws']} draws"
            )
        twin = "sigma-0 twin " if self.noise is not None else ""
        return f"verified ({twin}" + "; ".join(self._parts()) + noise + ")"

    def _parts(self) -> list[str]:
        if self.kind == "agreement":
            return [check.describe() for check in self.checks.values()]
        return [f"{kind}: {check.describe()}" for kind, check in self.checks.items()]

    # ---- manifest JSON ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self._to_dict() | ({"noise": self.noise} if self.noise is not None else {})

    def _to_dict(self) -> dict[str, Any]:
        if self.skipped is not None:
            return {"skipped": self.skipped}
        if not self.ran and self.reason is None and not self.checks and not self.passed:
            return {}  # nothing recorded
        if not self.ran:
            return {"ran": False, "reason": self.reason, "structural": self.structural, "passed": self.passed}
        kind = {"kind": "agreement"} if self.kind == "agreement" else {}
        checks = {name: check.to_dict() for name, check in self.checks.items()}
        return {"ran": True} | kind | checks | {"passed": self.passed}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Parity:
        if isinstance(data, Parity):
            return data
        data = data or {}
        noise = data.get("noise")
        noise = dict(noise) if isinstance(noise, Mapping) else None
        if "skipped" in data:
            return cls(skipped=str(data["skipped"]), noise=noise)
        checks = {
            name: check_from_dict(value)
            for name, value in data.items()
            if isinstance(value, Mapping) and name not in ("structural", "noise")
        }
        reason = data.get("reason")
        return cls(
            checks=checks,
            ran=bool(data.get("ran")),
            passed=bool(data.get("passed")),
            reason=None if reason is None else str(reason),
            structural=data.get("structural"),
            noise=noise,
        )


def check_agreement(
    reference: np.ndarray,
    got: np.ndarray,
    labels: np.ndarray | None,
    *,
    min_agreement: float = MIN_AGREEMENT,
    max_drop: float = MAX_ACCURACY_DROP,
) -> AgreementCheck:
    """The int8 rule: top-1 agreement with the fp32 reference, and (with labels) the accuracy drop in points."""
    ref_top, got_top = reference.argmax(1), got.argmax(1)
    check = AgreementCheck(
        images=len(reference),
        top1_agreement=float((ref_top == got_top).mean()),
        min_agreement=min_agreement,
        max_abs_diff=float(np.abs(reference - got).max()),
        passed=False,
    )
    passed = check.top1_agreement >= min_agreement
    if labels is not None:
        fp32, int8 = float((ref_top == labels).mean()), float((got_top == labels).mean())
        drop = round(100 * (fp32 - int8), 6)
        check.accuracy_fp32, check.accuracy, check.accuracy_drop_points = fp32, int8, drop
        check.max_drop_points = max_drop
        passed &= drop <= max_drop
    check.passed = bool(passed)
    return check


def check_parity(reference: np.ndarray, got: np.ndarray, precision: str) -> ToleranceCheck:
    """Compare artifact outputs with PyTorch's: max abs diff and top-1 agreement, against the tolerance."""
    diff = float(np.abs(reference - got).max())
    scale = max(1.0, float(np.abs(reference).max()))  # float32 error grows with the logits' magnitude
    tol = (FP32_ATOL if precision == "fp32" else FP16_RTOL) * scale
    ref_top, got_top = reference.argmax(1), got.argmax(1)
    mismatched = ref_top != got_top
    if precision == "fp16":  # a flip is acceptable only where the reference's top-2 margin is within tolerance
        top2 = np.sort(reference, axis=1)[:, -2:]
        mismatched &= (top2[:, 1] - top2[:, 0]) > tol
    return ToleranceCheck(
        max_abs_diff=diff,
        tolerance=tol,
        top1_agreement=float((ref_top == got_top).mean()),
        passed=bool(diff <= tol and not mismatched.any()),
        images=len(reference),
    )
