"""The models x models (or keys) tables: key diversity and gradient similarity."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from keyedge.attacks.gradients import gradient_similarity, input_gradient
from keyedge.benchmarks.robustness.evaluation import Evaluation
from keyedge.benchmarks.robustness.members import Member
from keyedge.benchmarks.robustness_report import Matrix
from keyedge.defenses import get_defense
from keyedge.keys.keyfile import Key
from keyedge.models.backbones import KeyedModel


def key_diversity(ev: Evaluation, members: Sequence[Member], keys: Sequence[Key]) -> Matrix:
    """Clean accuracy of every model with every key in place of its own (and with none): paper Table 5."""
    owners: dict[str, str] = {}
    for m in members:
        if m.keyed:  # models sharing a key (a full and a LoRA fine-tune, say) share its column
            owners[m.fingerprint] = f"{owners[m.fingerprint]}/{m.name}" if m.fingerprint in owners else m.name
    columns = [
        f"key of {owners[k.fingerprint]}" if k.fingerprint in owners else f"key {k.fingerprint}" for k in keys
    ] + ["no key"]
    values = []
    for m in members:
        row = []
        for k in [*list(keys), None]:
            size = m.model.spec.image_size
            if not get_defense(m.defense).takes_key:  # e.g. volumized: only its unshuffled accuracy
                row.append(
                    None if k is not None else float((ev.predict(m.model, ev.images) == ev.labels).float().mean())
                )
                continue
            if k is not None and size % k.block_size:
                row.append(None)
                continue
            swapped = KeyedModel(m.model.backbone, m.model.spec, k).eval().to(ev.config.device)
            row.append(float((ev.predict(swapped, ev.images) == ev.labels).float().mean()))
        values.append(row)
    return Matrix(
        "key-diversity",
        rows=[m.name for m in members],
        columns=columns,
        values=values,
        images=ev.images.shape[0],
        note="clean accuracy of each model (row) when its input is shuffled "
        "with each key (column: the key a model was trained with, or a fingerprint; fingerprints "
        f"{', '.join(k.fingerprint for k in keys)}); 'no key' = unshuffled input",
    )


def gradient_matrix(ev: Evaluation, members: Sequence[Member], limit: int) -> Matrix:
    """Mean cosine similarity of input gradients between every pair of models (orthogonal-deep-models Eq. 1)."""
    n = min(limit, ev.images.shape[0])
    grads = {}
    for m in members:
        parts = []
        for start in range(0, n, ev.config.batch_size):
            x = ev.images[start : min(n, start + ev.config.batch_size)].to(ev.config.device)
            y = ev.labels[start : start + x.shape[0]].to(ev.config.device)
            parts.append(input_gradient(m.model, x, y).cpu())
        grads[m.name] = torch.cat(parts)
    names = [m.name for m in members]
    values = [[float(gradient_similarity(grads[a], grads[b]).mean()) for b in names] for a in names]
    return Matrix(
        "gradient-similarity",
        rows=names,
        columns=names,
        values=values,
        images=n,
        note="mean cosine of the models' input gradients of the cross-entropy (diagonal 1); "
        "high similarity predicts transfer",
    )
