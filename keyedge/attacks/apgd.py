"""APGD-CE and APGD-DLR, Linf (Croce & Hein 2020): step-size-free PGD with momentum and step halving."""

from __future__ import annotations

import torch

from .base import Attack, LossFn, Models, check_positive, register_attack
from .losses import cross_entropy, dlr


def checkpoints(steps: int) -> list[int]:
    """Iterations after which the step size may be halved: ``w_j = ceil(p_j * steps)`` with
    ``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, in the integer
    form of the reference code (first interval 22%, each next 3% shorter, at least 6%)."""
    first, shrink, least = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    points, at, k = [], 0, first
    while at + k <= steps:
        at += k
        points.append(at)
        k = max(k - shrink, least)
    return points


class APGD(Attack):
    r"""Auto-PGD, Linf: 'Reliable evaluation of adversarial robustness with an ensemble of diverse
    parameter-free attacks' (Croce & Hein, ICML 2020), Algorithm 1.

    From a random start, ``steps`` momentum steps
    ``z = P(x_k + eta * sign(grad))``, ``x_{k+1} = P(x_k + 0.75 (z - x_k) + 0.25 (x_k - x_{k-1}))``
    (no momentum on the first step), with ``eta = 2 eps`` at first.  At each checkpoint ``w_j``
    (see :func:`checkpoints`) the step size of an example is halved, and it restarts from its
    best point so far, when the loss went up in at most ``rho`` of the steps since the last
    checkpoint, or when neither the step size nor the best loss changed at the last checkpoint.

    Returns, per example, a misclassified iterate when one was found (the best-loss point when it is
    misclassified), else the best-loss point; unlike the reference code, which returns the clean
    image where it fails, so that examples crafted on a surrogate keep their highest-loss
    perturbation for transfer.  With ``restarts > 1`` only examples not yet misclassified are run again.

    Distance measure: Linf.

    Arguments:
        model: model, or several models whose per-example losses are summed (multi-key EoT).
        eps (float): maximum perturbation per pixel value. (Default: 8/255)
        steps (int): number of iterations. (Default: 100)
        restarts (int): number of runs. (Default: 1)
        rho (float): fraction of increasing steps below which the step size is halved. (Default: 0.75)
        seed (int): seeds the random starts. (Default: 0)

    Shape:
        - images: ``(N, C, H, W)`` in [0, 1]; labels: ``(N,)``.
        - output: ``(N, C, H, W)`` in [0, 1], ``|x_adv - x| <= eps``.
    """

    norm = "Linf"
    paper = (
        "Croce & Hein 2020, Reliable evaluation of adversarial robustness with an ensemble of diverse "
        "parameter-free attacks"
    )
    hyperparameters = ("loss_name", "eps", "steps", "restarts", "rho")
    kind = "iterative"
    budget = ("eps", "steps")
    loss_fn: LossFn = staticmethod(cross_entropy)
    loss_name = "ce"

    def __init__(
        self,
        model: Models,
        *,
        eps: float = 8 / 255,
        steps: int = 100,
        restarts: int = 1,
        rho: float = 0.75,
        seed: int = 0,
    ):
        super().__init__(model, seed=seed)
        check_positive("eps", eps, allow_zero=True)
        check_positive("steps", steps, integer=True)
        check_positive("restarts", restarts, integer=True)
        check_positive("rho", rho)
        self.eps = float(eps)
        self.steps = int(steps)
        self.restarts = int(restarts)
        self.rho = float(rho)

    def perturb(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        out, fooled, best_loss = self._single_run(images, labels, generator)
        for _ in range(self.restarts - 1):
            todo = (~fooled).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            adv, now_fooled, loss = self._single_run(images[todo], labels[todo], generator)
            better = now_fooled | (loss > best_loss[todo])
            idx = todo[better]
            out[idx], fooled[idx], best_loss[idx] = adv[better], now_fooled[better], loss[better]
        return out

    def _single_run(
        self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One APGD run: (adversarial images, misclassified flags, best losses)."""
        n, eps, view = x.shape[0], self.eps, (-1,) + (1,) * (x.dim() - 1)
        lo, hi = (x - eps).clamp_(min=0), (x + eps).clamp_(max=1)
        t = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype).mul_(2).sub_(1)
        t.div_(t.abs().flatten(1).amax(1).clamp_min_(1e-12).view(view))  # the reference start: a vertex-ish point
        x_adv = torch.clamp(x + eps * t, lo, hi)

        loss, logits, grad = self.loss_and_grad(x_adv, y, self.loss_fn)
        fooled = logits.argmax(1) != y
        x_best, loss_best, grad_best = x_adv.clone(), loss.clone(), grad.clone()
        best_fooled = fooled.clone()
        x_best_adv = x_adv.clone()
        losses = torch.empty(self.steps + 1, n, device=x.device, dtype=loss.dtype)
        losses[0] = loss

        step = torch.full((n,) + (1,) * (x.dim() - 1), 2.0 * eps, device=x.device, dtype=x.dtype)
        marks = set(checkpoints(self.steps))
        last_mark, loss_best_last = 0, loss_best.clone()
        reduced_last = torch.ones(n, dtype=torch.bool, device=x.device)
        x_prev = x_adv.clone()
        for i in range(self.steps):
            with torch.no_grad():
                a = 0.75 if i > 0 else 1.0
                z = torch.clamp(x_adv + step * grad.sign(), lo, hi)
                x_new = torch.clamp(x_adv + a * (z - x_adv) + (1 - a) * (x_adv - x_prev), lo, hi)
                x_prev, x_adv = x_adv, x_new

            loss, logits, grad = self.loss_and_grad(x_adv, y, self.loss_fn)
            with torch.no_grad():
                now_fooled = logits.argmax(1) != y
                x_best_adv = torch.where(now_fooled.view(view), x_adv, x_best_adv)
                fooled |= now_fooled
                losses[i + 1] = loss
                improved = loss > loss_best
                x_best = torch.where(improved.view(view), x_adv, x_best)
                grad_best = torch.where(improved.view(view), grad, grad_best)
                best_fooled = torch.where(improved, now_fooled, best_fooled)
                loss_best = torch.where(improved, loss, loss_best)

                if i + 1 in marks:  # checkpoint: conditions 1 and 2 of the paper (Sec. 3.2)
                    k = i + 1 - last_mark
                    increases = (losses[last_mark + 1 : i + 2] > losses[last_mark : i + 1]).sum(0)
                    halve = (increases <= k * self.rho) | (~reduced_last & (loss_best_last >= loss_best))
                    reduced_last, loss_best_last, last_mark = halve, loss_best.clone(), i + 1
                    step = torch.where(halve.view(view), step / 2, step)
                    x_adv = torch.where(halve.view(view), x_best, x_adv)
                    grad = torch.where(halve.view(view), grad_best, grad)

        out = torch.where((fooled & ~best_fooled).view(view), x_best_adv, x_best)
        return out, fooled, loss_best


@register_attack
class APGDCE(APGD):
    r"""APGD on the cross-entropy loss (Croce & Hein 2020): the first attack of AutoAttack.

    Distance measure: Linf.  Arguments and shapes: see :class:`APGD`
    (``eps=8/255, steps=100, restarts=1, rho=0.75, seed=0``).

    Example::
        >>> attack = APGDCE(model, eps=8/255, steps=100)
        >>> adv_images = attack(images, labels)
    """

    name = "apgd-ce"
    loss_fn = staticmethod(cross_entropy)
    loss_name = "ce"


@register_attack
class APGDDLR(APGD):
    r"""APGD on the Difference of Logits Ratio loss (Croce & Hein 2020), which is invariant to the
    scale of the logits and so resists the gradient masking that saturated cross-entropy suffers.

    Distance measure: Linf.  Needs >= 3 classes.  Arguments and shapes: see :class:`APGD`
    (``eps=8/255, steps=100, restarts=1, rho=0.75, seed=0``).

    Example::
        >>> attack = APGDDLR(model, eps=8/255, steps=100)
        >>> adv_images = attack(images, labels)
    """

    name = "apgd-dlr"
    loss_fn = staticmethod(dlr)
    loss_name = "dlr"
