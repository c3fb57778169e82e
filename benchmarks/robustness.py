"""Robustness of key-based defenses, measured the way the paper does and a reviewer would check it.

Given trained checkpoints (a plain model, keyed full and LoRA fine-tunes, any block sizes) and their
keys, on ``n`` seeded, class-stratified test images:

* **adversarial sets** -- every model is attacked white-box once (PGD by default); each set is then
  classified by every model, which *is* the transferability matrix (source x target robust accuracy)
  and yields the scenarios of the key-based-defense paper (§III-B, §IV) per keyed target:

  - ``white-box``     the target itself (sanity: must reach ~0%; reported first),
  - ``non-adaptive``  crafted on the plain model (the attacker has only the public model),
  - ``adaptive``      crafted on a surrogate keyed model: same architecture and block size, another key,
  - ``multi-key EoT`` crafted on the sum of the losses of all such surrogates (>= 2),
  - ``cross-arch``    crafted on models of another architecture;
  - ``noise``         the random-noise control: sign noise of the budget (no model, no key, no query);
  - ``query``         Square / HopSkipJump querying the target's outputs only, on PyTorch and on the artifacts;

* **headline**: per model, the worst robust accuracy over everything an attacker without its key can run;

* **key diversity**: every model with every key (and none), clean accuracy (paper Table 5);
* **gradient similarity**: mean cosine of input gradients between models (orthogonal-deep-models Eq. 1);
* **sweeps**: robust accuracy vs eps (white-box, non-adaptive, adaptive), and vs block size;
* **deployed artifacts**: the same adversarial images classified by the exported ONNX / OpenVINO files;
* **trust checks** (docs/design.md §10): white-box near zero, PGD <= FGSM, transfer never beats white-box,
  every attack at least as strong as noise, accuracy non-increasing in eps -- each shown with its numbers.

Metrics per (scenario, target): clean and robust accuracy with binomial standard errors, attack
success rate (of the images the target got right, the share it gets wrong after the attack), and
the fooling ratio of orthogonal-deep-models §IV (the same, restricted to images *both* the source(s)
and the target classify correctly, so earlier mistakes of either cannot inflate it).

    from keyedge.benchmarks.robustness import RobustnessConfig, run_robustness
    report = run_robustness(checkpoints, keys, RobustnessConfig(data="fashion-mnist", limit=500))
    report.write("reports/robustness")
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from keyedge.attacks import get_attack, make_attack, parse_eps
from keyedge.errors import KeyedgeError
from keyedge.keys.keyfile import Key

SCENARIOS = ("white-box", "non-adaptive", "adaptive", "multi-key-eot", "cross-arch", "localized", "noise", "query")
#: Scenarios that need the target's key (its own gradients): not open to an attacker who lacks it.
KEYED_ONLY = ("white-box", "localized")


# --------------------------------------------------------------------------- data


@dataclass
class Member:
    """One model under evaluation (a checkpoint with its own key)."""

    name: str
    path: str
    arch: str
    fingerprint: str | None
    block_size: int | None
    finetune: str  # full / lora
    model: nn.Module = field(repr=False)
    recipe: str = ""  # the checkpoint's fine-tune recipe, in one line
    key: Key | None = field(default=None, repr=False)
    defense: str | None = None  # another defense than a key (volumize)

    @property
    def keyed(self) -> bool:
        return self.fingerprint is not None

    @property
    def plain(self) -> bool:
        return not self.keyed and self.defense is None

    @property
    def role(self) -> str:
        from keyedge.defenses import get_defense

        return get_defense(self.defense).role(self.fingerprint)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "arch": self.arch,
            "fingerprint": self.fingerprint,
            "block_size": self.block_size,
            "finetune": self.finetune,
            "recipe": self.recipe,
            "role": self.role,
        }


@dataclass
class RobustnessConfig:
    """What to run: data, attack and budget, sweeps, sizes."""

    data: str = "fashion-mnist"
    limit: int = 500  # test images
    seed: int = 0  # test subset and attacks
    attack: str = "pgd"
    eps: str = "16/255"  # Fashion-MNIST needs 16/255 for white-box PGD to reach ~0 (docs/design.md §9)
    steps: int = 20
    attack_options: dict[str, Any] = field(default_factory=dict)
    sanity_max: float = 0.05  # white-box robust accuracy above this: the sanity check fails
    fgsm_check: bool = True
    sweep_eps: list[str] = field(default_factory=lambda: ["0", "2/255", "4/255", "8/255", "16/255"])
    sweep_limit: int = 200
    sweep_targets: int = 1  # keyed targets in the eps sweep (the first ones, full fine-tunes first)
    gradient_limit: int = 128
    eot_max: int = 0  # surrogates summed in multi-key EoT (0: all available)
    batch_size: int = 100
    device: str = "cpu"
    artifacts: list[str] = field(default_factory=list)  # export directories to evaluate on
    # localized attacks, white-box on every model (volumization paper): "npixel:N", "patch:FRACTION"
    localized: list[str] = field(default_factory=list)
    localized_limit: int = 100
    npixel_popsize: int = 50  # differential evolution (Su et al. use 400 x 100; CPU-sized here)
    npixel_steps: int = 20
    patch_steps: int = 50
    # query attacks on every target (or on query_targets), PyTorch and artifacts: "square:5000", "hsj:1000"
    query: list[str] = field(default_factory=list)
    query_budgets: list[int] = field(default_factory=lambda: [100, 1000, 5000])  # robust accuracy read off at
    query_limit: int = 100
    query_targets: list[str] = field(default_factory=list)  # model names (empty: all)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Outcome:
    """One adversarial set classified by one target."""

    scenario: str
    target: str
    sources: list[str]
    attack: dict[str, Any]
    images: int
    clean_accuracy: float
    robust_accuracy: float
    attack_success_rate: float | None  # of the images the target got right clean: share wrong after the attack
    fooling_ratio: float | None  # the same over images source(s) and target both got right (orthogonal §IV)
    fooling_images: int  # how many images the fooling ratio is over
    runtime: str = "torch"  # or onnx:<file> / openvino:<file> for deployed artifacts
    queries: dict[str, Any] | None = None  # query attacks: budget, median queries to success, successes
    precision: str = "fp32"  # of the model classifying: fp32 (PyTorch), or the deployed artifact's (fp16, int8)

    @property
    def robust_se(self) -> float:
        return binomial_se(self.robust_accuracy, self.images)

    @property
    def clean_se(self) -> float:
        return binomial_se(self.clean_accuracy, self.images)

    @property
    def delta(self) -> float:
        """The volumization paper's robustness score: accuracy under attack - clean accuracy."""
        return self.robust_accuracy - self.clean_accuracy

    @property
    def defense_success_rate(self) -> float | None:
        """Of the attacked images the target got right, the share it still gets right (1 - attack success)."""
        return None if self.attack_success_rate is None else 1.0 - self.attack_success_rate

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            "robust_se": self.robust_se,
            "clean_se": self.clean_se,
            "delta": self.delta,
            "defense_success_rate": self.defense_success_rate,
        }


@dataclass
class Matrix:
    """A models x columns table: key diversity, transferability or gradient similarity."""

    kind: str
    rows: list[str]
    columns: list[str]
    values: list[list[float | None]]
    images: int
    note: str = ""

    def get(self, row: str, column: str) -> float | None:
        return self.values[self.rows.index(row)][self.columns.index(column)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Check:
    """A trust check of docs/design.md §10, with the numbers behind it."""

    name: str
    passed: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


# --------------------------------------------------------------------------- loading


def load_members(checkpoints: Sequence[Path], keys: dict[str, Key], device: str = "cpu") -> list[Member]:
    """Load each checkpoint with its own key (matched by fingerprint); names are the directory names."""
    from keyedge.checkpoints import load_checkpoint, read_manifest
    from keyedge.defenses import defense_of
    from keyedge.keys.keyfile import key_for

    members, names = [], set()
    for path in checkpoints:
        manifest = read_manifest(path)
        key = key_for(manifest.fingerprint, keys, owner=path)
        model, manifest = load_checkpoint(path, key, map_location=device, manifest=manifest)
        name = Path(path).resolve().name
        if name in names:
            name = f"{Path(path).resolve().parent.name}/{name}"
        names.add(name)
        members.append(
            Member(
                name=name,
                path=str(path),
                arch=manifest.model.name,
                fingerprint=manifest.fingerprint,
                block_size=key.block_size if key else None,
                finetune=manifest.finetune_mode,
                recipe=manifest.recipe,
                model=defense_of(model).evaluated(model).eval().to(device),
                key=key,
                defense=manifest.defense and manifest.defense_name,
            )
        )
    if not members:
        raise KeyedgeError("no checkpoints given", "pass checkpoint directories made by `keyedge train`")
    specs = {(m.model.spec.image_size, m.model.spec.num_classes) for m in members}
    if len(specs) > 1:
        raise KeyedgeError(
            f"the checkpoints differ in image size or classes: {sorted(specs)}",
            "compare models trained on the same data at the same size",
        )
    return members


# --------------------------------------------------------------------------- the engine


class Evaluation:
    """Shared state of one run: the images, every model's clean predictions, cached adversarial sets."""

    def __init__(
        self,
        members: list[Member],
        images: torch.Tensor,
        labels: torch.Tensor,
        config: RobustnessConfig,
        progress: Callable[[str, int], Callable[[int], None]] | None = None,
    ):
        self.members = {m.name: m for m in members}
        self.images, self.labels, self.config = images, labels, config
        self.progress = progress or (lambda _description, _total: lambda _n: None)
        self.clean = {m.name: self.predict(m.model, images) for m in members}
        self._adv: dict[tuple, torch.Tensor] = {}

    def predict(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = []
        with torch.inference_mode():
            for start in range(0, x.shape[0], self.config.batch_size):
                out.append(model(x[start : start + self.config.batch_size].to(self.config.device)).argmax(1).cpu())
        return torch.cat(out)

    def attack_for(self, sources: Sequence[str], eps: float, name: str | None = None):
        models = [self.members[s].model for s in sources]
        from keyedge.attacks import budget_options

        name = name or self.config.attack
        # the budget the attack declares: steps unless attack_options set them, eps always
        options = budget_options(name, steps=self.config.steps) | dict(self.config.attack_options)
        options |= budget_options(name, eps=eps)
        return make_attack(name, models if len(models) > 1 else models[0], seed=self.config.seed, **options)

    def adversarial(
        self, sources: Sequence[str], eps: float, *, attack: str | None = None, n: int | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Adversarial images crafted on ``sources`` (losses summed when several), cached per set."""
        n = n or self.images.shape[0]
        cache_key = (tuple(sources), round(eps, 8), attack or self.config.attack, n)
        atk = self.attack_for(sources, eps, attack)
        if cache_key not in self._adv:
            if eps == 0:
                self._adv[cache_key] = self.images[:n].clone()
            else:
                label = f"{atk.name} eps {eps * 255:.3g}/255 on {'+'.join(sources)}"
                tick = self.progress(label, n)
                self._adv[cache_key] = atk.run(
                    self.images[:n],
                    self.labels[:n],
                    batch_size=self.config.batch_size,
                    device=self.config.device,
                    progress=tick,
                )
        return self._adv[cache_key], atk.describe()

    def noise(self, eps: float, norm: str, n: int | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
        """The random-noise control at ``eps`` (sign noise for Linf, Gaussian of norm eps for L2), one set for all."""
        n = n or self.images.shape[0]
        any_model = next(iter(self.members.values())).model  # not queried: noise sees no model
        atk = make_attack("noise", any_model, eps=eps, norm=norm, seed=self.config.seed)
        cache_key = ("noise", round(eps, 8), norm, n)
        if cache_key not in self._adv:
            self._adv[cache_key] = atk.run(self.images[:n], self.labels[:n], batch_size=self.config.batch_size)
        return self._adv[cache_key], atk.describe()

    def outcome(
        self,
        scenario: str,
        target: str,
        sources: Sequence[str],
        adv: torch.Tensor,
        attack: dict[str, Any],
        predictions: torch.Tensor | None = None,
        runtime: str = "torch",
    ) -> Outcome:
        n = adv.shape[0]
        pred = predictions if predictions is not None else self.predict(self.members[target].model, adv)
        return self.scored(scenario, target, sources, pred == self.labels[:n], attack, runtime)

    def scored(
        self,
        scenario: str,
        target: str,
        sources: Sequence[str],
        adv_ok: torch.Tensor,
        attack: dict[str, Any],
        runtime: str = "torch",
        queries: dict[str, Any] | None = None,
    ) -> Outcome:
        """The metrics of one set from which of its first ``len(adv_ok)`` images the target still gets right."""
        n = adv_ok.shape[0]
        y = self.labels[:n]
        clean_ok = self.clean[target][:n] == y
        both = clean_ok.clone()
        for s in sources:
            both &= self.clean[s][:n] == y
        asr = float((clean_ok & ~adv_ok).sum() / clean_ok.sum()) if clean_ok.any() else None
        fooling = float((both & ~adv_ok).sum() / both.sum()) if both.any() else None
        return Outcome(
            scenario=scenario,
            target=target,
            sources=list(sources),
            attack=attack,
            images=n,
            clean_accuracy=float(clean_ok.float().mean()),
            robust_accuracy=float(adv_ok.float().mean()),
            attack_success_rate=asr,
            fooling_ratio=fooling,
            fooling_images=int(both.sum()),
            runtime=runtime,
            queries=queries,
        )


def scenario_sources(target: Member, members: Sequence[Member], eot_max: int = 0) -> dict[str, list[str] | str]:
    """For each scenario, the source models -- or why it cannot run with these models."""
    others = [m for m in members if m.name != target.name]
    out: dict[str, list[str] | str] = {"white-box": [target.name]}
    plains = [m for m in others if m.plain and m.arch == target.arch]
    out["non-adaptive"] = [plains[0].name] if plains else "no plain model of the same architecture"
    if not target.keyed:
        return out
    surrogates = [
        m
        for m in others
        if m.keyed
        and m.arch == target.arch
        and m.block_size == target.block_size
        and m.fingerprint != target.fingerprint
    ]
    surrogates.sort(key=lambda m: m.finetune != target.finetune)  # same fine-tuning mode first
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


def run_robustness(
    checkpoints: Sequence[Path],
    keys: Sequence[Key],
    config: RobustnessConfig,
    *,
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
    log: Callable[[str], None] = lambda _line: None,
    sealkeys: Sequence[Any] = (),
):
    """Run every scenario, matrix, sweep and check; return a :class:`RobustnessReport`.

    ``sealkeys`` open sealed artifact sets among ``config.artifacts`` (never recorded)."""
    from keyedge.benchmarks.latency import environment
    from keyedge.benchmarks.robustness_report import RobustnessReport
    from keyedge.data.datasets import load_dataset

    eps = parse_eps(config.eps)
    sweep_eps = sorted({parse_eps(e) for e in config.sweep_eps})
    key_map = {k.fingerprint: k for k in keys}
    members = load_members(checkpoints, key_map, config.device)
    for spec in config.query:  # a bad spec, an unknown target or a missing package fails now, not after the attacks
        name, queries = parse_query(spec)
        make_attack(name, nn.Identity(), queries=queries)
    query_targets(members, config)
    spec = members[0].model.spec
    dataset, info = load_dataset(config.data, "test", spec.image_size, limit=config.limit, seed=config.seed)
    if info.num_classes != spec.num_classes:
        raise KeyedgeError(
            f"{config.data} has {info.num_classes} classes, the models {spec.num_classes}",
            "evaluate on the data the models were trained for",
        )
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))])
    ev = Evaluation(members, images, labels, config, progress)
    log(
        f"{len(members)} models, {len(dataset)} {info.name} test images (seed {config.seed}), "
        f"{config.attack} eps {config.eps}, {config.steps} steps"
    )

    # every model attacked white-box once; every set classified by every model: the transfer matrix
    adv_sets: dict[str, torch.Tensor] = {}
    attack_info: dict[str, Any] = {}
    for m in members:
        adv_sets[m.name], attack_info = ev.adversarial([m.name], eps)
    names = [m.name for m in members]
    transfer_predictions = {(s, t): ev.predict(ev.members[t].model, adv_sets[s]) for s in names for t in names}
    transfer = Matrix(
        "transferability",
        rows=names,
        columns=names,
        images=len(dataset),
        values=[[float((transfer_predictions[(s, t)] == labels).float().mean()) for t in names] for s in names],
        note=f"robust accuracy of the column model on examples crafted white-box on the row model "
        f"({config.attack}, eps {config.eps}, {config.steps} steps); diagonal: white-box",
    )

    outcomes: list[Outcome] = []
    classified: list[tuple[Outcome, torch.Tensor]] = []  # (outcome, its images): what the artifacts classify too
    skipped: list[dict[str, str]] = []
    members_sorted = sorted(members, key=lambda m: (m.keyed, m.finetune != "full"))
    norm = get_attack(config.attack).norm
    noise_adv, noise_info = ev.noise(eps, norm)
    for target in members_sorted:
        for scenario, sources in scenario_sources(target, members, config.eot_max).items():
            if isinstance(sources, str):
                skipped.append({"scenario": scenario, "target": target.name, "reason": sources})
                continue
            if len(sources) == 1:
                adv, pred = adv_sets[sources[0]], transfer_predictions[(sources[0], target.name)]
                outcomes.append(ev.outcome(scenario, target.name, sources, adv, attack_info, pred))
                classified.append((outcomes[-1], adv))
            else:
                adv, info_ = ev.adversarial(sources, eps)
                outcomes.append(ev.outcome(scenario, target.name, sources, adv, info_))
        outcomes.append(ev.outcome("noise", target.name, [], noise_adv, noise_info))
        classified.append((outcomes[-1], noise_adv))

    outcomes += localized_outcomes(ev, members, config)
    for target in query_targets(members, config):
        outcomes += query_outcomes(ev, target.name, target.model, config, eps, norm)
    checks = trust_checks(ev, outcomes, transfer, eps, config)
    checks.append(noise_check(outcomes))
    diversity = key_diversity(ev, members, keys)
    gradients = gradient_matrix(ev, members, config.gradient_limit)
    sweeps = eps_sweep(ev, members, sweep_eps, config) if sweep_eps else []
    checks += sweep_checks(sweeps)
    artifacts = (
        artifact_outcomes(ev, members, config.artifacts, classified, sealkeys, eps=eps, norm=norm)
        if config.artifacts
        else []
    )
    return RobustnessReport(
        environment=environment(),
        config=config.to_dict(),
        data={
            "name": info.name,
            "source": info.source,
            "images": len(dataset),
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
    )


# --------------------------------------------------------------------------- localized attacks


def parse_localized(spec: str) -> tuple[str, dict[str, Any]]:
    """``npixel:4`` -> ("npixel", {"pixels": 4}); ``patch:0.05`` -> ("patch", {"fraction": 0.05}).

    Any localized attack with one budget parameter is ``NAME:VALUE``; the attack itself checks the value.
    """
    from keyedge.attacks import get_attack, list_attacks

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
    from keyedge.attacks import get_attack

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


# --------------------------------------------------------------------------- matrices


def key_diversity(ev: Evaluation, members: Sequence[Member], keys: Sequence[Key]) -> Matrix:
    """Clean accuracy of every model with every key in place of its own (and with none): paper Table 5."""
    from keyedge.defenses import get_defense
    from keyedge.models.backbones import KeyedModel

    owners: dict[str, str] = {}
    for m in members:
        if m.keyed:  # models sharing a key (a full and a LoRA fine-tune, say) share its column
            owners[m.fingerprint] = f"{owners[m.fingerprint]}/{m.name}" if m.fingerprint in owners else m.name
    columns = [
        f"key of {owners[k.fingerprint]}" if k.fingerprint in owners else f"key {k.fingerprint}" for k in keys
    ] + ["no key"]
    values = []
    for m in members:
        row = []
        for k in [*list(keys), None]:
            size = m.model.spec.image_size
            if not get_defense(m.defense).takes_key:  # e.g. volumized: only its unshuffled accuracy
                row.append(
                    None if k is not None else float((ev.predict(m.model, ev.images) == ev.labels).float().mean())
                )
                continue
            if k is not None and size % k.block_size:
                row.append(None)
                continue
            swapped = KeyedModel(m.model.backbone, m.model.spec, k).eval().to(ev.config.device)
            row.append(float((ev.predict(swapped, ev.images) == ev.labels).float().mean()))
        values.append(row)
    return Matrix(
        "key-diversity",
        rows=[m.name for m in members],
        columns=columns,
        values=values,
        images=ev.images.shape[0],
        note="clean accuracy of each model (row) when its input is shuffled "
        "with each key (column: the key a model was trained with, or a fingerprint; fingerprints "
        f"{', '.join(k.fingerprint for k in keys)}); 'no key' = unshuffled input",
    )


def gradient_matrix(ev: Evaluation, members: Sequence[Member], limit: int) -> Matrix:
    """Mean cosine similarity of input gradients between every pair of models (orthogonal-deep-models Eq. 1)."""
    from keyedge.attacks.gradients import gradient_similarity, input_gradient

    n = min(limit, ev.images.shape[0])
    grads = {}
    for m in members:
        parts = []
        for start in range(0, n, ev.config.batch_size):
            x = ev.images[start : min(n, start + ev.config.batch_size)].to(ev.config.device)
            y = ev.labels[start : start + x.shape[0]].to(ev.config.device)
            parts.append(input_gradient(m.model, x, y).cpu())
        grads[m.name] = torch.cat(parts)
    names = [m.name for m in members]
    values = [[float(gradient_similarity(grads[a], grads[b]).mean()) for b in names] for a in names]
    return Matrix(
        "gradient-similarity",
        rows=names,
        columns=names,
        values=values,
        images=n,
        note="mean cosine of the models' input gradients of the cross-entropy (diagonal 1); "
        "high similarity predicts transfer",
    )


# --------------------------------------------------------------------------- sweeps


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


def block_size_points(outcomes: Sequence[Outcome], models: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Clean and robust accuracy vs block size (paper Fig. 7), from the scenario outcomes of keyed full models."""
    by_name = {m["name"]: m for m in models}
    points = []
    for o in outcomes:
        m = by_name.get(o.target, {})
        if m.get("block_size") and o.runtime == "torch" and o.scenario not in ("localized", "query"):
            points.append(
                {
                    "block_size": m["block_size"],
                    "finetune": m["finetune"],
                    "target": o.target,
                    "scenario": o.scenario,
                    "clean_accuracy": o.clean_accuracy,
                    "robust_accuracy": o.robust_accuracy,
                    "robust_se": o.robust_se,
                }
            )
    return points


# --------------------------------------------------------------------------- checks


def trust_checks(
    ev: Evaluation, outcomes: Sequence[Outcome], transfer: Matrix, eps: float, config: RobustnessConfig
) -> list[Check]:
    checks = []
    white = [o for o in outcomes if o.scenario == "white-box"]
    worst = max(white, key=lambda o: o.robust_accuracy)
    # like the other checks, allow for sampling: on 64 images a 5% limit is 3 images, and one more image left
    # standing is not a broken attack; a broken attack (or wrapper) leaves about the clean accuracy standing
    limit = config.sanity_max + 2 * binomial_se(config.sanity_max, worst.images)
    checks.append(
        Check(
            "white-box attack succeeds",
            worst.robust_accuracy <= limit,
            f"white-box robust accuracy <= {config.sanity_max:.0%} on every model (within 2 standard errors, "
            f"{limit:.1%} on {worst.images} images): max {worst.robust_accuracy:.1%} ({worst.target}); if not, "
            f"the attack or the model wrapper is broken and no other number here can be trusted",
        )
    )
    if config.fgsm_check and config.attack != "fgsm":
        worse = []
        for o in white:
            adv, _ = ev.adversarial([o.target], eps, attack="fgsm")
            fgsm = float((ev.predict(ev.members[o.target].model, adv) == ev.labels).float().mean())
            if o.robust_accuracy > fgsm + 2 * binomial_se(fgsm, o.images):
                worse.append(f"{o.target}: {config.attack} {o.robust_accuracy:.1%} > FGSM {fgsm:.1%}")
            else:
                worse.append(f"{o.target}: {o.robust_accuracy:.1%} <= FGSM {fgsm:.1%}")
        bad = [w for w in worse if ">" in w]
        checks.append(Check(f"{config.attack} does at least as well as FGSM", not bad, "; ".join(worse)))
    violations = []
    for t in transfer.columns:
        diag = transfer.get(t, t)
        for s in transfer.rows:
            if s != t and transfer.get(s, t) < diag - 2 * binomial_se(diag, transfer.images) - 1e-9:
                violations.append(f"{s} -> {t}: {transfer.get(s, t):.1%} < white-box {diag:.1%}")
    checks.append(
        Check(
            "transfer never beats white-box",
            not violations,
            "; ".join(violations)
            or "every off-diagonal robust accuracy >= its white-box one "
            "(within 2 standard errors): no sign of gradient masking",
        )
    )
    return checks


def sweep_checks(points: Sequence[dict[str, Any]]) -> list[Check]:
    bad = []
    curves: dict[tuple, list[dict[str, Any]]] = {}
    for p in points:
        curves.setdefault((p["scenario"], p["target"]), []).append(p)
    for (scenario, target), curve in curves.items():
        curve.sort(key=lambda p: p["eps"])
        if scenario != "white-box":
            continue
        for a, b in itertools.pairwise(curve):
            if b["robust_accuracy"] > a["robust_accuracy"] + 2 * max(a["robust_se"], b["robust_se"], 1e-9):
                bad.append(
                    f"{target}: {b['robust_accuracy']:.1%} at {b['eps_255']:g}/255 > "
                    f"{a['robust_accuracy']:.1%} at {a['eps_255']:g}/255"
                )
    if not curves:
        return []
    return [
        Check(
            "white-box accuracy falls as eps grows",
            not bad,
            "; ".join(bad) or "non-increasing within 2 standard errors on every white-box curve",
        )
    ]


# --------------------------------------------------------------------------- deployed artifacts


def artifact_outcomes(
    ev: Evaluation,
    members: Sequence[Member],
    directories: Sequence[str],
    classified: Sequence[tuple[Outcome, torch.Tensor]],
    sealkeys: Sequence[Any] = (),
    *,
    eps: float,
    norm: str = "Linf",
) -> list[Outcome]:
    """Classify the scenarios' images (transfer sets and the noise control) with the exported artifacts of each
    target model, and run the query attacks on the artifacts themselves (through their runners, no gradients).

    Every target whose runtime runs on this host is used (CoreML only on macOS), through its backend's
    runner; sealed sets are opened with the matching one of ``sealkeys`` (decrypted in memory).
    """
    from keyedge.attacks import Queried
    from keyedge.deploy.artifacts import ArtifactManifest
    from keyedge.deploy.runtime import open_artifact
    from keyedge.exporters import get_backend

    by_path = {str(Path(m.path).resolve()): m for m in members}
    queried = {m.name for m in query_targets(members, ev.config)}
    results = []
    for directory in directories:
        manifest = ArtifactManifest.read(directory)
        source = str(manifest.checkpoint_path.resolve()) if manifest.checkpoint_path else "an unknown checkpoint"
        member = by_path.get(source)
        if member is None:
            raise KeyedgeError(
                f"{directory} was exported from {source}, which is not among the evaluated checkpoints",
                "add that checkpoint, or leave the artifact out",
            )
        for target in manifest.targets:
            backend = get_backend(target)
            if not backend.can_run()[0]:
                continue
            path = manifest.artifact(target)
            runtime = f"{target}:{Path(directory).name}/{path.name}"
            found = []
            with open_artifact(path, target, sealkey=list(sealkeys)) as runner:
                for o, adv in classified:
                    if o.target != member.name:
                        continue
                    pred = torch.from_numpy(runner.predict(adv.numpy())).argmax(1)
                    found.append(ev.outcome(o.scenario, o.target, o.sources, adv, o.attack, pred, runtime=runtime))
                if member.name in queried:
                    model = Queried(runner, runtime)
                    found += query_outcomes(ev, member.name, model, ev.config, eps, norm, runtime=runtime)
            results += [replace(o, precision=manifest.precision) for o in found]
    return results


def precision_pairs(outcomes: Sequence[Outcome], artifacts: Sequence[Outcome]) -> list[tuple[Outcome, Outcome]]:
    """Each quantized artifact's outcome beside its fp32 counterpart: the fp32 artifact of the same target
    and runtime classifying the same set where it was evaluated too, else the PyTorch model.

    The sets were crafted on the differentiable fp32 models: an int8 artifact's white-box figure is a transfer
    from fp32 (it has no gradients); its query attacks ran on the artifact itself.
    """

    def same(o: Outcome) -> tuple:
        budget = o.queries["budget"] if o.queries else None
        return (o.scenario, o.target, tuple(o.sources), attack_label(o.attack), budget)

    fp32 = {(same(o), o.runtime.split(":")[0]): o for o in artifacts if o.precision == "fp32"}
    torch_ = {same(o): o for o in outcomes if o.runtime == "torch"}
    pairs = []
    for o in artifacts:
        if o.precision == "fp32":
            continue
        match = fp32.get((same(o), o.runtime.split(":")[0])) or torch_.get(same(o))
        if match is not None:
            pairs.append((match, o))
    return pairs


# --------------------------------------------------------------------------- query attacks, noise, headline


def parse_query(spec: str) -> tuple[str, int]:
    """``square:5000`` -> ("square", 5000); ``hsj`` -> ("hsj", its default budget)."""
    from keyedge.attacks import list_attacks

    names = list_attacks(kind="query")
    hint = "write " + " or ".join(f"{n}[:QUERIES]" for n in names) + ", e.g. square:5000"
    name, _, text = spec.strip().partition(":")
    if name not in names:
        raise KeyedgeError(f"bad query attack {spec!r}", hint)
    try:
        queries = int(text) if text else int(get_attack(name).options()["queries"])
    except ValueError:
        raise KeyedgeError(f"bad query attack {spec!r} (queries must be an integer)", hint) from None
    if queries < 1:
        raise KeyedgeError(f"bad query attack {spec!r} (queries must be >= 1)", hint)
    return name, queries


def query_targets(members: Sequence[Member], config: RobustnessConfig) -> list[Member]:
    """The models the query attacks run on: ``config.query_targets`` by name, or every model."""
    if not config.query:
        return []
    names = {m.name for m in members}
    unknown = sorted(set(config.query_targets) - names)
    if unknown:
        raise KeyedgeError(
            f"no evaluated model named {', '.join(unknown)} for the query attacks", f"use {', '.join(sorted(names))}"
        )
    return [m for m in members if not config.query_targets or m.name in config.query_targets]


def query_outcomes(
    ev: Evaluation,
    target: str,
    model: nn.Module,
    config: RobustnessConfig,
    eps: float,
    norm: str,
    runtime: str = "torch",
) -> list[Outcome]:
    """Each query attack of ``config.query`` on one model (a PyTorch model or a :class:`Queried` artifact):
    one outcome per query budget, read off one run (robust = not broken within that many queries)."""
    n = min(config.query_limit, ev.images.shape[0])
    clean_ok = ev.clean[target][:n] == ev.labels[:n]
    out = []
    for spec in config.query:
        name, queries = parse_query(spec)
        attack = make_attack(name, model, eps=eps, queries=queries, norm=norm, seed=config.seed)
        tick = ev.progress(f"{attack.label()} on {target} ({runtime.split(':')[0]})", n)
        _, used = attack.run_queries(
            ev.images[:n], ev.labels[:n], batch_size=config.batch_size, device=config.device, progress=tick
        )
        info = attack.describe()
        for budget in sorted({b for b in config.query_budgets if 0 < b < queries} | {queries}):
            broken = used <= budget
            won = broken & clean_ok  # images the target got right, broken within the budget
            median = float(used[won].median()) if won.any() else None
            record = {"budget": budget, "max": queries, "median_to_success": median, "successes": int(won.sum())}
            out.append(ev.scored("query", target, [target], ~broken, info, runtime, record))
    return out


def noise_check(outcomes: Sequence[Outcome]) -> Check:
    """Every attack scenario must leave at most as many images standing as random noise of its budget."""
    noise = {o.target: o for o in outcomes if o.scenario == "noise"}
    weaker, compared = [], 0
    for o in outcomes:
        ref = noise.get(o.target)
        if ref is None or o.scenario in ("noise", "localized"):
            continue
        if o.queries and o.queries["budget"] != o.queries["max"]:  # a query attack at its full budget only
            continue
        compared += 1
        if o.robust_accuracy > ref.robust_accuracy + 2 * math.hypot(o.robust_se, ref.robust_se) + 1e-9:
            label = attack_label(o.attack)
            source = f" from {'+'.join(o.sources)}" if o.sources and o.sources != [o.target] else ""
            weaker.append(
                f"{o.scenario} ({label}{source}) on {o.target}: {o.robust_accuracy:.1%} "
                f"> noise {ref.robust_accuracy:.1%}"
            )
    detail = (
        "; ".join(weaker) + ": these attacks are weaker than random noise of the same budget for those models "
        "(the headline robust accuracy takes the worst case, noise included)"
        if weaker
        else f"all {compared} attack outcomes leave at most as many images standing as noise (within 2 standard errors)"
    )
    return Check("every attack does at least as well as random noise", not weaker, detail)


def attack_label(attack: dict[str, Any]) -> str:
    """The attack's ``label`` from its ``describe()``; for older reports without one, its class's ``label_format``."""
    from keyedge.attacks import ATTACKS

    if "label" in attack:
        return str(attack["label"])
    name = ATTACKS.resolve(str(attack.get("name")))
    try:
        return ATTACKS.get(name).label_format.format_map(attack)
    except (AttributeError, KeyError, TypeError, ValueError):  # an unknown name is a ValueError
        return str(attack.get("name"))


def headline(outcomes: Sequence[Outcome], members: Sequence[Member]) -> list[dict[str, Any]]:
    """Per model, the worst robust accuracy over everything an attacker without its key can run at the budget.

    Keyed models: transfer (non-adaptive, adaptive, multi-key EoT, cross-arch), the noise control and the query
    attacks, on PyTorch and on the deployed artifacts; not white-box (it needs the key). Models without a key
    (plain, volumized): white-box too -- the attacker holds everything.  Localized attacks have another budget
    (pixels, area) and are reported on their own.
    """
    rows = []
    for m in members:
        excluded = set(KEYED_ONLY) if m.keyed else {"localized"}
        candidates = [o for o in outcomes if o.target == m.name and o.scenario not in excluded]
        if not candidates:
            continue
        worst = min(candidates, key=lambda o: (o.robust_accuracy, -o.images))
        rows.append(
            {
                "target": m.name,
                "role": m.role,
                "robust_accuracy": worst.robust_accuracy,
                "robust_se": worst.robust_se,
                "images": worst.images,
                "scenario": worst.scenario,
                "sources": worst.sources,
                "attack": worst.attack["name"] if worst.queries else attack_label(worst.attack),
                "queries": worst.queries["budget"] if worst.queries else None,
                "runtime": worst.runtime,
                "over": sorted({o.scenario for o in candidates}),
            }
        )
    return rows
