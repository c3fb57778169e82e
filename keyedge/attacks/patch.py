"""Adversarial patch: a square of freely optimized pixels at a random or given place (localized attack)."""

from __future__ import annotations

import math

import torch

from .base import Attack, AttackError, Models, check_positive, register_attack
from .pgd import keep_worst


def patch_side(fraction: float, height: int, width: int) -> int:
    """Side of a square patch covering ``fraction`` of an ``height x width`` image: ``round(sqrt(f H W))``."""
    return max(1, round(math.sqrt(fraction * height * width)))


@register_attack
class Patch(Attack):
    r"""Adversarial patch of a given area (the localized attack of the volumization paper; after
    Brown et al. 2017, 'Adversarial Patch', optimized per image rather than universal).

    A square of side ``round(sqrt(fraction * H * W))`` pixels replaces the image there; its values
    are optimized per image by signed-gradient ascent on the cross-entropy (PGD with eps = 1
    inside the patch mask: ``p <- clip_[0,1](p + alpha * sign(grad))``), from a uniform random
    start.  The location is drawn uniformly per image (seeded) or given; with ``locations > 1``
    further random locations are tried for the examples not yet misclassified, keeping per
    example the first that breaks it (else the highest loss).

    Distance measure: L0 over a square region: only pixels inside the patch differ.

    Arguments:
        model: model, or several models whose cross-entropy losses are summed (multi-key EoT).
        fraction (float): patch area as a fraction of the image, e.g. 0.05-0.25. (Default: 0.05)
        steps (int): ascent steps. (Default: 50)
        alpha (float): step size in pixel values. (Default: 0.05)
        location ((top, left) | None): fixed upper-left corner; ``None`` = random per image. (Default: None)
        locations (int): random locations tried per image (only with ``location=None``). (Default: 1)
        seed (int): seeds locations and start values. (Default: 0)

    Shape:
        - images: ``(N, C, H, W)`` in [0, 1]; labels: ``(N,)``.
        - output: ``(N, C, H, W)`` in [0, 1].

    Example::
        >>> attack = Patch(model, fraction=0.1, steps=50, locations=4)
        >>> adv_images = attack(images, labels)
    """

    name = "patch"
    norm = "patch"
    paper = "Brown et al. 2017, Adversarial Patch; localized attacks as in the volumization paper"
    hyperparameters = ("fraction", "steps", "alpha", "location", "locations")
    kind = "localized"
    budget = ("fraction",)
    label_format = "patch {fraction:.0%} of the area"

    def __init__(
        self,
        model: Models,
        *,
        fraction: float = 0.05,
        steps: int = 50,
        alpha: float = 0.05,
        location: tuple[int, int] | None = None,
        locations: int = 1,
        seed: int = 0,
    ):
        super().__init__(model, seed=seed)
        check_positive("fraction", fraction)
        if fraction > 1:
            raise AttackError(f"patch fraction must be in (0, 1], got {fraction}")
        check_positive("steps", steps, integer=True, allow_zero=True)
        check_positive("alpha", alpha)
        check_positive("locations", locations, integer=True)
        if location is not None:
            location = tuple(int(v) for v in location)
            if len(location) != 2 or min(location) < 0:
                raise AttackError(f"patch location must be (top, left) >= 0, got {location!r}")
        self.fraction, self.steps, self.alpha = float(fraction), int(steps), float(alpha)
        self.location = location
        self.locations = int(locations) if location is None else 1

    def side(self, height: int, width: int) -> int:
        side = patch_side(self.fraction, height, width)
        if side > min(height, width):
            raise AttackError(f"a patch of {self.fraction:.0%} ({side}x{side}) does not fit a {height}x{width} image")
        return side

    def masks(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Boolean masks ``(N, 1, H, W)``: one square patch per image, at ``location`` or drawn at random."""
        n, _, height, width = images.shape
        side = self.side(height, width)
        dev = images.device
        if self.location is not None:
            top, left = self.location
            if top + side > height or left + side > width:
                raise AttackError(f"a {side}x{side} patch at {self.location} does not fit a {height}x{width} image")
            tops = torch.full((n,), top, device=dev)
            lefts = torch.full((n,), left, device=dev)
        else:
            tops = torch.randint(0, height - side + 1, (n,), generator=generator, device=dev)
            lefts = torch.randint(0, width - side + 1, (n,), generator=generator, device=dev)
        rows = torch.arange(height, device=dev)
        cols = torch.arange(width, device=dev)
        in_rows = (rows >= tops[:, None]) & (rows < tops[:, None] + side)
        in_cols = (cols >= lefts[:, None]) & (cols < lefts[:, None] + side)
        return (in_rows[:, :, None] & in_cols[:, None, :])[:, None]

    def perturb(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        def one_run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            mask = self.masks(x, generator)
            start = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            adv = torch.where(mask, start, x)
            for _ in range(self.steps):
                step = self.input_grad(adv, y).sign_().mul_(mask)
                adv.add_(step, alpha=self.alpha).clamp_(0, 1)
            return adv

        return keep_worst(self, images, labels, one_run(images, labels), self.locations, one_run)
