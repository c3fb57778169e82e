"""Transfer guard: fine-tune a keyed model on the adversarial examples that other keys' models make.

The adaptive attacker of a key-based defense has no key, so it fine-tunes the same public model
with a key of its own and crafts examples on that surrogate; they transfer to the target when both
models rely on the same (shared, pretrained) features -- the suspected reason LoRA keyed models
fall (the frozen base is common to all of them).  The guard gives the defender the attacker's tool:
it trains a few surrogates with keys of its own (never deployed), and every training batch has a
share of its images replaced by PGD examples crafted on one of them, in turn -- ensemble
adversarial training (Tramer et al. 2018) with keyed surrogates as the static models.  It does
not use the target's own gradients, so it is not (white-box) adversarial training: the target
keeps its clean accuracy budget for learning its key.

Evaluate it only against surrogates with other keys than the guard's (the attacker's keys are
not the defender's): ``python -m keyedge.benchmarks.experiments.lora_robustness`` does.
"""

from __future__ import annotations

import torch
from torch import nn

from keyedge.attacks import PGD
from keyedge.checkpoints import load_checkpoint, read_manifest
from keyedge.errors import KeyedgeError
from keyedge.keys.keyfile import key_for, load_key
from keyedge.models.lora import merge_lora


class TransferGuard:
    """PGD (:class:`keyedge.attacks.PGD`: Linf, random start) on one guard model per batch, in turn.

    Replaces the first ``share`` of each batch.  ``generator`` (on ``device``) draws every random start, so
    its state is what a resumed run restores.
    """

    def __init__(
        self,
        models: list[nn.Module],
        eps: float,
        steps: int,
        share: float,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ):
        if not models:
            raise KeyedgeError("the transfer guard needs at least one model", "pass --guard-model CHECKPOINT")
        self.models, self.eps, self.steps, self.share = models, eps, steps, share
        self.attacks = [PGD(m, eps=eps, steps=steps) for m in models]
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.turn = 0

    @classmethod
    def load(
        cls,
        paths: list[str],
        keys: list[str],
        eps: float,
        steps: int,
        share: float,
        device,
        seed: int = 0,
        own: str | None = None,
    ) -> TransferGuard:
        """The guard models from checkpoints (``keys``: their key files), frozen, merged.

        ``own``: the fingerprint of the model being trained -- a guard model with that key is refused
        (examples from the target's own key are white-box adversarial training, not a transfer guard)."""
        loaded = {k.fingerprint: k for k in (load_key(p) for p in keys)}
        models = []
        for path in paths:
            fingerprint = read_manifest(path).fingerprint
            if own is not None and fingerprint == own:
                raise KeyedgeError(
                    f"guard model {path} has the key of the model being trained",
                    "guard with models fine-tuned with other keys of yours",
                )
            key = key_for(fingerprint, loaded, owner=path)
            model, _ = load_checkpoint(path, key, map_location=device)
            model = merge_lora(model).eval()
            for p in model.parameters():
                p.requires_grad_(False)
            models.append(model)
        return cls(models, eps, steps, share, seed, device)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x`` with its first ``share`` images replaced by examples crafted on the next guard model."""
        n = max(1, round(self.share * x.shape[0]))
        attack = self.attacks[self.turn % len(self.attacks)]
        self.turn += 1
        with attack.prepared():
            adv = attack.perturb(x[:n].detach(), y[:n], self.generator)
        return torch.cat([adv.detach(), x[n:]])
