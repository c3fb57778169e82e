"""FGSM: one signed-gradient step (Goodfellow, Shlens & Szegedy 2015)."""

from __future__ import annotations

import torch

from .base import Attack, Models, check_positive, register_attack


@register_attack
class FGSM(Attack):
    r"""Fast Gradient Sign Method, 'Explaining and Harnessing Adversarial Examples' (ICLR 2015).

    ``x_adv = clip_[0,1](x + eps * sign(grad_x L(x, y)))``, one gradient: the single-step
    baseline every iterative attack must beat (docs/design.md §10).

    Distance measure: Linf.

    Arguments:
        model: model, or several models whose cross-entropy losses are summed (multi-key EoT).
        eps (float): maximum perturbation per pixel value. (Default: 8/255)
        seed (int): unused (FGSM is deterministic); kept for a uniform interface. (Default: 0)

    Shape:
        - images: ``(N, C, H, W)`` in [0, 1]; labels: ``(N,)``.
        - output: ``(N, C, H, W)`` in [0, 1], ``|x_adv - x| <= eps``.

    Example::
        >>> attack = FGSM(model, eps=8/255)
        >>> adv_images = attack(images, labels)
    """

    name = "fgsm"
    norm = "Linf"
    paper = "Goodfellow et al. 2015, Explaining and Harnessing Adversarial Examples"
    hyperparameters = ("eps", "steps")
    kind = "single-step"
    budget = ("eps",)
    steps = 1

    def __init__(self, model: Models, *, eps: float = 8 / 255, seed: int = 0):
        super().__init__(model, seed=seed)
        check_positive("eps", eps, allow_zero=True)
        self.eps = float(eps)

    def perturb(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        grad = self.input_grad(images, labels)
        return images.add(grad.sign_(), alpha=self.eps).clamp_(0, 1)
