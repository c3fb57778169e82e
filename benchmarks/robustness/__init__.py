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

* **headline**: per model, the worst case *per image* over everything an attacker without its key can run, on
  one common subset of images at each query budget (``worst``); the strongest single attack is kept beside it;
* **postures** (``postures``): per deployment posture, the attacks that know it, the transfer sets and the noise
  control through its device, the worst case per image at each budget, the guard's detections and false positives;

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

The package, by job: ``config`` (scenarios, :class:`RobustnessConfig`), ``members`` (loading the models),
``evaluation`` (images, clean predictions, cached adversarial sets), ``scenarios`` (who attacks whom,
localized attacks, eps sweeps), ``matrices`` (key diversity, gradient similarity), ``queries`` (query
attacks), ``artifacts`` (the deployed artifacts), ``checks`` (trust checks, the strongest single attack),
``worst`` (per-image traces, the worst case per image), ``postures`` (``--posture``) and ``run``
(:func:`run_robustness`).  What a run finds (:class:`Outcome`, :class:`Matrix`, :class:`Check`) is report
data: :mod:`keyedge.benchmarks.robustness_report`.
"""

from keyedge.benchmarks.robustness.artifacts import artifact_outcomes
from keyedge.benchmarks.robustness.checks import headline, noise_check, sweep_checks, trust_checks
from keyedge.benchmarks.robustness.config import KEYED_ONLY, SCENARIOS, RobustnessConfig
from keyedge.benchmarks.robustness.evaluation import Evaluation
from keyedge.benchmarks.robustness.matrices import gradient_matrix, key_diversity
from keyedge.benchmarks.robustness.members import Member, load_members
from keyedge.benchmarks.robustness.postures import check_postures, guard_false_positives, posture_rows
from keyedge.benchmarks.robustness.queries import parse_query, query_outcomes, query_targets
from keyedge.benchmarks.robustness.run import run_robustness
from keyedge.benchmarks.robustness.scenarios import eps_sweep, localized_outcomes, parse_localized, scenario_sources
from keyedge.benchmarks.robustness.worst import Trace, worst_case
from keyedge.benchmarks.robustness_report import (
    Check,
    Matrix,
    Outcome,
    attack_label,
    binomial_se,
    block_size_points,
    precision_pairs,
)

__all__ = [
    "KEYED_ONLY",
    "SCENARIOS",
    "Check",
    "Evaluation",
    "Matrix",
    "Member",
    "Outcome",
    "RobustnessConfig",
    "Trace",
    "artifact_outcomes",
    "attack_label",
    "binomial_se",
    "block_size_points",
    "check_postures",
    "eps_sweep",
    "gradient_matrix",
    "guard_false_positives",
    "headline",
    "key_diversity",
    "load_members",
    "localized_outcomes",
    "noise_check",
    "parse_localized",
    "parse_query",
    "posture_rows",
    "precision_pairs",
    "query_outcomes",
    "query_targets",
    "run_robustness",
    "scenario_sources",
    "sweep_checks",
    "trust_checks",
    "worst_case",
]
