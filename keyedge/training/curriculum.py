"""Batch syllabus of the volumization defense (volumization paper §4.3; its patch-aggregate loss, Eq. 10, is
:func:`keyedge.defenses.volumetric.patch_aggregate_loss`).

* :func:`syllabus` -- the permutation ordering a batch from simple to complex
  by a Table 1 metric at image level (Eqs. 11-13), exactly as the volumizer
  orders patches (:func:`keyedge.defenses.volumizer.rank`); the reference of a distance
  metric is the batch's lowest-entropy image.

* :class:`CurriculumBatchSampler` -- what ``keyedge train --curriculum METRIC`` uses.

The paper reorders samples *within* a batch.  A batch's mean loss, its gradient
and BatchNorm's batch statistics are all invariant to the order of its samples,
so for mini-batch training that ordering changes the update only by
floating-point summation order.  keyedge therefore applies the syllabus one
level up, where it has an effect: each epoch, batches are drawn at random (as
usual), then *the batches* are visited from simple to complex by the mean
metric of their images (Eqs. 11-13 applied to batches), and each batch is put
in syllabus order as the paper does.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler

from keyedge.defenses.volumizer import metric_scores, rank
from keyedge.errors import ShapeError


def syllabus(
    images: torch.Tensor, metric: str = "entropy", order: str = "ascending", *, bins: int = 32
) -> torch.Tensor:
    """The permutation (B,) putting a batch (B, C, H, W) in [0, 1] from simple to complex (``ascending``).

    ``images[perm]`` is the reordered batch; ties are broken by entropy, then by position.
    """
    if images.ndim != 4:
        raise ShapeError(f"expected an (N, C, H, W) batch, got shape {tuple(images.shape)}")
    return rank(images.unsqueeze(0), metric, order, bins=bins)[0]


def image_scores(dataset: Dataset, metric: str = "entropy", *, bins: int = 32, chunk: int = 1024) -> torch.Tensor:
    """Per-image Table 1 scores (N,) of a dataset of ``(image, label)`` items, lower = simpler.

    Distance metrics use the dataset's lowest-entropy image as the reference.
    """

    def images(start: int, stop: int) -> torch.Tensor:
        return torch.stack([dataset[i][0] for i in range(start, stop)])

    n = len(dataset)
    entropy = torch.cat(
        [metric_scores(images(s, min(n, s + chunk)).unsqueeze(0), "entropy", bins=bins)[0] for s in range(0, n, chunk)]
    )
    if metric == "entropy":
        return entropy
    reference = dataset[int(entropy.argmin())][0]
    return torch.cat(
        [
            metric_scores(images(s, min(n, s + chunk)).unsqueeze(0), metric, reference=reference, bins=bins)[0]
            for s in range(0, n, chunk)
        ]
    )


class CurriculumBatchSampler(Sampler[list[int]]):
    """Random batches, visited from simple to complex by their images' mean metric (see the module docstring).

    Each batch's indices are themselves in ascending metric order.  ``generator`` draws the
    batches (seed it for reproducible epochs); the per-image scores are computed once.
    """

    def __init__(
        self,
        scores: torch.Tensor,
        batch_size: int,
        *,
        drop_last: bool = False,
        generator: torch.Generator | None = None,
        order: str = "ascending",
    ):
        self.scores = scores.double()
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.generator = generator
        self.descending = order == "descending"

    def __len__(self) -> int:
        n = len(self.scores)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        perm = torch.randperm(len(self.scores), generator=self.generator)
        batches = list(perm.split(self.batch_size))
        if self.drop_last and len(batches[-1]) < self.batch_size:
            batches.pop()
        means = torch.stack([self.scores[b].mean() for b in batches])
        for i in torch.sort(means, descending=self.descending, stable=True).indices.tolist():
            batch = batches[i]
            yield batch[torch.sort(self.scores[batch], descending=self.descending, stable=True).indices].tolist()
