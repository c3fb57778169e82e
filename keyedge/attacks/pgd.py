"""PGD under the Linf norm (Madry et al. 2018), with random start and per-example worst case over restarts."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Attack, Models, check_positive, register_attack


def linf_steps(
    attack: Attack,
    labels: torch.Tensor,
    adv: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    alpha: float,
    steps: int,
) -> torch.Tensor:
    """``steps`` signed-gradient ascent steps on the summed cross-entropy, each projected on ``[lo, hi]``.

    ``lo = max(x - eps, 0)`` and ``hi = min(x + eps, 1)`` fold the Linf ball and the [0, 1] box
    into one clamp.  Updates ``adv`` in place; no host sync and one gradient buffer per step.
    """
    if len(attack.models) == 1:  # the hot path: no helper calls, no extra tensors
        model = attack.models[0]
        for _ in range(steps):
            adv.requires_grad_(True)
            with torch.enable_grad():
                loss = F.cross_entropy(model(adv), labels, reduction="sum")
            (grad,) = torch.autograd.grad(loss, adv)
            adv.requires_grad_(False)
            adv.add_(grad.sign_(), alpha=alpha).clamp_(lo, hi)
        return adv
    for _ in range(steps):
        adv.add_(attack.input_grad(adv, labels).sign_(), alpha=alpha).clamp_(lo, hi)
    return adv


def keep_worst(
    attack: Attack, x: torch.Tensor, labels: torch.Tensor, adv: torch.Tensor, restarts: int, one_run
) -> torch.Tensor:
    """Run ``one_run(x_subset, labels_subset)`` again for examples not yet misclassified, ``restarts - 1`` times.

    Per example the result is the first run that misclassifies it, else the run with the highest
    loss: an example counts as broken when any restart breaks it.
    """
    if restarts <= 1:
        return adv
    loss, logits = attack.loss(adv, labels)
    fooled = logits.argmax(1) != labels
    for _ in range(restarts - 1):
        todo = (~fooled).nonzero().squeeze(1)
        if todo.numel() == 0:
            break
        y = labels[todo]
        cand = one_run(x[todo], y)
        cand_loss, cand_logits = attack.loss(cand, y)
        cand_fooled = cand_logits.argmax(1) != y
        better = cand_fooled | (cand_loss > loss[todo])
        idx = todo[better]
        adv[idx] = cand[better]
        loss[idx] = cand_loss[better]
        fooled[idx] = cand_fooled[better]
    return adv


@register_attack
class PGD(Attack):
    r"""Projected Gradient Descent, Linf: 'Towards Deep Learning Models Resistant to Adversarial Attacks'
    (Madry et al., ICLR 2018).

    From a uniform random start in the eps-ball, ``steps`` steps
    ``x <- clip_{B(x0, eps) and [0,1]}(x + alpha * sign(grad L))`` on the cross-entropy; returns the
    last iterate.  With ``restarts > 1`` examples still classified correctly are attacked again
    from new random starts; per example the first breaking run is kept (else the highest loss).

    Distance measure: Linf.

    Arguments:
        model: model, or several models whose cross-entropy losses are summed (multi-key EoT).
        eps (float): maximum perturbation per pixel value. (Default: 8/255)
        alpha (float | None): step size; ``None`` = ``2.5 * eps / steps`` (Madry et al.'s rule: the
            iterate can cross the ball 2.5 times, and the step shrinks with more steps: 1/255 for
            PGD-20 at 8/255; torchattacks' fixed 2/255 is ``alpha=2/255``). (Default: None)
        steps (int): number of steps. (Default: 20)
        random_start (bool): start uniformly in the eps-ball instead of at the image. (Default: True)
        restarts (int): number of runs, see above. (Default: 1)
        seed (int): seeds the random starts. (Default: 0)

    Shape:
        - images: ``(N, C, H, W)`` in [0, 1]; labels: ``(N,)``.
        - output: ``(N, C, H, W)`` in [0, 1], ``|x_adv - x| <= eps``.

    Example::
        >>> attack = PGD(model, eps=8/255, steps=20)
        >>> adv_images = attack(images, labels)
        >>> eot = PGD([keyed_a, keyed_b, keyed_c], eps=8/255)   # gradients summed over surrogate keys
    """

    name = "pgd"
    norm = "Linf"
    paper = "Madry et al. 2018, Towards Deep Learning Models Resistant to Adversarial Attacks"
    hyperparameters = ("eps", "alpha", "steps", "random_start", "restarts")
    kind = "iterative"
    budget = ("eps", "steps")

    def __init__(
        self,
        model: Models,
        *,
        eps: float = 8 / 255,
        alpha: float | None = None,
        steps: int = 20,
        random_start: bool = True,
        restarts: int = 1,
        seed: int = 0,
    ):
        super().__init__(model, seed=seed)
        check_positive("eps", eps, allow_zero=True)
        check_positive("steps", steps, integer=True)
        check_positive("restarts", restarts, integer=True)
        self.eps = float(eps)
        self.steps = int(steps)
        self.alpha = float(alpha) if alpha is not None else 2.5 * self.eps / self.steps
        check_positive("alpha", self.alpha, allow_zero=True)
        self.random_start = bool(random_start)
        self.restarts = int(restarts)

    def perturb(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        def one_run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            lo = (x - self.eps).clamp_(min=0)
            hi = (x + self.eps).clamp_(max=1)
            adv = x.clone()
            if self.random_start:
                adv.add_(torch.empty_like(x).uniform_(-self.eps, self.eps, generator=generator)).clamp_(lo, hi)
            return linf_steps(self, y, adv, lo, hi, self.alpha, self.steps)

        return keep_worst(self, images, labels, one_run(images, labels), self.restarts, one_run)
