"""Random noise of the attack's budget: the control every attack must beat (no model, no key, no query)."""

from __future__ import annotations

import torch

from .base import Attack, AttackError, Models, check_positive, register_attack


@register_attack
class Noise(Attack):
    r"""Random noise at the budget: what an attacker with *nothing* -- no model, no key, no query -- does.

    ``norm="Linf"``: uniform random signs, ``x_adv = clip_[0,1](x + eps * s)`` with ``s`` in {-1, +1}
    per pixel value (a corner of the Linf ball); ``norm="L2"``: Gaussian noise rescaled to L2 norm
    ``eps`` per image.  An attack scenario that leaves *more* images standing than this control is too
    weak for that model, and a robust accuracy quoted from it overstates the defense (issue: transferred
    PGD hurt keyed models less than sign noise of the same budget).

    The model is not queried; it is taken only for the uniform interface (its device is used).

    Arguments:
        model: any model (unused).
        eps (float): perturbation budget. (Default: 8/255)
        norm (str): ``"Linf"`` (sign noise) or ``"L2"`` (Gaussian of that norm). (Default: "Linf")
        seed (int): seed of the noise. (Default: 0)

    Example::
        >>> noisy = Noise(model, eps=16/255).run(images, labels)
    """

    name = "noise"
    norm = "Linf"
    paper = "control: uniform sign noise (Linf) or Gaussian noise of norm eps (L2); no model, no key, no query"
    hyperparameters = ("eps", "norm")
    kind = "random"
    budget = ("eps",)
    label_format = "{name} {norm}"

    def __init__(self, model: Models, *, eps: float = 8 / 255, norm: str = "Linf", seed: int = 0):
        super().__init__(model, seed=seed)
        check_positive("eps", eps, allow_zero=True)
        if norm not in ("Linf", "L2"):
            raise AttackError(f"noise norm must be Linf or L2, got {norm!r}")
        self.eps, self.norm = float(eps), norm

    def perturb(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.norm == "Linf":
            signs = torch.randint(0, 2, images.shape, generator=generator, device=images.device).to(images.dtype)
            return images + self.eps * (2 * signs - 1)
        noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
        norms = noise.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (images.dim() - 1))
        return images + noise * (self.eps / norms)
