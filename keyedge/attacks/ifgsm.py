"""I-FGSM / BIM: iterative FGSM from the clean image (Kurakin, Goodfellow & Bengio 2017)."""

from __future__ import annotations

import torch

from .base import Attack, Models, check_positive, register_attack
from .pgd import linf_steps


@register_attack
class IFGSM(Attack):
    r"""Iterative FGSM (Basic Iterative Method), 'Adversarial examples in the physical world'
    (Kurakin et al., ICLR 2017 workshop).

    ``steps`` FGSM steps of size ``alpha`` from the clean image, each clipped to the eps-ball
    and [0, 1]: PGD without the random start.

    Distance measure: Linf.

    Arguments:
        model: model, or several models whose cross-entropy losses are summed (multi-key EoT).
        eps (float): maximum perturbation per pixel value. (Default: 8/255)
        alpha (float | None): step size; ``None`` = ``eps / steps``, the setting Dong et al. 2018
            compare I-FGSM and MI-FGSM under. (Default: None)
        steps (int): number of steps. (Default: 10)
        seed (int): unused (deterministic); kept for a uniform interface. (Default: 0)

    Shape:
        - images: ``(N, C, H, W)`` in [0, 1]; labels: ``(N,)``.
        - output: ``(N, C, H, W)`` in [0, 1], ``|x_adv - x| <= eps``.

    Example::
        >>> attack = IFGSM(model, eps=8/255, steps=10)
        >>> adv_images = attack(images, labels)
    """

    name = "ifgsm"
    norm = "Linf"
    paper = "Kurakin et al. 2017, Adversarial examples in the physical world"
    hyperparameters = ("eps", "alpha", "steps")
    kind = "iterative"
    budget = ("eps", "steps")

    def __init__(
        self, model: Models, *, eps: float = 8 / 255, alpha: float | None = None, steps: int = 10, seed: int = 0
    ):
        super().__init__(model, seed=seed)
        check_positive("eps", eps, allow_zero=True)
        check_positive("steps", steps, integer=True)
        self.eps = float(eps)
        self.steps = int(steps)
        self.alpha = float(alpha) if alpha is not None else self.eps / self.steps
        check_positive("alpha", self.alpha, allow_zero=True)

    def perturb(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        lo = (images - self.eps).clamp_(min=0)
        hi = (images + self.eps).clamp_(max=1)
        return linf_steps(self, labels, images.clone(), lo, hi, self.alpha, self.steps)
