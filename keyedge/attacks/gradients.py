"""Input gradients: the one place a loss is differentiated w.r.t. the [0, 1] input.

Attacks (:meth:`~keyedge.attacks.base.Attack.input_grad`), the transfer guard's PGD and the gradient
similarity of two models (orthogonal-deep-models Eq. 1; the ``--ortho-lambda`` regularizer and the robustness
report's gradient matrix) all use these.  Models map [0, 1] NCHW images to logits; losses are per example
(:mod:`keyedge.attacks.losses`) and summed, so a gradient does not depend on the batch it was taken in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .losses import cross_entropy

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def loss_and_input_gradient(
    model: nn.Module, x: torch.Tensor, labels: torch.Tensor, loss_fn: LossFn = cross_entropy
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example loss, logits and the gradient w.r.t. ``x`` of the summed loss, all detached."""
    leaf = x.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(leaf)
        loss = loss_fn(logits, labels)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    return loss.detach(), logits.detach(), grad


def input_gradient(
    model: nn.Module, x: torch.Tensor, labels: torch.Tensor, loss_fn: LossFn = cross_entropy
) -> torch.Tensor:
    """Gradient w.r.t. ``x`` of ``sum over examples of loss_fn(model(x), labels)`` (detached)."""
    return loss_and_input_gradient(model, x, labels, loss_fn)[2]


def gradient_similarity(grad_a: torch.Tensor, grad_b: torch.Tensor) -> torch.Tensor:
    """Per-image cosine of two input gradients (orthogonal-deep-models Eq. 1): shape (B,)."""
    return nn.functional.cosine_similarity(grad_a.flatten(1), grad_b.flatten(1), dim=1, eps=1e-12)


def mean_gradient_similarity(
    model_a: nn.Module,
    model_b: nn.Module,
    dataset,
    *,
    batch_size: int = 64,
    limit: int | None = None,
    device: torch.device | str = "cpu",
) -> float:
    """Mean cosine between two models' input gradients over ``dataset`` (orthogonal-deep-models Eq. 1)."""
    from torch.utils.data import DataLoader

    total, count = 0.0, 0
    modes = (model_a.training, model_b.training)
    model_a.eval()
    model_b.eval()
    for x, y in DataLoader(dataset, batch_size=batch_size):
        x, y = x.to(device), torch.as_tensor(y).to(device)
        sims = gradient_similarity(input_gradient(model_a, x, y), input_gradient(model_b, x, y))
        total += sims.sum().item()
        count += sims.numel()
        if limit and count >= limit:
            break
    model_a.train(modes[0])
    model_b.train(modes[1])
    return total / max(count, 1)
