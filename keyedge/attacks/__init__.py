"""Adversarial attacks: one attack per module behind :class:`Attack` (the domain layer, so that the
robustness harness, the transfer guard in training and any adversarial training share one PGD).

All attacks take a model -- or several, whose losses are summed (multi-key EoT) -- mapping
[0, 1] images to logits, and return adversarial images in [0, 1]; randomness is seeded and
private.  Build one by class or by name::

    from keyedge.attacks import PGD, make_attack
    adv = PGD(model, eps=8/255, steps=20)(images, labels)
    adv = make_attack("apgd-ce", [keyed_a, keyed_b], eps=parse_eps("4/255")).run(images, labels)

Each attack class says what it is for the harness: ``kind`` (single-step, iterative, localized, random or query),
``budget`` (the keyword arguments setting its budget and step schedule) and ``label()``;
``list_attacks(kind=...)`` lists the registry by kind (:mod:`keyedge.registry`), ``budget_options`` keeps a
harness's candidates.

========  ==========================  =====================================================
name      class                       attack
========  ==========================  =====================================================
fgsm      :class:`FGSM`               one signed-gradient step, Linf
pgd       :class:`PGD`                PGD with random start and restarts, Linf
pgdl2     :class:`PGDL2`              PGD, L2
ifgsm     :class:`IFGSM`              iterative FGSM (BIM), Linf
mifgsm    :class:`MIFGSM`             momentum iterative FGSM, Linf
apgd-ce   :class:`APGDCE`             Auto-PGD on cross-entropy, Linf
apgd-dlr  :class:`APGDDLR`            Auto-PGD on the DLR loss, Linf
autoattack :class:`AutoAttack`        AutoAttack via the optional ``pyautoattack``
npixel    :class:`NPixel`             N-pixel attack by differential evolution, L0
patch     :class:`Patch`              square adversarial patch of a given area
noise     :class:`Noise`              random sign (Linf) or Gaussian (L2) noise: the control
square    :class:`Square`             Square Attack, score-based queries (``pyautoattack``)
hsj       :class:`HopSkipJump`        HopSkipJump, decision-based queries (ART)
rays      :class:`RayS`               RayS, decision-based ray search, Linf (batched torch)
========  ==========================  =====================================================
"""

from .apgd import APGD, APGDCE, APGDDLR
from .autoattack import AutoAttack
from .base import (
    ATTACKS,
    KINDS,
    Attack,
    AttackError,
    budget_options,
    get_attack,
    is_attack,
    list_attacks,
    make_attack,
    parse_eps,
    register_attack,
)
from .fgsm import FGSM
from .ifgsm import IFGSM
from .losses import cross_entropy, dlr
from .mifgsm import MIFGSM
from .noise import Noise
from .npixel import NPixel
from .patch import Patch, patch_side
from .pgd import PGD
from .pgdl2 import PGDL2
from .query import HopSkipJump, Queried, QueryAttack, Square
from .rays import RayS

__all__ = [
    "APGD",
    "APGDCE",
    "APGDDLR",
    "ATTACKS",
    "FGSM",
    "IFGSM",
    "KINDS",
    "MIFGSM",
    "PGD",
    "PGDL2",
    "Attack",
    "AttackError",
    "AutoAttack",
    "HopSkipJump",
    "NPixel",
    "Noise",
    "Patch",
    "Queried",
    "QueryAttack",
    "RayS",
    "Square",
    "budget_options",
    "cross_entropy",
    "dlr",
    "get_attack",
    "is_attack",
    "list_attacks",
    "make_attack",
    "parse_eps",
    "patch_side",
    "register_attack",
]
