"""N-pixel attack: batched differential evolution over N (row, column, colour) tuples (Su et al. 2019)."""

from __future__ import annotations

import torch

from .base import Attack, AttackError, Models, check_positive, register_attack

Region = tuple[int, int, int, int]


def distinct_others(
    shape: tuple[int, int], n: int, generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every member ``i`` of ``shape[0]`` populations of size ``n`` (``shape[1] == n``): three
    population indices, distinct from each other and from ``i``, uniformly, without a loop."""

    def draw(high: int) -> torch.Tensor:
        return torch.randint(0, high, shape, generator=generator, device=device)

    a = draw(n - 1)
    b = draw(n - 2)
    b = b + (b >= a)
    c = draw(n - 3)
    low, high = torch.minimum(a, b), torch.maximum(a, b)
    c = c + (c >= low)
    c = c + (c >= high)
    own = torch.arange(n, device=device).expand(shape)
    return tuple(v + (v >= own) for v in (a, b, c))  # skip member i itself


def _members(pop: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``pop[b, index[b, i]]`` for populations ``(B, P, ...)`` and indices ``(B, P)``."""
    return pop.gather(1, index[..., None, None].expand_as(pop))


@register_attack
class NPixel(Attack):
    r"""N-pixel attack, 'One pixel attack for fooling deep neural networks' (Su, Vargas & Sakurai,
    IEEE TEVC 2019); the localized attack of the volumization paper.

    Black-box (uses outputs only).  A candidate is N tuples (row, column, r, g, b): the N pixels it
    overwrites.  Differential evolution per image, batched over images and population: the
    initial population is uniform over positions and N(128, 127)/255 (clipped) over colours;
    each generation every member ``i`` gets a child ``x_r1 + F (x_r2 - x_r3)`` (r1, r2, r3 distinct
    and != i; positions and colours clipped to their ranges), which replaces it when its fitness
    is not worse.  Fitness = probability of the true class (summed over models), to be minimized.
    Su et al. use no crossover (the child is the mutant); ``crossover=CR`` adds the usual
    binomial crossover.  An image stops evolving once its best member is misclassified.

    Distance measure: L0 over pixel positions: at most ``pixels`` positions (all channels of each)
    differ from the input, all inside ``region``.

    Arguments:
        model: model, or several models (fitness summed, success on summed logits).
        pixels (int): N, the number of pixels changed. (Default: 1)
        popsize (int): population size per image. (Default: 400, as Su et al.)
        steps (int): generations. (Default: 100, as Su et al.; CPU users will want fewer)
        f (float): DE scale factor F. (Default: 0.5)
        crossover (float | None): binomial crossover rate, ``None`` = no crossover. (Default: None)
        region ((top, left, height, width) | None): box the pixels are drawn from, e.g. one
            quadrant for the volumization paper's protocol; ``None`` = the whole image. (Default: None)
        early_stop (bool): stop evolving an image once it is misclassified. (Default: True)
        eval_batch (int): candidate images per forward pass. (Default: 512)
        seed (int): seeds the population and the DE choices. (Default: 0)

    Shape:
        - images: ``(N, C, H, W)`` in [0, 1]; labels: ``(N,)``.
        - output: ``(N, C, H, W)`` in [0, 1].

    Example::
        >>> attack = NPixel(model, pixels=3, popsize=100, steps=30, region=(0, 0, 16, 16))
        >>> adv_images = attack(images, labels)
    """

    name = "npixel"
    norm = "L0"
    paper = "Su et al. 2019, One pixel attack for fooling deep neural networks"
    hyperparameters = ("pixels", "popsize", "steps", "f", "crossover", "region", "early_stop")
    kind = "localized"
    budget = ("pixels",)
    label_format = "{pixels}-pixel"

    def __init__(
        self,
        model: Models,
        *,
        pixels: int = 1,
        popsize: int = 400,
        steps: int = 100,
        f: float = 0.5,
        crossover: float | None = None,
        region: Region | None = None,
        early_stop: bool = True,
        eval_batch: int = 512,
        seed: int = 0,
    ):
        super().__init__(model, seed=seed)
        check_positive("pixels", pixels, integer=True)
        check_positive("steps", steps, integer=True, allow_zero=True)
        check_positive("f", f)
        check_positive("eval_batch", eval_batch, integer=True)
        if isinstance(popsize, bool) or not isinstance(popsize, int) or popsize < 4:
            raise AttackError(f"popsize must be an integer >= 4 (DE picks three others per member), got {popsize!r}")
        if crossover is not None and not 0 < crossover <= 1:
            raise AttackError(f"crossover must be in (0, 1] or None, got {crossover!r}")
        if region is not None:
            region = tuple(int(v) for v in region)
            if len(region) != 4 or region[0] < 0 or region[1] < 0 or region[2] < 1 or region[3] < 1:
                raise AttackError(f"region must be (top, left, height, width) with positive size, got {region!r}")
        self.pixels, self.popsize, self.steps, self.f = int(pixels), popsize, int(steps), float(f)
        self.crossover = None if crossover is None else float(crossover)
        self.region = region
        self.early_stop = bool(early_stop)
        self.eval_batch = int(eval_batch)

    # -- candidates -> images -------------------------------------------------------------------------------------

    def _box(self, height: int, width: int) -> Region:
        top, left, h, w = self.region or (0, 0, height, width)
        if top + h > height or left + w > width:
            raise AttackError(f"region {self.region} does not fit in a {height}x{width} image")
        return top, left, h, w

    def _apply(self, images: torch.Tensor, genes: torch.Tensor, box: Region) -> torch.Tensor:
        """Images ``(M, C, H, W)`` with the pixels of candidates ``genes`` ``(M, N, 2 + C)`` written in."""
        m, c, height, width = images.shape
        top, left, h, w = box
        rows = genes[..., 0].long().clamp_(0, h - 1) + top
        cols = genes[..., 1].long().clamp_(0, w - 1) + left
        pos = rows * width + cols  # (M, N)
        colours = genes[..., 2:]
        # a position drawn twice gets the colour of its first occurrence (scatter order is then irrelevant)
        first = (pos[:, :, None] == pos[:, None, :]).int().argmax(-1)
        colours = colours.gather(1, first[..., None].expand_as(colours))
        out = images.reshape(m, c, height * width).clone()
        out.scatter_(2, pos[:, None, :].expand(m, c, pos.shape[1]), colours.transpose(1, 2).to(out.dtype))
        return out.view(m, c, height, width)

    def _fitness(
        self, images: torch.Tensor, labels: torch.Tensor, genes: torch.Tensor, box: Region
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(fitness, misclassified) of candidates ``genes`` ``(B, P, N, 2 + C)`` for images ``(B, ...)``."""
        b, p = genes.shape[:2]
        flat = genes.reshape(b * p, *genes.shape[2:])
        owner = torch.arange(b, device=images.device).repeat_interleave(p)
        fitness = torch.empty(b * p, device=images.device)
        fooled = torch.empty(b * p, dtype=torch.bool, device=images.device)
        with torch.no_grad():
            for s in range(0, b * p, self.eval_batch):
                idx = owner[s : s + self.eval_batch]
                x = self._apply(images[idx], flat[s : s + self.eval_batch], box)
                y = labels[idx]
                prob = logits = None
                for m in self.models:
                    z = m(x)
                    pz = z.softmax(1).gather(1, y[:, None]).squeeze(1)
                    prob = pz if prob is None else prob + pz
                    logits = z if logits is None else logits + z
                fitness[s : s + x.shape[0]] = prob
                fooled[s : s + x.shape[0]] = logits.argmax(1) != y
        return fitness.view(b, p), fooled.view(b, p)

    # -- differential evolution -----------------------------------------------------------------------------------

    def perturb(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b, c, height, width = images.shape
        box = self._box(height, width)
        dev, p, n = images.device, self.popsize, self.pixels
        upper = torch.tensor([box[2], box[3]] + [1.0] * c, device=dev)
        upper_open = upper.clone()
        upper_open[:2] -= 1e-4  # positions live in [0, h) so that floor() stays inside the box

        genes = torch.empty(b, p, n, 2 + c, device=dev)
        genes[..., :2] = torch.rand(b, p, n, 2, generator=generator, device=dev) * upper[:2]
        genes[..., 2:] = torch.randn(b, p, n, c, generator=generator, device=dev).mul_(127 / 255).add_(128 / 255)
        genes.clamp_(min=0).clamp_(max=upper_open)
        fitness, fooled = self._fitness(images, labels, genes, box)

        active = torch.arange(b, device=dev)
        for _ in range(self.steps):
            if self.early_stop:
                active = active[~fooled[active].any(1)]
            if active.numel() == 0:
                break
            pop = genes[active]
            r1, r2, r3 = distinct_others((active.numel(), p), p, generator, dev)
            child = _members(pop, r1).add_(_members(pop, r2).sub_(_members(pop, r3)), alpha=self.f)
            child.clamp_(min=0).clamp_(max=upper_open)
            if self.crossover is not None:  # binomial crossover, at least one gene from the mutant
                genes_per = n * (2 + c)
                take = torch.rand(pop.shape, generator=generator, device=dev) < self.crossover
                forced = torch.randint(0, genes_per, pop.shape[:2], generator=generator, device=dev)
                take.view(*pop.shape[:2], genes_per).scatter_(2, forced[..., None], True)
                child = torch.where(take, child, pop)
            child_fit, child_fooled = self._fitness(images[active], labels[active], child, box)
            better = child_fit <= fitness[active]
            genes[active] = torch.where(better[..., None, None], child, pop)
            fitness[active] = torch.where(better, child_fit, fitness[active])
            fooled[active] = torch.where(better, child_fooled, fooled[active])

        score = fitness - 2.0 * len(self.models) * fooled  # misclassified first, then lowest true-class probability
        best = score.argmin(1)
        chosen = genes[torch.arange(b, device=dev), best]
        return self._apply(images, chosen, box)
