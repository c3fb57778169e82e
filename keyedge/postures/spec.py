"""Deployment postures: what a deployed model answers to a query, and how (the ``--posture`` grammar).

A posture is a ``+``-joined list of parts, at most one of each kind, in any order::

    scores                  every class's probability (the default; what keyedge exported before postures)
    topk:K[:D]              the K most probable classes with their probabilities rounded to D decimals (default 2)
    label                   the top-1 class only (an ArgMax inside the graph: the device cannot leak scores)
    noise:SIGMA             Gaussian noise of standard deviation SIGMA (pixel units, [0, 1] images; ``8/255``
                            works) added to every query before the shuffle, inside the graph (Random Noise Defense)
    guard[:ACTION]          a stateful query guard in the device runtime (Blacklight-style hashes of quantized
                            pixel windows over a bounded history); ACTION refuse (default), lock or flag
    rate:N                  at most N queries per minute per device, enforced by the runtime

e.g. ``label+noise:0.02+guard``.  Outputs and noise live in the exported graph; the guard and the rate limit
are enforced by :mod:`keyedge.deploy.runtime` around any runner.  :func:`parse_posture` turns text into a
:class:`Posture`; ``str(posture)`` gives the canonical spelling back (outputs, noise, guard, rate).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from keyedge.errors import KeyedgeError

OUTPUTS = ("scores", "topk", "label")
GUARD_ACTIONS = ("refuse", "lock", "flag")
#: the largest noise a posture takes: beyond it the images are mostly noise (pixels live in [0, 1])
MAX_SIGMA = 0.5
MAX_RATE = 1_000_000
_NUMBER = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?:/\s*([0-9]*\.?[0-9]+)\s*)?$")


class PostureError(KeyedgeError, ValueError):
    """A posture spec or record that cannot be used (one line, exit 2)."""


_HINT = "write it like label+noise:0.02+guard (parts: scores, topk:K[:D], label, noise:SIGMA, guard[:ACTION], rate:N)"


@dataclass(frozen=True)
class Posture:
    """What a deployed model answers (``outputs``, ``topk``, ``decimals``), the in-graph noise, guard and rate."""

    outputs: str = "scores"
    topk: int | None = None  # for outputs == "topk"
    decimals: int | None = None  # rounding of topk probabilities
    noise: float = 0.0  # sigma of the in-graph Gaussian noise; 0: none
    guard: str | None = None  # the guard's action, None: no guard
    rate: int | None = None  # queries per minute per device, None: unlimited

    def __post_init__(self) -> None:
        if self.outputs not in OUTPUTS:
            raise PostureError(f"unknown posture output {self.outputs!r}", f"use {', '.join(OUTPUTS)}")
        if (self.outputs == "topk") != (self.topk is not None):
            raise PostureError("topk needs K, and only topk takes K", _HINT)
        if self.topk is not None and not 1 <= self.topk <= 1000:
            raise PostureError(f"topk:K needs K in 1..1000, got {self.topk}", "e.g. topk:3")
        if self.decimals is not None and (self.outputs != "topk" or not 0 <= self.decimals <= 6):
            raise PostureError(f"topk's decimals must be 0..6, got {self.decimals}", "e.g. topk:3:2")
        if not (math.isfinite(self.noise) and 0 <= self.noise <= MAX_SIGMA):
            raise PostureError(f"noise sigma must be in [0, {MAX_SIGMA}], got {self.noise:g}", "e.g. noise:0.02")
        if self.guard is not None and self.guard not in GUARD_ACTIONS:
            raise PostureError(f"unknown guard action {self.guard!r}", f"use {', '.join(GUARD_ACTIONS)}")
        if self.rate is not None and not 1 <= self.rate <= MAX_RATE:
            raise PostureError(f"rate must be 1..{MAX_RATE} queries per minute, got {self.rate}", "e.g. rate:60")

    # -- what it asks of the graph and of the runtime -------------------------------------------------------------

    @property
    def in_graph(self) -> bool:
        """Whether the exported graph differs from the plain scores graph (outputs or noise)."""
        return self.outputs != "scores" or self.noise > 0

    @property
    def randomized(self) -> bool:
        return self.noise > 0

    @property
    def label_only(self) -> bool:
        return self.outputs == "label"

    @property
    def name(self) -> str:
        return str(self)

    def __str__(self) -> str:
        parts = [self.outputs if self.outputs != "topk" else f"topk:{self.topk}"]
        if self.outputs == "topk" and self.decimals is not None:
            parts[0] += f":{self.decimals}"
        if self.noise:
            parts.append(f"noise:{self.noise:g}")
        if self.guard:
            parts.append("guard" if self.guard == "refuse" else f"guard:{self.guard}")
        if self.rate:
            parts.append(f"rate:{self.rate}")
        return "+".join(parts)

    # -- records ----------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"spec": str(self), **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Posture:
        """A posture from a manifest record (its ``spec`` is authoritative; the fields must agree with it)."""
        spec = data.get("spec")
        if not isinstance(spec, str):
            raise PostureError("a posture record needs its spec as text", _HINT)
        posture = parse_posture(spec)
        fields = {k: v for k, v in data.items() if k != "spec"}
        if fields and fields != asdict(posture):
            raise PostureError(f"posture record disagrees with its spec {spec!r}", "write the record with keyedge")
        return posture


SCORES = Posture()
#: the posture keyedge recommends for a device an attacker can query (docs/postures.md: measured on the
#: quickstart's k1), which the quickstart measures beside ``scores``
RECOMMENDED = "label+guard:lock"


def _number(text: str, what: str) -> float:
    match = _NUMBER.match(text)
    if not match:
        raise PostureError(f"{what} must be a number or a fraction like 8/255, got {text!r}", _HINT)
    value = float(match.group(1))
    if match.group(2) is not None:
        if float(match.group(2)) == 0:
            raise PostureError(f"{what} {text!r} divides by zero", _HINT)
        value /= float(match.group(2))
    return value


def _integer(text: str, what: str) -> int:
    if not re.fullmatch(r"\s*[0-9]{1,9}\s*", text):
        raise PostureError(f"{what} must be a whole number, got {text!r}", _HINT)
    return int(text)


def parse_posture(text: str | Posture | None) -> Posture:
    """The :class:`Posture` a spec names (``None`` or ``""``: scores); one line naming the bad part otherwise."""
    if isinstance(text, Posture):
        return text
    if text is None or not str(text).strip():
        return SCORES
    fields: dict[str, Any] = {}
    seen: set[str] = set()
    for raw in str(text).split("+"):
        part = raw.strip().lower()
        name, _, arg = part.partition(":")
        kind = "outputs" if name in OUTPUTS else name
        if kind in seen:
            raise PostureError(f"posture {text!r} names {kind} twice", _HINT)
        seen.add(kind)
        if name in ("scores", "label"):
            if arg:
                raise PostureError(f"posture part {name!r} takes no argument, got {part!r}", _HINT)
            fields["outputs"] = name
        elif name == "topk":
            k, _, decimals = arg.partition(":")
            fields |= {"outputs": "topk", "topk": _integer(k, "topk:K"), "decimals": 2}
            if decimals:
                fields["decimals"] = _integer(decimals, "topk's decimals")
        elif name == "noise":  # six significant digits: the canonical spelling reads back as the same number
            fields["noise"] = float(f"{_number(arg, 'noise:SIGMA'):.6g}")
        elif name == "guard":
            fields["guard"] = arg or "refuse"
        elif name == "rate":
            fields["rate"] = _integer(arg, "rate:N")
        else:
            raise PostureError(f"unknown posture part {raw.strip()!r} in {text!r}", _HINT)
    return Posture(**fields)
