"""PGD under the L2 norm (Madry et al. 2018): normalized gradient steps, per-example projection on the L2 ball."""

from __future__ import annotations

import torch

from .base import Attack, Models, check_positive, register_attack
from .pgd import keep_worst


def _l2(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


@register_attack
class PGDL2(Attack):
    r"""Projected Gradient Descent, L2: 'Towards Deep Learning Models Resistant to Adversarial Attacks'
    (Madry et al., ICLR 2018).

    From a random start drawn uniformly in the L2 ball of radius ``eps`` (random direction,
    radius ``eps * u**(1/d)``), ``steps`` steps ``x <- x + alpha * g / ||g||_2`` on the cross-entropy,
    each followed by the projection ``delta <- delta * min(1, eps / ||delta||_2)`` per example and a
    clip to [0, 1] (which can only shrink ``||delta||``).  Restarts as in :class:`PGD`.

    Distance measure: L2 (over all C*H*W values of an image).

    Arguments:
        model: model, or several models whose cross-entropy losses are summed (multi-key EoT).
        eps (float): radius of the L2 ball. (Default: 0.5)
        alpha (float | None): step length; ``None`` = ``2.5 * eps / steps``. (Default: None)
        steps (int): number of steps. (Default: 20)
        random_start (bool): start uniformly in the ball instead of at the image. (Default: True)
        restarts (int): runs per example, worst case kept. (Default: 1)
        seed (int): seeds the random starts. (Default: 0)

    Shape:
        - images: ``(N, C, H, W)`` in [0, 1]; labels: ``(N,)``.
        - output: ``(N, C, H, W)`` in [0, 1], ``||x_adv - x||_2 <= eps`` per example.

    Example::
        >>> attack = PGDL2(model, eps=0.5, steps=20)
        >>> adv_images = attack(images, labels)
    """

    name = "pgdl2"
    norm = "L2"
    paper = "Madry et al. 2018, Towards Deep Learning Models Resistant to Adversarial Attacks"
    hyperparameters = ("eps", "alpha", "steps", "random_start", "restarts")
    kind = "iterative"
    budget = ("eps", "steps")

    def __init__(
        self,
        model: Models,
        *,
        eps: float = 0.5,
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

    def _project(self, x: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
        delta = adv.sub_(x)
        delta.mul_((self.eps / _l2(delta).clamp_min_(1e-12)).clamp_max_(1.0))
        return delta.add_(x).clamp_(0, 1)

    def perturb(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        def one_run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            adv = x.clone()
            if self.random_start:
                direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
                direction.div_(_l2(direction).clamp_min_(1e-12))
                u = torch.rand(
                    (x.shape[0],) + (1,) * (x.dim() - 1), generator=generator, device=x.device, dtype=x.dtype
                )
                adv = self._project(x, adv.add_(direction.mul_(u.pow_(1.0 / x[0].numel()) * self.eps)))
            for _ in range(self.steps):
                grad = self.input_grad(adv, y)
                adv = self._project(x, adv.add_(grad.div_(_l2(grad).clamp_min_(1e-12)), alpha=self.alpha))
            return adv

        return keep_worst(self, images, labels, one_run(images, labels), self.restarts, one_run)
