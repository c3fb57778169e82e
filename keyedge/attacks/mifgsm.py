"""MI-FGSM: iterative FGSM with a momentum of L1-normalized gradients (Dong et al. 2018)."""

from __future__ import annotations

import torch

from .base import Attack, Models, check_positive, register_attack


@register_attack
class MIFGSM(Attack):
    r"""Momentum Iterative FGSM, 'Boosting Adversarial Attacks with Momentum' (Dong et al., CVPR 2018).

    ``g <- decay * g + grad / ||grad||_1`` (per example), ``x <- clip(x + alpha * sign(g))``: the
    momentum stabilizes the update direction, which makes the examples transfer better to
    other models (here: to models with other keys).

    Distance measure: Linf.

    Arguments:
        model: model, or several models whose cross-entropy losses are summed (multi-key EoT).
        eps (float): maximum perturbation per pixel value. (Default: 8/255)
        alpha (float | None): step size; ``None`` = ``eps / steps`` as in the paper. (Default: None)
        steps (int): number of steps. (Default: 10)
        decay (float): momentum factor mu. (Default: 1.0)
        seed (int): unused (deterministic); kept for a uniform interface. (Default: 0)

    Shape:
        - images: ``(N, C, H, W)`` in [0, 1]; labels: ``(N,)``.
        - output: ``(N, C, H, W)`` in [0, 1], ``|x_adv - x| <= eps``.

    Example::
        >>> attack = MIFGSM(model, eps=8/255, steps=10, decay=1.0)
        >>> adv_images = attack(images, labels)
    """

    name = "mifgsm"
    norm = "Linf"
    paper = "Dong et al. 2018, Boosting Adversarial Attacks with Momentum"
    hyperparameters = ("eps", "alpha", "steps", "decay")
    kind = "iterative"
    budget = ("eps", "steps")

    def __init__(
        self,
        model: Models,
        *,
        eps: float = 8 / 255,
        alpha: float | None = None,
        steps: int = 10,
        decay: float = 1.0,
        seed: int = 0,
    ):
        super().__init__(model, seed=seed)
        check_positive("eps", eps, allow_zero=True)
        check_positive("steps", steps, integer=True)
        check_positive("decay", decay, allow_zero=True)
        self.eps = float(eps)
        self.steps = int(steps)
        self.alpha = float(alpha) if alpha is not None else self.eps / self.steps
        check_positive("alpha", self.alpha, allow_zero=True)
        self.decay = float(decay)

    def perturb(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        lo = (images - self.eps).clamp_(min=0)
        hi = (images + self.eps).clamp_(max=1)
        adv = images.clone()
        momentum = torch.zeros_like(images)
        for _ in range(self.steps):
            grad = self.input_grad(adv, labels)
            l1 = grad.abs().flatten(1).sum(1).clamp_min_(1e-12).view(-1, 1, 1, 1)
            momentum.mul_(self.decay).add_(grad.div_(l1))
            adv.add_(momentum.sign(), alpha=self.alpha).clamp_(lo, hi)
        return adv
