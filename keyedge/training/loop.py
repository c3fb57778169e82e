"""Fine-tuning keyed (and plain) models: full or LoRA, one loop for CPU, GPU and torchrun/DDP.

The loop is deliberately plain PyTorch: AdamW, linear warm-up then cosine decay
(per step), label smoothing, bf16 autocast on CUDA, evaluation and an atomic
checkpoint after every epoch, ``resume`` from the last checkpoint.  Launched
with ``torchrun --nproc_per_node N``, it runs data-parallel (DDP; gloo on CPU,
nccl on GPU) without any change; only rank 0 prints and writes.

With an orthogonality reference (``ortho_ref``), the loss gains
``lambda * mean_i cos(grad_x L(model, x_i), grad_x L(ref, x_i))``
(orthogonal-deep-models §III, Eq. 3 / Alg. 1), pushing the model's input
gradients away from the frozen reference's -- the tool to test whether gradient
misalignment stops adversarial examples transferring between keyed models.
With guard models (``guard_models``), a share of every batch is replaced by PGD examples
crafted on them (:mod:`keyedge.training.guard`): the tool that does stop it (docs/lora.md).

With ``noise_aug`` (sigma), every training batch becomes ``x + sigma * noise`` (Gaussian, [0, 1] pixel
units, before the model's shuffle and normalization, unclamped): what a deployed ``noise:SIGMA`` posture
(:class:`~keyedge.postures.graph.PostureModule`) does to every query, so the model keeps its accuracy there.
The noise comes from a generator seeded per (seed, epoch, rank); each epoch then also reports the test
accuracy under the same noise.

With ``defense="volumize"`` the model is a :class:`~keyedge.defenses.volumetric.VolumizedModel`
(patch volumes, 3D backbone; no key, no LoRA), trained with the patch-aggregate
loss; ``curriculum`` visits each epoch's batches from simple to complex by a metric
(:mod:`keyedge.training.curriculum`).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Subset

from keyedge.attacks.gradients import gradient_similarity, input_gradient
from keyedge.checkpoints import (
    MANIFEST,
    CheckpointManifest,
    load_checkpoint,
    load_training_state,
    read_manifest,
    save_checkpoint,
)
from keyedge.data.datasets import load_dataset
from keyedge.defenses import Defense, get_defense, list_defenses
from keyedge.defenses.volumizer import check_metric
from keyedge.errors import KeyedgeError
from keyedge.fileio import check_output_directory
from keyedge.keys.keyfile import Key, load_key
from keyedge.models.backbones import check_model_name
from keyedge.models.lora import merge_lora
from keyedge.models.recipes import default_lr, lora_settings
from keyedge.postures.spec import MAX_SIGMA
from keyedge.training.curriculum import CurriculumBatchSampler, image_scores
from keyedge.training.guard import TransferGuard
from keyedge.validate import MAX_SEED


@dataclass
class TrainConfig:
    """Everything ``keyedge train`` can be told; recorded in the checkpoint manifest."""

    model: str
    data: str
    out: str
    key_file: str | None = None
    key_fingerprint: str | None = None  # what key_file must hold (a fleet's record): another key is refused
    sign_key: str | None = None  # a signing key file: every checkpoint written is signed (keyedge.sig)
    weights: str = "hub"
    image_size: int | None = None
    finetune: str = "full"  # full | lora
    lora_r: int | None = None
    lora_alpha: float | None = None
    lora_targets: list[str] | None = None
    lora_full: list[str] | None = None  # layers trained fully in a LoRA run (None: the family's; []: none)
    epochs: int = 3
    batch_size: int = 64
    lr: float | None = None  # default: 5e-4 full; LoRA: the family's recipe (keyedge.models.recipes)
    weight_decay: float = 0.05
    warmup_epochs: float = 0.3
    label_smoothing: float = 0.1
    seed: int = 0
    train_limit: int | None = None
    test_limit: int | None = None
    workers: int = 0
    device: str = "auto"
    amp: bool = True
    ortho_ref: str | None = None
    ortho_ref_key: str | None = None
    ortho_lambda: float = 0.0
    ortho_mode: str = "signed"  # signed: paper's Eq. 3; abs: |cos|, pushes towards orthogonal
    # transfer guard (keyedge.training.guard): train on PGD examples crafted on these other-key models
    guard_models: list[str] = field(default_factory=list)
    guard_keys: list[str] = field(default_factory=list)  # their key files
    guard_eps: float = 16 / 255
    guard_steps: int = 3
    guard_share: float = 0.5  # of each batch
    defense: str = "none"  # none (keyed or plain) | volumize
    patch: int = 16  # volumize: square patch side
    volume_metric: str = "entropy"  # volumize: patch ranking metric (keyedge.defenses.volumizer.METRICS)
    volume_order: str = "ascending"
    depth_kernel: int = 1  # volumize: depth of the 3D kernels (odd)
    curriculum: str = "none"  # none | a metric: visit each epoch's batches from simple to complex
    # Gaussian noise of this std ([0, 1] pixel units) on every training image, as a noise:SIGMA posture adds it
    noise_aug: float = 0.0
    resume: bool = False
    overwrite: bool = False

    def learning_rate(self, family: str) -> float:
        """The peak learning rate: ``--lr``, else the default of the fine-tune mode and the model family."""

        return self.lr if self.lr is not None else default_lr(self.finetune, family)

    def lora_recipe(self, family: str):
        """The LoRA recipe of this run: the family's defaults, overridden by the --lora-* flags given."""

        settings = lora_settings(
            family, r=self.lora_r, alpha=self.lora_alpha, targets=self.lora_targets, full=self.lora_full
        )
        return replace(settings, lr=self.learning_rate(family))

    def recipe(self, family: str) -> dict[str, Any]:
        """What the checkpoint records of how it was fine-tuned: mode, LoRA settings and a one-line label."""
        epochs = f", {self.epochs} epoch{'s' if self.epochs != 1 else ''}, batch {self.batch_size}"
        extras = self._guard_label() + self._noise_label()
        noise = {"noise_aug": self.noise_aug} if self.noise_aug else {}  # absent: none (as in older checkpoints)
        if self.finetune != "lora":
            return {
                "mode": self.finetune,
                "lora": None,
                "recipe": f"full fine-tune, lr {self.learning_rate(family):g}{epochs}{extras}",
                **noise,
            }
        settings = self.lora_recipe(family)
        return {
            "mode": "lora",
            "lora": settings.to_dict(),
            "recipe": f"{settings.label()}, lr {settings.lr:g}{epochs}{extras}",
            **noise,
        }

    def _noise_label(self) -> str:
        return f", noise aug {self.noise_aug:g}" if self.noise_aug else ""

    def _guard_label(self) -> str:
        if not self.guard_models:
            return ""
        return (
            f", transfer guard ({len(self.guard_models)} other-key models, eps {self.guard_eps * 255:.3g}/255, "
            f"{self.guard_steps} PGD steps, {self.guard_share:.0%} of each batch)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("resume", "overwrite", "sign_key")}

    @property
    def defense_impl(self) -> Defense:
        """The defense that builds, trains and checks this model (keyedge.defenses; ``none``: the key)."""
        return get_defense(self.defense)


def _check_numbers(config: TrainConfig) -> None:
    """Refuse NaN, infinite or out-of-range optimizer settings before anything is written (typer lets nan through)."""
    checks = (
        ("--lr", 5e-4 if config.lr is None else config.lr, lambda v: v > 0, "a finite number > 0, e.g. 5e-4"),
        ("--weight-decay", config.weight_decay, lambda v: v >= 0, "a finite number >= 0, e.g. 0.05"),
        ("--warmup-epochs", config.warmup_epochs, lambda v: v >= 0, "a finite number >= 0, e.g. 0.3"),
        ("--label-smoothing", config.label_smoothing, lambda v: 0 <= v < 1, "a number in [0, 1), e.g. 0.1"),
        ("--ortho-lambda", config.ortho_lambda, lambda v: v >= 0, "a finite number >= 0, e.g. 1.0"),
        ("--guard-eps", config.guard_eps, lambda v: 0 < v <= 1, "a number in (0, 1], e.g. 0.0627 (16/255)"),
        ("--guard-steps", config.guard_steps, lambda v: v >= 1, "an integer >= 1, e.g. 3"),
        ("--guard-share", config.guard_share, lambda v: 0 < v <= 1, "a number in (0, 1], e.g. 0.5"),
        (
            "--noise-aug",
            config.noise_aug,
            lambda v: 0 <= v <= MAX_SIGMA,
            f"a noise std in [0, {MAX_SIGMA}] ([0, 1] pixel units, as noise:SIGMA postures), e.g. 0.05 or 8/255",
        ),
    )
    for flag, value, ok, hint in checks:
        if not (isinstance(value, (int, float)) and math.isfinite(value) and ok(value)):
            raise KeyedgeError(f"{flag} {value!r} is not a usable value", f"pass {hint}")
    if not (isinstance(config.seed, int) and 0 <= config.seed <= MAX_SEED):
        raise KeyedgeError(f"--seed {config.seed!r} is not usable", f"pass an integer in 0..{MAX_SEED}")
    if config.guard_keys and not config.guard_models:
        raise KeyedgeError("--guard-key needs --guard-model", "pass the guard's checkpoints with --guard-model")


@dataclass
class Distributed:
    """torchrun's environment: world size, ranks; DDP is on when the world is larger than one."""

    world: int = field(default_factory=lambda: int(os.environ.get("WORLD_SIZE", "1")))
    rank: int = field(default_factory=lambda: int(os.environ.get("RANK", "0")))
    local_rank: int = field(default_factory=lambda: int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def setup(self, device: torch.device) -> None:
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def all_sum(self, *values: float) -> list[float]:
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor)
        return tensor.cpu().tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def resolve_device(name: str, dist_env: Distributed | None = None) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", dist_env.local_rank if dist_env else 0)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise KeyedgeError(f"unknown device {name!r}", "use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise KeyedgeError(f"--device {name} asked for, but torch sees no CUDA device", "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise KeyedgeError(
                f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s)", "use cuda:0 or --device auto"
            )
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise KeyedgeError(
                f"--device {name} asked for, but this torch has no usable MPS (Apple GPU)", "use --device cpu"
            )
    elif device.type != "cpu":
        raise KeyedgeError(f"--device {name}: keyedge runs on cpu, cuda or mps", "use auto, cpu, cuda, cuda:N or mps")
    return device


def warmup_cosine(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up to 1, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _shard(dataset: Dataset, dist_env: Distributed) -> Dataset:
    if not dist_env.enabled:
        return dataset
    return Subset(dataset, list(range(dist_env.rank, len(dataset), dist_env.world)))  # type: ignore[arg-type]


def noise_seed(seed: int, stream: int, rank: int = 0) -> int:
    """The seed of one stream of augmentation noise: training epoch ``stream`` (1, 2, ...) or evaluation (0)."""
    return ((seed * 1_000_003 + stream) * 1_009 + rank) % (2**63)


def add_noise(x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """``x + sigma * N(0, 1)``, unclamped: what a ``noise:SIGMA`` posture (PostureModule) adds, from ``generator``."""
    return x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    workers: int = 0,
    dist_env: Distributed | None = None,
    noise: float = 0.0,
    seed: int = 0,
) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy on ``dataset`` (sharded across DDP ranks).

    Clean by default; with ``noise`` (sigma), under Gaussian noise as a ``noise:SIGMA`` posture adds it, drawn
    from a generator seeded by ``seed`` (the same draws on every call).
    """
    dist_env = dist_env or Distributed(world=1, rank=0, local_rank=0)
    was_training = model.training
    model.eval()
    correct = total = loss_sum = 0.0
    loader = DataLoader(_shard(dataset, dist_env), batch_size=batch_size, num_workers=workers)
    generator = None
    if noise:
        generator = torch.Generator(device=torch.device(device)).manual_seed(noise_seed(seed, 0, dist_env.rank))
    for x, y in loader:
        x, y = x.to(device), torch.as_tensor(y).to(device)
        if generator is not None:
            x = add_noise(x, noise, generator)
        logits = model(x).float()
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        total += y.numel()
    model.train(was_training)
    correct, total, loss_sum = dist_env.all_sum(correct, total, loss_sum)
    return {"accuracy": correct / max(total, 1), "loss": loss_sum / max(total, 1), "images": int(total)}


def key_accuracy(
    checkpoint: str | Path,
    key: Key | None,
    data: str | Dataset,
    *,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Top-1 of a checkpoint's model on test images shuffled with ``key``: its own, another (key diversity) or none.

    ``data``: a dataset name (its test split, sized for the model; ``limit``/``seed`` pick a subset) or a dataset.
    Returns :func:`evaluate`'s result with ``data``, ``key`` (fingerprint used), ``trained_key`` and
    ``key_matches``.  The one place "accuracy with another key" is computed.
    """
    model, manifest = load_checkpoint(checkpoint, key, allow_key_mismatch=True, map_location=device)
    name = getattr(data, "name", None)
    if isinstance(data, str):
        data, info = load_dataset(data, "test", model.spec.image_size, limit=limit, seed=seed)
        if info.num_classes != model.spec.num_classes:
            raise KeyedgeError(
                f"{info.name} has {info.num_classes} classes, the model {model.spec.num_classes}",
                "evaluate on the data the model was trained for",
            )
        name = info.name
    used = key.fingerprint if key is not None else None
    result = evaluate(model, data, batch_size=batch_size, device=device)
    return {
        **result,
        "data": name,
        "key": used,
        "trained_key": manifest.fingerprint,
        "key_matches": used == manifest.fingerprint,
    }


def _signer(path: str | None) -> Any:
    """``--sign-key``'s signing key, read (and its permissions checked) before any data or model is loaded."""
    if not path:
        return None
    from keyedge.keys.signing import load_signing_key

    return load_signing_key(path)


def _load_key(path: str | None) -> Key | None:
    return load_key(path) if path else None


def _check_fits(path: str, flag: str, classes: int, size: int) -> None:
    """A guard or reference model must score the same classes at the same input size as the model trained.

    Otherwise its logits or input gradients do not line up with the batch (a traceback mid-epoch before).
    """
    spec = read_manifest(path).model
    if spec.num_classes != classes or spec.image_size != size:
        raise KeyedgeError(
            f"{flag} {path} takes {spec.image_size}px images into {spec.num_classes} classes, but the model "
            f"trained here takes {size}px into {classes}",
            f"pass a {flag.removeprefix('--')} trained on the same data at the same --image-size",
        )


def _reference_model(config: TrainConfig, device: torch.device) -> nn.Module | None:
    if not config.ortho_ref:
        if config.ortho_lambda:
            raise KeyedgeError("--ortho-lambda needs a reference model", "pass --ortho-ref CHECKPOINT")
        return None

    ref, _ = load_checkpoint(config.ortho_ref, _load_key(config.ortho_ref_key), map_location=device)
    ref = merge_lora(ref)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


def _guard(config: TrainConfig, device: torch.device, own: str | None):
    if not config.guard_models:
        return None

    return TransferGuard.load(
        config.guard_models,
        config.guard_keys,
        config.guard_eps,
        config.guard_steps,
        config.guard_share,
        device,
        seed=config.seed,
        own=own,
    )


def _check_resume(config: TrainConfig, manifest: CheckpointManifest, key: Key | None) -> None:
    recorded = {**_DEFENSE_DEFAULTS, **manifest.training.get("config", {})}
    for name in ("model", "finetune", "weights", "defense", "noise_aug", *config.defense_impl.training_fields):
        if recorded.get(name) != getattr(config, name):
            raise KeyedgeError(
                f"cannot resume: the checkpoint was trained with {name}={recorded.get(name)!r}, "
                f"not {getattr(config, name)!r}",
                f"use the same --{name.replace('_', '-')}",
            )
    fingerprint = manifest.fingerprint
    if fingerprint != (key.fingerprint if key else None):
        raise KeyedgeError("cannot resume: the key differs from the checkpoint's", "pass the same --key-file")


_DEFENSE_DEFAULTS = {  # what a checkpoint written before a field existed was trained with
    "defense": "none",
    "noise_aug": 0.0,
    **{k: v for name in list_defenses() for k, v in get_defense(name).training_fields.items()},
}


def _check_defense(config: TrainConfig) -> None:
    """Refuse what a defense cannot do, before any data or model is loaded."""
    if config.finetune not in ("full", "lora"):
        raise KeyedgeError(f"unknown fine-tune mode {config.finetune!r}", "use full or lora")
    if config.curriculum != "none":
        check_metric(config.curriculum)
    config.defense_impl.check_training(config)


def prepare_model(config: TrainConfig, key: Key | None, num_classes: int) -> nn.Module:
    """The model to fine-tune: pretrained backbone, new head and the defense (key, LoRA adapters, volume...)."""
    return config.defense_impl.new_model(config, key, num_classes)


def _check_run(config: TrainConfig, out: Path, dist_env: Distributed) -> None:
    """Refuse (one line) what this run cannot do, before any data or model is loaded."""
    if config.ortho_lambda and dist_env.enabled:
        raise KeyedgeError(
            "the orthogonality regularizer is not supported under DDP (double backward)", "train with it on one process"
        )
    if config.ortho_mode not in ("signed", "abs"):
        raise KeyedgeError(f"unknown --ortho-mode {config.ortho_mode!r}", "use signed or abs")
    if (out / MANIFEST).exists() and not (config.resume or config.overwrite):
        raise KeyedgeError(
            f"{out} already holds a checkpoint", "pass --resume to continue it or --overwrite to start over"
        )
    if config.resume and not (out / MANIFEST).exists():
        raise KeyedgeError(f"--resume: {out} holds no checkpoint", "drop --resume to start a new run")
    if not out.is_dir():  # a checkpoint directory that cannot be made: said now, not after the first epoch
        check_output_directory(out, overwrite=config.overwrite)
    _check_defense(config)
    if config.finetune == "lora" and config.weights == "none":
        raise KeyedgeError(
            "LoRA adapts pretrained weights, and --weights none gives none to adapt (nor a base "
            "to rebuild the model from)",
            "pass --weights, or use --finetune full",
        )
    if config.epochs < 1 or config.batch_size < 1:
        raise KeyedgeError("--epochs and --batch-size must be positive")
    lora_only = {
        "--lora-r": config.lora_r,
        "--lora-alpha": config.lora_alpha,
        "--lora-targets": config.lora_targets,
        "--lora-full": config.lora_full,
    }
    given = [flag for flag, value in lora_only.items() if value is not None]
    if config.finetune != "lora" and given:
        raise KeyedgeError(
            f"{', '.join(given)} only apply to --finetune lora, and this run fine-tunes {config.finetune}",
            f"drop {', '.join(given)}, or pass --finetune lora",
        )
    _check_numbers(config)


@dataclass
class _Run:
    """Everything one training run holds between epochs."""

    config: TrainConfig
    out: Path
    device: torch.device
    dist_env: Distributed
    key: Key | None
    model: nn.Module
    train_set: Dataset
    test_set: Dataset
    info: Any  # the dataset's DatasetInfo
    history: list[dict[str, Any]]
    start_epoch: int
    state: dict[str, Any] | None = None  # a resumed run's optimizer/scheduler/RNG state
    params: list[nn.Parameter] = field(default_factory=list)
    family: str = "other"
    recipe: dict[str, Any] = field(default_factory=dict)
    optimizer: Any = None
    scheduler: Any = None
    sampler: Any = None
    loader: DataLoader | None = None
    reference: nn.Module | None = None
    guard: Any = None
    noise: torch.Generator | None = None  # --noise-aug's generator, reseeded every epoch
    signer: Any = None  # --sign-key's SigningKey: every checkpoint written is signed
    ddp_model: nn.Module | None = None
    amp: bool = False


def _start(config: TrainConfig, out: Path, key: Key | None, num_classes: int) -> tuple[nn.Module, Any, list, int]:
    """(model, saved state or None, history, first epoch): a new model, or the checkpoint a resumed run continues."""
    if not config.resume:
        torch.manual_seed(config.seed)
        return prepare_model(config, key, num_classes), None, [], 1
    manifest = read_manifest(out)
    _check_resume(config, manifest, key)
    model, _ = load_checkpoint(out, key)  # the RNG state is restored from the checkpoint later
    start_epoch = manifest.epoch + 1
    if start_epoch > config.epochs:
        raise KeyedgeError(
            f"{out} already finished epoch {manifest.epoch} of {config.epochs}", "raise --epochs to train longer"
        )
    return model, load_training_state(out, manifest), list(manifest.metrics.get("history", [])), start_epoch


def _loader(run: _Run, log: Callable[[str], None]) -> None:
    """The sampler and loader: curriculum order, DDP shards, or seeded random batches."""
    config, dist_env, train_set = run.config, run.dist_env, run.train_set
    drop_last = len(train_set) > config.batch_size * dist_env.world
    if config.curriculum != "none":  # batches visited from simple to complex (keyedge.training.curriculum)
        if dist_env.enabled:
            raise KeyedgeError("--curriculum orders the batches of one process", "train it without torchrun")
        log(f"curriculum: scoring {len(train_set)} training images by {config.curriculum}")
        scores = image_scores(train_set, config.curriculum)
        run.sampler = CurriculumBatchSampler(
            scores, config.batch_size, drop_last=drop_last, generator=torch.Generator()
        )
        run.loader = DataLoader(train_set, batch_sampler=run.sampler, num_workers=config.workers)
        return
    run.sampler = (
        DistributedSampler(train_set, num_replicas=dist_env.world, rank=dist_env.rank, seed=config.seed)
        if dist_env.enabled
        else RandomSampler(train_set, generator=torch.Generator())
    )
    run.loader = DataLoader(
        train_set, batch_size=config.batch_size, sampler=run.sampler, num_workers=config.workers, drop_last=drop_last
    )


def _optimize(run: _Run, log: Callable[[str], None]) -> None:
    """Optimizer, loader, schedule, reference and guard models; a resumed run's state restored into them."""
    config, model = run.config, run.model
    run.params = [p for p in model.parameters() if p.requires_grad]
    run.family = getattr(getattr(model, "spec", None), "family", "other")
    run.recipe = config.recipe(run.family)
    lr = config.learning_rate(run.family)
    run.optimizer = torch.optim.AdamW(run.params, lr=lr, weight_decay=config.weight_decay)
    _loader(run, log)
    steps_per_epoch = max(1, len(run.loader))
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(
        run.optimizer, warmup_cosine(steps_per_epoch * config.epochs, int(config.warmup_epochs * steps_per_epoch))
    )
    for path, flag in [(config.ortho_ref, "--ortho-ref"), *((p, "--guard-model") for p in config.guard_models)]:
        if path:
            _check_fits(path, flag, run.info.num_classes, model.spec.image_size)
    run.reference = _reference_model(config, run.device)  # built before the RNG state is restored: it draws
    run.guard = _guard(config, run.device, run.key.fingerprint if run.key else None)
    run.noise = torch.Generator(device=run.device) if config.noise_aug else None  # sigma 0: nothing drawn
    if run.state is not None:
        run.optimizer.load_state_dict(run.state["optimizer"])
        run.scheduler.load_state_dict(run.state["scheduler"])
        torch.set_rng_state(run.state["rng"])
        if run.guard is not None and "guard_rng" in run.state:  # a resumed run crafts what a straight one would
            run.guard.generator.set_state(run.state["guard_rng"])
            run.guard.turn = int(run.state["guard_turn"])
    run.ddp_model = model
    if run.dist_env.enabled:
        ids = [run.device.index] if run.device.type == "cuda" else None
        run.ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    run.amp = config.amp and run.device.type == "cuda"


def _announce(run: _Run, log: Callable[[str], None]) -> None:
    config, model = run.config, run.model
    trainable = sum(p.numel() for p in run.params)
    total = sum(p.numel() for p in model.parameters())
    log(
        f"training {config.model} ({run.recipe['recipe']}; {trainable:,} of {total:,} parameters trainable) "
        f"{config.defense_impl.training_note(config, run.key)} on {run.info.name}: "
        f"{len(run.train_set)} train / {len(run.test_set)} test images at {model.spec.image_size}px, "
        f"device {run.device}" + (f", {run.dist_env.world} processes" if run.dist_env.enabled else "")
    )


def _epoch(run: _Run, epoch: int, progress: bool) -> tuple[dict[str, Any], dict[str, float]]:
    """Train one epoch and evaluate: the history record and the test result."""
    config, dist_env = run.config, run.dist_env
    if isinstance(run.sampler, DistributedSampler):
        run.sampler.set_epoch(epoch)
    else:  # the order depends on (seed, epoch) only, so a resumed run sees the data a straight run would
        run.sampler.generator.manual_seed(config.seed * 1_000_003 + epoch)
    if run.noise is not None:  # likewise the noise: (seed, epoch, rank) only
        run.noise.manual_seed(noise_seed(config.seed, epoch, dist_env.rank))
    run.ddp_model.train()
    stats = _train_epoch(
        run.ddp_model,
        run.reference,
        run.loader,
        run.optimizer,
        run.scheduler,
        config,
        run.device,
        run.amp,
        progress=progress and dist_env.main,
        epoch=epoch,
        guard=run.guard,
        noise=run.noise,
    )
    loss_sum, seen, correct, sim_sum, seconds = dist_env.all_sum(
        stats["loss_sum"], stats["images"], stats["correct"], stats["sim_sum"], stats["seconds"]
    )
    batch_size = max(config.batch_size, 128)
    test = evaluate(
        run.model, run.test_set, batch_size=batch_size, device=run.device, workers=config.workers, dist_env=dist_env
    )
    record = {
        "epoch": epoch,
        "train_loss": loss_sum / max(seen, 1),
        "train_accuracy": correct / max(seen, 1),
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "images_per_s": seen / max(seconds / dist_env.world, 1e-9),
        "lr": run.scheduler.get_last_lr()[0],
    }
    if config.noise_aug:  # what the noise posture costs: the same test images under the same noise
        noisy = evaluate(
            run.model,
            run.test_set,
            batch_size=batch_size,
            device=run.device,
            workers=config.workers,
            dist_env=dist_env,
            noise=config.noise_aug,
            seed=config.seed,
        )
        record["noisy_test_accuracy"], record["noisy_test_loss"] = noisy["accuracy"], noisy["loss"]
    if run.reference is not None:
        record["ortho_similarity"] = sim_sum / max(seen, 1)
    return record, test


def _save(run: _Run, epoch: int, record: dict[str, Any], test: dict[str, float]) -> None:
    """The epoch's checkpoint (rank 0): weights, manifest, and the state a resumed run continues from."""
    config, info = run.config, run.info
    guard = run.guard
    save_checkpoint(
        run.out,
        run.model,
        epoch=epoch,
        finetune=run.recipe,
        data={
            "name": info.name,
            "source": info.source,
            "classes": list(info.classes),
            "train_images": len(run.train_set),
            "test_images": len(run.test_set),
        },
        training={
            "config": config.to_dict(),
            "learning_rate": config.learning_rate(run.family),
            "trainable_parameters": sum(p.numel() for p in run.params),
            "world_size": run.dist_env.world,
            "device": str(run.device),
        },
        metrics={
            "history": run.history,
            "test_accuracy": record["test_accuracy"],
            "test_images": test["images"],
            **(
                {"noise_aug": config.noise_aug, "noisy_test_accuracy": record["noisy_test_accuracy"]}
                if config.noise_aug
                else {}
            ),
        },
        state={
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
            **({"guard_rng": guard.generator.get_state(), "guard_turn": guard.turn} if guard else {}),
            "epoch": epoch,
        },
        sign=run.signer,
    )


def train(
    config: TrainConfig, *, progress: bool = True, log: Callable[[str], None] = print
) -> CheckpointManifest | None:
    """Fine-tune per ``config``; checkpoint every epoch into ``config.out``; return the final manifest (rank 0)."""
    dist_env = Distributed()
    device = resolve_device(config.device, dist_env)
    out = Path(config.out)
    _check_run(config, out, dist_env)
    key = _load_key(config.key_file)
    if config.key_fingerprint is not None and (key is None or key.fingerprint != config.key_fingerprint):
        raise KeyedgeError(
            f"{config.key_file} holds key {key.fingerprint if key else 'none'}, "
            f"not the expected key {config.key_fingerprint}",
            "restore the right key file; nothing was trained",
        )
    signer = _signer(config.sign_key)
    size = config.image_size or _default_size(config)
    config.defense_impl.check_training(config, size)
    train_set, info = load_dataset(config.data, "train", size, limit=config.train_limit, seed=config.seed)
    test_set, _ = load_dataset(config.data, "test", size, limit=config.test_limit, seed=config.seed)
    model, state, history, start_epoch = _start(config, out, key, info.num_classes)
    model.to(device)
    dist_env.setup(device)
    run = _Run(config, out, device, dist_env, key, model, train_set, test_set, info, history, start_epoch, state)
    run.signer = signer
    _optimize(run, log)
    if dist_env.main:
        _announce(run, log)
    for epoch in range(start_epoch, config.epochs + 1):
        record, test = _epoch(run, epoch, progress)
        run.history.append(record)
        if dist_env.main:
            noisy = (
                f", {record['noisy_test_accuracy']:.2%} under noise {config.noise_aug:g}" if config.noise_aug else ""
            )
            log(
                f"epoch {epoch}/{config.epochs}: train loss {record['train_loss']:.4f}, "
                f"test accuracy {record['test_accuracy']:.2%}{noisy} ({test['images']} images), "
                f"{record['images_per_s']:.0f} images/s"
            )
            _save(run, epoch, record, test)
        dist_env.barrier()
    return read_manifest(out) if dist_env.main else None


def _default_size(config: TrainConfig) -> int:
    import timm

    if not timm.is_model(config.model):
        check_model_name(config.model)
    return int(timm.get_pretrained_cfg(config.model).to_dict().get("input_size", (3, 224, 224))[-1])


def _train_epoch(
    model: nn.Module,
    reference: nn.Module | None,
    loader: DataLoader,
    optimizer,
    scheduler,
    config: TrainConfig,
    device: torch.device,
    amp: bool,
    *,
    progress: bool,
    epoch: int,
    guard=None,
    noise: torch.Generator | None = None,
) -> dict[str, float]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    totals = {"loss_sum": 0.0, "images": 0.0, "correct": 0.0, "sim_sum": 0.0, "seconds": 0.0}
    bar = Progress(
        TextColumn(f"epoch {epoch}/{config.epochs}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}", markup=False),
        console=Console(stderr=True),
        disable=not progress,
        transient=True,
    )
    with bar:
        task = bar.add_task("train", total=len(loader), info="")
        start = time.perf_counter()
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), torch.as_tensor(y).to(device, non_blocking=True)
            if guard is not None:
                x = guard(x, y)
            if noise is not None:  # after the guard: a deployed noise posture perturbs adversarial queries too
                x = add_noise(x, config.noise_aug, noise)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                if reference is not None:
                    x.requires_grad_(True)
                    logits, loss = config.defense_impl.logits_and_loss(model, x, y, config)
                    (grad,) = torch.autograd.grad(nn.functional.cross_entropy(logits, y), x, create_graph=True)
                    ref_grad = input_gradient(reference, x.detach(), y)
                    sim = gradient_similarity(grad.float(), ref_grad.float())
                    penalty = sim.abs().mean() if config.ortho_mode == "abs" else sim.mean()
                    objective = loss + config.ortho_lambda * penalty
                    totals["sim_sum"] += sim.detach().sum().item()
                else:
                    logits, loss = config.defense_impl.logits_and_loss(model, x, y, config)
                    objective = loss
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            scheduler.step()
            n = y.numel()
            totals["loss_sum"] += loss.item() * n
            totals["correct"] += (logits.detach().argmax(1) == y).sum().item()
            totals["images"] += n
            elapsed = time.perf_counter() - start
            bar.update(task, advance=1, info=f"loss {loss.item():.3f}  {totals['images'] / elapsed:.0f} img/s")
        totals["seconds"] = time.perf_counter() - start
    return totals
