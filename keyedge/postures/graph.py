"""The in-graph part of a posture: Gaussian noise on every query before the shuffle, top-k or label outputs.

:class:`PostureModule` wraps a deployable module (which takes [0, 1] NCHW images and returns logits) so that
the exported graph itself enforces the posture: an app on the device cannot read scores a ``label`` artifact
does not compute.  Every output keeps the ``(N, classes)`` float shape of the scores, so runners, batching and
``argmax`` work unchanged:

* ``scores``  -- the logits, as before postures;
* ``topk:K:D`` -- the softmax probabilities of the K most probable classes, rounded to D decimals, zero elsewhere
  (TopK + Round + ScatterElements);
* ``label``   -- one-hot of the top-1 class (ArgMax + ScatterElements): one bit of information per class.

Noise (``noise:SIGMA``) is ``x + SIGMA * randn_like(x)`` in pixel units before the module, unclamped (Random
Noise Defense, Qin et al., NeurIPS 2021): a fresh draw on every call, so equal queries get different answers.
"""

from __future__ import annotations

import torch
from torch import nn

from keyedge.postures.spec import Posture


def posture_outputs(logits: torch.Tensor, posture: Posture) -> torch.Tensor:
    """What a query is answered with, from the logits (``(N, classes)`` floats in every posture)."""
    if posture.outputs == "scores":
        return logits
    if posture.outputs == "label":
        return torch.zeros_like(logits).scatter(1, logits.argmax(1, keepdim=True), 1.0)
    probs = logits.softmax(1)
    k = min(posture.topk or 1, logits.shape[1])
    top, index = probs.topk(k, dim=1)
    scale = 10.0 ** (posture.decimals if posture.decimals is not None else 2)
    return torch.zeros_like(probs).scatter(1, index, torch.round(top * scale) / scale)


class PostureModule(nn.Module):
    """``outputs(module(x + sigma * noise))``: a deployable module under a posture's in-graph part."""

    def __init__(self, module: nn.Module, posture: Posture, *, noise: bool = True):
        super().__init__()
        self.module = module
        self.posture = posture
        # noise=False: the deterministic twin that export verifies parity on (the shipped graph is checked
        # statistically); the posture's sigma is kept in ``posture`` either way
        self.sigma = float(posture.noise) if noise else 0.0

    @property
    def randomized(self) -> bool:
        """Whether two calls on the same input may differ (exporters skip their deterministic probe check)."""
        return self.sigma > 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sigma:
            x = x + self.sigma * torch.randn_like(x)
        return posture_outputs(self.module(x), self.posture)
