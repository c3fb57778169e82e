"""Per-example losses the attacks ascend: cross-entropy and DLR (Croce & Hein 2020).

Each takes logits ``(N, K)`` and labels ``(N,)`` and returns a loss per example ``(N,)``
(higher = closer to a misclassification); attacks sum them over models and examples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy ``-log softmax(z)_y`` per example."""
    return F.cross_entropy(logits, labels, reduction="none")


def dlr(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Difference of Logits Ratio: ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)``.

    ``z_pi1 >= z_pi2 >= z_pi3`` are the three largest logits.  Invariant to shifting and
    rescaling the logits, so it does not saturate like cross-entropy (Croce & Hein 2020, Eq. 6);
    positive exactly when the example is misclassified.  Needs at least 3 classes.
    """
    if logits.shape[1] < 3:
        raise ValueError(f"the DLR loss needs at least 3 classes, got {logits.shape[1]}")
    top = logits.topk(3, dim=1).values
    true = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1)
    return -(true - other) / (top[:, 0] - top[:, 2] + 1e-12)
