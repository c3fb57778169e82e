"""What a robustness run evaluates: the scenarios and :class:`RobustnessConfig`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SCENARIOS = ("white-box", "non-adaptive", "adaptive", "multi-key-eot", "cross-arch", "localized", "noise", "query")
#: Scenarios that need the target's key (its own gradients): not open to an attacker who lacks it.
KEYED_ONLY = ("white-box", "localized")


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
    # deployment postures (keyedge.postures grammar), measured on the query targets with the attacks that know them
    postures: list[str] = field(default_factory=list)
    stream_frames: int = 250  # camera-like frames per scene for the guard's false positives

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
