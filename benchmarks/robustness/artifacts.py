"""The deployed artifacts under the same attacks: transfer sets classified by each artifact, query attacks on it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from keyedge.attacks import Queried
from keyedge.benchmarks.robustness.evaluation import Evaluation
from keyedge.benchmarks.robustness.members import Member
from keyedge.benchmarks.robustness.queries import query_outcomes, query_targets
from keyedge.benchmarks.robustness.worst import Trace
from keyedge.benchmarks.robustness_report import Outcome, attack_label
from keyedge.deploy.artifacts import ArtifactManifest
from keyedge.deploy.runtime import open_artifact
from keyedge.errors import KeyedgeError
from keyedge.exporters import get_backend


def artifact_outcomes(
    ev: Evaluation,
    members: Sequence[Member],
    directories: Sequence[str],
    classified: Sequence[tuple[Outcome, torch.Tensor]],
    sealkeys: Sequence[Any] = (),
    *,
    eps: float,
    norm: str = "Linf",
) -> list[Outcome]:
    """Classify the scenarios' images (transfer sets and the noise control) with the exported artifacts of each
    target model, and run the query attacks on the artifacts themselves (through their runners, no gradients).

    Every target whose runtime runs on this host is used (CoreML only on macOS), through its backend's
    runner; sealed sets are opened with the matching one of ``sealkeys`` (decrypted in memory).
    """
    by_path = {str(Path(m.path).resolve()): m for m in members}
    queried = {m.name for m in query_targets(members, ev.config)}
    results = []
    for directory in directories:
        manifest = ArtifactManifest.read(directory)
        source = str(manifest.checkpoint_path.resolve()) if manifest.checkpoint_path else "an unknown checkpoint"
        member = by_path.get(source)
        if member is None:
            raise KeyedgeError(
                f"{directory} was exported from {source}, which is not among the evaluated checkpoints",
                "add that checkpoint, or leave the artifact out",
            )
        for target in manifest.targets:
            backend = get_backend(target)
            if not backend.can_run()[0]:
                continue
            path = manifest.artifact(target)
            runtime = f"{target}:{Path(directory).name}/{path.name}"
            found = []
            with open_artifact(path, target, sealkey=list(sealkeys)) as runner:
                for o, adv in classified:
                    if o.target != member.name:
                        continue
                    pred = torch.from_numpy(runner.predict(adv.numpy())).argmax(1)
                    found.append(ev.outcome(o.scenario, o.target, o.sources, adv, o.attack, pred, runtime=runtime))
                    label = attack_label(o.attack) + (f" from {'+'.join(o.sources)}" if o.sources else "")
                    standing = pred == ev.labels[: len(pred)]
                    ev.traces.append(Trace.from_standing(o.target, o.scenario, label, runtime, standing))
                if member.name in queried:
                    model = Queried(runner, runtime)
                    found += query_outcomes(ev, member.name, model, ev.config, eps, norm, runtime=runtime)
            results += [replace(o, precision=manifest.precision) for o in found]
    return results
