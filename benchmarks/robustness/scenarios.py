"""The attack scenarios: which models craft the adversarial sets for each target, localized attacks, eps sweeps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from keyedge.attacks import get_attack, list_attacks, make_attack
from keyedge.benchmarks.robustness.config import RobustnessConfig
from keyedge.benchmarks.robustness.evaluation import Evaluation
from keyedge.benchmarks.robustness.members import Member
from keyedge.benchmarks.robustness_report import Outcome
from keyedge.errors import KeyedgeError


def scenario_sources(target: Member, members: Sequence[Member], eot_max: int = 0) -> dict[str, list[str] | str]:
    """For each scenario, the source models -- or why it cannot run with these models."""
    others = [m for m in members if m.name != target.name]
    out: dict[str, list[str] | str] = {"white-box": [target.name]}
    plains = [m for m in others if m.plain and m.arch == target.arch]
    out["non-adaptive"] = [plains[0].name] if plains else "no plain model of the same architecture"
    if not target.keyed:
        return out
    surrogates = _surrogates(target, members)
    out["adaptive"] = (
        [surrogates[0].name]
        if surrogates
        else f"no other keyed {target.arch} with block size {target.block_size} and another key"
    )
    eot = [m.name for m in surrogates][: max(2, eot_max) if eot_max else None]
    out["multi-key-eot"] = (
        eot
        if len(eot) >= 2
        else f"needs >= 2 surrogate keyed models with block size {target.block_size}, have {len(surrogates)}"
    )
    foreign = [m.name for m in others if m.arch != target.arch]
    out["cross-arch"] = foreign[:1] if foreign else "no model of another architecture"
    return out


def _surrogates(target: Member, members: Sequence[Member]) -> list[Member]:
    """Keyed models an attacker can train for ``target``: same architecture and block size, another key; those
    fine-tuned the way the target was first."""
    found = [
        m
        for m in members
        if m.name != target.name
        and m.keyed
        and m.arch == target.arch
        and m.block_size == target.block_size
        and m.fingerprint != target.fingerprint
    ]
    return sorted(found, key=lambda m: m.finetune != target.finetune)


def eot_by_recipe(target: Member, members: Sequence[Member], eot_max: int = 0) -> dict[str, list[str]]:
    """Multi-key EoT over the surrogates of one fine-tune recipe (full, LoRA...), for each recipe with >= 2 of them,
    where the surrogates mix recipes (else the plain multi-key EoT is that set already): a target can be weaker
    against one recipe's surrogates than against all of them summed."""
    if not target.keyed:
        return {}
    surrogates = _surrogates(target, members)
    recipes = {m.finetune for m in surrogates}
    if len(recipes) < 2:
        return {}
    out = {}
    for recipe in sorted(recipes):
        names = [m.name for m in surrogates if m.finetune == recipe][: max(2, eot_max) if eot_max else None]
        if len(names) >= 2:
            out[recipe] = names
    return out


def transfer_scenario(source: Member, target: Member) -> str | None:
    """What an adversarial set crafted white-box on ``source`` is for ``target`` (None: it needs the target's key)."""
    if source.name == target.name:
        return "white-box"
    if target.keyed and source.fingerprint == target.fingerprint:
        return None
    if source.arch != target.arch:
        return "cross-arch"
    if source.plain:
        return "non-adaptive"
    if source.keyed and target.keyed and source.block_size == target.block_size:
        return "adaptive"
    return "transfer"


def parse_localized(spec: str) -> tuple[str, dict[str, Any]]:
    """``npixel:4`` -> ("npixel", {"pixels": 4}); ``patch:0.05`` -> ("patch", {"fraction": 0.05}).

    Any localized attack with one budget parameter is ``NAME:VALUE``; the attack itself checks the value.
    """
    types = {int: "an integer", float: "a number"}
    forms = {}
    for localized in sorted(list_attacks(kind="localized")):
        budget = get_attack(localized).budget
        if len(budget) == 1:
            forms[localized] = budget[0]
    hint = "write " + " or ".join(f"{n}:{p.upper()}" for n, p in forms.items())
    name, _, text = spec.partition(":")
    if name not in forms:
        raise KeyedgeError(f"bad localized attack {spec!r}", hint)
    cls, parameter = get_attack(name), forms[name]
    default = cls.options()[parameter]
    try:
        value = type(default)(text) if type(default) in types else text
        cls(nn.Identity(), **{parameter: value})  # the attack's own checks of its budget
    except ValueError as exc:  # AttackError is a ValueError
        reason = exc.message if isinstance(exc, KeyedgeError) else f"{parameter} must be {types[type(default)]}"
        raise KeyedgeError(f"bad localized attack {spec!r} ({reason})", hint) from None
    return name, {parameter: value}


def localized_outcomes(ev: Evaluation, members: Sequence[Member], config: RobustnessConfig) -> list[Outcome]:
    """N-pixel and patch attacks, white-box on every model (volumization paper §5: robustness score, success rate).

    A config field ``<attack>_<option>`` (``npixel_popsize``, ``patch_steps``...) sets that attack's option.
    """
    n = min(config.localized_limit, ev.images.shape[0])
    out = []
    for spec in config.localized:
        name, options = parse_localized(spec)
        cls = get_attack(name)
        prefix = f"{name.replace('-', '_')}_"
        for option, value in config.to_dict().items():
            if option.startswith(prefix) and cls.accepts(option[len(prefix) :]):
                options[option[len(prefix) :]] = value
        for m in members:
            attack = make_attack(name, m.model, seed=config.seed, **options)
            tick = ev.progress(f"{attack.label()} on {m.name}", n)
            adv = attack.run(
                ev.images[:n], ev.labels[:n], batch_size=ev.config.batch_size, device=ev.config.device, progress=tick
            )
            out.append(ev.outcome("localized", m.name, [m.name], adv, attack.describe()))
    return out


def eps_sweep(
    ev: Evaluation, members: Sequence[Member], eps_values: Sequence[float], config: RobustnessConfig
) -> list[dict[str, Any]]:
    """Robust accuracy vs eps for the plain model and the first keyed targets: white-box, non-adaptive, adaptive."""
    keyed = sorted([m for m in members if m.keyed], key=lambda m: m.finetune != "full")[: config.sweep_targets]
    targets = [m for m in members if m.plain][:1] + keyed
    n = min(config.sweep_limit, ev.images.shape[0])
    norm = get_attack(config.attack).norm
    points = []
    for target in targets:
        sets = {
            s: v for s, v in scenario_sources(target, members).items() if s in ("white-box", "non-adaptive", "adaptive")
        }
        for scenario, sources in [*sets.items(), ("noise", [])]:
            if isinstance(sources, str):
                continue
            for eps in eps_values:
                adv, info = ev.noise(eps, norm, n) if scenario == "noise" else ev.adversarial(sources, eps, n=n)
                o = ev.outcome(scenario, target.name, sources, adv, info)
                points.append(
                    {
                        "kind": "eps",
                        "scenario": scenario,
                        "target": target.name,
                        "sources": sources,
                        "eps": eps,
                        "eps_255": round(eps * 255, 4),
                        "images": n,
                        "robust_accuracy": o.robust_accuracy,
                        "robust_se": o.robust_se,
                    }
                )
    return points
