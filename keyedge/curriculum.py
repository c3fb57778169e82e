"""Patch-aggregate loss and batch syllabus of the volumization defense (volumization paper §4.2 Eq. 10, §4.3).

* :func:`patch_aggregate_loss` -- PAL = sum over the D patches of each patch's
  cross-entropy against the image's label (Eq. 10), averaged over the batch.
  It is D times the mean patch loss, so its scale grows with D; AdamW's update
  is (nearly) invariant to that scale.
* :func:`syllabus` -- the permutation ordering a batch from simple to complex
  by a Table 1 metric at image level (Eqs. 11-13), exactly as the volumizer
  orders patches (:func:`keyedge.volumize.rank`); the reference of a distance
  metric is the batch's lowest-entropy image.

Note that the paper reorders samples *within* a batch.  A batch's mean loss,
its gradient and BatchNorm's batch statistics are all invariant to the order
of its samples, so for ordinary mini-batch training the syllabus changes the
update only by floating-point summation order; a curriculum with an effect
would order samples *across* batches (e.g. sort the epoch by the metric).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from keyedge.errors import ShapeError
from keyedge.volumize import rank


def patch_aggregate_loss(per_patch_logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
                         ) -> torch.Tensor:
    """PAL (Eq. 10): sum over patches of per-patch cross-entropy, mean over the batch.

    ``per_patch_logits`` (B, D, classes), ``labels`` (B,) -- every patch is
    trained towards its image's label.
    """
    if per_patch_logits.ndim != 3 or labels.shape != per_patch_logits.shape[:1]:
        raise ShapeError(f"expected per-patch logits (B, D, classes) and labels (B,), got "
                         f"{tuple(per_patch_logits.shape)} and {tuple(labels.shape)}")
    b, d, classes = per_patch_logits.shape
    per_patch = F.cross_entropy(per_patch_logits.reshape(b * d, classes), labels.repeat_interleave(d),
                                reduction="none", label_smoothing=label_smoothing)
    return per_patch.view(b, d).sum(1).mean()


def syllabus(images: torch.Tensor, metric: str = "entropy", order: str = "ascending", *, bins: int = 32
             ) -> torch.Tensor:
    """The permutation (B,) putting a batch (B, C, H, W) in [0, 1] from simple to complex (``ascending``).

    ``images[perm]`` is the reordered batch; ties are broken by entropy, then by position.
    """
    if images.ndim != 4:
        raise ShapeError(f"expected an (N, C, H, W) batch, got shape {tuple(images.shape)}")
    return rank(images.unsqueeze(0), metric, order, bins=bins)[0]
