"""The robustness harness: load the models and the test images, run every scenario, matrix, sweep and check."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from keyedge.attacks import get_attack, make_attack, parse_eps
from keyedge.benchmarks.latency import environment
from keyedge.benchmarks.robustness.artifacts import artifact_outcomes
from keyedge.benchmarks.robustness.checks import headline, noise_check, sweep_checks, trust_checks
from keyedge.benchmarks.robustness.config import RobustnessConfig
from keyedge.benchmarks.robustness.evaluation import Evaluation
from keyedge.benchmarks.robustness.matrices import gradient_matrix, key_diversity
from keyedge.benchmarks.robustness.members import Member, load_members
from keyedge.benchmarks.robustness.postures import Latency, check_postures, guard_false_positives, posture_rows
from keyedge.benchmarks.robustness.queries import parse_query, query_outcomes, query_targets
from keyedge.benchmarks.robustness.scenarios import (
    eot_by_recipe,
    eps_sweep,
    localized_outcomes,
    scenario_sources,
    transfer_scenario,
)
from keyedge.benchmarks.robustness.worst import Trace, worst_case
from keyedge.benchmarks.robustness_report import Matrix, Outcome, RobustnessReport, attack_label
from keyedge.data.datasets import load_dataset
from keyedge.errors import KeyedgeError
from keyedge.keys.keyfile import Key


def _test_images(config: RobustnessConfig, members: Sequence[Member]) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """The seeded, class-stratified test images and labels, from the data the models were trained for."""
    spec = members[0].model.spec
    dataset, info = load_dataset(config.data, "test", spec.image_size, limit=config.limit, seed=config.seed)
    if info.num_classes != spec.num_classes:
        raise KeyedgeError(
            f"{config.data} has {info.num_classes} classes, the models {spec.num_classes}",
            "evaluate on the data the models were trained for",
        )
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))])
    return images, labels, info


def _transfer(ev: Evaluation, members: Sequence[Member], eps: float, config: RobustnessConfig):
    """Every model attacked white-box once; every set classified by every model: the transfer matrix.

    Returns the sets by source, the attack's description, the predictions by (source, target) and the matrix."""
    adv_sets: dict[str, torch.Tensor] = {}
    attack_info: dict[str, Any] = {}
    for m in members:
        adv_sets[m.name], attack_info = ev.adversarial([m.name], eps)
    names = [m.name for m in members]
    predictions = {(s, t): ev.predict(ev.members[t].model, adv_sets[s]) for s in names for t in names}
    label = attack_label(attack_info)
    for s in members:
        for t in members:
            scenario = transfer_scenario(s, t)
            if scenario is not None:  # every set crafted without the target's key is one of its keyless attacks
                standing = predictions[(s.name, t.name)] == ev.labels
                name = f"{label} from {s.name}"
                ev.traces.append(
                    Trace.from_standing(t.name, scenario, name, "torch", standing, images=adv_sets[s.name])
                )
    transfer = Matrix(
        "transferability",
        rows=names,
        columns=names,
        images=ev.images.shape[0],
        values=[[float((predictions[(s, t)] == ev.labels).float().mean()) for t in names] for s in names],
        note=f"robust accuracy of the column model on examples crafted white-box on the row model "
        f"({config.attack}, eps {config.eps}, {config.steps} steps); diagonal: white-box",
    )
    return adv_sets, attack_info, predictions, transfer


def _scenarios(ev: Evaluation, members: Sequence[Member], eps: float, transfer_sets: tuple, norm: str):
    """Each target under each scenario, and the noise control: (outcomes, (outcome, images) that artifacts
    classify too, scenarios skipped and why)."""
    adv_sets, attack_info, predictions = transfer_sets
    outcomes: list[Outcome] = []
    classified: list[tuple[Outcome, torch.Tensor]] = []
    skipped: list[dict[str, str]] = []
    noise_adv, noise_info = ev.noise(eps, norm)
    for target in sorted(members, key=lambda m: (m.keyed, m.finetune != "full")):
        for scenario, sources in scenario_sources(target, members, ev.config.eot_max).items():
            if isinstance(sources, str):
                skipped.append({"scenario": scenario, "target": target.name, "reason": sources})
                continue
            if len(sources) == 1:
                adv, pred = adv_sets[sources[0]], predictions[(sources[0], target.name)]
                outcomes.append(ev.outcome(scenario, target.name, sources, adv, attack_info, pred))
                classified.append((outcomes[-1], adv))
            else:
                outcomes.append(_summed(ev, scenario, target, sources, eps))
        for sources in eot_by_recipe(target, members, ev.config.eot_max).values():
            if sources != scenario_sources(target, members, ev.config.eot_max).get("multi-key-eot"):
                outcomes.append(_summed(ev, "multi-key-eot", target, sources, eps))
        noise_pred = ev.predict(target.model, noise_adv)
        outcomes.append(ev.outcome("noise", target.name, [], noise_adv, noise_info, noise_pred))
        classified.append((outcomes[-1], noise_adv))
        standing = noise_pred == ev.labels
        ev.traces.append(
            Trace.from_standing(target.name, "noise", attack_label(noise_info), "torch", standing, images=noise_adv)
        )
    return outcomes, classified, skipped


def _summed(ev: Evaluation, scenario: str, target: Member, sources: list[str], eps: float) -> Outcome:
    """A set crafted on several ``sources`` (losses summed: multi-key EoT) on ``target``; its trace to ``ev.traces``."""
    adv, info = ev.adversarial(sources, eps)
    pred = ev.predict(target.model, adv)
    label = f"{attack_label(info)} from {'+'.join(sources)}"
    standing = pred == ev.labels[: len(pred)]
    ev.traces.append(Trace.from_standing(target.name, scenario, label, "torch", standing, images=adv))
    return ev.outcome(scenario, target.name, sources, adv, info, pred)


def run_robustness(
    checkpoints: Sequence[Path],
    keys: Sequence[Key],
    config: RobustnessConfig,
    *,
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
    log: Callable[[str], None] = lambda _line: None,
    sealkeys: Sequence[Any] = (),
    latency: Latency | None = None,
) -> RobustnessReport:
    """Run every scenario, matrix, sweep and check; return a :class:`RobustnessReport`.

    ``sealkeys`` open sealed artifact sets among ``config.artifacts`` (never recorded); ``latency(posture, member)``
    gives a posture's latency overhead against ``scores`` (a ratio) for the postures table, where measured."""
    eps = parse_eps(config.eps)
    sweep_eps = sorted({parse_eps(e) for e in config.sweep_eps})
    members = load_members(checkpoints, {k.fingerprint: k for k in keys}, config.device)
    for spec in config.query:  # a bad spec, an unknown target or a missing package fails now, not after the attacks
        name, queries = parse_query(spec)
        make_attack(name, nn.Identity(), queries=queries)
    query_targets(members, config)
    check_postures(members, config)  # an unknown part, a bad sigma, topk:K beyond the classes: now, not later
    images, labels, info = _test_images(config, members)
    ev = Evaluation(members, images, labels, config, progress)
    log(
        f"{len(members)} models, {len(images)} {info.name} test images (seed {config.seed}), "
        f"{config.attack} eps {config.eps}, {config.steps} steps"
    )
    *transfer_sets, transfer = _transfer(ev, members, eps, config)
    norm = get_attack(config.attack).norm
    outcomes, classified, skipped = _scenarios(ev, members, eps, tuple(transfer_sets), norm)
    outcomes += localized_outcomes(ev, members, config)
    for target in query_targets(members, config):
        outcomes += query_outcomes(ev, target.name, target.model, config, eps, norm)
    checks = [*trust_checks(ev, outcomes, transfer, eps, config), noise_check(outcomes)]
    diversity = key_diversity(ev, members, keys)
    gradients = gradient_matrix(ev, members, config.gradient_limit)
    sweeps = eps_sweep(ev, members, sweep_eps, config) if sweep_eps else []
    checks += sweep_checks(sweeps)
    artifacts = (
        artifact_outcomes(ev, members, config.artifacts, classified, sealkeys, eps=eps, norm=norm)
        if config.artifacts
        else []
    )
    postures = posture_rows(ev, members, ev.traces, config, eps, latency) if config.postures else []
    spec = members[0].model.spec
    return RobustnessReport(
        environment=environment(),
        config=config.to_dict(),
        data={
            "name": info.name,
            "source": info.source,
            "images": len(images),
            "image_size": spec.image_size,
            "classes": list(info.classes),
        },
        models=[m.describe() for m in members],
        outcomes=outcomes,
        skipped=skipped,
        matrices=[diversity, transfer, gradients],
        sweeps=sweeps,
        checks=checks,
        artifacts=artifacts,
        headline=headline(outcomes + artifacts, members),
        worst_case=worst_case(ev.traces, members, config.query_budgets),
        postures=postures,
        guard_false_positives=guard_false_positives(ev, config) if config.postures else None,
    )
