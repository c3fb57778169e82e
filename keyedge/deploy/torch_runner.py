"""The PyTorch reference runner: a checkpoint rebuilt as the module that was exported, run as a :class:`Runner`.

``bench latency``'s ``torch`` runtime times exported artifacts against it; it is a
:class:`keyedge.exporters.base.Runner` (``runner(x)``, ``predict``, ``describe``, ``close``) whose runtime is
PyTorch eager under ``inference_mode``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from keyedge.checkpoints import load_checkpoint
from keyedge.defenses import defense_of
from keyedge.defenses.keyed import SHUFFLE_FORMS
from keyedge.errors import KeyedgeError
from keyedge.exporters.base import Runner
from keyedge.keys.keyfile import Key

__all__ = ["TorchRunner", "load_checkpoint_runner", "torch_available"]


class TorchRunner(Runner):
    """A checkpoint rebuilt as the module that was exported (same fuse), run eagerly under ``inference_mode``."""

    backend = "torch"

    def __init__(
        self, directory: Path, module: nn.Module, device: torch.device, image_size: int, settings: dict[str, Any]
    ):
        super().__init__(directory, [None, 3, image_size, image_size], settings)
        self.module = module
        self.device = device

    def infer(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():  # .cpu() waits for CUDA/MPS: the copy back is part of the call, as elsewhere
            return self.module(torch.from_numpy(x).to(self.device)).cpu().numpy()

    def logits(self, result: np.ndarray) -> np.ndarray:
        return result

    def close(self) -> None:
        self.module = None


def torch_available(device: str | None) -> tuple[bool, str]:
    """Whether PyTorch can run on ``device`` (cpu, cuda, mps) here, and why not."""
    if device == "cuda" and not torch.cuda.is_available():
        return False, "torch: CUDA is not available on this host"
    if device == "mps" and not torch.backends.mps.is_available():
        return False, "torch: MPS is not available on this host"
    return True, f"torch {torch.__version__}"


def load_checkpoint_runner(
    directory: Path, key: Key | None, *, fuse: str | None = None, device: str | None = None, threads: int | None = None
) -> TorchRunner:
    """Load a checkpoint for eager inference as it would be exported (``fuse``: a shuffle form or fold)."""
    ok, why = torch_available(device)
    if not ok:
        raise KeyedgeError(why, "pick another device")
    if threads:
        torch.set_num_threads(threads)
    target = torch.device(device or "cpu")
    model, manifest = load_checkpoint(directory, key)
    chosen = fuse if fuse in (*SHUFFLE_FORMS, "fold") else "gather"
    module = defense_of(model).deployable(model, key, chosen).module.to(target).eval()
    return TorchRunner(
        Path(directory),
        module,
        target,
        manifest.model.image_size,
        {"device": str(target), "threads": threads, "fuse": chosen},
    )
